"""PPO: GAE and truncation bootstrap against NumPy, learning, seeds under vmap, determinism,
config validation, evaluation. Everything runs on the tiny point-goal env with (32, 32) nets."""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fast_jit

import lunarl  # noqa: F401  (compat shim)
from lunarl import agents
from lunarl.agents import ppo
from lunarl.agents.base import stateless
from lunarl.agents.networks import RunningStats
from lunarl.run.evaluation import rollout, summarize

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ppo_toy_env import PointGoal  # noqa: E402

TINY = dict(
    num_envs=16,
    episode_length=32,
    unroll_length=16,
    num_minibatches=4,
    num_epochs=4,
    policy_hidden=(32, 32),
    value_hidden=(32, 32),
    learning_rate=3e-3,
)


@pytest.fixture(scope="module")
def env() -> PointGoal:
    return PointGoal()


@pytest.fixture(scope="module")
def cfg() -> ppo.PPOConfig:
    return ppo.PPOConfig.build(**TINY)


@pytest.fixture(scope="module")
def step():
    return fast_jit(ppo.train_step)


def _train(step, ts, iterations: int):
    for _ in range(iterations):
        ts, metrics = step(ts)
    return ts, metrics


# --------------------------------------------------------------------------------------------
# GAE and truncation
# --------------------------------------------------------------------------------------------


def _numpy_gae(rewards, values, bootstrap, final_values, done, truncation, gamma, lam):
    """Textbook GAE over [T, N] with explicit cases.

    Within an episode the next value is the next row's value (``bootstrap`` after the last row);
    at a termination it is 0; at a truncation it is the value of the episode's final observation.
    """
    T, N = rewards.shape
    adv = np.zeros((T, N))
    for n in range(N):
        running = 0.0
        for t in reversed(range(T)):
            if done[t, n] and not truncation[t, n]:
                next_value, running = 0.0, 0.0
            elif done[t, n]:
                next_value, running = final_values[t, n], 0.0
            else:
                next_value = values[t + 1, n] if t + 1 < T else bootstrap[n]
            delta = rewards[t, n] + gamma * next_value - values[t, n]
            running = delta + gamma * lam * running
            adv[t, n] = running
    return adv, adv + values


def test_gae_matches_numpy_reference():
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 9, 4, 0.97, 0.9
    rewards = rng.normal(size=(T, N))
    values = rng.normal(size=(T, N))
    bootstrap = rng.normal(size=N)
    final_values = rng.normal(size=(T, N))  # V(final obs) where an episode ended
    done = rng.random((T, N)) < 0.3
    truncation = done & (rng.random((T, N)) < 0.5)
    done[-1, 0], truncation[-1, 0] = True, True  # truncation on the last row
    done[2, 1], truncation[2, 1] = True, False  # and a termination
    # What the agent feeds GAE: the value of the observation each step produced (before reset).
    next_values = np.where(done, final_values, np.concatenate([values[1:], bootstrap[None]]))

    adv, targets = ppo.compute_gae(
        *(jnp.asarray(x, jnp.float32) for x in (rewards, values, next_values, done, truncation)),
        gamma,
        lam,
    )
    ref_adv, ref_targets = _numpy_gae(rewards, values, bootstrap, final_values, done, truncation, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, ref_targets, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_from_final_observation(env, cfg):
    """Roll out through the real wrapper stack: episodes that never reach the goal are cut by
    the limit; the GAE PPO uses must then bootstrap from V(final obs), not from 0 and not from
    the value of the fresh episode's first observation."""
    never = PointGoal(goal_radius=0.0)  # the goal cannot be reached: every episode truncates
    cfg5 = cfg.replace(episode_length=5, num_envs=4, unroll_length=12)
    ts = jax.jit(lambda key: ppo.init(key, never, cfg5))(jax.random.PRNGKey(3))
    _, batch, _ = jax.jit(ppo.rollout)(ts)  # default XLA options: obs and final_obs are compared bit for bit
    done, trunc = np.asarray(batch.done), np.asarray(batch.truncation)
    expected = np.zeros((12, 4))
    expected[[4, 9]] = 1.0
    np.testing.assert_array_equal(done, expected)
    np.testing.assert_array_equal(trunc, expected)
    obs, final = np.asarray(batch.obs), np.asarray(batch.final_obs)
    # Not done: the final observation is the next step's observation. Truncated: it is not.
    np.testing.assert_array_equal(final[:-1][done[:-1] == 0], obs[1:][done[:-1] == 0])
    assert not np.allclose(final[4], obs[5])

    # Parameters as an argument, not closed over (scripts/results/xla_cpu_notes.md: all-zero ones).
    value = jax.jit(lambda p, o: ppo._network(never, cfg5).apply(p, o, method=ppo.ActorCritic.value))
    values, final_values = np.asarray(value(ts.params, batch.obs)), np.asarray(value(ts.params, batch.final_obs))
    adv, _ = ppo.compute_gae(
        batch.reward, jnp.asarray(values), jnp.asarray(final_values), batch.done, batch.truncation, 0.99, 0.95
    )
    rewards = np.asarray(batch.reward)
    ref, _ = _numpy_gae(rewards, values, final_values[-1], final_values, done, trunc, 0.99, 0.95)
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-5)
    as_terminal, _ = _numpy_gae(rewards, values, final_values[-1], final_values, done, np.zeros_like(trunc), 0.99, 0.95)
    assert np.abs(as_terminal[4] - ref[4]).max() > 1e-3  # the bootstrap really changes the targets


# --------------------------------------------------------------------------------------------
# Minibatch shuffling and the flat-parameter learning loop
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 2048, 3000, 70_000])  # 70,000 > 2**16: the fallback
def test_shuffled_indices_is_a_permutation(n):
    a, b = (np.asarray(ppo.shuffled_indices(jax.random.PRNGKey(k), n)) for k in (0, 1))
    assert a.dtype == np.int32
    np.testing.assert_array_equal(np.sort(a), np.arange(n))
    np.testing.assert_array_equal(a, ppo.shuffled_indices(jax.random.PRNGKey(0), n))  # deterministic
    if n > 2:
        assert (a != b).any()


def test_shuffled_indices_is_uniform():
    """All 24 orders of 4 items, each about equally often over 24,000 keys (binomial sd ~31)."""
    perms = jax.vmap(lambda k: ppo.shuffled_indices(k, 4))(jax.random.split(jax.random.PRNGKey(0), 24_000))
    codes = np.asarray(perms) @ np.array([64, 16, 4, 1])
    _, counts = np.unique(codes, return_counts=True)
    assert len(counts) == 24
    assert counts.min() > 850 and counts.max() < 1150


def test_flat_learning_loop_matches_per_leaf_optax(env, cfg):
    """``_learn`` keeps the parameters flat inside its loop and drives the inner clip+Adam with
    the state ``optax.flatten`` made; it must equal the plain per-leaf optax loop."""
    ts = ppo.init(jax.random.PRNGKey(3), env, cfg)
    net = ppo._network(env, cfg)
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    n = cfg.num_envs * cfg.unroll_length
    data = ppo._Sample(
        obs=jax.random.normal(keys[0], (n, ppo._feature_size(env, cfg))),
        action=jax.random.normal(keys[1], (n, env.action_size)),
        log_prob=jax.random.normal(keys[2], (n,)) - 3.0,
        advantage=jax.random.normal(keys[3], (n,)),
        target=jnp.linspace(-1.0, 1.0, n),
    )
    rng = jax.random.PRNGKey(5)
    params, opt_state, aux = fast_jit(lambda ts: ppo._learn(ts, net, data, rng))(ts)

    optimizer = ppo._optimizer(cfg)
    loss_grad = jax.grad(lambda p, minibatch: ppo.ppo_loss(p, net, minibatch, cfg)[0])

    @fast_jit  # one compile for the 16 reference updates (op by op, they compiled hundreds of kernels)
    def ref_update(params, opt_state, idx):
        grads = loss_grad(params, jax.tree.map(lambda x: x[idx], data))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    ref_params, ref_state, norms = ts.params, ts.opt_state, []
    for key in jax.random.split(rng, cfg.num_epochs):
        perm = ppo.shuffled_indices(key, n)
        for i in range(cfg.num_minibatches):
            ref_params, ref_state, norm = ref_update(ref_params, ref_state, perm.reshape(cfg.num_minibatches, -1)[i])
            norms.append(norm)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, params, ref_params)
    jax.tree.map(close, opt_state, ref_state)
    close(aux["losses/grad_norm"], np.mean(norms))


def test_running_stats_match_numpy():
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n, 5)) for n in (7, 50, 13)]
    stats = RunningStats.create(5)
    for b in batches:
        stats = stats.update(jnp.asarray(b, jnp.float32))
    allx = np.concatenate(batches)
    np.testing.assert_allclose(stats.mean, allx.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats.var, allx.var(0), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Learning, seeds, determinism
# --------------------------------------------------------------------------------------------


def test_learning_improves_deterministic_return(env, cfg, step):
    policy = ppo.make_policy(env, cfg)
    ev = fast_jit(functools.partial(rollout, env, policy, num_episodes=256, episode_length=cfg.episode_length))
    ts = ppo.init(jax.random.PRNGKey(0), env, cfg)
    before = summarize(ev(ppo.policy_params(ts), jax.random.PRNGKey(7)))
    ts, metrics = _train(step, ts, 80)
    after = summarize(ev(ppo.policy_params(ts), jax.random.PRNGKey(7)))
    assert int(ts.env_steps) == 80 * cfg.num_envs * cfg.unroll_length
    assert all(np.isfinite(float(v)) for v in metrics.values())
    # Reaching the goal from ~1 unit away is worth about 10; the untrained policy barely moves.
    assert after["episode_return"] > before["episode_return"] + 4.0, (before, after)
    assert after["success_rate"] > 0.5, after


def test_vmapped_seeds_match_single_seed_runs(env, cfg, step):
    keys = jax.random.split(jax.random.PRNGKey(42), 2)
    batched = fast_jit(jax.vmap(lambda k: ppo.init(k, env, cfg)))(keys)
    batched, metrics = _train(fast_jit(jax.vmap(ppo.train_step)), batched, 3)
    assert metrics["losses/policy_loss"].shape == (2,)
    for i in range(2):
        single, single_metrics = _train(step, ppo.init(keys[i], env, cfg), 3)
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(batched.params), strict=True):
            np.testing.assert_allclose(a, b[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(single.obs_stats.mean, batched.obs_stats.mean[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            single_metrics["charts/episode_return"], metrics["charts/episode_return"][i], rtol=1e-4, atol=1e-4
        )


def test_same_seed_is_bit_identical(env, cfg, step):
    a, _ = _train(step, ppo.init(jax.random.PRNGKey(5), env, cfg), 4)
    b, _ = _train(step, ppo.init(jax.random.PRNGKey(5), env, cfg), 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    c, _ = _train(step, ppo.init(jax.random.PRNGKey(6), env, cfg), 4)
    assert not np.array_equal(a.params["params"]["actor"]["Dense_0"]["kernel"], c.params["params"]["actor"]["Dense_0"]["kernel"])


def test_train_state_leaves_are_arrays_and_metrics_complete(env, cfg, step):
    ts, metrics = step(ppo.init(jax.random.PRNGKey(0), env, cfg))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(ts))
    expected = {
        "charts/episode_return", "charts/episode_length", "charts/success_rate", "charts/episodes_finished",
        "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
        "losses/clip_fraction", "losses/explained_variance", "charts/learning_rate", "losses/grad_norm",
    }  # fmt: skip
    assert expected == set(metrics) == set(ppo.METRIC_NAMES)
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())


def test_linear_lr_decay(env):
    # Its own compile (lr_decay changes the program), so the smallest config: the schedule counts
    # updates, so other epoch and minibatch counts give the same per-iteration rates.
    small = dict(num_envs=4, unroll_length=4, num_minibatches=1, num_epochs=2, policy_hidden=(8,), value_hidden=(8,))
    decayed = ppo.PPOConfig.build(**{**TINY, **small, "lr_decay": True, "total_iterations": 4})
    ts = ppo.init(jax.random.PRNGKey(0), env, decayed)
    step = fast_jit(ppo.train_step)
    lrs = []
    for _ in range(4):
        ts, m = step(ts)
        lrs.append(float(m["charts/learning_rate"]))
    np.testing.assert_allclose(lrs, [3e-3, 2.25e-3, 1.5e-3, 0.75e-3], rtol=1e-5)


class _HeadingGoal(PointGoal):
    """PointGoal whose observation entry 0 is declared an angle (only the features matter here)."""

    angle_observations = (0,)


def test_angle_observations_are_fed_as_cos_sin(cfg):
    env = _HeadingGoal()
    stats = RunningStats.create(env.observation_size)
    # Just either side of the wrap: the raw entries differ by ~2 pi, their (cos, sin) barely.
    obs = jnp.array([[np.pi - 1e-3, 0.5, 0.0, 0.0], [-np.pi + 1e-3, 0.5, 0.0, 0.0]], jnp.float32)
    x = ppo._features(env, cfg, stats, obs)
    assert x.shape == (2, env.observation_size + 2)
    np.testing.assert_allclose(x[:, :4], stats.normalize(obs))
    np.testing.assert_allclose(x[0, 4:], x[1, 4:], atol=3e-3)
    assert abs(float(x[0, 0] - x[1, 0])) > 6.0
    # Switched off, the network sees the observation only; its input layer has the right width.
    off = cfg.replace(angle_features=False)
    assert ppo._features(env, off, stats, obs).shape == (2, env.observation_size)
    for c, width in ((cfg, 6), (off, 4)):
        params = jax.eval_shape(lambda c=c: ppo.init(jax.random.PRNGKey(0), env, c)).params["params"]  # traced only
        assert params["actor"]["Dense_0"]["kernel"].shape[0] == width


# --------------------------------------------------------------------------------------------
# Config and registry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(gamma=1.5), "gamma"),
        (dict(num_envs=0), "num_envs"),
        (dict(activation="sigmoidish"), "activation"),
        (dict(num_envs=16, unroll_length=16, num_minibatches=3), "num_minibatches"),
        (dict(policy_hidden=(64, 0)), "policy_hidden"),
        (dict(lr_decay="yes"), "lr_decay"),
        (dict(no_such_field=1), "no_such_field"),
    ],
)
def test_bad_config_raises_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ppo.PPOConfig.build(**overrides)


def test_agent_registry():
    assert agents.get("ppo") is ppo.AGENT
    assert ppo.AGENT.config_class is ppo.PPOConfig
    assert agents.get("lunarl.agents.ppo") is ppo.AGENT  # agents outside lunarl: a module path
    with pytest.raises(ValueError, match="known agents: .*ppo"):
        agents.get("nope")
    with pytest.raises(ValueError, match="defines no AGENT"):
        agents.get("lunarl.agents.networks")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def test_evaluate_counts_only_the_first_episode(env):
    """A scripted policy that heads straight for the goal finishes well before the limit; the
    evaluator must report exactly the first episode of each env (host loop reference)."""

    def greedy(params, obs, rng, deterministic):
        return jnp.clip(obs[..., 2:] * 10.0, -1.0, 1.0)

    n, limit = 6, 32
    out = jax.jit(
        functools.partial(rollout, env, stateless(greedy), num_episodes=n, episode_length=limit, return_states=True)
    )(None, jax.random.PRNGKey(11))
    assert {k: out[k].shape for k in ("episode_return", "episode_length", "success")} == {
        "episode_return": (n,), "episode_length": (n,), "success": (n,)
    }  # fmt: skip
    assert out["states"].obs.shape == (limit + 1, env.observation_size)

    reset_key, _ = jax.random.split(jax.random.PRNGKey(11))
    keys = jax.random.split(reset_key, n)
    env_step = jax.jit(env.step)
    for i in range(n):
        state, ret, length = env.reset(keys[i]), 0.0, 0
        while True:
            state = env_step(state, greedy(None, state.obs, None, True))
            ret, length = ret + float(state.reward), length + 1
            if state.done:
                break
        assert length < limit
        assert out["episode_length"][i] == length
        np.testing.assert_allclose(out["episode_return"][i], ret, rtol=1e-5)
        assert out["success"][i] == 1.0
    np.testing.assert_array_equal(out["states"].obs[-1], out["states"].obs[int(out["episode_length"][0])])
    summary = summarize(out)
    assert summary["success_rate"] == 1.0 and summary["num_episodes"] == n
