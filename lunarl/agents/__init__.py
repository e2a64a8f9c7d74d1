"""Agents: modules exposing ``CONFIG_CLASS``, ``init``, ``train_step``, ``policy_params`` and
``make_policy`` (see ``lunarl.agents.ppo``), looked up by name with ``get``."""

from __future__ import annotations

import importlib
from types import ModuleType

_AGENTS: dict[str, str] = {"ppo": "lunarl.agents.ppo"}


def known() -> list[str]:
    """Names accepted by ``get``."""
    return sorted(_AGENTS)


def get(name: str) -> ModuleType:
    """The agent module registered under ``name``; unknown names raise ``ValueError``."""
    if name not in _AGENTS:
        raise ValueError(f"unknown agent {name!r}; known agents: {known()}")
    return importlib.import_module(_AGENTS[name])


__all__ = ["get", "known"]
