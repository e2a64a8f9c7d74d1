"""Checks before a training run starts anything (wandb, compiles): the places it writes to.

Each failure is a ``ConfigError`` with one line naming the key or path: the run dir and the
checkpoint dir must be creatable and writable (a probe file is written and removed), the
checkpoint dir's disk must have room for two checkpoints of this run's state (its size read from
the abstract state; Orbax compresses, so this errs on the safe side), and a ``config.yaml``
already in the run dir must be a lunarl train config (never overwrite someone else's file).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import jax
from omegaconf import OmegaConf

from lunarl.run.schema import ConfigError, Plan

__all__ = ["preflight", "state_bytes"]

# Named per process: the processes of a multi-process run probe the same directories at once.
_PROBE = f".lunarl-write-probe-{socket.gethostname()}-{os.getpid()}"


def state_bytes(shapes: Any) -> int:
    """Bytes of a pytree of ``ShapeDtypeStruct``s (or arrays)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def _writable_dir(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / _PROBE
        probe.write_text("lunarl checks that it can write here\n")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}={path} is not a writable directory: {e.strerror or e}") from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_existing_config(run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise ConfigError(f"run.dir={run_dir} holds a config.yaml that is not YAML ({' '.join(str(e).split())[:120]}); use another run.dir") from None
    if not isinstance(saved, dict) or not {"env", "agent", "run", "checkpoint"} <= saved.keys():
        raise ConfigError(f"run.dir={run_dir} holds a config.yaml that is not a lunarl train config; use another run.dir")


def preflight(plan: Plan, run_dir: Path, state_size: int) -> None:
    """Raise ``ConfigError`` unless the run can write its run dir and its checkpoints.

    ``state_size``: bytes of the seed-stacked TrainState (``state_bytes(state_shapes(...))``).
    """
    _check_existing_config(run_dir)
    _writable_dir(run_dir, "run.dir")
    ckpt, key = plan.cfg.checkpoint.dir, "checkpoint.dir"
    if "://" in ckpt:
        # S3 is reached when the checkpoints are opened (credentials and bucket are checked
        # there); Orbax writes to the staging dir first, so that is what needs room.
        from lunarl.run.remote import parse_s3_url

        try:
            parse_s3_url(ckpt)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ckpt, key = str(run_dir / "checkpoints"), "the staging dir of the s3:// checkpoint.dir"
    ckpt_dir = Path(ckpt)
    _writable_dir(ckpt_dir, key)
    free = shutil.disk_usage(ckpt_dir).free
    needed = 2 * state_size
    if free < needed:
        raise ConfigError(
            f"{key}={ckpt_dir} has {_human(free)} free; two checkpoints of this run's state "
            f"need up to {_human(needed)} (lower env.num_envs or the agent's buffer sizes, or free space)"
        )
