"""On-device replay: a ring buffer of transitions as pure functions over a pytree.

A ``Replay`` lives inside an agent's TrainState, so it is jitted, vmapped over seeds, sharded
over the env batch and checkpointed with everything else; no host round trip touches it.

Layout. Every leaf of ``Replay.data`` is ``[capacity, num_envs, ...]``: one *row* per vectorised
env step, one column per env. ``add`` writes whole rows (``[T, num_envs, ...]``, e.g. one
``lax.scan`` rollout) at ``position`` and wraps around; ``size`` counts the rows written so far
(at most ``capacity``). Keeping the env axis instead of flattening it means

* the env axis stays a real axis, so the host can shard it (``PartitionSpec(None, "data")``, see
  ``ENV_AXIS_SPEC``) like the env states themselves;
* each column is one env's own time series, so consecutive rows of a column are consecutive
  steps of one env, which is what sequence sampling (n-step returns, the Dreamer world model)
  needs: ``sample_sequences`` returns ``length`` consecutive rows of one column.

Sampling. ``sample`` draws transitions uniformly from the written rows and all columns (with
replacement). ``sample_sequences`` draws windows of ``length`` consecutive rows that lie wholly
inside the written part and never cross the write head, i.e. never join the newest row to the
oldest one of a wrapped buffer, whose steps are ``capacity`` steps apart. A window may still span
an episode boundary (the auto-reset wrapper starts a new episode in the same column); callers
that care store ``done`` flags and mask (SAC's n-step return stops at the first ``done``, a
world model resets its latent there). Both need at least one written row (``length`` rows for
sequences); before that they return zero-filled rows, and the caller is expected to skip its
update (``can_sample``), which SAC does with ``lax.cond``.

Why not flashbax (0.1.3 on PyPI). Its trajectory buffer is the same idea (``[add_batch, time]``
layout, sequence sampling), but it would be a new dependency for about a hundred lines, its state
layout (batch-major) and field names would be what our checkpoints store, and its flat item buffer
forms (obs, next_obs) pairs from adjacent rows, which is wrong at an auto-reset: the next row holds
the *new* episode's first observation, while SAC must bootstrap a truncated episode from its final
observation (``info["final_obs"]``). Here transitions store whatever the agent puts in them, and
the sampling rules above are ours to test.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from lunarl.agents.base import DATA_AXIS_NAME, REPLICATED

__all__ = [
    "ENV_AXIS_SPEC",
    "Replay",
    "add",
    "can_sample",
    "env_axes",
    "gather_windows",
    "init",
    "oldest_row",
    "sample",
    "sample_sequences",
]

#: Placement of a ``Replay.data`` leaf: rows replicated (not split), env columns on ``data``.
ENV_AXIS_SPEC = PartitionSpec(None, DATA_AXIS_NAME)


@struct.dataclass
class Replay:
    """Ring buffer state. ``data`` leaves are ``[capacity, num_envs, ...]``."""

    data: Any
    position: jax.Array  # int32: the row the next ``add`` writes first
    size: jax.Array  # int32: rows written so far, at most capacity

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    @property
    def num_envs(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[1]


def init(capacity: int, num_envs: int, example: Any) -> Replay:
    """An empty buffer of ``capacity`` rows x ``num_envs`` columns of transitions shaped like
    ``example`` (one transition of one env: a pytree of arrays without the env axis)."""
    if capacity < 1 or num_envs < 1:
        raise ValueError(f"replay.init: capacity={capacity} and num_envs={num_envs} must be >= 1")
    data = jax.tree.map(
        lambda x: jnp.zeros((capacity, num_envs) + jnp.shape(x), jnp.asarray(x).dtype), example
    )
    return Replay(data=data, position=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def add(replay: Replay, rows: Any) -> Replay:
    """``replay`` with ``rows`` (leaves ``[T, num_envs, ...]``, T <= capacity) written at the head.

    Rows past the end wrap to the start, overwriting the oldest ones.
    """
    capacity, num_envs = replay.capacity, replay.num_envs
    leaves = jax.tree.leaves(rows)
    t = leaves[0].shape[0]
    if t > capacity:
        raise ValueError(f"replay.add: {t} rows do not fit in a buffer of capacity {capacity}")
    chex.assert_trees_all_equal_structs(rows, replay.data)
    jax.tree.map(
        lambda r, d: chex.assert_shape(r, (t, num_envs) + d.shape[2:]), rows, replay.data
    )
    index = (replay.position + jnp.arange(t, dtype=jnp.int32)) % capacity
    data = jax.tree.map(
        lambda d, r: d.at[index].set(r.astype(d.dtype), unique_indices=True), replay.data, rows
    )
    return Replay(
        data=data,
        position=(replay.position + t) % capacity,
        size=jnp.minimum(replay.size + t, capacity),
    )


def can_sample(replay: Replay, length: int = 1) -> jax.Array:
    """Whether ``sample`` (``length`` 1) or ``sample_sequences(length)`` has enough written rows."""
    return replay.size >= length


def sample(replay: Replay, rng: jax.Array, batch_size: int) -> Any:
    """``batch_size`` transitions drawn uniformly (with replacement) from the written rows and
    all env columns: leaves ``[batch_size, ...]``."""
    k_row, k_env = jax.random.split(rng)
    row = jax.random.randint(k_row, (batch_size,), 0, jnp.maximum(replay.size, 1))
    env = jax.random.randint(k_env, (batch_size,), 0, replay.num_envs)
    return jax.tree.map(lambda d: d[row, env], replay.data)


def sample_sequences(replay: Replay, rng: jax.Array, batch_size: int, length: int) -> Any:
    """``batch_size`` windows of ``length`` consecutive rows of one env column each: leaves
    ``[batch_size, length, ...]``, oldest step first.

    Starts are uniform over the windows inside the written rows that do not cross the write head
    (``size - length + 1`` per column once ``size >= length``).
    """
    capacity = replay.capacity
    if length > capacity:
        raise ValueError(f"replay.sample_sequences: length {length} exceeds capacity {capacity}")
    k_row, k_env = jax.random.split(rng)
    starts = jnp.maximum(replay.size - length + 1, 1)
    offset = jax.random.randint(k_row, (batch_size,), 0, starts)
    env = jax.random.randint(k_env, (batch_size,), 0, replay.num_envs)
    return gather_windows(replay, offset, env, length)


def oldest_row(replay: Replay) -> jax.Array:
    """The row of the oldest written step (window offsets count from it)."""
    return (replay.position - replay.size) % replay.capacity


def gather_windows(replay: Replay, offset: jax.Array, env: jax.Array, length: int) -> Any:
    """Windows of ``length`` consecutive rows starting ``offset`` rows after the oldest written
    one, each from its env column ``env`` (both ``[batch]``): leaves ``[batch, length, ...]``."""
    rows = (oldest_row(replay) + offset[:, None] + jnp.arange(length, dtype=jnp.int32)) % replay.capacity
    return jax.tree.map(lambda d: d[rows, env[:, None]], replay.data)


def env_axes(replay: Replay) -> Replay:
    """Placement specs for a ``Replay`` (see ``lunarl.agents.base.Agent.env_axes``)."""
    return Replay(
        data=jax.tree.map(lambda _: ENV_AXIS_SPEC, replay.data),
        position=REPLICATED,
        size=REPLICATED,
    )
