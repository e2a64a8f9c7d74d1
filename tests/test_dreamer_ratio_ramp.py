"""Dreamer's train-ratio ramp (``agent.train_ratio_start``, ``agent.train_ratio_ramp``): the share
of each iteration's updates that change the parameters rises linearly from the start ratio when
the prefill ends to ``train_ratio``; the updates past the share change no parameter and no optimiser
state, and the gradient-step count says how many were applied."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import adam_counts, fast_jit, unadopted_lever

import lunarl
from lunarl.agents.dreamer import agent as dreamer

# 4 envs x 4 steps = 16 env steps per iteration; batches of 4 x 8 = 32 replayed steps, so
# train_ratio 8 is 4 updates per iteration and the start ratio 2 is one.
RAMPED = dict(
    num_envs=4, episode_length=200, unroll_length=4, batch_size=4, seq_len=8, horizon=3, buffer_size=256,
    prefill=32, train_ratio=8.0, train_ratio_start=2.0, train_ratio_ramp=64,
)  # fmt: skip


def test_active_updates_rise_linearly_from_the_start_ratio_after_the_prefill():
    cfg = dreamer.DreamerConfig.build(**RAMPED)
    assert cfg.updates_per_iteration == 4
    # env steps -> ratio: prefill and before 2 (one update), +16 -> 3.5 (1.75 -> 2), +48 -> 6.5
    # (3.25 -> 3), the ramp's end and after 8 (4).
    for env_steps, updates in ((0, 1), (32, 1), (48, 2), (80, 3), (96, 4), (10_000, 4)):
        assert int(cfg.active_updates(np.int32(env_steps))) == updates, env_steps
    flat = dreamer.DreamerConfig.build(**{**RAMPED, "train_ratio_ramp": 0})
    assert int(flat.active_updates(np.int32(32))) == 4


@unadopted_lever
def test_updates_past_the_share_change_nothing_are_not_counted_and_do_not_run(monkeypatch):
    env = lunarl.envs.make("car_track")
    cfg = dreamer.DreamerConfig.build(**RAMPED)
    ran = []
    real_update = dreamer.update

    def counted_update(*args):  # a host callback per update that actually runs
        jax.debug.callback(lambda: ran.append(1))
        return real_update(*args)

    monkeypatch.setattr(dreamer, "update", counted_update)
    step = fast_jit(dreamer.train_step)
    ts = dreamer.init(jax.random.PRNGKey(0), env, cfg)
    applied = []
    for _ in range(5):  # env steps 16 (prefill), 32, 48, 64, 80
        ts, metrics = step(ts)
        jax.effects_barrier()
        applied.append(int(ts.gradient_steps))
        assert np.isfinite(float(metrics["world_model/loss"]))
    # No update in the prefill, then 1 (ratio 2), 2 (3.5), 2 (5: 2.5 rounds to even), 3 (6.5).
    assert applied == [0, 1, 3, 5, 8]
    # Only those ran: the scan's other steps (16 in all after the prefill) skipped their work.
    assert len(ran) == 8
    # Every optimiser (world model, actor, critic) took exactly the applied updates: the skipped
    # ones left their Adam state as it was.
    counts = adam_counts(ts.opt_state)
    assert set(counts) >= {"['world_model']", "['actor']", "['critic']"} and set(counts.values()) == {8}


def test_ramp_config_is_checked():
    with pytest.raises(ValueError, match="train_ratio_start"):
        dreamer.DreamerConfig.build(**{**RAMPED, "train_ratio_start": 0.0})
    with pytest.raises(ValueError, match="train_ratio_start"):
        dreamer.DreamerConfig.build(**{**RAMPED, "train_ratio_start": 16.0})
    dreamer.DreamerConfig.build(**{**RAMPED, "train_ratio_start": 0.0, "train_ratio_ramp": 0})
