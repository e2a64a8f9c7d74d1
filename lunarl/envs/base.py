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
  our ``VmapWrapper`` (Brax's, plus one program per device on a ``data`` mesh axis), and our
  ``AutoResetWrapper``, which (unlike Brax's) starts every new episode
  from a freshly randomised layout, drawn ahead of time a few envs per step so resets cost a
  small fraction of a step, and keeps the last observation of the finished episode in
  ``info["final_obs"]`` so agents can bootstrap through time limits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Env, State, Wrapper
from brax.envs.wrappers.training import EpisodeWrapper
from flax import struct

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

#: The mesh axis that splits the env batch (``lunarl.run.placement`` builds it).
DATA_AXIS_NAME = "data"


def data_axis_size() -> int:
    """Devices on the ``data`` axis of the mesh being traced under (1 when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS_NAME not in mesh.axis_names:
        return 1
    return int(mesh.shape[DATA_AXIS_NAME])


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
    #: Observation entries that are angles wrapping at +-pi (e.g. a heading). Agents feed them to
    #: their networks as (cos, sin) as well: the raw value jumps by 2 pi across the wrap, which an
    #: MLP must otherwise learn to bridge exactly where a task may need to steer.
    angle_observations: ClassVar[tuple[int, ...]] = ()
    #: Compile lunarl's training/evaluation programs for this env with XLA:CPU's fusion emitters
    #: on (faster networks); MJX envs set False. See ``lunarl._platform.compile_options``.
    cpu_fusion_emitters: ClassVar[bool] = True

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


@struct.dataclass
class ResetPool:
    """Pre-drawn first states, one slot per env, for the auto-reset wrapper."""

    pipeline_state: Any
    obs: jax.Array
    fresh: jax.Array  # bool [num_envs]: the slot holds a layout no episode has used yet


class AutoResetWrapper(Wrapper):
    """Reset finished envs, each into a freshly drawn random episode.

    Brax's ``AutoResetWrapper`` restarts every env from the state its first ``reset`` produced,
    so a "randomised" env replays one layout per env forever. Calling ``reset`` for the whole
    batch on every step fixes that but costs as much as the step itself. This wrapper keeps a
    pool of pre-drawn first states in ``info["reset_pool"]``: a finished env swaps its pool slot
    in (a cheap select), and every step redraws at most ``resets_per_step`` used slots (default
    ``ceil(num_envs / 16)``), gathering only those envs so the reset work is a small fraction of
    the batch. No ``lax.cond`` is involved, so the saving survives ``vmap`` over seeds.

    Every episode starts from a layout no earlier episode of that env used, as long as no more
    than ``resets_per_step`` slots are waiting for a redraw; otherwise an env that finishes again
    within a few steps of its last reset (before its slot is redrawn) repeats that layout.
    Keys come from each env's own ``info["rng"]`` chain, so an env's layouts do not depend on
    what the other envs do.

    ``info["final_obs"]`` holds the observation the finished step produced before it was replaced
    by the new episode's first observation, which agents need to bootstrap values through
    truncation. Expects a batched env (wrap ``VmapWrapper`` first). ``randomize=False`` restores
    Brax's behaviour (every env restarts from its first state).
    """

    def __init__(self, env: Env, randomize: bool = True, resets_per_step: int | None = None):
        super().__init__(env)
        if resets_per_step is not None and resets_per_step < 1:
            raise ValueError(f"resets_per_step must be >= 1 (or None for num_envs / 16), got {resets_per_step}")
        self.randomize = randomize
        self.resets_per_step = resets_per_step

    def reset(self, rng: jax.Array) -> State:
        state = self.env.reset(rng)
        state.info["final_obs"] = state.obs
        if self.randomize:
            keys = jax.vmap(jax.random.split)(state.info["rng"])
            spare = self.env.reset(keys[:, 1])
            state.info["rng"] = keys[:, 0]
            fresh = jnp.ones(state.done.shape, bool)
            state.info["reset_pool"] = ResetPool(spare.pipeline_state, spare.obs, fresh)
        else:
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
            pool = state.info["reset_pool"]
            new_pipeline, new_obs = pool.pipeline_state, pool.obs
            pool = pool.replace(fresh=pool.fresh & ~done)
            state.info["reset_pool"], state.info["rng"] = self._redraw(pool, state.info["rng"])
        else:
            new_pipeline, new_obs = state.info["first_pipeline_state"], state.info["first_obs"]
        pipeline_state = _where_batch(done, new_pipeline, state.pipeline_state)
        obs = _where_batch(done, new_obs, state.obs)
        return state.replace(pipeline_state=pipeline_state, obs=obs)

    def _redraw(self, pool: ResetPool, rng: jax.Array) -> tuple[ResetPool, jax.Array]:
        """Refill up to ``resets_per_step`` used slots with new layouts (gather, reset, scatter)."""
        n = pool.fresh.shape[0]
        m = min(n, self.resets_per_step or -(-n // 16))
        # Indices of used slots, padded with n: out of bounds, so the scatters below drop them.
        idx = jnp.nonzero(~pool.fresh, size=m, fill_value=n)[0]
        keys = jax.vmap(jax.random.split)(rng[jnp.minimum(idx, n - 1)])
        drawn = self.env.reset(keys[:, 1])

        def put(full: jax.Array, part: jax.Array) -> jax.Array:
            return full.at[idx].set(part, mode="drop")

        pool = ResetPool(
            pipeline_state=jax.tree.map(put, pool.pipeline_state, drawn.pipeline_state),
            obs=put(pool.obs, drawn.obs),
            fresh=put(pool.fresh, jnp.ones((m,), bool)),
        )
        return pool, put(rng, keys[:, 0])


class VmapWrapper(Wrapper):
    """Steps a batch of envs: ``reset`` takes keys ``[num_envs, 2]``, every State leaf gains a
    leading env axis.

    Traced under a mesh whose ``data`` axis has several devices (the host's chunk,
    ``lunarl.run.programs``), the batch is stepped with ``shard_map``: each device steps its own
    envs as its own program. Under GSPMD instead, a loop whose trip count depends on the data
    (MJX's constraint solver runs until every env has converged) needs every device's answer at
    every iteration, so the devices wait on each other. The env step needs no other collective,
    so both give the same numbers. On one device it is exactly ``vmap``.
    """

    def reset(self, rng: jax.Array) -> State:
        return self._batched(self.env.reset, rng)

    def step(self, state: State, action: jax.Array) -> State:
        return self._batched(self.env.step, state, action)

    @staticmethod
    def _batched(fn: Any, *args: Any) -> State:
        batched = jax.vmap(fn)
        devices = data_axis_size()
        # The auto-reset wrapper resets a few envs per step: batches that do not split stay vmapped.
        if devices == 1 or jax.tree.leaves(args)[0].shape[0] % devices:
            return batched(*args)
        on_data = jax.sharding.PartitionSpec(DATA_AXIS_NAME)
        # check_vma=False: MJX's solver has lax.cond branches that differ in varying-ness.
        sharded = jax.shard_map(
            batched, in_specs=on_data, out_specs=on_data, axis_names={DATA_AXIS_NAME}, check_vma=False
        )
        return sharded(*args)


def wrap_for_training(
    env: Env,
    episode_length: int | None = None,
    action_repeat: int = 1,
    randomize_resets: bool = True,
    resets_per_step: int | None = None,
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
    return AutoResetWrapper(env, randomize=randomize_resets, resets_per_step=resets_per_step)
