"""The host loop: compiled chunks of training iterations, then log, evaluate and checkpoint.

One chunk is ``run.log_every`` iterations of the agent's ``train_step`` under ``lax.scan``,
vmapped over seeds, compiled once ahead of time (``lunarl.run.programs``); between chunks the
host reduces the chunk's metrics, evaluates the deterministic policy, saves checkpoints and
checks for a stop request. Nothing random happens on the host: training randomness lives in the
TrainState and evaluation keys are derived from ``seed`` and the iteration, so a resumed run ends
bit-identical to one that never stopped. Nothing here knows which agent it trains.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
from omegaconf import OmegaConf

from lunarl.agents.base import Agent
from lunarl.run.checkpoint import CheckpointDamaged, CheckpointError, Checkpoints
from lunarl.run.distributed import any_process, is_primary, select_devices, to_host
from lunarl.run.evaluation import eval_keys, eval_row, make_evaluator
from lunarl.run.logger import RunLogger
from lunarl.run.metrics import first_bad_metric, reduce_chunk
from lunarl.run.numerics import describe_change, numerics_fingerprint
from lunarl.run.placement import Placement
from lunarl.run.population import PopulationRun
from lunarl.run.programs import abstract_state, init_state, make_chunk, seed_keys
from lunarl.run.schema import Plan
from lunarl.run.signals import GracefulStop
from lunarl.run.video import VideoRecorder, video_name

__all__ = ["NoIntactCheckpoint", "TrainResult", "TrainingDiverged", "train"]


class TrainingDiverged(RuntimeError):
    """NaN or inf in the metrics or parameters; the last good checkpoint is kept."""


class NoIntactCheckpoint(CheckpointError):
    """Every checkpoint of the run is damaged; the run dir is left as it was."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    status: str  # "finished" | "interrupted" | "already-finished"
    iteration: int
    global_step: int
    state: Any


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every step of the loop reads: the plan and the objects built from it."""

    plan: Plan
    env: Any
    agent: Agent
    placement: Placement
    ckpts: Checkpoints
    logger: RunLogger
    config: Mapping[str, Any]
    run_dir: Path | None = None
    videos: VideoRecorder | None = None  # when run.video_every > 0
    population: PopulationRun | None = None  # with population.*: the rows are members x seeds
    # lunarl.run.numerics: the stack this process computes on, saved with every checkpoint
    numerics: Mapping[str, str] = dataclasses.field(default_factory=numerics_fingerprint)

    def meta(self, iteration: int) -> dict[str, Any]:
        return {"iteration": iteration, "global_step": iteration * self.plan.steps_per_iteration}

    def checkpoint_meta(self, iteration: int) -> dict[str, Any]:
        return {**self.meta(iteration), "numerics": dict(self.numerics)}


def train(
    plan: Plan, run_dir: Path, config: Mapping[str, Any], logger: RunLogger, placement: Placement | None = None
) -> TrainResult:
    """Train (or resume) the run described by ``plan``; ``config`` is the resolved config saved
    with every checkpoint; ``placement`` defaults to the mesh over ``run.devices``. Raises
    ``TrainingDiverged`` and ``CheckpointError``. With several processes every one calls this;
    only process 0's ``logger`` writes."""
    cfg, total, every = plan.cfg, plan.total_iterations, plan.cfg.run.log_every
    env, agent = plan.env_and_agent()
    # A hyperparameter population trains plan.num_rows rows of its wrapped agent (lunarl.run.population).
    population = PopulationRun(plan.population, agent, run_dir, is_primary()) if plan.population is not None else None
    agent = population.agent if population is not None else agent
    # An s3:// checkpoint.dir is staged in RUN_DIR/checkpoints (lunarl.run.remote).
    ckpts = Checkpoints(
        cfg.checkpoint.dir, cfg.checkpoint.max_to_keep, staging=str(run_dir / "checkpoints"),
        upload_timeout=cfg.checkpoint.upload_timeout, report=logger.print,
    )  # fmt: skip
    videos = VideoRecorder(agent, env, plan.agent_config, cfg.run.video_format) if cfg.run.video_every else None
    if placement is None:
        placement = Placement.for_run(plan.num_rows, plan.agent_config.num_envs, select_devices(cfg.run.devices))
    run = _Run(plan, env, agent, placement, ckpts, logger, config, run_dir, videos, population)
    try:
        ts, iteration = _resume_or_init(run)
        # Only now (a refused resume must not touch it): the config as it runs, resolved.
        # Hydra's .hydra/config.yaml keeps the interpolations.
        if is_primary():
            OmegaConf.save(OmegaConf.create(dict(config)), run_dir / "config.yaml")
        logger.console.start_at(iteration * plan.steps_per_iteration)
        if iteration >= total:
            logger.print(f"run already finished: iteration {iteration} of {total}")
            return TrainResult("already-finished", iteration, run.meta(iteration)["global_step"], ts)
        t0 = time.perf_counter()
        chunk = make_chunk(agent, env, every, run.placement).lower(ts).compile()
        evaluate = _compile_evaluator(run, ts) if cfg.run.eval_every else None
        logger.print(
            f"{plan.env_name} x {plan.agent_config.num_envs} envs x {cfg.num_seeds} seed(s), {agent.name}: "
            f"{total} iterations of {plan.steps_per_iteration:,} env steps in chunks of {every} "
            f"(compiled in {time.perf_counter() - t0:.1f}s); {run.placement.describe()}; run dir {run_dir}"
            + (f"; {plan.population.describe()}" if population is not None else "")
        )
        status = "finished"
        with GracefulStop() as stop:
            while iteration < total:
                ts, iteration = _train_chunk(run, chunk, ts, iteration)
                last = iteration >= total
                # Every process must stop at the same chunk, whichever of them got the signal.
                stopping = any_process(stop.requested is not None)
                if evaluate is not None and (iteration % cfg.run.eval_every == 0 or last):
                    _evaluate(run, evaluate, ts, iteration)
                if population is not None:  # PBT, when due: after the evaluation, before the checkpoint
                    ts = population.after_evaluation(ts, iteration, total, run.meta(iteration), logger.print)
                if iteration % cfg.run.checkpoint_every == 0 or last or stopping:
                    ckpts.save(iteration, ts, config, run.checkpoint_meta(iteration))
                if stopping and not last:
                    status = "interrupted"
                    break
        ckpts.wait()
        if status == "interrupted":
            logger.print(
                f"stopped by {stop.requested or 'a signal to another process'} at iteration {iteration}/{total}; checkpoint saved in "
                f"{ckpts.where}. Run again with run.dir={run_dir} to resume."
            )
        else:
            logger.print(
                f"finished {total} iterations ({total * plan.steps_per_iteration:,} env steps per seed); "
                f"checkpoints in {ckpts.where}"
            )
        return TrainResult(status, iteration, run.meta(iteration)["global_step"], ts)
    finally:
        ckpts.wait()
        ckpts.close()


def _record_video(run: _Run, ts: Any, iteration: int) -> None:
    """One deterministic episode of seed 0's policy to ``<run.dir>/videos/``, logged to wandb.

    Drawn on the host after the evaluation (the training chunk is untouched); its cost is logged
    as ``perf/video_seconds`` and printed, split into rollout, drawing and encoding.
    """
    assert run.videos is not None and run.run_dir is not None
    meta = run.meta(iteration)
    # Gathered on every process (a collective), drawn by process 0 alone.
    params = jax.tree.map(lambda x: x[0], to_host(jax.vmap(run.agent.policy_params)(ts)))
    if not is_primary():
        return
    key = eval_keys(run.plan.cfg.seed, iteration, run.plan.cfg.num_seeds)[0]
    path = run.run_dir / "videos" / video_name(meta["global_step"], run.videos.fmt)
    video = run.videos.record(params, key, path)
    run.logger.log_video("eval/video", video.path, meta["global_step"])
    run.logger.log({**meta, "perf/video_seconds": video.seconds}, progress=False)
    run.logger.print(f"video @ {meta['global_step']:,} steps: {video.describe()}")


def _resume_or_init(run: _Run) -> tuple[Any, int]:
    """The latest checkpoint's state and iteration, or a fresh state at iteration 0."""
    plan, num_seeds, population = run.plan, run.plan.num_rows, run.population
    start = run.ckpts.latest_step()
    if start is None:
        keys = population.keys(plan.cfg.seed) if population is not None else seed_keys(plan.cfg.seed, num_seeds)
        ts = init_state(run.agent, run.env, plan.agent_config, jax.device_put(keys, run.placement.seeds), run.placement)
        if population is not None:
            ts = population.start(ts, 0)
        return ts, 0
    target = abstract_state(run.agent, run.env, plan.agent_config, num_seeds, run.placement)
    ts, meta = _restore_newest_intact(run, target)
    start = meta["iteration"]
    if population is not None:
        ts = population.start(ts, start)
    dropped = run.logger.jsonl.drop_after(start)
    if run.logger.tensorboard is not None:
        run.logger.tensorboard.purge_after(meta["global_step"])
    run.logger.print(
        f"resuming from checkpoint at iteration {start} (env step {meta['global_step']:,}) "
        f"in {run.ckpts.where}" + (f"; dropped {dropped} metric rows logged after it" if dropped else "")
    )
    change = describe_change(meta.get("numerics"), run.numerics)
    if change:
        run.logger.print(
            f"iteration {start} was saved on another machine or install ({change}); the run continues, "
            "but will not end bit-identical to one that never stopped (lunarl.run.numerics)"
        )
    return ts, start


def _restore_newest_intact(run: _Run, target: Any) -> tuple[Any, dict]:
    """The newest latest-checkpoint that reads back intact. Damaged newer ones are moved aside to
    ``corrupt/`` only once an intact one is found; with none intact nothing is touched and
    ``NoIntactCheckpoint`` is raised."""
    damaged: list[CheckpointDamaged] = []
    for step in sorted(run.ckpts.latest.all_steps(), reverse=True):
        try:
            ts, _, meta = run.ckpts.restore(step, target, config=run.config)
        except CheckpointDamaged as e:
            damaged.append(e)
            continue
        for e in damaged:
            moved = run.ckpts.quarantine("latest", e.step)
            run.logger.print(f"{e}; moved it to {moved}; resuming from iteration {step}")
        return ts, meta
    reasons = "; ".join(f"iteration {e.step}: {e.reason}" for e in damaged)
    raise NoIntactCheckpoint(
        f"no intact checkpoint in {run.ckpts.directory / 'latest'} ({reasons}); nothing was changed. "
        "Move that directory aside to start over, or use a new run.dir."
    )


def _compile_evaluator(run: _Run, ts: Any) -> Any:
    params = jax.vmap(run.agent.policy_params)(ts)
    evaluator = make_evaluator(run.agent, run.env, run.plan.agent_config, run.plan.cfg.run.eval_episodes)
    return evaluator.lower(params, _eval_keys(run, 0)).compile()


def _eval_keys(run: _Run, iteration: int) -> jax.Array:
    """The evaluation keys, placed like the seeds (a global array when there are several processes)."""
    cfg = run.plan.cfg
    keys = run.population.eval_keys(cfg.seed, iteration) if run.population is not None else eval_keys(cfg.seed, iteration, cfg.num_seeds)
    return jax.device_put(keys, run.placement.seeds)


def _train_chunk(run: _Run, chunk: Any, ts: Any, iteration: int) -> tuple[Any, int]:
    """Run one chunk (``ts`` is donated), stop on NaN/inf before anything is saved, log its row."""
    every, agent = run.plan.cfg.run.log_every, run.agent
    t0 = time.perf_counter()
    # The compiled chunk checks its input shardings exactly, and XLA hands zero-size leaves (MJX
    # has several) back replicated although they were split on a mesh: restate them (a no-op
    # for every other leaf).
    ts = jax.device_put(ts, chunk.input_shardings[0][0])
    ts, metrics, finite = chunk(ts)
    metrics = to_host(metrics)
    elapsed = time.perf_counter() - t0
    if not bool(finite):
        last = run.ckpts.latest_step()
        raise TrainingDiverged(
            f"non-finite value (NaN/inf) in {first_bad_metric(metrics)} during iterations "
            f"{iteration}-{iteration + every}; stopped without saving. Last good checkpoint: "
            f"{'none' if last is None else f'iteration {last}'} in {run.ckpts.directory}. "
            "Try a lower learning rate or tighter gradient clipping in agent.*."
        )
    iteration += every
    steps = every * run.plan.steps_per_iteration * run.plan.num_rows
    run.logger.log({
        **run.meta(iteration),
        **(run.population.chunk_row(metrics) if run.population is not None
           else reduce_chunk(metrics, agent.episode_statistics, agent.episode_count, agent.running_totals)),
        "perf/steps_per_second": steps / elapsed,
    })
    return ts, iteration


def _evaluate(run: _Run, evaluate: Any, ts: Any, iteration: int) -> None:
    """Evaluate every seed's deterministic policy, log it, and keep the best checkpoint."""
    cfg = run.plan.cfg
    result = evaluate(jax.vmap(run.agent.policy_params)(ts), _eval_keys(run, iteration))
    row = run.population.eval_row(to_host(result)) if run.population is not None else eval_row(to_host(result))
    meta = run.meta(iteration)
    run.logger.log({**meta, **row}, progress=False)
    run.logger.print(
        f"eval @ {meta['global_step']:,} steps: return {row['eval/episode_return']:.2f} "
        f"± {row['eval/episode_return_std']:.2f}, success {row['eval/success_rate']:.0%}, "
        f"length {row['eval/episode_length']:.0f}"
    )
    if run.videos is not None and (iteration % cfg.run.video_every == 0 or iteration >= run.plan.total_iterations):
        _record_video(run, ts, iteration)
    if cfg.checkpoint.keep_best:
        best_meta, score = run.checkpoint_meta(iteration), row["eval/episode_return"]
        try:
            run.ckpts.save_best(iteration, ts, run.config, best_meta, score)
        except CheckpointDamaged as e:  # the saved best cannot be read back to compare with
            moved = run.ckpts.quarantine("best", e.step)
            run.logger.print(f"{e}; moved it to {moved}")
            run.ckpts.save_best(iteration, ts, run.config, best_meta, score)

