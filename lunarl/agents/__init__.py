"""Agents, looked up by name: each is a module defining ``AGENT`` (a ``lunarl.agents.base.Agent``).

``get("ppo")`` returns PPO's ``Agent``. An agent that lives outside lunarl is named by its module
path instead (``agent.name=mypackage.my_agent``, a module that defines ``AGENT``), or registered
under a short name with ``register``.
"""

from __future__ import annotations

import importlib

from lunarl.agents.base import Agent

_AGENTS: dict[str, str] = {"ppo": "lunarl.agents.ppo", "sac": "lunarl.agents.sac", "dreamer": "lunarl.agents.dreamer.agent"}


def known() -> list[str]:
    """Names accepted by ``get`` besides module paths."""
    return sorted(_AGENTS)


def register(name: str, module: str) -> None:
    """Make ``get(name)`` load the ``AGENT`` of ``module`` (a dotted module path)."""
    _AGENTS[name] = module


def get(name: str) -> Agent:
    """The agent registered under ``name``, or the ``AGENT`` of module ``name``.

    Raises ``ValueError`` naming the known agents when there is neither.
    """
    module_name = _AGENTS.get(name, name if "." in name else None)
    hint = f"known agents: {known()} (or a module path 'package.module' that defines AGENT)"
    if module_name is None:
        raise ValueError(f"unknown agent {name!r}; {hint}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import agent module {module_name!r} ({e}); {hint}") from e
    agent = getattr(module, "AGENT", None)
    if not isinstance(agent, Agent):
        raise ValueError(f"module {module_name!r} defines no AGENT (a lunarl.agents.base.Agent); {hint}")
    return agent


__all__ = ["Agent", "get", "known", "register"]
