"""Pure-JAX environments and their registry.

``make("rover", num_rocks=5)`` builds an env with validated overrides; ``registered()`` lists the
names. Env modules are imported on first use, so importing lunarl does not pull in MuJoCo.
"""

from __future__ import annotations

import importlib
from typing import Any

from lunarl.envs.base import (
    AutoResetWrapper,
    EnvConfig,
    LunarEnv,
    State,
    bounded,
    wrap_for_training,
)

# name -> "module:Class"; the module is imported only when the env is made.
_REGISTRY: dict[str, str] = {
    "rover": "lunarl.envs.rover:Rover",
    "car_track": "lunarl.envs.car_track:CarTrack",
    "kuka": "lunarl.envs.kuka:Kuka",
}


def registered() -> list[str]:
    """Names accepted by ``make`` whose module is present in this install."""
    names = []
    for name, target in _REGISTRY.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            names.append(name)
    return names


def env_class(name: str) -> type[LunarEnv]:
    """The env class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown env {name!r}; registered envs: {registered()}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def config_class(name: str) -> type[EnvConfig]:
    """The frozen config dataclass of env ``name`` (its fields are the allowed overrides)."""
    return env_class(name).config_cls


def make(name: str, **overrides: Any) -> LunarEnv:
    """Build env ``name`` with config ``overrides``; bad overrides raise ``ValueError``."""
    return env_class(name)(**overrides)


def register(name: str, target: str) -> None:
    """Register an env class given as ``"package.module:Class"`` (for envs outside lunarl)."""
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:Class', got {target!r}")
    _REGISTRY[name] = target


__all__ = [
    "AutoResetWrapper",
    "EnvConfig",
    "LunarEnv",
    "State",
    "bounded",
    "config_class",
    "env_class",
    "make",
    "register",
    "registered",
    "wrap_for_training",
]
