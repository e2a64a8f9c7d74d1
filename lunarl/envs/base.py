"""The environment contract shared by every lunarl env.

An env is a Brax ``Env``: ``reset(rng) -> State`` and ``step(state, action) -> State`` are pure
and jittable, and ``State`` is Brax's own, so Brax's wrappers and trainers run on lunarl envs
unchanged. What lunarl adds:

* ``EnvConfig``: a frozen dataclass of the env's parameters (a ``lunarl.config.Config``). Each
  field may declare its allowed range (``bounded``); ``EnvConfig.build(**overrides)`` rejects
  unknown fields, wrong types and out-of-range values with a ``ValueError`` naming the field.
* ``LunarEnv``: the base class. The env's own physical state lives in ``State.pipeline_state``
  (a ``flax.struct`` dataclass); ``State.info`` holds only ``rng`` plus what wrappers add, so the
  auto-reset wrapper can swap in a fresh episode by replacing ``pipeline_state`` and ``obs``.
* Wrappers: Brax's ``EpisodeWrapper`` (episode limit, ``info["truncation"]``) and
  ``VmapWrapper``, and our ``AutoResetWrapper``, which (unlike Brax's) starts every new episode
  from a freshly randomised ``reset`` and keeps the last observation of the finished episode in
  ``info["final_obs"]`` so agents can bootstrap through time limits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State, Wrapper
from brax.envs.wrappers.training import EpisodeWrapper, VmapWrapper

from lunarl.config import Config, bounded

__all__ = [
    "AutoResetWrapper",
    "EnvConfig",
    "EpisodeWrapper",
    "LunarEnv",
    "State",
    "VmapWrapper",
    "bounded",
    "wrap_for_training",
]


@dataclasses.dataclass(frozen=True)
class EnvConfig(Config):
    """Base of every env's parameters (see ``lunarl.config.Config`` for validation)."""


# --------------------------------------------------------------------------------------------
# The env base class
# --------------------------------------------------------------------------------------------


class LunarEnv(Env):
    """Base class of lunarl envs: a Brax ``Env`` built from a validated ``EnvConfig``.

    Subclasses set ``config_cls`` and implement ``reset``, ``step``, ``observation_size``,
    ``action_size`` and ``render``. The env object is static (it holds only Python config), so
    it can be closed over by ``jit``.
    """

    config_cls: ClassVar[type[EnvConfig]] = EnvConfig
    #: Episode limit the training wrappers apply by default (in env steps).
    default_episode_length: ClassVar[int] = 1000

    def __init__(self, config: EnvConfig | None = None, **overrides: Any):
        if config is None:
            config = self.config_cls.build(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def backend(self) -> str:
        return "jax"

    def render(self, state: State) -> np.ndarray:
        """A uint8 [H, W, 3] frame of one (unbatched) state."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# --------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------


def _where_batch(done: jax.Array, new: Any, old: Any) -> Any:
    """Per-env select over a pytree whose leaves have the batch as their leading axis."""

    def pick(a: jax.Array, b: jax.Array) -> jax.Array:
        mask = jnp.reshape(done, done.shape + (1,) * (a.ndim - done.ndim))
        return jnp.where(mask, a, b)

    return jax.tree.map(pick, new, old)


class AutoResetWrapper(Wrapper):
    """Reset finished envs, drawing a new random episode each time.

    Brax's ``AutoResetWrapper`` restarts every env from the state its first ``reset`` produced,
    so a "randomised" env replays one layout per env forever. This wrapper calls the wrapped
    env's ``reset`` with a fresh key (split from ``info["rng"]``) for envs that are done and
    selects it per env. ``info["final_obs"]`` holds the observation the finished step produced
    before it was replaced by the new episode's first observation, which agents need to bootstrap
    values through truncation.

    Expects a batched env (wrap ``VmapWrapper`` first). ``randomize=False`` restores Brax's
    cheaper behaviour (cache the first state) for envs whose reset is expensive.
    """

    def __init__(self, env: Env, randomize: bool = True):
        super().__init__(env)
        self.randomize = randomize

    def reset(self, rng: jax.Array) -> State:
        state = self.env.reset(rng)
        state.info["final_obs"] = state.obs
        if not self.randomize:
            state.info["first_pipeline_state"] = state.pipeline_state
            state.info["first_obs"] = state.obs
        return state

    def step(self, state: State, action: jax.Array) -> State:
        if "steps" in state.info:
            state.info["steps"] = jnp.where(state.done, jnp.zeros_like(state.info["steps"]), state.info["steps"])
        state = state.replace(done=jnp.zeros_like(state.done))
        state = self.env.step(state, action)
        done = state.done.astype(bool)
        state.info["final_obs"] = state.obs
        if self.randomize:
            keys = jax.vmap(jax.random.split)(state.info["rng"])
            fresh = self.env.reset(keys[:, 1])
            new_pipeline, new_obs = fresh.pipeline_state, fresh.obs
            state.info["rng"] = keys[:, 0]
        else:
            new_pipeline, new_obs = state.info["first_pipeline_state"], state.info["first_obs"]
        pipeline_state = _where_batch(done, new_pipeline, state.pipeline_state)
        obs = _where_batch(done, new_obs, state.obs)
        return state.replace(pipeline_state=pipeline_state, obs=obs)


def wrap_for_training(
    env: Env,
    episode_length: int | None = None,
    action_repeat: int = 1,
    randomize_resets: bool = True,
) -> Wrapper:
    """Batch, limit and auto-reset an env: the stack agents train on.

    ``reset`` then takes keys of shape ``[num_envs, 2]``. Same order as
    ``brax.envs.wrappers.training.wrap``: Vmap, then Episode, then AutoReset.
    """
    if episode_length is None:
        episode_length = getattr(env, "default_episode_length", 1000)
    if episode_length < 1:
        raise ValueError(f"episode_length must be >= 1, got {episode_length}")
    env = VmapWrapper(env)
    env = EpisodeWrapper(env, episode_length, action_repeat)
    return AutoResetWrapper(env, randomize=randomize_resets)
