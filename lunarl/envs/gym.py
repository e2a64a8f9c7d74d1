"""Gymnasium adapters for SB3 and other outside tools.

* ``LunarGymEnv``: one env, one episode at a time (the ids ``lunarl/Rover-v0`` etc.).
* ``LunarVectorEnv``: ``num_envs`` envs stepped as one jitted, vmapped call, with the same
  wrappers agents train on (episode limit, auto-reset), in Gymnasium's same-step autoreset mode.

The JAX env's ``reset`` and ``step`` are jitted once per adapter; every call crosses to the host,
so this is for compatibility, not speed (``scripts/bench_envs.py`` shows the gap). Episodes are
truncated after the env's ``default_episode_length`` steps (``max_episode_steps`` overrides it).
"""

from __future__ import annotations

from typing import Any

import gymnasium
import jax
import numpy as np
from gymnasium import spaces

from lunarl.envs import make, wrap_for_training

#: Gymnasium id -> lunarl env name.
GYMNASIUM_IDS = {
    "lunarl/Rover-v0": "rover",
    "lunarl/CarTrack-v0": "car_track",
    "lunarl/Kuka-v0": "kuka",
}


class LunarGymEnv(gymnasium.Env):
    """A ``gymnasium.Env`` over a jitted lunarl env."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        env_name: str,
        render_mode: str | None = None,
        max_episode_steps: int | None = None,
        **overrides: Any,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.env = make(env_name, **overrides)
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps or self.env.default_episode_length
        self.observation_space = spaces.Box(
            -np.inf, np.inf, shape=(self.env.observation_size,), dtype=np.float32
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(self.env.action_size,), dtype=np.float32)
        self._reset = jax.jit(self.env.reset)
        self._step = jax.jit(self.env.step)
        self._state = None
        self._steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        key = jax.random.PRNGKey(int(self.np_random.integers(0, 2**31 - 1)))
        self._state = self._reset(key)
        self._steps = 0
        return np.asarray(self._state.obs, dtype=np.float32), {}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        self._state = self._step(self._state, action)
        self._steps += 1
        terminated = bool(self._state.done)
        truncated = (not terminated) and self._steps >= self.max_episode_steps
        info = {k: float(v) for k, v in self._state.metrics.items()}
        obs = np.asarray(self._state.obs, dtype=np.float32)
        return obs, float(self._state.reward), terminated, truncated, info

    def render(self):
        if self.render_mode != "rgb_array" or self._state is None:
            return None
        return self.env.render(self._state)


class LunarVectorEnv(gymnasium.vector.VectorEnv):
    """``num_envs`` copies of a lunarl env as a Gymnasium vector env (same-step autoreset).

    A finished env's observation is already the first one of its next episode; the last
    observation of the finished episode is in ``infos["final_obs"]`` (masked by
    ``infos["_final_obs"]``), as Gymnasium's ``AutoresetMode.SAME_STEP`` prescribes.
    """

    metadata = {"autoreset_mode": gymnasium.vector.AutoresetMode.SAME_STEP}

    def __init__(self, env_name: str, num_envs: int, max_episode_steps: int | None = None, **overrides: Any):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env = make(env_name, **overrides)
        self.num_envs = num_envs
        self._wrapped = wrap_for_training(self.env, max_episode_steps or self.env.default_episode_length)
        self.single_observation_space = spaces.Box(
            -np.inf, np.inf, shape=(self.env.observation_size,), dtype=np.float32
        )
        self.single_action_space = spaces.Box(-1.0, 1.0, shape=(self.env.action_size,), dtype=np.float32)
        self.observation_space = gymnasium.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gymnasium.vector.utils.batch_space(self.single_action_space, num_envs)
        self._reset = jax.jit(self._wrapped.reset)
        self._step = jax.jit(self._wrapped.step)
        self._state = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        base = int(self._np_random.integers(0, 2**31 - 1)) if seed is None else seed
        self._state = self._reset(jax.random.split(jax.random.PRNGKey(base), self.num_envs))
        return np.asarray(self._state.obs, dtype=np.float32), {}

    def step(self, actions):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        actions = np.clip(np.asarray(actions, dtype=np.float32), -1.0, 1.0).reshape(self.action_space.shape)
        self._state = self._step(self._state, actions)
        done = np.asarray(self._state.done, dtype=bool)
        truncated = done & np.asarray(self._state.info["truncation"], dtype=bool)
        terminated = done & ~truncated
        infos: dict[str, Any] = {k: np.asarray(v) for k, v in self._state.metrics.items()}
        if done.any():
            infos["final_obs"] = np.asarray(self._state.info["final_obs"], dtype=np.float32)
            infos["_final_obs"] = done
        obs = np.asarray(self._state.obs, dtype=np.float32)
        return obs, np.asarray(self._state.reward, dtype=np.float32), terminated, truncated, infos


def make_vector_env(gym_id_or_name: str, num_envs: int, **kwargs: Any) -> LunarVectorEnv:
    """A ``LunarVectorEnv`` from a Gymnasium id (``lunarl/Rover-v0``) or an env name (``rover``)."""
    return LunarVectorEnv(GYMNASIUM_IDS.get(gym_id_or_name, gym_id_or_name), num_envs, **kwargs)


def register_gymnasium_envs() -> None:
    """Register ``lunarl/*`` ids with Gymnasium (idempotent)."""
    for gym_id, name in GYMNASIUM_IDS.items():
        if gym_id not in gymnasium.registry:
            gymnasium.register(
                id=gym_id,
                entry_point="lunarl.envs.gym:LunarGymEnv",
                kwargs={"env_name": name},
                disable_env_checker=True,
            )
