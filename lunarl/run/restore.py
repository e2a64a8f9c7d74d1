"""Loading a trained run back from its checkpoints, for evaluation and analysis.

``restore_run(checkpoint_dir, "best")`` reads the config saved with the checkpoint, rebuilds the
env and agent from it, and restores the TrainState onto this machine's devices. ``lunarl.evaluate``
and the scripts use it; the train loop restores its own resume target.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lunarl.agents.base import Agent
from lunarl.envs.base import LunarEnv
from lunarl.run.checkpoint import Checkpoints
from lunarl.run.placement import Placement
from lunarl.run.programs import abstract_state
from lunarl.run.schema import ConfigError, Plan, validate_train

__all__ = ["SavedRun", "checkpoint_dir_of", "restore_run"]


@dataclasses.dataclass(frozen=True)
class SavedRun:
    plan: Plan  # the run's validated config, as saved with the checkpoint
    env: LunarEnv
    agent: Agent
    state: Any  # seed-stacked TrainState
    meta: dict[str, Any]  # iteration, global_step (and score for best)
    placement: Placement


def checkpoint_dir_of(run_dir: Path) -> str:
    """Where a run wrote its checkpoints: ``checkpoint.dir`` of its resolved ``config.yaml``
    (which may be ``s3://...``), else ``RUN_DIR/checkpoints``. A checkpoint dir that was inside
    the run dir is found inside ``run_dir`` wherever the run dir has been moved or copied to."""
    run_dir = Path(run_dir)
    resolved = run_dir / "config.yaml"
    if not resolved.exists():
        return str(run_dir / "checkpoints")
    try:
        saved = OmegaConf.load(resolved)
        directory, saved_run_dir = OmegaConf.select(saved, "checkpoint.dir"), OmegaConf.select(saved, "run.dir")
    except Exception:
        directory = saved_run_dir = None
    if not isinstance(directory, str):
        raise ConfigError(f"{resolved} is not a lunarl train config (it has no checkpoint.dir); pass checkpoint_dir=PATH")
    if isinstance(saved_run_dir, str) and "://" not in directory and Path(directory).is_relative_to(saved_run_dir):
        return str(run_dir / Path(directory).relative_to(saved_run_dir))
    return directory


def restore_run(checkpoint_dir: str, which: str | int = "latest", staging: str | None = None) -> SavedRun:
    """Restore checkpoint ``which`` (latest, best or an iteration) of the run in ``checkpoint_dir``.

    An ``s3://`` dir is read through a local copy: that checkpoint is downloaded into ``staging``
    (default: ``~/.cache/lunarl/s3/<bucket>/<prefix>``) unless it is there already; nothing is
    written to the bucket. Raises ``CheckpointError`` (missing or unfit checkpoint, unreachable
    bucket) and ``ConfigError`` (a saved config this version cannot read), each naming the path
    or key.
    """
    ckpts = Checkpoints(checkpoint_dir, create=False, staging=staging, pull=(which,))
    try:
        plan = validate_train(OmegaConf.create(ckpts.read(which, "config")))
        env, agent = plan.env_and_agent()
        if plan.population is not None:  # a population run: members x seeds rows of its agent
            agent = plan.population.agent(agent)
        placement = Placement.for_seeds(plan.num_rows)
        target = abstract_state(agent, env, plan.agent_config, plan.num_rows, placement)
        state, _, meta = ckpts.restore(which, target)
    finally:
        ckpts.close()
    return SavedRun(plan, env, agent, state, meta, placement)
