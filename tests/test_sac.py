"""SAC: the squashed-Gaussian log-prob and the targets against NumPy, truncation handling,
temperature tuning, seeds under vmap, determinism, learning, exact resume with the replay,
config validation, and the benchmark script. Everything runs on the tiny point-goal env with
(32, 32) nets; compiled functions are module-scoped fixtures."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from conftest import fast_jit

import lunarl  # noqa: F401  (compat shim)
from lunarl import agents
from lunarl.agents import replay, sac
from lunarl.agents.base import AgentConfig

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from ppo_toy_env import PointGoal  # noqa: E402

TINY = dict(
    num_envs=8,
    episode_length=32,
    unroll_length=4,
    utd_ratio=1.0,
    batch_size=64,
    buffer_size=4096,
    warmup_steps=64,
    actor_hidden=(32, 32),
    critic_hidden=(32, 32),
    learning_rate=1e-3,
)


@pytest.fixture(scope="module")
def env() -> PointGoal:
    return PointGoal()


@pytest.fixture(scope="module")
def cfg() -> sac.SACConfig:
    return sac.SACConfig.build(**TINY)


@pytest.fixture(scope="module")
def init_fn(env, cfg):
    return fast_jit(lambda key: sac.init(key, env, cfg))


@pytest.fixture(scope="module")
def step():
    return fast_jit(sac.train_step)


def _train(step, ts, iterations: int):
    for _ in range(iterations):
        ts, metrics = step(ts)
    return ts, metrics


# --------------------------------------------------------------------------------------------
# The squashed Gaussian
# --------------------------------------------------------------------------------------------


def test_squashed_gaussian_log_prob_matches_numpy():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(64, 3)).astype(np.float32)
    log_std = rng.uniform(-2.0, 0.3, size=(64, 3)).astype(np.float32)
    dist = sac.squashed_gaussian(jnp.asarray(mean), jnp.asarray(log_std))
    action, log_prob = dist.sample_and_log_prob(seed=jax.random.PRNGKey(1))
    a = np.asarray(action, np.float64)
    assert (np.abs(a) < 1).all()
    # The NumPy reference: Gaussian density of u = atanh(a), minus log |d tanh(u)/du| = log(1 - a^2).
    u = np.arctanh(np.clip(a, -1 + 1e-7, 1 - 1e-7))
    std = np.exp(log_std.astype(np.float64))
    gauss = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    ref = (gauss - np.log(1 - a**2)).sum(-1)
    # Away from saturation atanh is well conditioned, so the reference is exact there.
    ok = np.abs(a).max(-1) < 0.99
    assert ok.sum() > 40
    np.testing.assert_allclose(np.asarray(log_prob)[ok], ref[ok], rtol=1e-4, atol=1e-4)
    # The density evaluated at the action agrees with the one returned with the sample.
    np.testing.assert_allclose(dist.log_prob(action)[ok], np.asarray(log_prob)[ok], rtol=1e-3, atol=1e-3)
    assert np.isfinite(np.asarray(log_prob)).all()


def test_deterministic_policy_is_tanh_of_mean(env, cfg, init_fn):
    ts = init_fn(jax.random.PRNGKey(0))
    policy = sac.make_policy(env, cfg)
    obs = ts.env_state.obs
    params = sac.policy_params(ts)
    a, carry = policy.act(params, obs, policy.initial_carry(obs.shape[0]), jnp.ones(obs.shape[0], bool), jax.random.PRNGKey(0), True)
    mean, _ = sac._actor(env, cfg).apply(params["actor"], sac._features(env, cfg, params["obs_stats"], obs))
    np.testing.assert_allclose(a, jnp.tanh(mean), rtol=1e-6)
    b, _ = policy.act(params, obs, carry, jnp.ones(obs.shape[0], bool), jax.random.PRNGKey(0), False)
    assert a.shape == b.shape == (cfg.num_envs, env.action_size) and (jnp.abs(b) <= 1).all()
    assert not np.allclose(a, b)


# --------------------------------------------------------------------------------------------
# Targets and time limits
# --------------------------------------------------------------------------------------------


def test_truncation_bootstraps_from_the_final_observation(env):
    """Collect through the real wrapper stack with a 5-step limit: at a truncation the stored
    next_obs is the episode's last observation (not the reset one) and the TD target bootstraps
    from it; a termination does not bootstrap."""
    cfg = sac.SACConfig.build(**{**TINY, "episode_length": 5, "unroll_length": 12, "warmup_steps": 0})
    ts = jax.jit(lambda key: sac.init(key, env, cfg))(jax.random.PRNGKey(3))
    # Default XLA options: obs and next_obs are compared bit for bit.
    _, batch, _ = jax.jit(sac.collect)(ts, jax.random.PRNGKey(4))
    done, term = np.asarray(batch.done), np.asarray(batch.terminated)
    truncated = (done == 1) & (term == 0)
    assert truncated[4].all() and truncated.sum() >= cfg.num_envs  # every env hits the limit at step 5
    obs, next_obs = np.asarray(batch.obs), np.asarray(batch.next_obs)
    # Within an episode next_obs is the next row's obs; at the end it is not (auto-reset).
    cont = done[:-1] == 0
    np.testing.assert_array_equal(next_obs[:-1][cont], obs[1:][cont])
    assert not np.allclose(next_obs[4], obs[5])
    # The episode's last observation continues its trajectory: one step of speed 0.1 per axis.
    assert np.abs(next_obs[4, :, :2] - obs[4, :, :2]).max() <= 0.1 + 1e-6

    # Hand-computed targets for one truncated and one terminated transition (n = 1).
    gamma, alpha, r = cfg.gamma, 0.3, np.float32(0.7)
    seq = sac.Transition(
        obs=jnp.zeros((2, 1, 4)),
        action=jnp.zeros((2, 1, 2)),
        reward=jnp.full((2, 1), r),
        next_obs=jnp.asarray(next_obs[4, :2])[:, None],
        terminated=jnp.asarray([[0.0], [1.0]]),
        done=jnp.asarray([[1.0], [1.0]]),
    )
    reward, discount, boot_obs = sac.n_step_targets(seq, gamma)
    np.testing.assert_allclose(discount, [gamma, 0.0])
    np.testing.assert_array_equal(boot_obs, next_obs[4, :2])
    next_q = jnp.asarray([[1.5, -2.0], [1.2, 4.0]])  # [critic, batch]
    next_log_prob = jnp.asarray([-0.5, 0.25])
    y = sac.td_target(next_q, next_log_prob, reward, discount, alpha)
    np.testing.assert_allclose(y, [r + gamma * (1.2 - alpha * -0.5), r], rtol=1e-6)


def _numpy_n_step(reward, done, terminated, gamma):
    out_r, out_d, out_k = [], [], []
    for b in range(reward.shape[0]):
        total, k = 0.0, 0
        for k in range(reward.shape[1]):
            total += gamma**k * reward[b, k]
            if done[b, k]:
                break
        out_r.append(total)
        out_d.append(0.0 if terminated[b, k] else gamma ** (k + 1))
        out_k.append(k)
    return np.array(out_r), np.array(out_d), np.array(out_k)


def test_n_step_targets_match_numpy():
    rng = np.random.default_rng(0)
    b, n, gamma = 256, 4, 0.9
    reward = rng.normal(size=(b, n)).astype(np.float32)
    done = (rng.random((b, n)) < 0.2).astype(np.float32)
    terminated = done * (rng.random((b, n)) < 0.5)
    next_obs = rng.normal(size=(b, n, 3)).astype(np.float32)
    seq = sac.Transition(
        obs=jnp.zeros((b, n, 3)), action=jnp.zeros((b, n, 1)), reward=jnp.asarray(reward),
        next_obs=jnp.asarray(next_obs), terminated=jnp.asarray(terminated), done=jnp.asarray(done),
    )  # fmt: skip
    r, d, boot = sac.n_step_targets(seq, gamma)
    ref_r, ref_d, ref_k = _numpy_n_step(reward, done, terminated, gamma)
    np.testing.assert_allclose(r, ref_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5)
    np.testing.assert_array_equal(boot, next_obs[np.arange(b), ref_k])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_warmup_and_updates_are_decided_on_device(env, cfg, init_fn, step):
    ts = init_fn(jax.random.PRNGKey(0))
    ts, m = step(ts)  # 32 env steps < warmup 64: uniform actions, no update
    assert int(ts.gradient_steps) == 0 and float(m["losses/qf_loss"]) == 0.0
    assert int(ts.replay.size) == cfg.unroll_length and float(m["charts/replay_size"]) == 32
    actions = np.asarray(ts.replay.data.action[: cfg.unroll_length])
    assert actions.min() < -0.8 and actions.max() > 0.8  # uniform, not the near-zero initial actor
    ts, m = step(ts)  # 64 >= warmup and >= batch_size: learns
    assert int(ts.gradient_steps) == cfg.updates_per_iteration and float(m["losses/qf_loss"]) > 0
    assert set(m) == set(sac.METRIC_NAMES) and all(v.dtype == jnp.float32 for v in m.values())


def test_temperature_moves_toward_the_target_entropy(env, cfg, init_fn, step):
    # Initial actor: entropy above the target -|A| = -2, so alpha must fall ...
    ts, m = _train(step, init_fn(jax.random.PRNGKey(0)), 6)
    assert float(m["losses/entropy"]) > -2.0 and float(m["losses/alpha"]) < 0.99
    # ... and with the actor's log-std pinned to log_std_min = -5 (a large negative bias on the
    # log-std outputs) the entropy is far below it, so alpha must rise. Same compiled step.
    ts = init_fn(jax.random.PRNGKey(0))
    head = ts.params["actor"]["params"]["MLP_0"]["Dense_2"]
    bias = head["bias"].at[env.action_size :].set(-50.0)
    kernel = head["kernel"].at[:, env.action_size :].set(0.0)
    actor = {"params": {"MLP_0": {**ts.params["actor"]["params"]["MLP_0"], "Dense_2": {"bias": bias, "kernel": kernel}}}}
    ts, m = _train(step, ts.replace(params={**ts.params, "actor": actor}), 6)
    assert float(m["losses/entropy"]) < -2.0 and float(m["losses/alpha"]) > 1.001


def test_same_seed_bit_identical_and_seeds_differ(init_fn, step):
    a, _ = _train(step, init_fn(jax.random.PRNGKey(7)), 4)
    b, _ = _train(step, init_fn(jax.random.PRNGKey(7)), 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    c, _ = _train(step, init_fn(jax.random.PRNGKey(8)), 4)
    assert not np.array_equal(a.params["critic"]["params"]["q1"]["Dense_0"]["kernel"],
                              c.params["critic"]["params"]["q1"]["Dense_0"]["kernel"])  # fmt: skip


def test_vmap_over_two_seeds_equals_two_single_runs(env, cfg, init_fn, step):
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    batched = fast_jit(jax.vmap(lambda k: sac.init(k, env, cfg)))(keys)
    batched, metrics = _train(fast_jit(jax.vmap(sac.train_step)), batched, 4)
    for i in range(2):
        single, single_metrics = _train(step, init_fn(keys[i]), 4)
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(batched.params), strict=True):
            np.testing.assert_allclose(a, b[i], rtol=1e-4, atol=1e-5)
        # Batched (vmapped) matmuls may round differently from plain ones, and the actions they
        # give drive the envs, so the stored observations agree to float rounding, not bitwise.
        np.testing.assert_allclose(single.replay.data.obs, batched.replay.data.obs[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            single_metrics["losses/qf_loss"], metrics["losses/qf_loss"][i], rtol=1e-4, atol=1e-5
        )


def _greedy_return(env, cfg, ts, episodes: int = 64) -> float:
    """Mean return of the deterministic policy over fixed episodes (no auto-reset)."""
    policy = sac.make_policy(env, cfg)
    params = sac.policy_params(ts)

    @fast_jit
    def run(params):
        state = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(123), episodes))

        def body(carry, _):
            state, alive, total = carry
            action, _ = policy.act(params, state.obs, (), jnp.zeros(episodes, bool), jax.random.PRNGKey(0), True)
            state = jax.vmap(env.step)(state, action)
            total = total + alive * state.reward
            return (state, alive * (1.0 - state.done), total), None

        init = (state, jnp.ones(episodes), jnp.zeros(episodes))
        return jax.lax.scan(body, init, None, length=cfg.episode_length)[0][2].mean()

    return float(run(params))


def test_short_run_improves_the_return(env, cfg, init_fn, step):
    ts = init_fn(jax.random.PRNGKey(0))
    before = _greedy_return(env, cfg, ts)
    ts, _ = _train(step, ts, 200)  # 6,400 env steps, 800 gradient steps
    after = _greedy_return(env, cfg, ts)
    # The return is progress toward the goal (at most ~2.8 x 10) plus a bonus of 1 on arrival.
    assert after > before + 3.0, (before, after)


def test_resume_from_orbax_is_bit_identical_with_the_replay(tmp_path, init_fn, step):
    ts, _ = _train(step, init_fn(jax.random.PRNGKey(5)), 3)
    assert int(ts.replay.size) > 0
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, ts)
        ckpt.wait_until_finished()
    straight, straight_metrics = _train(step, ts, 3)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, init_fn(jax.random.PRNGKey(99))))
    # Orbax hands back arrays committed to a device, which the jitted step would compile for
    # anew; the same values as host arrays reuse its program.
    restored = jax.device_get(restored)
    np.testing.assert_array_equal(restored.replay.data.obs, ts.replay.data.obs)
    assert int(restored.replay.position) == int(ts.replay.position)
    resumed, resumed_metrics = _train(step, restored, 3)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    for k in straight_metrics:
        np.testing.assert_array_equal(straight_metrics[k], resumed_metrics[k])


# --------------------------------------------------------------------------------------------
# Contract, config
# --------------------------------------------------------------------------------------------


def test_agent_contract(env, cfg, init_fn):
    assert sac.AGENT.config_class is sac.SACConfig
    assert "sac" in agents.known() and agents.get("sac") is sac.AGENT
    ts = init_fn(jax.random.PRNGKey(0))
    specs = sac.env_axes(ts)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == jax.tree.structure(ts)
    assert specs.replay.data.obs == replay.ENV_AXIS_SPEC and specs.params["log_alpha"] == jax.sharding.PartitionSpec()
    assert cfg.env_steps_per_iteration == 32 and cfg.updates_per_iteration == 4 and cfg.capacity == 512


def test_config_validation():
    with pytest.raises(ValueError, match="utd_ratio"):
        sac.SACConfig.build(**{**TINY, "utd_ratio": 0.3})
    assert sac.SACConfig.build(**{**TINY, "utd_ratio": 0.25}).updates_per_iteration == 1
    with pytest.raises(ValueError, match="buffer_size"):
        sac.SACConfig.build(**{**TINY, "buffer_size": 16})
    with pytest.raises(ValueError, match="activation"):
        sac.SACConfig.build(activation="nope")
    with pytest.raises(ValueError, match="log_std_min"):
        sac.SACConfig.build(log_std_min=1.0, log_std_max=0.5)
    with pytest.raises(ValueError, match="gamma"):
        sac.SACConfig.build(gamma=1.5)


def test_agent_yaml_lists_exactly_the_user_fields():
    conf = yaml.safe_load((ROOT / "conf/agent/sac.yaml").read_text())
    assert conf.pop("name") == "sac"
    user_fields = {f.name for f in dataclasses.fields(sac.SACConfig)} - set(AgentConfig.HOST_FIELDS)
    assert set(conf) == user_fields
    sac.SACConfig.build(**conf)  # every value valid
    for f in dataclasses.fields(sac.SACConfig):
        if f.name in conf and isinstance(f.default, tuple):
            assert tuple(conf[f.name]) == f.default, f.name
        elif f.name in conf:
            assert conf[f.name] == f.default, f.name
    for name in ("car_track_sac", "kuka_reach_sac"):
        exp = yaml.safe_load((ROOT / f"conf/experiment/{name}.yaml").read_text())
        assert {"override /agent": "sac"} in exp["defaults"]
        sac.SACConfig.build(**{**conf, **exp["agent"]})


# --------------------------------------------------------------------------------------------
# The benchmark script
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # about a minute each: both trainers compile
@pytest.mark.parametrize("full_replay", [False, True])
def test_bench_sac_writes_side_by_side_results(tmp_path, full_replay):
    out = tmp_path / "bench_sac.json"
    args = [
        "--env", "car_track", "--num-envs", "4", "--total-steps", "256", "--chunks", "2", "--repeats", "1",
        "--eval-episodes", "4", "--set", "batch_size=16", "--set", "warmup_steps=32", "--set", "unroll_length=4",
        "--set", "actor_hidden=8", "--set", "critic_hidden=8", "--set", "buffer_size=100", "--out", str(out),
    ]  # fmt: skip
    if full_replay:
        args.append("--full-replay")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_sac.py"), *args], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in (
        "lunarl_sps", "brax_sps", "ratio", "lunarl_ups", "brax_ups", "lunarl_compile_s", "brax_compile_s",
        "lunarl_return", "brax_return",
    ):  # fmt: skip
        assert isinstance(result[key], float), key
    assert result["lunarl_sps"] > 0 and result["brax_sps"] > 0
    assert result["ratio"] == result["runs"][0]["ratio"]
    assert result["settings"]["num_envs"] == 4 and result["settings"]["actor_hidden"] == [8]
    assert result["full_replay"] is full_replay
    # --full-replay: the warm-up fills the replay (100 rounded up to whole 16-step iterations).
    expected = (112, 112) if full_replay else (32, 100)
    assert (result["settings"]["warmup_steps"], result["settings"]["buffer_size"]) == expected
    assert "ratio lunarl/brax" in proc.stdout


def test_bench_sac_rejects_bad_flags(tmp_path):
    for bad, culprit in ((["--repeats", "0"], "--repeats=0"), (["--set", "nope=1"], "nope")):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts/bench_sac.py"), *bad, "--out", str(tmp_path / "x.json")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode != 0 and culprit in proc.stderr, proc.stderr[-2000:]
