"""The Gymnasium adapter: ids registered on ``import lunarl`` and Gymnasium's own checker."""

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import lunarl
from lunarl.envs.gym import GYMNASIUM_IDS

AVAILABLE = [gym_id for gym_id, name in GYMNASIUM_IDS.items() if name in lunarl.envs.registered()]


def test_ids_are_registered_on_import():
    for gym_id in GYMNASIUM_IDS:
        assert gym_id in gymnasium.registry


@pytest.mark.parametrize(
    "gym_id", [pytest.param(g, marks=pytest.mark.slow) if g == "lunarl/Kuka-v0" else g for g in AVAILABLE]
)
def test_check_env_passes(gym_id):
    env = gymnasium.make(gym_id)
    check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("gym_id", [g for g in AVAILABLE if g != "lunarl/Kuka-v0"])
def test_episode_is_truncated_at_the_limit(gym_id):
    env = gymnasium.make(gym_id, max_episode_steps=5)
    env.reset(seed=0)
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_space.shape, np.float32))
        assert np.isfinite(obs).all() and np.isfinite(reward)
        if terminated:
            break
    assert terminated or truncated
    assert "success" in info


def test_vector_env_autoresets_in_same_step_mode():
    from lunarl.envs.gym import make_vector_env

    envs = make_vector_env("lunarl/Rover-v0", num_envs=3, max_episode_steps=4)
    obs, _ = envs.reset(seed=1)
    assert obs.shape == (3, envs.single_observation_space.shape[0]) and obs.dtype == np.float32
    again, _ = envs.reset(seed=1)
    np.testing.assert_array_equal(obs, again)
    for _ in range(4):
        obs, reward, terminated, truncated, infos = envs.step(envs.action_space.sample() * 0)
        assert reward.shape == (3,) and np.isfinite(reward).all()
    # The fourth step hits the limit: truncated (not terminated), the final obs kept in infos,
    # and the returned obs is the first of a new episode.
    assert truncated.all() and not terminated.any()
    assert infos["_final_obs"].all()
    assert not np.array_equal(infos["final_obs"], obs)
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        make_vector_env("rover", num_envs=0)
