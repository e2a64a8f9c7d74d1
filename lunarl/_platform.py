"""XLA settings: process-wide defaults applied on ``import lunarl``, and per-program options.

XLA:CPU's fusion emitters help some programs and cripple others (the measurements are in
``scripts/results/xla_cpu_notes.md``):

* MJX is orders of magnitude slower with them on, so ``configure_xla`` turns them off for the
  whole process before JAX starts: whatever a user jits by hand stays usable.
* Small MLPs, and so PPO's iteration on the rover and the car track, run faster with them on.
  So lunarl's own training and evaluation programs are compiled with ``compile_options(env)``,
  which turns them back on for envs that declare ``cpu_fusion_emitters = True`` (every env but
  the MJX one).

A user who sets ``--xla_cpu_use_fusion_emitters`` in ``XLA_FLAGS`` keeps their value everywhere.
The options only concern the CPU backend; on GPU ``compile_options`` is empty.
"""

from __future__ import annotations

import os
from typing import Any

_FLAG = "--xla_cpu_use_fusion_emitters"


def _user_set_flag() -> bool:
    return _FLAG in os.environ.get("LUNARL_USER_XLA_FLAGS", "")


def configure_xla() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    # Remember what the user asked for before we add our default (re-imports see our flag).
    os.environ.setdefault("LUNARL_USER_XLA_FLAGS", flags)
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}=false".strip()


def set_process_fusion_emitters(on: bool) -> bool:
    """Turn the fusion emitters on or off for every program of this process, unless the user set
    the flag; returns the setting in force. Only effective before JAX starts its backend (for
    scripts that must give code they do not compile themselves, e.g. Brax's trainer, the setting
    lunarl's own programs get)."""
    if _user_set_flag():
        return f"{_FLAG}=true" in os.environ["LUNARL_USER_XLA_FLAGS"].lower()
    flags = os.environ.get("XLA_FLAGS", "")
    kept = [f for f in flags.split() if not f.startswith(_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"{_FLAG}={str(on).lower()}"])
    return on


def compile_options(env: Any) -> dict[str, Any]:
    """``jax.jit(..., compiler_options=...)`` for a program that steps ``env`` (see the module doc)."""
    import jax

    if jax.default_backend() != "cpu" or _user_set_flag():
        return {}
    return {"xla_cpu_use_fusion_emitters": bool(getattr(env, "cpu_fusion_emitters", False))}
