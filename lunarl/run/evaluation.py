"""Evaluation, in one place: the episode rollout, its summary and its keys.

``rollout`` runs one episode in each of ``num_episodes`` vmapped envs through the agent's
``Policy``, carrying its carry and resetting it where an episode starts. It is pure; the train
loop's periodic evaluation (``make_evaluator``), ``lunarl.evaluate``, videos and the scripts all
use it. Every env runs exactly its first episode: once it terminates (or hits the limit) its
state and carry are frozen and it stops accumulating, so each row is one complete episode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lunarl._platform import compile_options
from lunarl.agents.base import Agent, Policy
from lunarl.envs.base import LunarEnv
from lunarl.run.metrics import per_seed_row

__all__ = ["eval_keys", "eval_row", "make_evaluator", "rollout", "summarize"]

_EVAL_SALT = 0x5EED  # evaluation keys never collide with the training keys split from ``seed``


def _freeze(alive: jax.Array, new: Any, old: Any) -> Any:
    """``new`` for the envs still in their first episode, ``old`` for the finished ones."""
    return jax.tree.map(lambda n, o: jnp.where(alive.reshape(alive.shape + (1,) * (n.ndim - 1)), n, o), new, old)


def rollout(
    env: LunarEnv,
    policy: Policy,
    params: Any,
    rng: jax.Array,
    num_episodes: int,
    episode_length: int,
    deterministic: bool = True,
    return_states: bool = False,
    reset_keys: jax.Array | None = None,
) -> dict[str, Any]:
    """Per-episode ``episode_return``, ``episode_length`` and ``success`` (each [num_episodes]).

    ``env`` is an unbatched lunarl env; ``reset_keys`` [num_episodes, 2] choose the episodes'
    layouts (default: split from ``rng``). ``success`` is 1 if the env's ``metrics["success"]``
    was positive at any step of the episode. With ``return_states`` the result also has
    ``states`` and ``carries``: the env ``State`` and the policy carry of episode 0 after reset
    and after each of the ``episode_length`` steps (leading axis ``episode_length + 1``; frames
    past ``episode_length[0]`` repeat the last one), for videos and inspection.
    """
    reset_key, act_key = jax.random.split(rng)
    if reset_keys is None:
        reset_keys = jax.random.split(reset_key, num_episodes)
    state = jax.vmap(env.reset)(reset_keys)
    zeros = jnp.zeros((num_episodes,), jnp.float32)
    policy_carry = policy.initial_carry(num_episodes)
    is_first = jnp.ones((num_episodes,), bool)
    first_of = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731

    def step(carry, key):
        state, policy_carry, is_first, alive, ret, length, success = carry
        action, next_carry = policy.act(params, state.obs, policy_carry, is_first, key, deterministic)
        nxt = jax.vmap(env.step)(state, action)
        live = alive.astype(jnp.float32)
        ret = ret + live * nxt.reward
        length = length + live
        step_success = nxt.metrics.get("success", jnp.zeros_like(nxt.reward)) > 0
        success = jnp.maximum(success, live * step_success)
        # Freeze finished envs so nothing past the first episode is ever counted or shown.
        state = _freeze(alive, nxt, state)
        policy_carry = _freeze(alive, next_carry, policy_carry)
        alive = alive & (nxt.done == 0)
        out = (first_of(state), first_of(policy_carry)) if return_states else None
        # No env starts a new episode here: each runs its first one only.
        return (state, policy_carry, jnp.zeros_like(is_first), alive, ret, length, success), out

    carry = (state, policy_carry, is_first, jnp.ones((num_episodes,), bool), zeros, zeros, zeros)
    final, trajectory = jax.lax.scan(step, carry, jax.random.split(act_key, episode_length))
    ret, length, success = final[4:]
    out: dict[str, Any] = {"episode_return": ret, "episode_length": length, "success": success}
    if return_states:
        initial = jax.tree.map(lambda x: x[None], (first_of(state), first_of(policy_carry)))
        joined = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), initial, trajectory)
        out["states"], out["carries"] = joined
    return out


def summarize(result: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Return mean/std, success rate, mean length and count over the last (episode) axis.

    ``result`` is ``rollout``'s output, with or without leading seed axes; each value keeps
    them (a 0-d array for one seed's episodes: use ``float(...)``).
    """
    ret = np.asarray(result["episode_return"], np.float64)
    return {
        "episode_return": ret.mean(axis=-1),
        "episode_return_std": ret.std(axis=-1),
        "success_rate": np.asarray(result["success"], np.float64).mean(axis=-1),
        "episode_length": np.asarray(result["episode_length"], np.float64).mean(axis=-1),
        "num_episodes": np.full(ret.shape[:-1], ret.shape[-1]),
    }


def eval_row(result: Mapping[str, Any]) -> dict[str, float]:
    """A log row from the episodes of every seed ``[S, N]``: ``eval/...`` means over seeds, and
    ``seed{i}/eval/...`` per seed when there are several."""
    summary = summarize(result)
    del summary["num_episodes"]
    return per_seed_row(summary, prefix="eval/")


def eval_keys(seed: int, iteration: int, num_seeds: int) -> jax.Array:
    """Evaluation keys of every seed at ``iteration``: a stream of their own (salted), so
    evaluating never changes training and a resumed run evaluates the same episodes."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL_SALT), iteration)
    return jax.random.split(key, num_seeds)


def make_evaluator(
    agent: Agent, env: LunarEnv, cfg: Any, num_episodes: int, deterministic: bool = True
) -> Callable[[Any, jax.Array], dict]:
    """``evaluate(params[S], keys[S]) -> {"episode_return": [S, N], ...}``, all seeds at once, jitted."""
    policy = agent.make_policy(env, cfg)

    def one_seed(params: Any, key: jax.Array) -> dict:
        return rollout(env, policy, params, key, num_episodes, cfg.episode_length, deterministic)

    return jax.jit(jax.vmap(one_seed), compiler_options=compile_options(env))
