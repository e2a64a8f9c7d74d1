"""Policy evaluation: one episode in each of ``num_episodes`` vmapped envs, no auto-reset.

``evaluate`` is pure; bind the static arguments and jit it, e.g.
``jax.jit(functools.partial(evaluate, env, policy, num_episodes=1000, episode_length=1000))``.
Every env runs exactly its first episode: once it terminates (or hits the limit) its state is
frozen and it stops accumulating, so each row is one complete episode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lunarl.envs.base import LunarEnv

__all__ = ["evaluate", "summarize"]

Policy = Callable[[Any, jax.Array, jax.Array, bool], jax.Array]


def evaluate(
    env: LunarEnv,
    policy: Policy,
    params: Any,
    rng: jax.Array,
    num_episodes: int,
    episode_length: int,
    deterministic: bool = True,
    return_states: bool = False,
) -> dict[str, Any]:
    """Per-episode ``episode_return``, ``episode_length`` and ``success`` (each [num_episodes]).

    ``env`` is an unbatched lunarl env. ``success`` is 1 if the env's ``metrics["success"]`` was
    positive at any step of the episode. With ``return_states`` the result also has ``states``:
    the ``State`` of episode 0 after reset and after each of the ``episode_length`` steps
    (leading axis ``episode_length + 1``; frames past ``episode_length[0]`` repeat the last
    state), for rendering a video with ``env.render``.
    """
    reset_key, act_key = jax.random.split(rng)
    state = jax.vmap(env.reset)(jax.random.split(reset_key, num_episodes))
    zeros = jnp.zeros((num_episodes,), jnp.float32)
    carry = (state, jnp.ones((num_episodes,), bool), zeros, zeros, zeros)

    def step(carry, key):
        state, alive, ret, length, success = carry
        action = policy(params, state.obs, key, deterministic)
        nxt = jax.vmap(env.step)(state, action)
        live = alive.astype(jnp.float32)
        ret = ret + live * nxt.reward
        length = length + live
        step_success = nxt.metrics.get("success", jnp.zeros_like(nxt.reward)) > 0
        success = jnp.maximum(success, live * step_success)
        # Freeze finished envs so nothing past the first episode is ever counted or shown.
        state = jax.tree.map(
            lambda new, old: jnp.where(alive.reshape(alive.shape + (1,) * (new.ndim - 1)), new, old),
            nxt,
            state,
        )
        alive = alive & (nxt.done == 0)
        first = jax.tree.map(lambda x: x[0], state) if return_states else None
        return (state, alive, ret, length, success), first

    (_, _, ret, length, success), states = jax.lax.scan(
        step, carry, jax.random.split(act_key, episode_length)
    )
    out: dict[str, Any] = {"episode_return": ret, "episode_length": length, "success": success}
    if return_states:
        initial = jax.tree.map(lambda x: x[0][None], state)
        out["states"] = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), initial, states)
    return out


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Host-side summary over all episodes (and seeds, if there is a leading seed axis)."""
    ret = np.asarray(result["episode_return"], np.float64)
    return {
        "return_mean": float(ret.mean()),
        "return_std": float(ret.std()),
        "success_rate": float(np.asarray(result["success"], np.float64).mean()),
        "length_mean": float(np.asarray(result["episode_length"], np.float64).mean()),
        "num_episodes": int(ret.size),
    }
