"""The on-device replay ring buffer: writes wrap, samples come only from written rows, sequences
are consecutive steps of one env that never cross the write head, and it all jits and vmaps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lunarl.agents import replay

CAPACITY, NUM_ENVS = 8, 3


def _rows(first_step: int, t: int) -> dict[str, jax.Array]:
    """Rows whose entries name themselves: step id (1-based, 0 = never written) and env id."""
    step = jnp.arange(first_step, first_step + t, dtype=jnp.int32)[:, None] + jnp.zeros((1, NUM_ENVS), jnp.int32)
    env = jnp.broadcast_to(jnp.arange(NUM_ENVS, dtype=jnp.int32), (t, NUM_ENVS))
    vec = jnp.stack([step, env], axis=-1).astype(jnp.float32)
    return {"step": step, "env": env, "vec": vec}


def _example() -> dict[str, jax.Array]:
    return {"step": jnp.zeros((), jnp.int32), "env": jnp.zeros((), jnp.int32), "vec": jnp.zeros((2,), jnp.float32)}


def _filled(total_steps: int, chunk: int = 3) -> replay.Replay:
    buf = replay.init(CAPACITY, NUM_ENVS, _example())
    add = jax.jit(replay.add)
    written = 0
    while written < total_steps:
        t = min(chunk, total_steps - written)
        buf = add(buf, _rows(written + 1, t))
        written += t
    return buf


def test_init_layout_and_add_wraps():
    buf = replay.init(CAPACITY, NUM_ENVS, _example())
    assert buf.data["vec"].shape == (CAPACITY, NUM_ENVS, 2) and buf.data["step"].dtype == jnp.int32
    assert (buf.capacity, buf.num_envs, int(buf.size), int(buf.position)) == (CAPACITY, NUM_ENVS, 0, 0)
    buf = _filled(5)
    assert (int(buf.size), int(buf.position)) == (5, 5)
    np.testing.assert_array_equal(buf.data["step"][:, 0], [1, 2, 3, 4, 5, 0, 0, 0])
    buf = _filled(11)  # 3 rows past the end overwrite the 3 oldest
    assert (int(buf.size), int(buf.position)) == (CAPACITY, 3)
    np.testing.assert_array_equal(buf.data["step"][:, 0], [9, 10, 11, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(buf.data["env"][2], np.arange(NUM_ENVS))
    with pytest.raises(ValueError, match="capacity"):
        replay.add(buf, _rows(1, CAPACITY + 1))
    with pytest.raises(ValueError, match="capacity"):
        replay.init(0, NUM_ENVS, _example())


@pytest.mark.parametrize("total", [1, 5, 11, 30])
def test_sample_returns_only_written_transitions(total):
    buf = _filled(total)
    batch = jax.jit(replay.sample, static_argnums=2)(buf, jax.random.PRNGKey(total), 4000)
    steps, envs = np.asarray(batch["step"]), np.asarray(batch["env"])
    assert steps.shape == (4000,) and batch["vec"].shape == (4000, 2)
    live = set(range(max(1, total - CAPACITY + 1), total + 1))
    assert set(steps.tolist()) == live  # never unwritten (0) or overwritten, and all of them
    assert set(envs.tolist()) == set(range(NUM_ENVS))
    # Each transition is read whole: its fields come from one (row, env) cell.
    np.testing.assert_array_equal(np.asarray(batch["vec"]), np.stack([steps, envs], -1))
    # Uniform: every (step, env) cell about equally often.
    counts = np.bincount((steps - min(live)) * NUM_ENVS + envs, minlength=len(live) * NUM_ENVS)
    expected = 4000 / (len(live) * NUM_ENVS)
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected


@pytest.mark.parametrize("total", [4, 8, 11, 30])
def test_sequences_are_consecutive_and_never_cross_the_head(total):
    length = 4
    buf = _filled(total)
    assert bool(replay.can_sample(buf, length))
    seq = jax.jit(replay.sample_sequences, static_argnums=(2, 3))(buf, jax.random.PRNGKey(total), 2000, length)
    steps, envs = np.asarray(seq["step"]), np.asarray(seq["env"])
    assert steps.shape == (2000, length) and seq["vec"].shape == (2000, length, 2)
    np.testing.assert_array_equal(np.diff(steps, axis=1), 1)  # consecutive steps, oldest first
    assert (envs == envs[:, :1]).all()  # one env per window
    oldest = max(1, total - CAPACITY + 1)
    assert steps.min() >= oldest and steps.max() <= total
    # Every window that fits is drawn (starts oldest .. total - length + 1).
    assert set(steps[:, 0].tolist()) == set(range(oldest, total - length + 2))


def test_can_sample_and_empty_buffer():
    buf = replay.init(CAPACITY, NUM_ENVS, _example())
    assert not bool(replay.can_sample(buf)) and not bool(replay.can_sample(_filled(2), 3))
    assert bool(replay.can_sample(_filled(3), 3))
    with pytest.raises(ValueError, match="exceeds capacity"):
        replay.sample_sequences(buf, jax.random.PRNGKey(0), 2, CAPACITY + 1)


def test_vmap_over_seeds_and_env_axes():
    """Two buffers (one per seed) under vmap behave like two separate ones."""
    init = jax.vmap(lambda _: replay.init(CAPACITY, NUM_ENVS, _example()))
    bufs = init(jnp.arange(2))
    rows = jax.tree.map(lambda x: jnp.stack([x, x + 100]), _rows(1, 3))
    bufs = jax.vmap(replay.add)(bufs, rows)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    batch = jax.vmap(lambda b, k: replay.sample(b, k, 64))(bufs, keys)
    assert set(np.asarray(batch["step"][0]).tolist()) <= {1, 2, 3}
    assert set(np.asarray(batch["step"][1]).tolist()) <= {101, 102, 103}
    one = replay.sample(jax.tree.map(lambda x: x[1], bufs), keys[1], 64)
    np.testing.assert_array_equal(one["step"], batch["step"][1])
    specs = replay.env_axes(_filled(1))
    assert specs.data["vec"] == PartitionSpec(None, "data") and specs.size == PartitionSpec()
