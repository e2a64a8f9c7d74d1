"""Process setup for one run across several processes (hosts, or one process per GPU).

JAX's own runtime does the work: ``jax.distributed.initialize`` connects the processes, after
which ``jax.devices()`` lists every process's devices and one ``jit`` runs over all of them
(each process feeds and holds only its own shards). ``initialize`` is called when

* ``run.coordinator_address``, ``run.num_processes`` and ``run.process_id`` are set (all three),
  e.g. two processes on one machine: ``run.coordinator_address=127.0.0.1:12355
  run.num_processes=2 run.process_id=0`` (and ``=1``); or
* the app runs under SLURM with more than one task (``SLURM_NTASKS > 1``, e.g. ``srun`` with one
  task per GPU): JAX reads the coordinator, process count and id from SLURM's variables.

Process 0 alone logs (console, ``metrics.jsonl``, wandb, TensorBoard) and writes
``config.yaml`` and videos; every process computes, saves its shards of each checkpoint
(Orbax's multi-process save) and restores. ``to_host`` and ``any_process`` are the two
host-side collectives the loop needs. On CPU the processes talk through gloo (JAX's default
CPU collectives).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lunarl.run.schema import ConfigError, RunSchema

__all__ = ["any_process", "check_cpu_devices", "initialize", "is_primary", "select_devices", "set_cpu_devices", "to_host"]


def _explicit(run: RunSchema) -> dict[str, Any] | None:
    given = {
        "coordinator_address": run.coordinator_address,
        "num_processes": run.num_processes,
        "process_id": run.process_id,
    }
    if all(v is None for v in given.values()):
        return None
    missing = [f"run.{k}" for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(
            "run.coordinator_address, run.num_processes and run.process_id go together; "
            f"missing {', '.join(missing)}"
        )
    if not 0 <= given["process_id"] < given["num_processes"]:
        raise ConfigError(f"run.process_id={given['process_id']} must be in [0, run.num_processes={given['num_processes']})")
    return given


def _slurm_tasks() -> int:
    try:
        return int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        return 1


def initialize(run: RunSchema) -> bool:
    """Connect this process to the others of the run when there are several (see the module
    docstring); True when it did. Call it before anything touches a JAX backend. Raises
    ``ConfigError`` for an incomplete ``run.coordinator_address/num_processes/process_id``."""
    explicit = _explicit(run)
    if explicit is None and _slurm_tasks() <= 1:
        return False
    if explicit is not None and explicit["num_processes"] == 1:
        return False
    if jax.distributed.is_initialized():
        return True
    if explicit is not None:
        jax.distributed.initialize(**explicit)
    else:
        jax.distributed.initialize()  # JAX detects the SLURM cluster from its environment
    return True


_CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def set_cpu_devices(run: RunSchema) -> None:
    """``run.cpu_devices=N``: XLA's CPU backend starts with N devices. Each device runs its
    programs on its own thread, so on a mesh whose ``data`` axis spans them every core steps its
    own share of the envs (worth it for envs whose step XLA:CPU runs on one thread, like MJX's at
    tens of envs). Call before anything starts a JAX backend; a value already in ``XLA_FLAGS``
    wins (``check_cpu_devices`` then reports the mismatch)."""
    if run.cpu_devices is None:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _CPU_DEVICES_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_CPU_DEVICES_FLAG}={run.cpu_devices}".strip()


def check_cpu_devices(run: RunSchema) -> None:
    """``ConfigError`` when the CPU backend did not start with ``run.cpu_devices`` devices."""
    if run.cpu_devices is None:
        return
    started = len(jax.local_devices(backend="cpu"))
    if started != run.cpu_devices:
        raise ConfigError(
            f"run.cpu_devices={run.cpu_devices}: JAX's CPU backend runs {started} device(s) "
            f"(started earlier in this process, or {_CPU_DEVICES_FLAG} in XLA_FLAGS says otherwise)"
        )


def is_primary() -> bool:
    """Whether this is process 0, the one that logs and writes files other than checkpoints."""
    return jax.process_index() == 0


def select_devices(spec: Any) -> list[jax.Device]:
    """The devices ``run.devices`` names: None = all (every process's, ``jax.devices()``), an
    int = the first that many, a list = the devices with those ids."""
    devices = jax.devices()
    if spec is None:
        return devices
    if isinstance(spec, bool):
        raise ConfigError(f"run.devices={spec!r}: use a number of devices, a list of device ids, or null for all")
    if isinstance(spec, int):
        if not 1 <= spec <= len(devices):
            raise ConfigError(f"run.devices={spec} must be between 1 and the {len(devices)} device(s) available")
        return devices[:spec]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        by_id = {d.id: d for d in devices}
        ids = list(spec)
        unknown = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or i not in by_id]
        if unknown or not ids or len(set(ids)) != len(ids):
            raise ConfigError(
                f"run.devices={ids}: give distinct ids of available devices ({sorted(by_id)})"
            )
        return [by_id[i] for i in ids]
    raise ConfigError(f"run.devices={spec!r}: use a number of devices, a list of device ids, or null for all")


def to_host(tree: Any) -> Any:
    """NumPy copies of a pytree of (possibly global) arrays, on every process. An array sharded
    over other processes' devices is gathered (every process must call this at the same point);
    local and replicated ones are read from this process's shards."""

    def fetch(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is True on any process (e.g. a stop signal one process received), so
    that all of them take the same branch; a collective when there are several processes."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
