"""The training wrappers (episode limit, auto-reset, vmap) and config validation, on a tiny env."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import lunarl  # noqa: F401  (installs the compat shim)
from lunarl.envs import EnvConfig, LunarEnv, State, bounded, wrap_for_training


@dataclasses.dataclass(frozen=True)
class CounterConfig(EnvConfig):
    terminate_at: int = bounded(1000, 1, None)


@struct.dataclass
class CounterState:
    t: jax.Array
    start: jax.Array  # drawn at reset: tells episodes apart


class Counter(LunarEnv):
    """obs = [t, start]; terminates when t reaches ``terminate_at``."""

    config_cls = CounterConfig

    def reset(self, rng):
        rng, key = jax.random.split(rng)
        ps = CounterState(t=jnp.zeros((), jnp.int32), start=jax.random.uniform(key))
        return State(ps, self._obs(ps), jnp.zeros(()), jnp.zeros(()), {"success": jnp.zeros(())}, {"rng": rng})

    def step(self, state, action):
        ps = state.pipeline_state.replace(t=state.pipeline_state.t + 1)
        done = (ps.t >= self.config.terminate_at).astype(jnp.float32)
        return state.replace(pipeline_state=ps, obs=self._obs(ps), reward=jnp.ones(()), done=done)

    def _obs(self, ps):
        return jnp.stack([ps.t.astype(jnp.float32), ps.start])

    @property
    def observation_size(self):
        return 2

    @property
    def action_size(self):
        return 1


def _rollout(env, num_envs, num_steps, seed=0):
    state = env.reset(jax.random.split(jax.random.PRNGKey(seed), num_envs))

    def body(state, _):
        state = env.step(state, jnp.zeros((num_envs, 1)))
        return state, (state.obs, state.done, state.info["truncation"], state.info["final_obs"])

    return jax.jit(lambda s: jax.lax.scan(body, s, None, length=num_steps))(state)


def test_truncation_sets_flags_and_keeps_final_obs():
    env = wrap_for_training(Counter(), episode_length=5)
    _, (obs, done, trunc, final_obs) = _rollout(env, num_envs=3, num_steps=12)
    # Steps 5 and 10 (indices 4, 9) end an episode by the limit, not by termination.
    expected = np.zeros(12)
    expected[[4, 9]] = 1
    np.testing.assert_array_equal(done[:, 0], expected)
    np.testing.assert_array_equal(trunc[:, 0], expected)
    # The observation after the limit is the new episode's first one; the final one is kept.
    np.testing.assert_array_equal(obs[4, :, 0], 0.0)
    np.testing.assert_array_equal(final_obs[4, :, 0], 5.0)
    np.testing.assert_array_equal(obs[5, :, 0], 1.0)


def test_termination_is_not_truncation():
    env = wrap_for_training(Counter(terminate_at=3), episode_length=10)
    _, (_, done, trunc, final_obs) = _rollout(env, num_envs=2, num_steps=7)
    np.testing.assert_array_equal(done[:, 0], [0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(trunc[:, 0], 0)
    np.testing.assert_array_equal(final_obs[2, :, 0], 3.0)


def test_auto_reset_draws_a_new_episode_each_time():
    # All 4 envs finish together every 2 steps: 4 redraws per step keep up with that.
    env = wrap_for_training(Counter(terminate_at=2), episode_length=100, resets_per_step=4)
    _, (obs, done, _, _) = _rollout(env, num_envs=4, num_steps=6)
    starts = np.asarray(obs[[1, 3, 5], :, 1])  # first obs of episodes 2, 3, 4
    assert len(np.unique(starts)) == starts.size, "each reset must draw a fresh layout"
    brax_like = wrap_for_training(Counter(terminate_at=2), episode_length=100, randomize_resets=False)
    _, (obs2, _, _, _) = _rollout(brax_like, num_envs=4, num_steps=6)
    np.testing.assert_array_equal(obs2[1, :, 1], obs2[3, :, 1])


def test_limited_redraws_catch_up_and_keep_each_env_on_its_own_key_chain():
    # 32 envs all truncate at step 3; 2 redraws per step refill the 32 used slots in 16 steps.
    limited = wrap_for_training(Counter(), episode_length=3, resets_per_step=2)
    state, (obs, done, _, _) = _rollout(limited, num_envs=32, num_steps=3)
    assert done[-1].all()
    assert int(state.info["reset_pool"].fresh.sum()) == 2  # all 32 used, 2 redrawn so far
    # Redrawing two slots per step or all of them at once gives every env the same layouts.
    full = wrap_for_training(Counter(), episode_length=1000, resets_per_step=32)
    slow = wrap_for_training(Counter(), episode_length=1000, resets_per_step=2)
    pools = []
    for env in (full, slow):
        s = env.reset(jax.random.split(jax.random.PRNGKey(0), 32))
        s = s.replace(done=jnp.ones(32))  # as if every env had just finished
        s.info["reset_pool"] = s.info["reset_pool"].replace(fresh=jnp.zeros(32, bool))
        s = jax.jit(lambda s, env=env: jax.lax.fori_loop(0, 16, lambda _, s: _step_zero(env, s), s))(s)
        assert bool(s.info["reset_pool"].fresh.all()), "16 steps of 2 redraws refill 32 slots"
        pools.append(np.asarray(s.info["reset_pool"].obs[:, 1]))
    np.testing.assert_array_equal(pools[0], pools[1])


def _step_zero(env, state):
    return env.step(state, jnp.zeros((state.obs.shape[0], 1)))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"CounterConfig.terminate_at=0 is out of range"):
        Counter(terminate_at=0)
    with pytest.raises(ValueError, match="terminate_at must be an int"):
        Counter(terminate_at="abc")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        Counter(bogus=1)
    with pytest.raises(ValueError, match="episode_length must be >= 1"):
        wrap_for_training(Counter(), episode_length=0)
    with pytest.raises(ValueError, match="resets_per_step must be >= 1"):
        wrap_for_training(Counter(), resets_per_step=0)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown env 'nope'"):
        lunarl.envs.make("nope")
