"""The compiled programs of a run, built from an ``Agent``: the seed-vmapped ``init``, its
abstract shape (the restore target), and the chunk of training iterations.

Each takes the run's ``Placement``, so the state is created, restored and trained where the mesh
says. Nothing here knows which agent it is building for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lunarl._platform import compile_options
from lunarl.agents.base import ENV_METRICS_PREFIX, SEED_AXIS_NAME, Agent
from lunarl.run.placement import Placement

__all__ = ["abstract_state", "init_state", "make_chunk", "seed_keys", "state_shapes"]


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """One init key per seed, all split from ``seed``."""
    return jax.random.split(jax.random.PRNGKey(seed), num_seeds)


def state_shapes(agent: Agent, env: Any, cfg: Any, num_seeds: int) -> Any:
    """``ShapeDtypeStruct``s of the seed-stacked TrainState (traced, nothing computed)."""
    return jax.eval_shape(jax.vmap(lambda k: agent.init(k, env, cfg)), seed_keys(0, num_seeds))


def init_state(agent: Agent, env: Any, cfg: Any, keys: jax.Array, placement: Placement) -> Any:
    """The seeds' TrainStates, stacked on a leading seed axis, placed by ``placement``."""
    shardings = placement.state_shardings(agent, state_shapes(agent, env, cfg, keys.shape[0]))
    init = jax.jit(
        jax.vmap(lambda k: agent.init(k, env, cfg)),
        out_shardings=shardings,
        compiler_options=compile_options(env),
    )
    return init(keys)


def abstract_state(agent: Agent, env: Any, cfg: Any, num_seeds: int, placement: Placement) -> Any:
    """Shapes, dtypes and shardings of ``init_state`` without computing it: the Orbax restore
    target (explicit shardings, so a checkpoint written on other devices restores here)."""
    shapes = state_shapes(agent, env, cfg, num_seeds)
    shardings = placement.state_shardings(agent, shapes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def make_chunk(
    agent: Agent, env: Any, num_iterations: int, placement: Placement | None = None
) -> Callable[[Any], tuple[Any, dict, jax.Array]]:
    """``chunk(ts) -> (ts, metrics[K, S], finite)``: K seed-vmapped iterations as one ``lax.scan``.

    ``metrics`` holds the agent's ``metric_names`` and, under ``ENV_METRICS_PREFIX``, each
    entry of the env's ``State.metrics`` averaged over the envs after every iteration.

    The input TrainState is donated: its buffers become the output's, so a state that holds a
    replay buffer is never in device memory twice; do not use ``ts`` after the call. ``finite``
    is False when any of the agent's metrics or policy parameters became NaN/inf, so the host can stop before
    the broken state is saved. ``env`` (the one the states step) picks the XLA compile options.

    With a ``placement`` the state is pinned to its shardings after every iteration (env leaves
    stay split on ``data`` through the scan, the rest replicated; the partitioner adds the
    all-reduces of gradients and batch statistics) and ``metrics`` and ``finite`` come back
    replicated, so every process can read them.
    """
    # Seeds vmapped as the ``seed`` mesh axis, so constraints an agent puts on one seed's arrays
    # (``base.split_on_data``) keep the seed axis split too. The axis is named either way, so an
    # agent's ``base.seed_cond`` can skip a branch no seed takes.
    step = jax.vmap(
        agent.train_step,
        axis_name=SEED_AXIS_NAME,
        spmd_axis_name=SEED_AXIS_NAME if placement is not None else None,
    )

    def pin(ts: Any) -> Any:
        if placement is None:
            return ts
        return jax.lax.with_sharding_constraint(ts, placement.state_shardings(agent, ts))

    def env_means(ts: Any) -> dict[str, jax.Array]:
        """One seed's env ``State.metrics`` averaged over its envs (``ENV_METRICS_PREFIX``)."""
        state_metrics = agent.env_state(ts).metrics
        return {ENV_METRICS_PREFIX + k: jnp.mean(v.astype(jnp.float32)) for k, v in state_metrics.items()}

    def iteration(ts: Any, _: Any) -> tuple[Any, tuple[dict, dict]]:
        ts, metrics = step(ts)
        if set(metrics) != set(agent.metric_names):
            raise ValueError(
                f"agent {agent.name!r}: train_step returned metrics {sorted(metrics)}, "
                f"but its metric_names are {sorted(agent.metric_names)}"
            )
        return pin(ts), (metrics, jax.vmap(env_means)(ts))

    def chunk(ts: Any) -> tuple[Any, dict, jax.Array]:
        if placement is None:
            return _chunk(ts)
        with jax.sharding.use_abstract_mesh(placement.mesh.abstract_mesh):  # for split_on_data
            return _chunk(ts)

    def _chunk(ts: Any) -> tuple[Any, dict, jax.Array]:
        ts, (metrics, env_metrics) = jax.lax.scan(iteration, pin(ts), None, length=num_iterations)
        # Env metrics are logged but do not stop a run: the agent's own metrics and parameters
        # say whether learning broke.
        finite = _all_finite(metrics) & _all_finite(jax.vmap(agent.policy_params)(ts))
        metrics = {**metrics, **env_metrics}
        if placement is not None:
            metrics, finite = jax.lax.with_sharding_constraint((metrics, finite), placement.replicated)
        return ts, metrics, finite

    return jax.jit(chunk, donate_argnums=0, compiler_options=compile_options(env))
