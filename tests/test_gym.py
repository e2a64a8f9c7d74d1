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


@pytest.mark.parametrize("gym_id", AVAILABLE)
def test_check_env_passes(gym_id):
    env = gymnasium.make(gym_id)
    check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("gym_id", [g for g in AVAILABLE if g != "lunarl/Kuka-v0"])
def test_episode_is_truncated_at_the_limit(gym_id):
    env = gymnasium.make(gym_id, max_episode_steps=5)
    env.reset(seed=0)
    for t in range(5):
        obs, reward, terminated, truncated, info = env.step(np.zeros(env.action_space.shape, np.float32))
        assert np.isfinite(obs).all() and np.isfinite(reward)
        if terminated:
            break
    assert terminated or truncated
    assert "success" in info
