"""What the command-line apps share: one-line errors, a quiet console, and Hydra's own errors
(bad overrides, missing config groups) turned into one line naming the key.

Hydra composes the config before lunarl's code runs and reports composition errors itself, in
several lines with a hint about ``HYDRA_FULL_ERROR``. ``run_app`` holds stderr back until the
task function starts (``release_stderr``); if Hydra exits before that, what it wrote becomes one
``app: error: ...`` line, and an unknown ``env.*`` / ``agent.*`` / other key gets a
"did you mean" from the config classes and schemas.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["StoppedExit", "fail", "known_keys", "normalize_overrides", "quiet_libraries", "release_stderr", "run_app"]


class StoppedExit(SystemExit):
    """An exit code that reports no error: a run stopped by a signal after its checkpoint, with the
    code a scheduler retries on (``run.stop_exit_code``). ``run_app`` keeps the run dir's files."""


def fail(app: str, message: str, code: int = 1) -> NoReturn:
    """Print ``app: error: message`` on stderr (one line, no traceback) and exit with ``code``."""
    release_stderr()
    # Straight to the real stream: a library thread may be writing a traceback through the
    # filter at this moment, and this line must not end up inside it.
    stream = _held.real if _held is not None else sys.stderr
    print(f"{app}: error: {' '.join(str(message).split())}", file=stream, flush=True)
    sys.exit(code)


def quiet_libraries() -> None:
    """Orbax and absl log every save at INFO, and JAX reports the TPU backend it did not find on
    every CPU/GPU machine; the console belongs to lunarl's own progress output."""
    for name in ("absl", "orbax", "botocore", "boto3", "s3transfer"):  # boto: "Found credentials in ..."
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedTaskFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_UnretrievedTaskFilter())
    # The same reads, when collected before they started, warn "coroutine ... was never awaited"
    # (seen once in a fresh-clone run, as two extra stderr lines under the one-line error).
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


class _UnretrievedTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records. After a failed Orbax read
    (a damaged checkpoint), TensorStore's sibling reads fail too and nobody awaits them; asyncio
    logs each with a traceback when the task is collected, which Hydra's handler prints on
    stdout. The read that was awaited has already raised, and the app reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


# --------------------------------------------------------------------------------------------
# Keys: every field of the env and agent config classes, and the app schemas
# --------------------------------------------------------------------------------------------


def _schema_keys(node: Any, prefix: str) -> set[str]:
    keys = set()
    for f in dataclasses.fields(node):
        key = f"{prefix}{f.name}"
        keys.add(key)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            keys |= _schema_keys(default, key + ".")
    return keys


def known_keys(schema: type) -> set[str]:
    """Every key a user may set: the schema's, and ``env.*`` / ``agent.*`` fields of every
    registered env and agent config class."""
    import lunarl.agents
    import lunarl.envs
    from lunarl.run.schema import ENV_RUN_KEYS

    keys = _schema_keys(schema, "")
    keys |= {f"env.{k}" for k in ENV_RUN_KEYS}
    for name in lunarl.envs.registered():
        keys |= {f"env.{f.name}" for f in dataclasses.fields(lunarl.envs.config_class(name))}
    for name in lunarl.agents.known():
        try:
            cls = lunarl.agents.get(name).config_class
        except ValueError:
            continue
        keys |= {"agent.name"} | {f"agent.{f.name}" for f in dataclasses.fields(cls) if f.name not in cls.HOST_FIELDS}
    return keys


#: Open maps whose entries a user adds with a plain ``key=value`` (the population's
#: ``ranges.agent.NAME`` / ``values.agent.NAME``): passed to Hydra as ``++key=value``.
OPEN_PREFIXES = ("population.ranges.", "population.values.")


def normalize_overrides(argv: Iterable[str], listed: set[str], appended_groups: tuple[str, ...] = ()) -> list[str]:
    """``+env.num_rocks=3`` -> ``env.num_rocks=3`` where the key is listed in ``conf/`` (Hydra
    refuses to append a key that exists), ``env.FIELD=...`` -> ``+env.FIELD=...`` for
    ``appended_groups`` whose node starts empty (the evaluate app's ``env`` variant), and
    ``population.ranges.agent.NAME=...`` -> ``++...`` (``OPEN_PREFIXES``: add or override)."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        group = key.lstrip("+").split(".")[0] if "." in key else None
        if key.lstrip("+").startswith(OPEN_PREFIXES) and "=" in arg:
            arg = "++" + arg.lstrip("+")
        elif group in appended_groups:
            if "=" in arg and not arg.startswith(("+", "-", "~")):
                arg = "+" + arg
        elif arg.startswith("+") and not arg.startswith("++") and key[1:] in listed:
            arg = arg[1:]
        out.append(arg)
    return out


# --------------------------------------------------------------------------------------------
# Hydra's errors as one line
# --------------------------------------------------------------------------------------------


_TRACEBACK = "Traceback (most recent call last):"
# TensorStore's threads call back into asyncio loops that Orbax has already closed, e.g. after
# a read of a damaged checkpoint failed; each prints a traceback ending in this line. They are
# harmless and say nothing a user can act on.
_NOISE = "RuntimeError: Event loop is closed"


class _HeldStream(io.TextIOBase):
    """Buffers writes until ``release``, then writes through to the real stream (handlers that
    captured this object while it was held keep working), dropping only tracebacks that end in
    ``_NOISE``. Several threads print such tracebacks at once, so lines are grouped per thread."""

    def __init__(self, real: Any):
        self.real = real
        self.held: list[str] | None = []
        self.blocks: dict[int, list[str]] = {}  # per thread: a traceback being collected
        self.partial: dict[int, str] = {}  # per thread: text after its last newline
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            if self.held is not None:
                self.held.append(text)
                return len(text)
            thread = threading.get_ident()
            for line in (self.partial.pop(thread, "") + text).splitlines(keepends=True):
                if line.endswith("\n"):
                    self._line(thread, line)
                elif thread in self.blocks or _TRACEBACK.startswith(line):
                    self.partial[thread] = line  # may be the start of a traceback: wait
                else:
                    self.real.write(line)
            return len(text)

    def _line(self, thread: int, line: str) -> None:
        block = self.blocks.get(thread)
        if block is None:
            if line.startswith(_TRACEBACK):
                self.blocks[thread] = [line]
            else:
                self.real.write(line)
            return
        block.append(line)
        if not line[:1].isspace() and not line.startswith(_TRACEBACK):  # the exception line
            del self.blocks[thread]
            if line.strip() != _NOISE:
                self.real.write("".join(block))

    def flush(self) -> None:
        if self.held is None:
            self.real.flush()

    def release(self) -> str:
        text = "".join(self.held or [])
        self.held = None
        return text

    def fileno(self) -> int:
        return self.real.fileno()

    def isatty(self) -> bool:
        return self.real.isatty()


_held: _HeldStream | None = None


def release_stderr() -> None:
    """Let stderr through again, writing what was held (call first thing in a task function)."""
    global _held
    if _held is not None and _held.held is not None:
        text = _held.release()
        if text:
            _held.real.write(text)
            _held.real.flush()


def one_line_hydra_error(text: str, keys: set[str]) -> str:
    """Hydra's multi-line error as one line; an unknown key gets a suggestion from ``keys``."""
    missing = re.search(r"Key '([^']+)' is not in struct\s+full_key: (\S+)", text)
    if missing is None:
        missing = re.search(r"Could not override '([^']+)'", text)
        full_key = missing.group(1) if missing and "No match in the defaults list" not in text else None
    else:
        full_key = missing.group(2)
    if full_key and full_key not in keys:
        group = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        candidates = sorted(k for k in keys if k.startswith(group))
        close = difflib.get_close_matches(full_key, candidates, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else (f"; known keys under {group[:-1]}: see --cfg job" if group else "")
        return f"unknown key {full_key}{hint}"
    group = re.search(r"Could not find '([^']+)'\s+Available options in '[^']+':\s*(.*?)\s*Config search path", text, re.S)
    if group:
        options = ", ".join(group.group(2).split())
        return f"no config {group.group(1)}; available: {options}"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    return "; ".join(lines) or "Hydra could not compose the config"


# What Hydra writes into a run dir before lunarl's code runs.
_HYDRA_FILES = (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log")


class _HydraFiles:
    """The files Hydra is about to (re)write in an existing run dir, as they were, so that a
    refused start leaves the run dir byte for byte as it found it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.existed = {d: d.exists() for d in (run_dir, run_dir / ".hydra")}
        self.files = {name: (run_dir / name).read_bytes() if (run_dir / name).is_file() else None for name in _HYDRA_FILES}

    def restore(self) -> None:
        """Best effort: a file another process changed meanwhile is left as it is."""
        for name, data in self.files.items():
            path = self.run_dir / name
            try:
                if data is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                elif path.is_file():
                    path.unlink()
            except OSError:
                pass
        for d in (self.run_dir / ".hydra", self.run_dir):
            try:
                if not self.existed[d] and d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            except OSError:
                pass


# Temporary dirs that libraries create when imported and delete at interpreter exit, which
# ``run_app``'s ``os._exit`` skips: wandb's media and artifact staging dirs (two per run, left in
# the system temp dir of every run and sweep job otherwise).
_LIBRARY_TEMP_DIRS = (("wandb.sdk.data_types._private", "MEDIA_TMP"), ("wandb.sdk.artifacts.artifact", "Artifact._TMP_DIR"))


def _remove_library_temp_dirs() -> None:
    """Delete the ``_LIBRARY_TEMP_DIRS`` of the modules this process imported (a missing module or
    attribute, e.g. another wandb version's layout, is skipped)."""
    for module, attribute in _LIBRARY_TEMP_DIRS:
        found: Any = sys.modules.get(module)
        for name in attribute.split("."):
            found = getattr(found, name, None)
        if isinstance(found, tempfile.TemporaryDirectory):
            try:
                found.cleanup()
            except OSError:  # never worth a traceback on the way out
                pass


def _explicit_run_dir(argv: list[str]) -> Path | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")]
    return Path(values[-1]) if values and not any(a in ("-m", "--multirun") for a in argv) else None


def run_app(app: str, hydra_main: Callable[[], Any], schema: type, appended_groups: tuple[str, ...] = (), protect_run_dir: bool = False) -> None:
    """Run a ``@hydra.main`` function with lunarl's argument handling and one-line errors.

    ``protect_run_dir``: when ``run.dir=PATH`` is given and the app exits with an error, put back
    the files Hydra wrote there (a refused resume must not touch an existing run).
    """
    global _held
    keys = known_keys(schema)
    sys.argv = [sys.argv[0], *normalize_overrides(sys.argv[1:], keys, appended_groups)]
    run_dir = _explicit_run_dir(sys.argv[1:]) if protect_run_dir else None
    hydra_files = _HydraFiles(run_dir) if run_dir is not None else None
    # Stays sys.stderr for the life of the process (its noise filter matters at exit too).
    _held = _HeldStream(sys.stderr)
    real, sys.stderr = sys.stderr, _held
    code = 0
    try:
        hydra_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        failed = bool(code) and not isinstance(e, StoppedExit)
        if _held.held is not None and failed:
            text = _held.release()
            print(f"{app}: error: {one_line_hydra_error(text, keys)}", file=real, flush=True)
        if hydra_files is not None and failed:
            logging.shutdown()  # Hydra's train.log handler writes nothing more
            hydra_files.restore()
    finally:
        release_stderr()
    # Leave without the interpreter's teardown: after a failed Orbax read, TensorStore's threads
    # call back into asyncio loops that are gone and print pages of tracebacks while Python shuts
    # down. Everything that matters was closed explicitly (wandb finished, checkpoints waited
    # for and closed by the loop); flush what was printed and exit with the app's code.
    logging.shutdown()
    _remove_library_temp_dirs()
    for stream in (sys.stdout, real):
        stream.flush()
    os._exit(code)
