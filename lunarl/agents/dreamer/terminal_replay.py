"""Prioritised replay of windows that contain a termination (Dreamer only).

Why. On the car track a crash is a rare event once the policy drives (0.24% of the replayed steps
in ``scripts/results/dreamer.md``), and uniform windows showed the tiny world model too few of
them to learn that an obstacle hit ends the episode with -5: at a hit its posterior termination
probability stayed at 0.002-0.04. A loss weight on the continue head biased every prediction
(the car stood still); drawing more windows *around* the rare events instead keeps each loss
unweighted and shows the model the steps that lead to them. At the car experiment's train ratio
256 a quarter of each batch still did better than none or half (``scripts/results/dreamer.md``,
session 27).

What. ``sample`` draws ``batch_size`` windows of ``length`` consecutive rows of one env column, as
``lunarl.agents.replay.sample_sequences`` does (inside the written rows, never across the write
head), of which the first ``num_terminal`` are drawn uniformly over the *terminal steps* in the
buffer (each terminal step equally likely), each placed uniformly among the windows that contain
it; the rest are uniform windows. Until the buffer holds a terminal step the first ``num_terminal``
are uniform windows too. A ``TerminalIndex`` (a cumulative count over the ``[capacity, num_envs]``
terminal flags) is built once per iteration (the replay does not change during the iteration's
updates), so each draw is a binary search; all of it is jit- and vmap-able, no host round trip.

Recency (``recent_rows`` of ``index``, 0 = off). Once the car drives, ~70% of the buffer's terminal
steps are the early policy's crashes (``scripts/results/dreamer.md`` session 5), so a draw uniform
over all of them mostly replays old crashes, not the current policy's obstacle hits. With
``recent_rows > 0`` only terminal steps in the newest ``recent_rows`` written rows are indexed;
the window around one may still reach back into older rows.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from lunarl.agents import replay as replay_lib

__all__ = ["TerminalIndex", "index", "sample"]


@struct.dataclass
class TerminalIndex:
    """``counts[i]``: terminal steps among the written cells ``0..i`` of the flattened
    ``[capacity, num_envs]`` buffer (row-major)."""

    counts: jax.Array  # int32 [capacity * num_envs]

    @property
    def total(self) -> jax.Array:
        return self.counts[-1]


def index(replay: replay_lib.Replay, terminal: jax.Array, recent_rows: int = 0) -> TerminalIndex:
    """The index of the terminal steps of ``replay``; ``terminal`` is its ``[capacity, num_envs]``
    flag leaf (> 0.5 = the step ended its episode by termination). ``recent_rows > 0``: only those
    in the newest ``recent_rows`` written rows."""
    if recent_rows < 0:
        raise ValueError(f"terminal_replay.index: recent_rows={recent_rows} must be >= 0")
    capacity, num_envs = replay.capacity, replay.num_envs
    chex.assert_shape(terminal, (capacity, num_envs))
    offset = (jnp.arange(capacity, dtype=jnp.int32) - replay_lib.oldest_row(replay)) % capacity
    written = offset < replay.size
    if recent_rows > 0:
        written = written & (offset >= replay.size - recent_rows)
    flags = (terminal > 0.5) & written[:, None]
    return TerminalIndex(counts=jnp.cumsum(flags.reshape(-1).astype(jnp.int32)))


def sample(
    replay: replay_lib.Replay, terminals: TerminalIndex, rng: jax.Array, batch_size: int, length: int,
    num_terminal: int,
) -> Any:  # fmt: skip
    """``batch_size`` windows (leaves ``[batch_size, length, ...]``); the first ``num_terminal``
    contain a terminal step whenever the buffer holds one, the others are uniform."""
    if not 0 <= num_terminal <= batch_size:
        raise ValueError(f"terminal_replay.sample: num_terminal={num_terminal} must be in [0, batch_size={batch_size}]")
    capacity, num_envs = replay.capacity, replay.num_envs
    if length > capacity:
        raise ValueError(f"terminal_replay.sample: length {length} exceeds capacity {capacity}")
    k_uniform, k_cell, k_place, k_start, k_env = jax.random.split(rng, 5)
    uniform = replay_lib.sample_sequences(replay, k_uniform, batch_size - num_terminal, length)
    if num_terminal == 0:
        return uniform
    last_start = jnp.maximum(replay.size - length, 0)  # the last window start that fits
    # A terminal cell, each equally likely: the first cell whose running count exceeds u.
    u = jax.random.randint(k_cell, (num_terminal,), 0, jnp.maximum(terminals.total, 1))
    cell = jnp.searchsorted(terminals.counts, u, side="right").astype(jnp.int32)
    cell = jnp.minimum(cell, capacity * num_envs - 1)
    at = (cell // num_envs - replay_lib.oldest_row(replay)) % capacity  # its offset from the oldest row
    # Place it uniformly among the windows that contain it and fit in the written rows.
    lo = jnp.maximum(at - (length - 1), 0)
    hi = jnp.minimum(at, last_start)
    start = lo + jax.random.randint(k_place, (num_terminal,), 0, jnp.maximum(hi - lo + 1, 1))
    # No terminal step yet: uniform windows instead.
    has = terminals.total > 0
    start = jnp.where(has, start, jax.random.randint(k_start, (num_terminal,), 0, last_start + 1))
    env = jnp.where(has, cell % num_envs, jax.random.randint(k_env, (num_terminal,), 0, num_envs))
    chosen = replay_lib.gather_windows(replay, start, env, length)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), chosen, uniform)
