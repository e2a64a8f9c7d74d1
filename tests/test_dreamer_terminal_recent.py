"""Dreamer's terminal-window replay restricted to recent terminal steps (``agent.terminal_recent``):
only terminal steps in the newest rows are drawn, windows stay inside the written rows, and
``terminal_recent=0`` is the unrestricted index, count for count. Synthetic replays, no nets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lunarl.agents import replay as replay_lib
from lunarl.agents.dreamer import agent as dreamer
from lunarl.agents.dreamer import terminal_replay


def _stamped_replay(capacity: int, num_envs: int, rows: int, terminal_cells: list[tuple[int, int]]):
    """Rows carry their write count (1, 2, ...); ``terminated`` is set at the (write count, env) cells."""
    stamp = np.arange(1, rows + 1, dtype=np.float32)[:, None].repeat(num_envs, 1)
    term = np.zeros((rows, num_envs), np.float32)
    for t, e in terminal_cells:
        term[t - 1, e] = 1.0
    replay = replay_lib.init(capacity, num_envs, {"stamp": jnp.zeros(()), "terminated": jnp.zeros(())})
    for lo in range(0, rows, 40):
        replay = replay_lib.add(replay, {"stamp": jnp.asarray(stamp[lo:lo + 40]), "terminated": jnp.asarray(term[lo:lo + 40])})
    return replay


@pytest.mark.parametrize("rows", [120, 260])  # part-filled; wrapped (write head mid-buffer)
def test_recent_terminal_windows_draw_only_recent_terminal_steps(rows):
    capacity, num_envs, length, batch, recent = 200, 4, 16, 2048, 50
    old = [(rows - 100, 0), (rows - 60, 2)]  # outside the newest 50 rows
    new = [(rows - 30, 3), (rows - 1, 1)]  # inside (the last one at the head)
    replay = _stamped_replay(capacity, num_envs, rows, old + new)
    assert int(terminal_replay.index(replay, replay.data["terminated"]).total) == 4
    terminals = terminal_replay.index(replay, replay.data["terminated"], recent)
    assert int(terminals.total) == len(new)
    k = batch // 4
    seq = jax.jit(terminal_replay.sample, static_argnums=(3, 4, 5))(replay, terminals, jax.random.PRNGKey(0), batch, length, k)
    stamp, term = np.asarray(seq["stamp"]), np.asarray(seq["terminated"])
    assert stamp.min() >= max(1, rows - capacity + 1) and stamp.max() <= rows
    assert np.all(np.diff(stamp, axis=1) == 1)
    assert term[:k].any(axis=1).all()
    # The prioritised windows hold recent terminal steps only (the old ones are > length rows
    # away), each about equally often.
    ends = stamp[:k][term[:k] > 0]
    assert set(ends.tolist()) == {float(t) for t, _ in new}
    counts = np.array([np.sum(ends == t) for t, _ in new])
    assert counts.min() > 0.35 * k


def test_recent_terminal_windows_fall_back_and_config():
    replay = _stamped_replay(200, 4, 120, [(10, 0), (20, 1)])  # terminals only in old rows
    terminals = terminal_replay.index(replay, replay.data["terminated"], 30)
    assert int(terminals.total) == 0
    seq = terminal_replay.sample(replay, terminals, jax.random.PRNGKey(1), 256, 16, 128)
    stamp = np.asarray(seq["stamp"])
    assert len(np.unique(stamp[:128, 0])) > 40  # uniform windows, not a pile at one old terminal
    # recent_rows larger than the written rows = no restriction.
    full = terminal_replay.index(replay, replay.data["terminated"])
    wide = terminal_replay.index(replay, replay.data["terminated"], 10_000)
    np.testing.assert_array_equal(np.asarray(full.counts), np.asarray(wide.counts))
    with pytest.raises(ValueError, match="recent_rows"):
        terminal_replay.index(replay, replay.data["terminated"], -1)
    cfg = dreamer.DreamerConfig.build(num_envs=16, terminal_fraction=0.25, terminal_recent=8192)
    assert cfg.terminal_recent_rows == 512
    assert dreamer.DreamerConfig.build(num_envs=16, terminal_recent=100).terminal_recent_rows == 7  # rounds up
    assert dreamer.DreamerConfig.build().terminal_recent == 0
    with pytest.raises(ValueError, match="terminal_recent"):
        dreamer.DreamerConfig.build(terminal_recent=-1)
