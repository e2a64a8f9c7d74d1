"""The world model: an RSSM with categorical latents, learned from replayed sequences.

Pieces (DreamerV3, Hafner et al. 2023, for vector observations):

* ``symlog``/``symexp`` squash observations, rewards and values so one set of hyperparameters
  fits tasks whose magnitudes differ by orders of magnitude.
* ``TwoHot``: a scalar as a distribution over fixed bins equally spaced in symlog space (255 by
  default, -20..20); the reward head and the critic predict logits over those bins and are
  trained by cross-entropy, so large rewards do not produce large gradients.
* ``WorldModelNet`` (Flax): MLP encoder of ``symlog(obs)`` (plus cos/sin of the entries listed in
  ``angle_indices``: a raw heading jumps by 2 pi at the wrap); the RSSM with a deterministic GRU state
  ``deter`` and a stochastic state of ``stoch`` categoricals of ``classes`` classes each (one-hot,
  sampled with straight-through gradients from a 1% uniform mix of the softmax, so no class ever
  has probability 0 and the KL stays finite); the decoder (symlog MSE), the reward head (two-hot)
  and the continue head (Bernoulli). Dense layers are Dense -> RMSNorm -> SiLU.
* ``kl_losses``: KL balancing with free bits. The dynamics term trains the prior towards the
  (stopped) posterior, the representation term the posterior towards the (stopped) prior; each is
  clipped below at ``free_nats`` per time step, so a KL already below 1 nat gets no gradient.
* ``observe``: the posterior states of a batch of replayed sequences, and ``world_model_loss``.

Replay rows (see ``lunarl.agents.dreamer.agent.Step``) store, per env step, the observation acted
on (``obs``), ``is_first`` (that observation starts an episode), the action, the reward, and the
observation the step produced *before* any auto-reset (``next_obs``, the env's ``final_obs``)
with ``terminated``. Because the auto-reset wrapper replaces the terminal observation by the next
episode's first one, a step's outcome is learned from ``next_obs``: the latent of row t is
``post(GRU(latent_{t-1}, a_{t-1}), embed(next_obs_{t-1}))``, from which the decoder rebuilds
``next_obs``, the reward head predicts the step's reward and the continue head ``1 - terminated``.
Where ``is_first`` the carried latent is dropped and the latent is rebuilt from the reset carry
(zeros) and ``obs`` exactly as acting does, so sequences never leak across episodes, and a time
limit (truncation) is not taught as a termination.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lunarl.agents.networks import with_angle_features

__all__ = [
    "Latent",
    "ModelDims",
    "TwoHot",
    "WorldModelNet",
    "categorical_kl",
    "kl_losses",
    "observe",
    "rollout_prior",
    "sample_stoch",
    "symexp",
    "symlog",
    "unimix_logits",
    "world_model_loss",
]


def symlog(x: jax.Array) -> jax.Array:
    """``sign(x) log(1 + |x|)``."""
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def symexp(x: jax.Array) -> jax.Array:
    """Inverse of ``symlog``."""
    return jnp.sign(x) * jnp.expm1(jnp.abs(x))


@dataclasses.dataclass(frozen=True)
class TwoHot:
    """Scalars as two-hot weights over ``num_bins`` bins equally spaced in symlog space."""

    num_bins: int = 255
    low: float = -20.0
    high: float = 20.0

    @property
    def bins(self) -> jax.Array:
        return jnp.linspace(self.low, self.high, self.num_bins, dtype=jnp.float32)

    def encode(self, x: jax.Array) -> jax.Array:
        """``x`` [...] -> weights [..., num_bins] on the two bins around ``symlog(x)`` (clipped to
        the bin range), linearly interpolated so that ``weights @ bins == symlog(x)``."""
        y = jnp.clip(symlog(x.astype(jnp.float32)), self.low, self.high)
        width = (self.high - self.low) / (self.num_bins - 1)
        pos = (y - self.low) / width
        below = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, self.num_bins - 2)
        frac = jnp.clip(pos - below, 0.0, 1.0)
        return (
            jax.nn.one_hot(below, self.num_bins) * (1.0 - frac)[..., None]
            + jax.nn.one_hot(below + 1, self.num_bins) * frac[..., None]
        )

    def decode(self, logits: jax.Array) -> jax.Array:
        """The predicted scalar: ``symexp`` of the expected bin under ``softmax(logits)``."""
        return symexp(jnp.sum(jax.nn.softmax(logits, axis=-1) * self.bins, axis=-1))

    def decode_weights(self, weights: jax.Array) -> jax.Array:
        return symexp(jnp.sum(weights * self.bins, axis=-1))

    def loss(self, logits: jax.Array, target: jax.Array) -> jax.Array:
        """Cross-entropy of ``logits`` [..., bins] against the two-hot of ``target`` [...]."""
        target = jax.lax.stop_gradient(self.encode(target))
        return -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Network sizes (one ``size`` preset of the agent config)."""

    deter: int
    hidden: int
    stoch: int
    classes: int
    units: int
    layers: int

    @property
    def stoch_size(self) -> int:
        return self.stoch * self.classes

    @property
    def feat_size(self) -> int:
        return self.deter + self.stoch_size


class Latent(struct.PyTreeNode):
    """An RSSM state: ``deter`` [..., D] and the flat one-hot ``stoch`` [..., S*C]."""

    deter: jax.Array
    stoch: jax.Array

    @property
    def feat(self) -> jax.Array:
        """What every head reads: ``[deter, stoch]``."""
        return jnp.concatenate([self.deter, self.stoch], axis=-1)


class Dense(nn.Module):
    """Dense (no bias, the norm has its own scale) -> RMSNorm -> SiLU."""

    units: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.units, use_bias=False)(x)
        return nn.silu(nn.RMSNorm(epsilon=1e-4)(x))


class Stack(nn.Module):
    """``layers`` of ``Dense`` then a linear output (``zero_out``: zero-initialised, so a fresh
    reward head or critic predicts exactly 0 instead of a random value; ``out_scale``: the
    variance scale of its LeCun-normal initialiser, DreamerV3's ``outscale``)."""

    layers: int
    units: int
    out: int
    zero_out: bool = False
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.layers):
            x = Dense(self.units)(x)
        if self.zero_out:
            init = nn.initializers.zeros
        else:  # at out_scale 1 this is exactly lecun_normal
            init = nn.initializers.variance_scaling(self.out_scale, "fan_in", "truncated_normal")
        return nn.Dense(self.out, kernel_init=init)(x)


class GRU(nn.Module):
    """The DreamerV2/V3 GRU: one normalised projection of ``[input, state]`` gives the reset,
    candidate and update gates; the update gate is biased by -1 so a fresh cell keeps its state."""

    size: int

    @nn.compact
    def __call__(self, x: jax.Array, state: jax.Array) -> jax.Array:
        parts = nn.Dense(3 * self.size, use_bias=False)(jnp.concatenate([x, state], axis=-1))
        parts = nn.RMSNorm(epsilon=1e-4)(parts)
        reset, cand, update = jnp.split(parts, 3, axis=-1)
        reset = jax.nn.sigmoid(reset)
        cand = jnp.tanh(reset * cand)
        update = jax.nn.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * state


class WorldModelNet(nn.Module):
    """All world-model networks; call its methods with ``apply(..., method=...)``."""

    obs_size: int
    action_size: int
    dims: ModelDims
    num_bins: int = 255
    angle_indices: tuple[int, ...] = ()  # observation entries also encoded as (cos, sin)

    def setup(self) -> None:
        d = self.dims
        self.encoder = Stack(d.layers, d.units, d.units)
        self.img_in = Dense(d.hidden)
        self.gru = GRU(d.deter)
        self.prior_net = Stack(1, d.hidden, d.stoch_size)
        self.post_net = Stack(1, d.hidden, d.stoch_size)
        self.decoder = Stack(d.layers, d.units, self.obs_size)
        self.reward_net = Stack(d.layers, d.units, self.num_bins, zero_out=True)
        self.cont_net = Stack(d.layers, d.units, 1)

    def embed(self, obs: jax.Array) -> jax.Array:
        return self.encoder(with_angle_features(symlog(obs), obs, self.angle_indices))

    def img_step(self, deter: jax.Array, stoch: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Next ``deter`` and the prior logits [..., S*C] after ``action`` from ``(deter, stoch)``."""
        x = self.img_in(jnp.concatenate([stoch, action], axis=-1))
        deter = self.gru(x, deter)
        return deter, self.prior_net(deter)

    def posterior(self, deter: jax.Array, embed: jax.Array) -> jax.Array:
        return self.post_net(jnp.concatenate([deter, embed], axis=-1))

    def heads(self, feat: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(decoded symlog observation, reward logits [..., bins], continue logit [...])."""
        return self.decoder(feat), self.reward_net(feat), self.cont_net(feat)[..., 0]

    def reward_and_cont(self, feat: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.reward_net(feat), self.cont_net(feat)[..., 0]

    def __call__(self, obs: jax.Array, action: jax.Array) -> Any:
        """Touches every network once (for ``init`` only)."""
        d = self.dims
        batch = obs.shape[:-1]
        deter = jnp.zeros(batch + (d.deter,))
        stoch = jnp.zeros(batch + (d.stoch_size,))
        deter, prior = self.img_step(deter, stoch, action)
        post = self.posterior(deter, self.embed(obs))
        return prior, post, self.heads(jnp.concatenate([deter, stoch], axis=-1))


# --------------------------------------------------------------------------------------------
# Categorical latents
# --------------------------------------------------------------------------------------------


def unimix_logits(logits: jax.Array, classes: int, unimix: float) -> jax.Array:
    """Log-probabilities [..., S, C] of ``(1 - unimix) softmax(logits) + unimix / C``; ``logits``
    may be flat [..., S*C]."""
    logits = logits.reshape(logits.shape[:-1] + (-1, classes)) if logits.shape[-1] != classes else logits
    probs = jax.nn.softmax(logits, axis=-1)
    probs = (1.0 - unimix) * probs + unimix / classes
    return jnp.log(probs)


def sample_stoch(rng: jax.Array, log_probs: jax.Array) -> jax.Array:
    """A one-hot sample [..., S*C] of ``log_probs`` [..., S, C] with straight-through gradients
    (the forward value is the one-hot, the gradient that of the probabilities)."""
    classes = log_probs.shape[-1]
    index = jax.random.categorical(rng, log_probs, axis=-1)
    one_hot = jax.nn.one_hot(index, classes, dtype=log_probs.dtype)
    probs = jnp.exp(log_probs)
    sample = one_hot + (probs - jax.lax.stop_gradient(probs))  # forward: exactly the one-hot
    return sample.reshape(sample.shape[:-2] + (-1,))


def categorical_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """``KL(p || q)`` summed over the ``S`` categoricals: [..., S, C] -> [...]."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=(-2, -1))


def kl_losses(post: jax.Array, prior: jax.Array, free_nats: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dynamics loss, representation loss, raw KL), each [...], from log-probabilities
    [..., S, C]. ``dyn = max(free, KL(sg(post) || prior))``, ``rep = max(free, KL(post || sg(prior)))``."""
    sg = jax.lax.stop_gradient
    dyn = categorical_kl(sg(post), prior)
    rep = categorical_kl(post, sg(prior))
    return jnp.maximum(dyn, free_nats), jnp.maximum(rep, free_nats), sg(dyn)


# --------------------------------------------------------------------------------------------
# Observing sequences and the loss
# --------------------------------------------------------------------------------------------


def initial_deter(net: WorldModelNet, params: Any, batch: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """``deter`` and prior logits right after the reset carry (zeros state, zero action)."""
    d = net.dims
    zeros = lambda n: jnp.zeros(tuple(batch) + (n,), jnp.float32)  # noqa: E731
    return net.apply(params, zeros(d.deter), zeros(d.stoch_size), zeros(net.action_size), method=WorldModelNet.img_step)


@struct.dataclass
class Observed:
    """Per step of a sequence ([T, B, ...]): posterior latents and both distributions."""

    latent: Latent
    post: jax.Array  # log-probabilities [T, B, S, C]
    prior: jax.Array


def observe(
    net: WorldModelNet, params: Any, seq: Any, rng: jax.Array, unimix: float
) -> Observed:
    """Posterior latents of the *outcome* of every replayed step (the latent of ``next_obs``).

    ``seq`` leaves are time-major ``[T, B, ...]`` with fields ``obs``, ``next_obs``, ``action``,
    ``is_first``. Step 0 of every window starts from the reset carry, like an ``is_first`` step
    (the replay does not store latents).
    """
    d = net.dims
    t_len, batch = seq.action.shape[:2]
    chex.assert_shape(seq.obs, (t_len, batch, net.obs_size))
    embed_next = net.apply(params, seq.next_obs, method=WorldModelNet.embed)
    embed_now = net.apply(params, seq.obs, method=WorldModelNet.embed)
    deter0, _ = initial_deter(net, params, (batch,))
    restart = seq.is_first.astype(bool).at[0].set(True)

    def step(carry: Latent, xs: tuple) -> tuple[Latent, tuple]:
        e_now, e_next, action, first, key = xs
        k_reset, k_post = jax.random.split(key)
        # The latent of ``obs``: carried from the previous step, or rebuilt from the reset carry.
        reset_logits = net.apply(params, deter0, e_now, method=WorldModelNet.posterior)
        reset = Latent(deter0, sample_stoch(k_reset, unimix_logits(reset_logits, d.classes, unimix)))
        mask = first[:, None]
        now = jax.tree.map(lambda r, c: jnp.where(mask, r, c), reset, carry)
        deter, prior_logits = net.apply(params, now.deter, now.stoch, action, method=WorldModelNet.img_step)
        post_logits = net.apply(params, deter, e_next, method=WorldModelNet.posterior)
        post = unimix_logits(post_logits, d.classes, unimix)
        prior = unimix_logits(prior_logits, d.classes, unimix)
        latent = Latent(deter, sample_stoch(k_post, post))
        return latent, (latent, post, prior)

    init = Latent(jnp.zeros((batch, d.deter)), jnp.zeros((batch, d.stoch_size)))
    keys = jax.random.split(rng, t_len)
    _, (latent, post, prior) = jax.lax.scan(step, init, (embed_now, embed_next, seq.action, restart, keys))
    return Observed(latent=latent, post=post, prior=prior)


def world_model_loss(
    net: WorldModelNet,
    params: Any,
    seq: Any,
    rng: jax.Array,
    *,
    unimix: float,
    free_nats: float,
    dyn_scale: float,
    rep_scale: float,
    twohot: TwoHot,
    reward_scale: float = 1.0,
    cont_scale: float = 1.0,
) -> tuple[jax.Array, tuple[Observed, dict[str, jax.Array]]]:
    """Scalar loss and (observed latents, metrics) of time-major sequences ``seq``; the reward and
    continue terms are scaled by ``reward_scale`` / ``cont_scale`` (DreamerV3's ``rew``/``con``)."""
    obs = observe(net, params, seq, rng, unimix)
    decoded, reward_logits, cont_logit = net.apply(params, obs.latent.feat, method=WorldModelNet.heads)
    recon = jnp.sum(jnp.square(decoded - symlog(seq.next_obs)), axis=-1)
    reward = twohot.loss(reward_logits, seq.reward)
    cont_target = 1.0 - seq.terminated
    cont = optax_sigmoid_bce(cont_logit, cont_target)
    dyn, rep, kl = kl_losses(obs.post, obs.prior, free_nats)
    loss = jnp.mean(recon + reward_scale * reward + cont_scale * cont + dyn_scale * dyn + rep_scale * rep)
    predicted = twohot.decode(reward_logits)
    metrics = {
        "world_model/loss": loss,
        "world_model/reconstruction": jnp.mean(recon),
        "world_model/reward": jnp.mean(reward),
        "world_model/continue": jnp.mean(cont),
        "world_model/kl_dynamics": jnp.mean(dyn),
        "world_model/kl_representation": jnp.mean(rep),
        "world_model/kl": jnp.mean(kl),
        "world_model/reward_error": jnp.mean(jnp.abs(predicted - seq.reward)),
        "world_model/posterior_entropy": jnp.mean(-jnp.sum(jnp.exp(obs.post) * obs.post, axis=(-2, -1))),
    }
    return loss, (obs, metrics)


def optax_sigmoid_bce(logit: jax.Array, target: jax.Array) -> jax.Array:
    """Binary cross-entropy of a logit (stable form)."""
    return jnp.maximum(logit, 0.0) - logit * target + jnp.log1p(jnp.exp(-jnp.abs(logit)))


def rollout_prior(
    net: WorldModelNet, params: Any, start: Latent, actions: jax.Array, rng: jax.Array, unimix: float
) -> Latent:
    """Open-loop latents [H, N, ...] of the prior from ``start`` (leaves [N, ...]) under given
    ``actions`` [H, N, A]: what the model imagines the real actions lead to (for diagnostics)."""
    classes = net.dims.classes

    def step(latent: Latent, xs: tuple) -> tuple[Latent, Latent]:
        action, key = xs
        deter, prior_logits = net.apply(params, latent.deter, latent.stoch, action, method=WorldModelNet.img_step)
        nxt = Latent(deter, sample_stoch(key, unimix_logits(prior_logits, classes, unimix)))
        return nxt, nxt

    _, latents = jax.lax.scan(step, start, (actions, jax.random.split(rng, actions.shape[0])))
    return latents
