"""The host loop: compiled chunks of training iterations, then log, evaluate and checkpoint.

One chunk is ``run.log_every`` iterations of the agent's ``train_step`` under ``lax.scan``,
vmapped over seeds, compiled once ahead of time; between chunks the host reduces the chunk's
metrics, evaluates the deterministic policy, saves checkpoints and checks for a stop request.
Nothing random happens on the host: training randomness lives in ``TrainState.rng`` and
evaluation keys are derived from ``seed`` and the iteration, so a resumed run ends bit-identical
to one that never stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding
from omegaconf import OmegaConf

from lunarl._platform import compile_options
from lunarl.run.checkpoint import Checkpoints
from lunarl.run.logger import RunLogger
from lunarl.run.schema import Plan
from lunarl.run.signals import GracefulStop

__all__ = [
    "TrainingDiverged",
    "TrainResult",
    "abstract_state",
    "eval_row",
    "init_state",
    "make_chunk",
    "make_evaluator",
    "reduce_chunk",
    "seed_sharding",
    "train",
]

# Episode statistics are averages over the episodes that finished in an iteration; over a chunk
# they are weighted by that count, so an iteration where nothing finished does not count as 0
# (and a chunk where nothing finished logs no episode statistics at all).
_EPISODE_KEYS = ("charts/episode_return", "charts/episode_length", "charts/success_rate")
_EPISODE_COUNT = "charts/episodes_finished"
_EVAL_SALT = 0x5EED  # evaluation keys never collide with the training keys split from ``seed``


class TrainingDiverged(RuntimeError):
    """NaN or inf in the losses or parameters; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    status: str  # "finished" | "interrupted" | "already-finished"
    iteration: int
    global_step: int
    state: Any


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    return jax.random.split(jax.random.PRNGKey(seed), num_seeds)


def seed_sharding(num_seeds: int) -> jax.sharding.Sharding:
    """Where the TrainState lives: the seed axis split over this host's devices when it divides
    evenly (seeds never communicate, so this scales with no collective), else one device."""
    devices = jax.local_devices()
    if len(devices) > 1 and num_seeds % len(devices) == 0:
        return NamedSharding(Mesh(np.array(devices), ("seed",)), PartitionSpec("seed"))
    return SingleDeviceSharding(devices[0])


def init_state(agent: ModuleType, env: Any, cfg: Any, keys: jax.Array) -> Any:
    """The seeds' TrainStates, stacked on a leading seed axis, placed by ``seed_sharding``."""
    init = jax.jit(
        jax.vmap(lambda k: agent.init(k, env, cfg)),
        out_shardings=seed_sharding(keys.shape[0]),
        compiler_options=compile_options(env),
    )
    return init(keys)


def abstract_state(agent: ModuleType, env: Any, cfg: Any, num_seeds: int) -> Any:
    """Shapes, dtypes and shardings of ``init_state`` without computing it: the Orbax restore
    target (explicit shardings, so a checkpoint written on other devices restores here)."""
    shapes = jax.eval_shape(jax.vmap(lambda k: agent.init(k, env, cfg)), seed_keys(0, num_seeds))
    sharding = seed_sharding(num_seeds)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def make_chunk(agent: ModuleType, env: Any, num_iterations: int) -> Callable[[Any], tuple[Any, dict, jax.Array]]:
    """``chunk(ts) -> (ts, metrics[K, S], finite)``: K vmapped iterations as one ``lax.scan``.

    ``finite`` is False when any loss or parameter became NaN/inf, so the host can stop before
    the broken state is saved. ``env`` (the one the states step) picks the XLA compile options.
    """
    step = jax.vmap(agent.train_step)

    def chunk(ts: Any) -> tuple[Any, dict, jax.Array]:
        ts, metrics = jax.lax.scan(lambda t, _: step(t), ts, None, length=num_iterations)
        finite = _all_finite(metrics) & _all_finite(jax.vmap(agent.policy_params)(ts))
        return ts, metrics, finite

    return jax.jit(chunk, compiler_options=compile_options(env))


def make_evaluator(agent: ModuleType, env: Any, cfg: Any, num_episodes: int, deterministic: bool = True) -> Callable[[Any, jax.Array], dict]:
    """``evaluate(params[S], keys[S]) -> {"episode_return": [S, N], ...}`` for all seeds at once."""
    from lunarl.run import evaluation

    policy = agent.make_policy(env, cfg)

    def one_seed(params: Any, key: jax.Array) -> dict:
        return evaluation.evaluate(env, policy, params, key, num_episodes, cfg.episode_length, deterministic)

    return jax.jit(jax.vmap(one_seed), compiler_options=compile_options(env))


def eval_keys(seed: int, iteration: int, num_seeds: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL_SALT), iteration)
    return jax.random.split(key, num_seeds)


def _per_seed_row(per_seed: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    """Mean over seeds under the plain key; with several seeds also ``seed{i}/key``.

    NaN marks "no data" (no episode finished in the chunk): such values are left out of the row
    and of the mean, rather than logged as a misleading 0.
    """
    row: dict[str, float] = {}
    for key, values in per_seed.items():
        known = values[~np.isnan(values)]
        if known.size:
            row[prefix + key] = float(np.mean(known))
        if values.shape[0] > 1:
            for i, v in enumerate(values):
                if not np.isnan(v):
                    row[f"seed{i}/{prefix}{key}"] = float(v)
    return row


def reduce_chunk(metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Host reduction of a chunk's metrics ``[K, S]`` to one row (see ``_EPISODE_KEYS``)."""
    per_seed: dict[str, np.ndarray] = {}
    count = metrics.get(_EPISODE_COUNT)
    for key, values in metrics.items():
        values = np.asarray(values, dtype=np.float64)
        if key == "env_steps":
            continue
        if key in _EPISODE_KEYS and count is not None:
            n = np.asarray(count, dtype=np.float64)
            total = n.sum(axis=0)
            per_seed[key] = np.where(total > 0, (values * n).sum(axis=0) / np.maximum(total, 1), np.nan)
        elif key == _EPISODE_COUNT:
            per_seed[key] = values.sum(axis=0)
        else:
            per_seed[key] = values.mean(axis=0)
    return _per_seed_row(per_seed)


def eval_row(result: Mapping[str, Any]) -> dict[str, float]:
    """Summary of evaluation episodes ``[S, N]``: return mean/std, success rate, length."""
    ret = np.asarray(result["episode_return"], dtype=np.float64)
    per_seed = {
        "episode_return": ret.mean(axis=1),
        "episode_return_std": ret.std(axis=1),
        "success_rate": np.asarray(result["success"], dtype=np.float64).mean(axis=1),
        "episode_length": np.asarray(result["episode_length"], dtype=np.float64).mean(axis=1),
    }
    return _per_seed_row(per_seed, prefix="eval/")


def _first_bad_metric(metrics: Mapping[str, np.ndarray]) -> str:
    for key, values in metrics.items():
        if not np.all(np.isfinite(np.asarray(values))):
            return key
    return "the parameters"


def train(plan: Plan, run_dir: Path, config: Mapping[str, Any], logger: RunLogger) -> TrainResult:
    """Train (or resume) the run described by ``plan``; ``config`` is the resolved config saved
    with every checkpoint. Raises ``TrainingDiverged`` and ``CheckpointError``."""
    cfg = plan.cfg
    env, agent = plan.env_and_agent()
    agent_cfg = plan.agent_config
    num_seeds = cfg.num_seeds
    chunk_len = cfg.run.log_every
    total = plan.total_iterations
    total_steps = total * plan.steps_per_iteration

    ckpts = Checkpoints(cfg.checkpoint.dir, cfg.checkpoint.max_to_keep)
    try:
        start = ckpts.latest_step()
        if start is not None:
            target = abstract_state(agent, env, agent_cfg, num_seeds)
            ts, _, meta = ckpts.restore("latest", target, config=config)
            dropped = logger.jsonl.drop_after(start)
            logger.print(
                f"resuming from checkpoint at iteration {start} (env step {meta['global_step']:,}) "
                f"in {ckpts.directory}" + (f"; dropped {dropped} metric rows logged after it" if dropped else "")
            )
        else:
            start = 0
            ts = init_state(agent, env, agent_cfg, seed_keys(cfg.seed, num_seeds))
        # Only now (a refused resume must not touch it): the config as it runs, resolved.
        # Hydra's .hydra/config.yaml keeps the interpolations.
        OmegaConf.save(OmegaConf.create(dict(config)), run_dir / "config.yaml")
        iteration = start
        logger.console.start_at(start * plan.steps_per_iteration)
        if iteration >= total:
            logger.print(f"run already finished: iteration {iteration} of {total}")
            return TrainResult("already-finished", iteration, iteration * plan.steps_per_iteration, ts)

        t0 = time.perf_counter()
        chunk = make_chunk(agent, env, chunk_len).lower(ts).compile()
        evaluator = None
        if cfg.run.eval_every:
            params = jax.vmap(agent.policy_params)(ts)
            evaluator = make_evaluator(agent, env, agent_cfg, cfg.run.eval_episodes)
            evaluator = evaluator.lower(params, eval_keys(cfg.seed, 0, num_seeds)).compile()
        placement = seed_sharding(num_seeds)
        if len(placement.device_set) > 1:
            logger.print(f"{num_seeds} seeds split over {len(placement.device_set)} devices")
        logger.print(
            f"{plan.env_name} x {agent_cfg.num_envs} envs x {num_seeds} seed(s), {plan.agent_name}: "
            f"{total} iterations of {plan.steps_per_iteration:,} env steps in chunks of {chunk_len} "
            f"(compiled in {time.perf_counter() - t0:.1f}s); run dir {run_dir}"
        )

        def meta_at(it: int) -> dict[str, Any]:
            return {"iteration": it, "global_step": it * plan.steps_per_iteration}

        status = "finished"
        with GracefulStop() as stop:
            while iteration < total:
                t0 = time.perf_counter()
                new_ts, metrics, finite = chunk(ts)
                metrics = jax.device_get(metrics)
                elapsed = time.perf_counter() - t0
                if not bool(finite):
                    last = ckpts.latest_step()
                    raise TrainingDiverged(
                        f"non-finite value (NaN/inf) in {_first_bad_metric(metrics)} during iterations "
                        f"{iteration}-{iteration + chunk_len}; stopped without saving. Last good checkpoint: "
                        f"{'none' if last is None else f'iteration {last}'} in {ckpts.directory}. "
                        "Try a lower agent.learning_rate or agent.max_grad_norm."
                    )
                ts, iteration = new_ts, iteration + chunk_len
                row = {
                    "global_step": iteration * plan.steps_per_iteration,
                    "iteration": iteration,
                    **reduce_chunk(metrics),
                    "perf/steps_per_second": chunk_len * plan.steps_per_iteration * num_seeds / elapsed,
                }
                logger.log(row)
                last_chunk = iteration >= total
                if evaluator is not None and (iteration % cfg.run.eval_every == 0 or last_chunk):
                    result = jax.device_get(evaluator(jax.vmap(agent.policy_params)(ts), eval_keys(cfg.seed, iteration, num_seeds)))
                    erow = eval_row(result)
                    logger.log({"global_step": row["global_step"], "iteration": iteration, **erow}, progress=False)
                    logger.print(
                        f"eval @ {row['global_step']:,} steps: return {erow['eval/episode_return']:.2f} "
                        f"± {erow['eval/episode_return_std']:.2f}, success {erow['eval/success_rate']:.0%}, "
                        f"length {erow['eval/episode_length']:.0f}"
                    )
                    if cfg.checkpoint.keep_best:
                        ckpts.save_best(iteration, ts, config, meta_at(iteration), erow["eval/episode_return"])
                if iteration % cfg.run.checkpoint_every == 0 or last_chunk or stop.requested:
                    ckpts.save(iteration, ts, config, meta_at(iteration))
                if stop.requested and not last_chunk:
                    status = "interrupted"
                    break
        ckpts.wait()
        if status == "interrupted":
            logger.print(
                f"stopped by {stop.requested} at iteration {iteration}/{total}; checkpoint saved in "
                f"{ckpts.directory}. Run again with run.dir={run_dir} to resume."
            )
        else:
            logger.print(f"finished {total} iterations ({total_steps:,} env steps per seed); checkpoints in {ckpts.directory}")
        return TrainResult(status, iteration, iteration * plan.steps_per_iteration, ts)
    finally:
        ckpts.wait()
        ckpts.close()
