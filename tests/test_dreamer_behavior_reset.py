"""Dreamer's behaviour reset (``agent.behavior_reset_at``, ``agent.behavior_reset``): at the
iteration that passes each listed env step, the critic (or the actor and the critic) restarts from
fresh parameters and a fresh optimiser state, before that iteration's updates; the world model and
the replay keep everything."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import adam_counts, assert_same_state, fast_jit, unadopted_lever

import lunarl
from lunarl.agents.dreamer import agent as dreamer

# 4 envs x 4 steps = 16 env steps per iteration, 4 updates of 4 x 8 each after the 32-step
# prefill; the reset falls in the third iteration (env steps 32 -> 48).
SMALL = dict(
    num_envs=4, episode_length=200, unroll_length=4, batch_size=4, seq_len=8, horizon=3, buffer_size=256,
    prefill=32, train_ratio=8.0, actor_ema_rate=0.01,
)  # fmt: skip


def _differs(a, b) -> bool:
    """Some leaf of two equally shaped pytrees differs."""
    return not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def env():
    return lunarl.envs.make("car_track")


@pytest.fixture(scope="module")
def trained(env):
    """Every part updated once per update of one iteration (Adam counts 4)."""
    cfg = dreamer.DreamerConfig.build(**SMALL)
    step = fast_jit(dreamer.train_step)
    ts = dreamer.init(jax.random.PRNGKey(0), env, cfg)
    for _ in range(2):  # env steps 16 (prefill), 32 (the first 4 updates)
        ts, _ = step(ts)
    assert set(adam_counts(ts.opt_state).values()) == {4}
    return ts


@unadopted_lever
@pytest.mark.parametrize("part", ["critic", "actor_critic"])
def test_reset_restarts_only_the_named_parts(env, trained, part):
    cfg = dreamer.DreamerConfig.build(**SMALL, behavior_reset=part)
    ts = trained.replace(cfg=cfg)
    fresh = dreamer.init(jax.random.PRNGKey(1), env, cfg).params
    params, opt_state = dreamer.reset_behavior(ts, np.bool_(True), jax.random.PRNGKey(1))
    reset = {"critic", "slow_critic"} | ({"actor", "actor_ema"} if part == "actor_critic" else set())
    for name in params:
        # A fresh part has the shapes of a fresh init and not the trained values; the rest is kept.
        assert _differs(params[name], ts.params[name]) == (name in reset), name
        assert jax.tree.map(np.shape, params[name]) == jax.tree.map(np.shape, fresh[name]), name
    assert_same_state(params["slow_critic"], params["critic"])
    if part == "actor_critic":
        assert_same_state(params["actor_ema"], params["actor"])
    counts = adam_counts(opt_state)
    assert counts["['critic']"] == 0 and counts["['world_model']"] == 4
    assert counts["['actor']"] == (0 if part == "actor_critic" else 4)
    # Not due: everything as it was.
    params, opt_state = dreamer.reset_behavior(ts, np.bool_(False), jax.random.PRNGKey(1))
    assert_same_state(params, ts.params)
    assert_same_state(opt_state, ts.opt_state)


@unadopted_lever
def test_reset_fires_once_before_the_iterations_updates(env):
    """Twin runs from one seed, with and without a reset at env step 40: they agree until the third
    iteration; in it the critic's Adam count restarts (4 updates, not 8) while the world model, which
    learns from the replay alone, stays bit-identical, and no later iteration resets again."""
    runs = {}
    for reset_at in ((), (40,)):
        cfg = dreamer.DreamerConfig.build(**SMALL, behavior_reset_at=reset_at)
        step = fast_jit(dreamer.train_step)
        ts = dreamer.init(jax.random.PRNGKey(0), env, cfg)
        states = []
        for _ in range(4):  # env steps 16, 32 (first updates), 48 (reset), 64
            ts, metrics = step(ts)
            assert np.isfinite(float(metrics["critic/loss"]))
            states.append(ts)
        runs[reset_at] = states
    plain, reset = runs[()], runs[(40,)]
    assert_same_state(plain[1].params, reset[1].params)
    assert_same_state(plain[2].params["world_model"], reset[2].params["world_model"])
    assert _differs(plain[2].params["critic"], reset[2].params["critic"])
    assert [adam_counts(s.opt_state)["['critic']"] for s in reset] == [0, 4, 4, 8]
    assert [adam_counts(s.opt_state)["['actor']"] for s in reset] == [0, 4, 8, 12]


def test_reset_config_is_checked():
    with pytest.raises(ValueError, match="behavior_reset="):
        dreamer.DreamerConfig.build(**SMALL, behavior_reset="world_model")
    with pytest.raises(ValueError, match="behavior_reset_at"):
        dreamer.DreamerConfig.build(**SMALL, behavior_reset_at=(32,))
    with pytest.raises(ValueError, match="behavior_reset_at"):
        dreamer.DreamerConfig.build(**SMALL, behavior_reset_at=(-5,))
