"""A tiny pure-JAX env for PPO tests: a point on the plane steered to a random goal.

Observation (4): position and goal - position. Action (2): velocity in [-1, 1] per axis, scaled by
``speed``. Reward: ``progress_weight`` x the distance gained this step, plus ``goal_bonus`` when
within ``goal_radius`` (which terminates the episode; ``metrics["success"]`` = 1). Episodes that
do not reach the goal end at the wrapper's limit (``default_episode_length``), so value
bootstrapping through truncation matters here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from lunarl.envs.base import EnvConfig, LunarEnv, State, bounded


@dataclasses.dataclass(frozen=True)
class PointGoalConfig(EnvConfig):
    speed: float = bounded(0.1, 0.0, 1.0)
    goal_radius: float = bounded(0.1, 0.0, 2.0)
    progress_weight: float = bounded(10.0, 0.0, None)
    goal_bonus: float = bounded(1.0, 0.0, None)


@struct.dataclass
class PointGoalState:
    pos: jax.Array
    goal: jax.Array


class PointGoal(LunarEnv):
    config_cls = PointGoalConfig
    default_episode_length = 32

    @property
    def observation_size(self) -> int:
        return 4

    @property
    def action_size(self) -> int:
        return 2

    def _obs(self, s: PointGoalState) -> jax.Array:
        return jnp.concatenate([s.pos, s.goal - s.pos]).astype(jnp.float32)

    def reset(self, rng: jax.Array) -> State:
        k_pos, k_goal = jax.random.split(rng)
        s = PointGoalState(
            pos=jax.random.uniform(k_pos, (2,), minval=-1.0, maxval=1.0),
            goal=jax.random.uniform(k_goal, (2,), minval=-1.0, maxval=1.0),
        )
        zero = jnp.zeros((), jnp.float32)
        return State(
            pipeline_state=s,
            obs=self._obs(s),
            reward=zero,
            done=zero,
            metrics={"success": zero},
            info={"rng": rng},
        )

    def step(self, state: State, action: jax.Array) -> State:
        cfg = self.config
        s = state.pipeline_state
        before = jnp.linalg.norm(s.goal - s.pos)
        pos = jnp.clip(s.pos + cfg.speed * jnp.clip(action, -1.0, 1.0), -1.0, 1.0)
        after = jnp.linalg.norm(s.goal - pos)
        reached = (after < cfg.goal_radius).astype(jnp.float32)
        reward = cfg.progress_weight * (before - after) + cfg.goal_bonus * reached
        s = s.replace(pos=pos)
        return state.replace(
            pipeline_state=s,
            obs=self._obs(s),
            reward=reward.astype(jnp.float32),
            done=reached,
            metrics={"success": reached},
        )
