"""Behaviour learned in imagination: actor and critic trained on latent rollouts of the world model.

From every posterior latent of a replayed batch (``B * T`` starts) the actor drives the world
model's prior for ``horizon`` steps; the reward and continue heads score the imagined steps and
the critic values them. Targets are lambda-returns
``R_t = r_{t+1} + gamma c_{t+1} ((1 - lambda) v_{t+1} + lambda R_{t+1})``, ``R_H = v_H``, where
``c`` is the continue head's probability, and every step is weighted by the imagined probability
of still being in the episode (``prod gamma c``, stopped).

* Critic: two-hot over symlog bins, trained by cross-entropy on the (stopped) returns, plus a
  regulariser towards the prediction of a slow EMA copy of itself (rate ``slow_critic_rate``),
  which keeps the bootstrapped targets from chasing themselves. With ``replay_value_scale > 0``
  (DreamerV3's ``repval`` loss, scale 0.3) it is also trained on the posterior latents of the
  replayed sequences, towards lambda-returns of the *real* rewards and terminations
  (``replay_returns``): imagination alone lets the critic drift wherever the model is wrong about
  the current policy, and a backprop actor climbs that error (scripts/results/dreamer.md).
* Imagination from a terminal start latent (a crash or a finished lap) goes nowhere the model has
  seen; as in DreamerV3 such starts get weight 0 (``start_cont = 1 - terminated``).
* Return normalisation: returns are divided by ``max(1, P95 - P5)``, the 5th-95th percentile
  range tracked with an EMA (``ReturnNorm``); the max with 1 keeps small returns from being
  inflated into noise, so the entropy bonus has the same meaning on every task.
* Actor, continuous actions in [-1, 1]: a Gaussian with mean ``tanh(.)`` and a standard deviation
  in ``[min_std, max_std]``; the sample is clipped to [-1, 1] with a straight-through gradient
  (the dynamics see exactly what an env would get). Entropy bonus ``actor_entropy``. The output
  layer's initial variance is scaled by ``out_scale`` (DreamerV3: 0.01): near 0, every state
  starts with its mean near 0 and its std near the top; at 1 some start near full lock, where
  ``tanh``'s gradient vanishes (the car seeds that never drove held the steering there).
* Actor gradient, ``actor_grad``: ``backprop`` maximises the normalised returns by differentiating
  them through the learned dynamics, reward and critic (the world model and critic parameters are
  constants there); ``reinforce`` uses the score function with the advantage
  ``(R_t - v_t) / scale``. **Default: ``backprop``**, for the budget the car-track target sets
  (1/10 of PPO's env steps, 32,768): there it learns earlier (first laps at 8-10k env steps
  against REINFORCE's 15-25k) and reaches 90% of held-out tracks on 3 of 6 seeds against
  REINFORCE's 2 of 6 (both with recent terminal windows), and 4 of those 6 with the output scale
  0.01 (0 of 3 further seeds; REINFORCE with it: 0 of 3, its std stayed at 0.6-0.9). Without that
  scale a third of backprop's seeds never drove: it follows the gradient of the model and critic,
  so where they say every action ends in a crash (or that crawling is fine) it has nothing to
  climb. REINFORCE, with the replay value loss tying the critic to real returns, keeps exploring
  (its std stays ~0.3) and got all 6 of those seeds past 90% by 46k env steps (output scale 1),
  where backprop then got 4; ``actor_grad=reinforce replay_value_scale=0.3``. The runs, and an
  early one in which REINFORCE's steering drifted to full lock, are in scripts/results/dreamer.md.
  ``mix`` (DreamerV2's ``both``) maximises ``(1 - s) * backprop + s * REINFORCE`` objectives,
  ``s = reinforce_share``. Mid-run on the car the backprop gradient's norm is 4-13x REINFORCE's,
  so the two weigh about the same only at a share near 0.9. At 0.9 the car got 4 of 9 seeds past
  90% (as backprop did, failing on other seeds), and kuka_reach seed 1, which backprop never
  taught to reach, got 92.2% by 41k env steps; on the rover 3 of 3 seeds passed 90% deposits
  within 164k env steps, where backprop's one seed peaked at 61%. The kuka_reach and rover
  experiments use it.
* Imagination noise, ``noise_corr`` (backprop only; default 0): the actor's standard-normal draws
  follow an AR(1) process over the imagined steps, ``z_t = rho z_{t-1} + sqrt(1 - rho^2) eps_t``,
  so each step keeps its Gaussian but a rollout's deviations from the mean persist, and the
  backprop objective is the return smoothed over committed deviations. Why: near an obstacle on
  the car the imagined return is flat for small steering changes and rises only for a swerve held
  near full lock, so the gradient at independent low-noise samples does not see it
  (``scripts/car_crash_foresight.py``'s slope read). Measured on the car, with a std floor of 0.3
  it drove a seed the experiment never drives and lost seeds that learn without it
  (scripts/results/dreamer.md, session 17). On a share of the rollouts only (``noise_share``)
  it still lost them (session 18).
* Where the slope is flat, ``probe.py`` searches instead: committed actions scored in
  imagination, the best distilled into the actor (``probe_scale``; session 18).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lunarl.agents.dreamer.world_model import (
    Latent,
    Stack,
    TwoHot,
    WorldModelNet,
    sample_stoch,
    unimix_logits,
)

__all__ = [
    "ActorNet",
    "CriticNet",
    "Imagined",
    "ReturnNorm",
    "action_distribution",
    "imagine",
    "lambda_returns",
    "replay_returns",
]

# A Python float holding the float32 value (computing it with jnp at import time would start a
# JAX backend, which must wait for jax.distributed.initialize in a multi-process run).
_LOG_2PI_E = float(np.float32(1.0 + math.log(2.0 * math.pi)))


class ActorNet(nn.Module):
    """Mean (in [-1, 1]) and standard deviation of a Gaussian per action dimension."""

    action_size: int
    layers: int
    units: int
    min_std: float = 0.1
    max_std: float = 1.0
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, feat: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = Stack(self.layers, self.units, 2 * self.action_size, out_scale=self.out_scale)(feat)
        mean, raw = jnp.split(out, 2, axis=-1)
        # +2: a fresh actor starts near max_std, i.e. exploring.
        std = self.min_std + (self.max_std - self.min_std) * jax.nn.sigmoid(raw + 2.0)
        return jnp.tanh(mean), std


class CriticNet(nn.Module):
    """Two-hot value logits (zero-initialised output: a fresh critic predicts 0)."""

    layers: int
    units: int
    num_bins: int = 255

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        return Stack(self.layers, self.units, self.num_bins, zero_out=True)(feat)


def action_distribution(mean: jax.Array, std: jax.Array) -> dict[str, jax.Array]:
    """Helpers of the Gaussian: its entropy (summed over dimensions)."""
    return {"entropy": jnp.sum(0.5 * _LOG_2PI_E + jnp.log(std), axis=-1)}


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    z = (x - mean) / std
    return jnp.sum(-0.5 * jnp.square(z) - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def sample_action(
    rng: jax.Array, mean: jax.Array, std: jax.Array, noise: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(action clipped to [-1, 1] with a straight-through gradient, the raw Gaussian sample);
    ``noise``: the standard-normal draw to use instead of one from ``rng``."""
    raw = mean + std * (jax.random.normal(rng, mean.shape) if noise is None else noise)
    clipped = jnp.clip(raw, -1.0, 1.0) + (raw - jax.lax.stop_gradient(raw))  # forward: exactly the clip
    return clipped, raw


class ReturnNorm(struct.PyTreeNode):
    """EMA of the 5th and 95th percentile of the imagined returns."""

    low: jax.Array
    high: jax.Array

    @classmethod
    def create(cls) -> ReturnNorm:
        return cls(low=jnp.zeros((), jnp.float32), high=jnp.zeros((), jnp.float32))

    def update(self, returns: jax.Array, rate: float) -> ReturnNorm:
        returns = jax.lax.stop_gradient(returns).reshape(-1)
        low, high = jnp.percentile(returns, jnp.array([5.0, 95.0]))
        return ReturnNorm(low=self.low + rate * (low - self.low), high=self.high + rate * (high - self.high))

    def scale(self, limit: float) -> jax.Array:
        """``max(limit, high - low)``: returns are divided by it."""
        return jnp.maximum(limit, self.high - self.low)


@struct.dataclass
class Imagined:
    """An imagined rollout, time-major: ``feat`` [H+1, N, F], ``action``/``raw_action`` [H, N, A]."""

    feat: jax.Array
    action: jax.Array
    raw_action: jax.Array


def imagine(
    wm: WorldModelNet,
    wm_params: Any,
    actor: ActorNet,
    actor_params: Any,
    start: Latent,
    rng: jax.Array,
    horizon: int,
    unimix: float,
    noise_corr: float = 0.0,
    noise_share: float = 1.0,
) -> Imagined:
    """Roll the prior forward ``horizon`` steps from ``start`` (leaves [N, ...]) with the actor;
    ``noise_corr``: the AR(1) coefficient of its standard-normal draws over the steps, in the
    first ``round(noise_share * N)`` rollouts (the rest draw independently)."""
    classes = wm.dims.classes
    if not 0.0 <= noise_corr < 1.0:
        raise ValueError(f"imagine: noise_corr={noise_corr} must be in [0, 1)")
    if not 0.0 <= noise_share <= 1.0:
        raise ValueError(f"imagine: noise_share={noise_share} must be in [0, 1]")
    num = start.deter.shape[0]
    correlated = (jnp.arange(num) < round(noise_share * num))[:, None]
    # Per-rollout coefficients; an independent rollout gets (0, 1), so its draws are eps exactly.
    keep = jnp.where(correlated, noise_corr, 0.0)
    fresh = jnp.where(correlated, math.sqrt(1.0 - noise_corr**2), 1.0)

    def step(carry: tuple[Latent, jax.Array], xs: tuple) -> tuple[tuple[Latent, jax.Array], tuple]:
        latent, previous = carry
        first, key = xs
        k_act, k_stoch = jax.random.split(key)
        feat = latent.feat
        mean, std = actor.apply(actor_params, feat)
        eps = jax.random.normal(k_act, mean.shape)
        # At noise_corr 0 this is eps exactly, so the random stream is the independent sampler's.
        noise = jnp.where(first, eps, keep * previous + fresh * eps)
        action, raw = sample_action(k_act, mean, std, noise)
        deter, prior_logits = wm.apply(wm_params, latent.deter, latent.stoch, action, method=WorldModelNet.img_step)
        stoch = sample_stoch(k_stoch, unimix_logits(prior_logits, classes, unimix))
        return (Latent(deter, stoch), noise), (feat, action, raw)

    firsts = jnp.arange(horizon) == 0
    noise0 = jnp.zeros(start.deter.shape[:-1] + (actor.action_size,), jnp.float32)
    (last, _), (feats, actions, raws) = jax.lax.scan(step, (start, noise0), (firsts, jax.random.split(rng, horizon)))
    feat = jnp.concatenate([feats, last.feat[None]], axis=0)
    return Imagined(feat=feat, action=actions, raw_action=raws)


def lambda_returns(
    reward: jax.Array, cont: jax.Array, value: jax.Array, gamma: float, lam: float
) -> jax.Array:
    """``R_t`` for t < H from ``reward``/``cont`` [H, ...] (of steps 1..H) and ``value`` [H+1, ...]."""
    chex.assert_equal_shape([reward, cont])
    chex.assert_equal(value.shape[0], reward.shape[0] + 1)
    discount = gamma * cont

    def back(next_return: jax.Array, xs: tuple) -> tuple[jax.Array, jax.Array]:
        r, d, v_next = xs
        ret = r + d * ((1.0 - lam) * v_next + lam * next_return)
        return ret, ret

    _, returns = jax.lax.scan(back, value[-1], (reward, discount, value[1:]), reverse=True)
    return returns


def behavior_losses(
    wm: WorldModelNet,
    wm_params: Any,
    actor: ActorNet,
    actor_params: Any,
    critic: CriticNet,
    critic_params: Any,
    start: Latent,
    start_cont: jax.Array,
    norm: ReturnNorm,
    rng: jax.Array,
    *,
    horizon: int,
    unimix: float,
    gamma: float,
    lam: float,
    actor_grad: str,
    actor_entropy: float,
    norm_rate: float,
    reinforce_share: float,
    norm_limit: float,
    twohot: TwoHot,
    noise_corr: float = 0.0,
    noise_share: float = 1.0,
) -> tuple[jax.Array, tuple[Imagined, jax.Array, jax.Array, ReturnNorm, dict[str, jax.Array]]]:
    """The actor loss (differentiable in ``actor_params``) and, as aux, what the critic needs:
    (stopped rollout, stopped returns, stopped step weights, the updated normaliser, metrics).
    ``start_cont`` [N]: 0 where the start latent is terminal (those rollouts get weight 0).
    ``reinforce_share``: with ``actor_grad="mix"``, the weight of the REINFORCE objective (the
    backprop objective gets ``1 - reinforce_share``). ``noise_corr``, ``noise_share``: see
    ``imagine`` (backprop only: the REINFORCE score assumes independent steps)."""
    sg = jax.lax.stop_gradient
    if noise_corr > 0 and actor_grad != "backprop":
        raise ValueError(f"noise_corr={noise_corr} needs actor_grad='backprop' (got {actor_grad!r})")
    traj = imagine(wm, wm_params, actor, actor_params, start, rng, horizon, unimix, noise_corr, noise_share)
    if actor_grad == "reinforce":
        traj = sg(traj)
    reward_logits, cont_logit = wm.apply(wm_params, traj.feat[1:], method=WorldModelNet.reward_and_cont)
    reward = twohot.decode(reward_logits)
    cont = jax.nn.sigmoid(cont_logit)
    value = twohot.decode(critic.apply(critic_params, traj.feat))
    returns = lambda_returns(reward, cont, value, gamma, lam)  # [H, N]
    # Weight of step t: the imagined probability that the episode is still running at t.
    weight = sg(jnp.cumprod(jnp.concatenate([start_cont[None], gamma * cont[:-1]], axis=0), axis=0))
    norm = norm.update(returns, norm_rate)
    scale = norm.scale(norm_limit)
    mean, std = actor.apply(actor_params, sg(traj.feat[:-1]))
    entropy = action_distribution(mean, std)["entropy"]
    if actor_grad not in ("backprop", "reinforce", "mix"):
        raise ValueError(f"actor_grad={actor_grad!r}: use 'backprop', 'reinforce' or 'mix'")
    if actor_grad == "backprop":
        objective = returns / scale
    else:
        advantage = sg((returns - value[:-1]) / scale)
        objective = gaussian_log_prob(sg(traj.raw_action), mean, std) * advantage
        if actor_grad == "mix":
            objective = (1.0 - reinforce_share) * returns / scale + reinforce_share * objective
    loss = -jnp.mean(weight * (objective + actor_entropy * entropy))
    metrics = {
        "actor/loss": loss,
        "actor/entropy": jnp.mean(entropy),
        "actor/std": jnp.mean(std),
        "imagination/return": jnp.mean(returns),
        "imagination/reward": jnp.mean(reward),
        "imagination/continue": jnp.mean(cont),
        "imagination/return_scale": scale,
    }
    return loss, (sg(traj), sg(returns), weight, norm, jax.tree.map(sg, metrics))


def critic_loss(
    critic: CriticNet,
    critic_params: Any,
    slow_params: Any,
    traj: Imagined,
    returns: jax.Array,
    weight: jax.Array,
    *,
    slow_reg: float,
    twohot: TwoHot,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of the critic at steps 0..H-1 against the returns and the slow critic."""
    feat = traj.feat[:-1]
    logits = critic.apply(critic_params, feat)
    slow = jax.lax.stop_gradient(twohot.decode(critic.apply(slow_params, feat)))
    per_step = twohot.loss(logits, returns) + slow_reg * twohot.loss(logits, slow)
    loss = jnp.mean(weight * per_step)
    return loss, {"critic/loss": loss, "critic/value": jnp.mean(twohot.decode(logits))}


def replay_returns(
    reward: jax.Array, terminated: jax.Array, is_first: jax.Array, value: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Lambda-returns of replayed latents and where they are defined (both [T-1, B]).

    Inputs are time-major [T, B] replay rows; latent t is the outcome of row t (its reward and
    ``terminated``), so its successor is latent t+1 with reward ``reward[t+1]``, unless row t+1
    starts a new episode. ``R_t = r_{t+1} + gamma (1 - term_{t+1}) ((1 - lam) v_{t+1} + lam R_{t+1})``,
    where ``R_{t+1}`` is ``v_{t+1}`` if latent t+1 has no successor in the window. Defined (mask 1)
    where latent t is not terminal and its successor is in the window.
    """
    chex.assert_equal_shape([reward, terminated, is_first, value])
    same = 1.0 - is_first[1:]  # latent t is followed by latent t+1 of its episode
    live = gamma * (1.0 - terminated[1:])

    def back(boot: jax.Array, xs: tuple) -> tuple[jax.Array, jax.Array]:
        r, lv, v_next, v_now, s = xs
        ret = r + lv * ((1.0 - lam) * v_next + lam * boot)
        return jnp.where(s > 0, ret, v_now), ret

    xs = (reward[1:], live, value[1:], value[:-1], same)
    _, returns = jax.lax.scan(back, value[-1], xs, reverse=True)
    return returns, same * (1.0 - terminated[:-1])


def replay_critic_loss(
    critic: CriticNet,
    critic_params: Any,
    slow_params: Any,
    feat: jax.Array,
    reward: jax.Array,
    terminated: jax.Array,
    is_first: jax.Array,
    *,
    gamma: float,
    lam: float,
    slow_reg: float,
    twohot: TwoHot,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy of the critic on replayed latents ``feat`` [T, B, F] against the returns of the
    real rewards (bootstrapped with its own stopped values) and against the slow critic."""
    logits = critic.apply(critic_params, feat)
    value = jax.lax.stop_gradient(twohot.decode(logits))
    returns, mask = replay_returns(reward, terminated, is_first, value, gamma, lam)
    slow = jax.lax.stop_gradient(twohot.decode(critic.apply(slow_params, feat[:-1])))
    per_step = twohot.loss(logits[:-1], jax.lax.stop_gradient(returns)) + slow_reg * twohot.loss(logits[:-1], slow)
    loss = jnp.mean(mask * per_step)
    return loss, {"critic/replay_loss": loss, "critic/replay_return": jnp.sum(mask * returns) / jnp.maximum(jnp.sum(mask), 1.0)}
