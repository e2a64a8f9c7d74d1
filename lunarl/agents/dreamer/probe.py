"""Committed-action probes: a planning-style improvement step for the actor (``probe_scale > 0``).

Why: the backprop actor follows the local slope of its imagined return. Near an obstacle on the
car track that objective is flat for small steering changes and rises only for a swerve held near
full lock for several steps (``scripts/car_crash_foresight.py``'s slope read: an offset of 0.25
toward the swerve gains 2-8% of the full swerve's gain), so on some seeds the actor never learns
to swerve although its own imagination scores the swerve higher (scripts/results/dreamer.md,
sessions 16-17). A probe looks where the gradient does not.

From each of ``probe_starts`` start latents the world model imagines, with common random draws of
its stochastic state, ``1 + 2A`` rollouts of ``horizon`` steps (``A`` action dimensions): the
actor's plan (its mean action every step) and, for every dimension ``j`` and sign, the plan with
action ``j`` held at +1 or -1 for the first ``probe_steps`` steps. Each is scored by its
lambda-return at the start (the model's rewards and continues, the critic's bootstrap), divided
by the return scale as the actor loss is. Where the best held action beats the plan by more than
``probe_margin`` (and, with ``probe_min_end > 0``, only where the plan imagines an episode end at
some step with at least that probability: a crash ahead), the actor's mean at that rollout's
first ``probe_steps`` latents is pulled toward the held action (squared error; the other
dimensions' targets are the actor's own means, so only ``j`` moves). Nothing here is
differentiated through the model or the critic: the probes are a search, and the actor distils
what it found. ``probe_from`` and ``probe_max_return`` gate whole updates instead: the probes
run only once a seed has ``probe_from`` env steps and while its imagined return is below the bound,
so a seed whose critic already expects to drive trains as without them. With
``DreamerConfig.lookahead`` the policy runs the same search (``candidate_search``) from its
filtered latent at every step and acts with a winning held action.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from lunarl.agents.dreamer.behavior import ActorNet, CriticNet, lambda_returns
from lunarl.agents.dreamer.world_model import Latent, TwoHot, WorldModelNet, unimix_logits


def probe_actions(action_size: int) -> jax.Array:
    """The held actions [1 + 2A, A] of the candidates (0: not held): row 0 the plan, then
    dimension ``j`` held at +1 and at -1 for each ``j``."""
    eye = jnp.eye(action_size)
    return jnp.concatenate([jnp.zeros((1, action_size)), eye, -eye], axis=0)


def probe_rollouts(
    wm: WorldModelNet,
    wm_params: Any,
    actor: ActorNet,
    actor_params: Any,
    start: Latent,
    rng: jax.Array,
    *,
    horizon: int,
    hold_steps: int,
    unimix: float,
) -> tuple[jax.Array, jax.Array]:
    """Features [H+1, K, N, F] and actions [H, K, N, A] of the ``K = 1 + 2A`` candidate rollouts
    from ``start`` (leaves [N, ...]); every candidate sees the same draws of the stochastic state."""
    classes = wm.dims.classes
    held_value = probe_actions(actor.action_size)[:, None, :]  # [K, 1, A]
    held_mask = held_value != 0.0
    latent = jax.tree.map(lambda x: jnp.broadcast_to(x, (held_value.shape[0],) + x.shape), start)

    def step(latent: Latent, xs: tuple) -> tuple[Latent, tuple]:
        t, key = xs
        feat = latent.feat
        mean, _ = actor.apply(actor_params, feat)
        action = jnp.where(held_mask & (t < hold_steps), held_value, mean)
        deter, prior_logits = wm.apply(wm_params, latent.deter, latent.stoch, action, method=WorldModelNet.img_step)
        log_probs = unimix_logits(prior_logits, classes, unimix)  # [K, N, S, C]
        # Gumbel-max with one draw per start, shared by its candidates (common random numbers).
        gumbel = jax.random.gumbel(key, log_probs.shape[1:])
        stoch = jax.nn.one_hot(jnp.argmax(log_probs + gumbel, axis=-1), classes, dtype=log_probs.dtype)
        return Latent(deter, stoch.reshape(stoch.shape[:-2] + (-1,))), (feat, action)

    xs = (jnp.arange(horizon), jax.random.split(rng, horizon))
    last, (feats, actions) = jax.lax.scan(step, latent, xs)
    return jnp.concatenate([feats, last.feat[None]], axis=0), actions


@struct.dataclass
class Search:
    """The scored candidates from N start latents: their rollouts, the best one per start and
    whether it wins (beats the plan by the margin where the plan imagines an episode end)."""

    feats: jax.Array  # [H+1, K, N, F]
    actions: jax.Array  # [H, K, N, A]
    best: jax.Array  # [N]: the best candidate; 0 (the plan) where nothing beats it
    best_gain: jax.Array  # [N]: its lambda-return at the start over the plan's, / scale
    wins: jax.Array  # [N] bool

    def first_action(self) -> jax.Array:
        """The best candidate's first action [N, A]."""
        return jnp.take_along_axis(self.actions[0], self.best[None, :, None], axis=0)[0]


def candidate_search(
    wm: WorldModelNet,
    wm_params: Any,
    actor: ActorNet,
    actor_params: Any,
    critic: CriticNet,
    critic_params: Any,
    start: Latent,
    scale: jax.Array,
    rng: jax.Array,
    *,
    horizon: int,
    hold_steps: int,
    unimix: float,
    gamma: float,
    lam: float,
    twohot: TwoHot,
    margin: float | jax.Array,
    min_end: float | jax.Array,
) -> Search:
    """Roll out and score the candidates, each by its lambda-return at the start (the model's
    rewards and continues, the critic's bootstrap) divided by ``scale``. ``min_end``: a held
    action wins only where the plan imagines an episode end at some step with at least this
    probability (0: everywhere)."""
    if not 1 <= hold_steps <= horizon:
        raise ValueError(f"probe: hold_steps={hold_steps} must be in [1, horizon={horizon}]")
    feats, actions = probe_rollouts(
        wm, wm_params, actor, actor_params, start, rng, horizon=horizon, hold_steps=hold_steps, unimix=unimix
    )
    reward_logits, cont_logit = wm.apply(wm_params, feats[1:], method=WorldModelNet.reward_and_cont)
    value = twohot.decode(critic.apply(critic_params, feats))
    cont = jax.nn.sigmoid(cont_logit)  # [H, K, N]
    returns = lambda_returns(twohot.decode(reward_logits), cont, value, gamma, lam)
    score = returns[0] / scale  # [K, N]
    gain = score - score[0]
    best = jnp.argmax(gain, axis=0)
    best_gain = jnp.take_along_axis(gain, best[None], axis=0)[0]
    plan_end = jnp.max(1.0 - cont[:, 0], axis=0)  # [N]
    wins = (best_gain > margin) & (plan_end >= min_end)
    return Search(feats=feats, actions=actions, best=best, best_gain=best_gain, wins=wins)


def probe_loss(
    actor_params: Any,
    wm: WorldModelNet,
    wm_params: Any,
    actor: ActorNet,
    critic: CriticNet,
    critic_params: Any,
    start: Latent,
    start_cont: jax.Array,
    scale: jax.Array,
    rng: jax.Array,
    *,
    horizon: int,
    hold_steps: int,
    unimix: float,
    gamma: float,
    lam: float,
    margin: float | jax.Array,
    twohot: TwoHot,
    min_end: float | jax.Array = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The distillation loss (differentiable in ``actor_params``) and its metrics: the share of
    starts where a held action beat the plan by ``margin`` and the mean normalised gain of the
    best candidate over the plan. ``start_cont`` [N]: 0 for terminal starts (never distilled).
    ``min_end``: distil only starts whose plan imagines an episode end at some step with at
    least this probability (0: every start)."""
    chex.assert_rank(start_cont, 1)
    sg = jax.lax.stop_gradient
    search = candidate_search(
        wm, wm_params, actor, sg(actor_params), critic, critic_params, start, scale, rng, horizon=horizon,
        hold_steps=hold_steps, unimix=unimix, gamma=gamma, lam=lam, twohot=twohot, margin=margin, min_end=min_end,
    )  # fmt: skip
    improved = search.wins & (start_cont > 0.5)

    # The best candidate's first hold_steps latents and actions: [hold_steps, N, ...].
    index = search.best[None, None, :, None]
    pick = lambda x: jnp.take_along_axis(x[:hold_steps], index, axis=1)[:, 0]  # noqa: E731
    feat, target = sg(pick(search.feats[:-1])), sg(pick(search.actions))
    mean, _ = actor.apply(actor_params, feat)
    error = jnp.sum(jnp.square(mean - target), axis=-1)  # [hold_steps, N]
    weight = improved.astype(jnp.float32)
    loss = 0.5 * jnp.mean(weight * jnp.mean(error, axis=0))
    metrics = {"probe/improved": jnp.mean(weight), "probe/gain": jnp.mean(search.best_gain)}
    return loss, metrics
