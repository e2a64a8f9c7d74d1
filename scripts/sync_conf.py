"""Keep ``conf/env/*.yaml`` and ``conf/agent/*.yaml`` listing every field of their config classes.

Every field of an env's or agent's config class is an ordinary Hydra key (``env.num_rocks=3``,
no ``+``), listed by ``python -m lunarl.train --cfg job`` with its default; that needs the field
in the group's yaml. This script rewrites each file's field block from the dataclass, in field
order, keeping the value already in the yaml (a file may choose its own default), the file's header
comment and a comment written after a key; new fields get the class default, and a field without
a comment gets its ``bounded`` doc.

    python scripts/sync_conf.py            # rewrite what drifted
    python scripts/sync_conf.py --check    # exit 1 naming what drifted (the test suite runs this)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml

import lunarl
import lunarl.agents
from lunarl.run.schema import ENV_RUN_KEYS

CONF = Path(__file__).resolve().parent.parent / "conf"


def _yaml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix(" ...")


def render(path: Path, group: str) -> str:
    """The file as it should be: header comment, the app's keys, then every config field."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    # A comment already written after a key is kept (it may say more than the field's doc).
    comments = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if sep and not line.startswith((" ", "#")) and "#" in rest:
            comments[key.strip()] = rest.split("#", 1)[1].strip()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    name = data.get("name")
    if group == "env":
        cls = lunarl.envs.config_class(name)
        app_keys = [k for k in ENV_RUN_KEYS]
        skip: set[str] = set()
    else:
        cls = lunarl.agents.get(name).config_class
        app_keys = ["name"]
        skip = set(cls.HOST_FIELDS)
    lines = [*header]
    for key in app_keys:
        value = data.get(key)
        note = comments.get(key, "null = the env's default_episode_length" if key == "episode_length" else "")
        lines.append(f"{key}: {_yaml_value(value)}" + (f"   # {note}" if note else ""))
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = data.get(f.name, f.default)
        doc = comments.get(f.name, f.metadata.get("doc", ""))
        lines.append(f"{f.name}: {_yaml_value(value)}" + (f"   # {doc}" if doc else ""))
    return "\n".join(lines) + "\n"


def drifted(paths: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    return [(p, new) for p, g in paths if (new := render(p, g)) != p.read_text()]


def conf_files() -> list[tuple[Path, str]]:
    return [(p, group) for group in ("env", "agent") for p in sorted((CONF / group).glob("*.yaml"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the files that drifted")
    args = parser.parse_args(argv)
    changes = drifted(conf_files())
    for path, new in changes:
        if args.check:
            print(f"{path.relative_to(CONF.parent)} does not list its config class's fields as they are; "
                  "run python scripts/sync_conf.py", file=sys.stderr)
        else:
            path.write_text(new)
            print(f"rewrote {path.relative_to(CONF.parent)}")
    return 1 if (args.check and changes) else 0


if __name__ == "__main__":
    sys.exit(main())
