"""``python -m lunarl.train +experiment=NAME [key=value ...]``: train an agent, Hydra-composed.

The config tree is ``conf/`` (``config.yaml`` and its groups); the resolved config, the metrics
(``metrics.jsonl``), wandb files and Orbax checkpoints all land in ``run.dir``. Running again with
the same ``run.dir`` resumes from its latest checkpoint. Sweeps: ``-m seed=0,1,2`` (every job gets
``<run.dir>/<job number>``; wandb groups them by ``logger.wandb.group``, the experiment name).

Exit codes: 0 finished, or stopped by SIGINT/SIGTERM after saving a checkpoint (run again to
resume; ``run.stop_exit_code`` makes such a stop exit with another code, for schedulers that
retry on it); 1 a bad config, override or checkpoint (one-line message naming the key or path);
3 training diverged (NaN/inf; the last good checkpoint is kept); 4 every checkpoint of the run is
damaged (the run dir is left as it was); 5 checkpoints that belong in ``s3://`` could not be
uploaded within ``checkpoint.upload_timeout`` (they stay in ``<run.dir>/checkpoints``; running
again with the same ``run.dir`` uploads them). A damaged latest checkpoint with an intact older one is
moved aside to ``checkpoints/corrupt/`` and the run resumes from the older one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lunarl.run.cli import StoppedExit, fail, quiet_libraries, release_stderr, run_app
from lunarl.run.objective import read_objective
from lunarl.run.schema import ConfigError, TrainSchema, register_schemas, validate_train

__all__ = ["main"]

EXIT_CONFIG_ERROR = 1
EXIT_DIVERGED = 3
EXIT_NO_INTACT_CHECKPOINT = 4
EXIT_UPLOAD_FAILED = 5

register_schemas()


def _created_dir(path: str) -> str:
    """``${created_dir:PATH}``: PATH, created if missing. Optuna opens its SQLite study in the
    sweep dir (conf/hydra/sweeper/optuna_tpe.yaml) before Hydra creates that dir."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


OmegaConf.register_new_resolver("created_dir", _created_dir, replace=True)


def _remove_if_empty_run(run_dir: Path) -> None:
    """Hydra creates the run dir (``.hydra/``, ``train.log``) before we validate; after a config
    error, delete what it wrote unless the dir holds anything else (a run being resumed)."""
    hydra_files = {".hydra", "train.log"}  # written by Hydra before the task function runs
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - hydra_files:
        return
    for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"):
        (run_dir / name).unlink(missing_ok=True)
    for d in (run_dir / ".hydra", run_dir):
        try:
            d.rmdir()
        except OSError:
            return


def run(cfg: DictConfig, run_dir: Path, job_label: str, multirun: bool = False) -> int:
    """Validate, then train; returns the process exit code. In a ``multirun`` a diverged job
    returns its code instead of ending the process, so the sweep goes on with its next job."""
    # Hydra already created run_dir (its output dir); make run.dir name it exactly, so that
    # checkpoint.dir (``${run.dir}/checkpoints``) follows it, in multirun jobs too.
    cfg.run.dir = str(run_dir)
    try:
        plan = validate_train(cfg)
    except ConfigError as e:
        _remove_if_empty_run(run_dir)
        fail("lunarl.train", str(e), EXIT_CONFIG_ERROR)
    config = OmegaConf.to_container(cfg, resolve=True)

    import jax

    from lunarl.run import distributed

    try:
        # Before anything touches a JAX backend (building some envs does).
        distributed.set_cpu_devices(plan.cfg.run)
        distributed.initialize(plan.cfg.run)
        distributed.check_cpu_devices(plan.cfg.run)
    except ConfigError as e:
        _remove_if_empty_run(run_dir)
        fail("lunarl.train", str(e), EXIT_CONFIG_ERROR)

    from lunarl.run.placement import MeshTooWide, Placement

    try:
        placement = Placement.for_run(
            plan.num_rows, plan.agent_config.num_envs, distributed.select_devices(plan.cfg.run.devices)
        )
    except ConfigError as e:
        _remove_if_empty_run(run_dir)
        fail("lunarl.train", str(e), EXIT_CONFIG_ERROR)
    except MeshTooWide as e:
        _remove_if_empty_run(run_dir)
        fail(
            "lunarl.train",
            f"env.num_envs={plan.agent_config.num_envs} (agent.num_envs) must be a multiple of the data axis: "
            f"{e}; change env.num_envs or run.devices={plan.cfg.run.devices}",
            EXIT_CONFIG_ERROR,
        )

    from lunarl.run.checkpoint import CheckpointError, CheckpointUploadFailed
    from lunarl.run.preflight import preflight, state_bytes
    from lunarl.run.programs import state_shapes

    env, agent = plan.env_and_agent()
    if plan.population is not None:  # members x seeds rows of the population's agent
        agent = plan.population.agent(agent)
    size = state_bytes(state_shapes(agent, env, plan.agent_config, plan.num_rows))
    try:
        preflight(plan, run_dir, size)
    except ConfigError as e:
        _remove_if_empty_run(run_dir)
        fail("lunarl.train", str(e), EXIT_CONFIG_ERROR)
    from lunarl.run.logger import ConsoleProgress, JsonlWriter, RunLogger, TensorBoardLogger, WandbLogger
    from lunarl.run.loop import NoIntactCheckpoint, TrainingDiverged, train

    # Only process 0 logs (console, metrics.jsonl, wandb, TensorBoard); the others compute.
    primary = distributed.is_primary()
    wb = plan.cfg.logger.wandb
    logger = RunLogger(
        JsonlWriter(run_dir / "metrics.jsonl", enabled=primary),
        WandbLogger(
            wb.mode if primary else "disabled", wb.project, wb.entity, wb.group, wb.tags,
            f"{plan.cfg.name}:{job_label}", run_dir, config,
        ),  # fmt: skip
        ConsoleProgress(
            plan.total_iterations * plan.steps_per_iteration, 0, plan.cfg.logger.console and primary, plan.num_rows
        ),
        TensorBoardLogger(run_dir / "tensorboard") if plan.cfg.logger.tensorboard and primary else None,
        quiet=not primary,
    )
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    logger.print(f"lunarl.train on {jax.default_backend()} ({jax.device_count()} device(s){processes}), run dir {run_dir}")
    code = 0
    try:
        if train(plan, run_dir, config, logger, placement).status == "interrupted":
            code = plan.cfg.run.stop_exit_code
    except NoIntactCheckpoint as e:
        code = EXIT_NO_INTACT_CHECKPOINT
        logger.close(code)
        fail("lunarl.train", str(e), code)
    except CheckpointUploadFailed as e:
        code = EXIT_UPLOAD_FAILED
        logger.close(code)
        fail("lunarl.train", str(e), code)
    except CheckpointError as e:
        code = EXIT_CONFIG_ERROR
        logger.close(code)
        fail("lunarl.train", str(e), code)
    except TrainingDiverged as e:
        code = EXIT_DIVERGED
        logger.close(code)
        if not multirun:
            fail("lunarl.train", str(e), code)
        print(f"lunarl.train: error: {' '.join(str(e).split())} (the sweep goes on)", file=sys.stderr, flush=True)
        return code
    logger.close(0)  # a stop with its checkpoint is no failure, whatever code the scheduler wants
    return code


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one run (one job of a multirun); returns its ``run.objective`` for a sweeper
    (``lunarl.run.objective``: of a diverged job, the evaluations logged before it diverged)."""
    release_stderr()  # Hydra composed the config: its errors are behind us
    quiet_libraries()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    label = run_dir.name if hc.mode == RunMode.RUN else f"{run_dir.parent.name}/{run_dir.name}"
    sweeper = hc.sweeper
    if "optuna" in str(sweeper.get("_target_", "")) and str(sweeper.get("direction")).split(".")[-1] != "maximize":
        fail("lunarl.train", f"hydra.sweeper.direction={sweeper.get('direction')}: run.objective is maximised; "
             "use hydra/sweeper=optuna_tpe or set hydra.sweeper.direction=maximize", EXIT_CONFIG_ERROR)
    code = run(cfg, run_dir, label, multirun=hc.mode == RunMode.MULTIRUN)
    if code and hc.mode == RunMode.RUN:  # a multirun goes on with its next job
        raise StoppedExit(code)
    return read_objective(run_dir / "metrics.jsonl", cfg.run.objective, cfg.run.eval_episodes, cfg.num_seeds)


if __name__ == "__main__":
    run_app("lunarl.train", main, TrainSchema, protect_run_dir=True)
