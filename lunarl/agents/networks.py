"""Flax modules and running statistics shared by lunarl's agents.

* ``MLP`` and ``ActorCritic``: separate policy and value MLPs (no shared torso, so the value
  loss cannot disturb the policy features), orthogonal initialisation as in the PPO
  implementation studies (hidden gain sqrt(2), policy head 0.01 so the initial policy is close
  to the state-independent Gaussian, value head 1.0), and a learned state-independent log-std.
* ``orthogonal``: that initialiser built from plain jnp ops (Householder QR) instead of LAPACK.
  jaxlib 0.10's CPU LAPACK kernels split a batched call (``vmap`` over seeds makes every QR
  batched) into chunks on XLA's intra-op thread pool and block until they finish; when the
  thunk executor runs as many such calls at once as the pool has threads, every pool thread
  waits for chunks that no free thread can run, and the multi-seed ``init`` deadlocks.
* ``RunningStats``: observation mean/variance merged batch by batch (Chan et al.'s parallel
  form of Welford's update), a pytree that lives in the agent's train state.
* ``observation_features`` / ``feature_size``: what the networks see of an observation
  (``with_angle_features``: its (cos, sin) part, which Dreamer's encoder uses too).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["ACTIVATIONS", "MLP", "ActorCritic", "RunningStats", "feature_size", "observation_features", "orthogonal", "with_angle_features"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": nn.tanh,
    "relu": nn.relu,
    "elu": nn.elu,
    "silu": nn.silu,
    "gelu": nn.gelu,
}


def _householder_q(a: jax.Array) -> jax.Array:
    """The thin Q of ``a = QR`` ([m, n], m >= n) with R's diagonal made positive: unique for a
    full-rank ``a``, so it equals what LAPACK's geqrf/orgqr give up to rounding."""
    m, n = a.shape
    rows = jnp.arange(m)
    dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPU

    def reflect(k: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        r, q = carry  # r: ``a`` reduced so far; q: product of the reflections so far
        x = jnp.where(rows >= k, r[:, k], 0.0)
        # Reflect x onto -sign(x_k) |x| e_k (the sign that avoids cancellation, as in geqrf).
        alpha = -jnp.where(x[k] >= 0, 1.0, -1.0) * jnp.sqrt(jnp.sum(x * x))
        v = x.at[k].add(-alpha)
        v = v / jnp.maximum(jnp.sqrt(jnp.sum(v * v)), jnp.finfo(a.dtype).tiny)
        return r - 2.0 * jnp.outer(v, dot(v, r)), q - 2.0 * jnp.outer(dot(q, v), v)

    r, q = jax.lax.fori_loop(0, n, reflect, (a, jnp.eye(m, dtype=a.dtype)))
    return q[:, :n] * jnp.where(jnp.diagonal(r) >= 0, 1.0, -1.0)


def orthogonal(scale: float = 1.0) -> nn.initializers.Initializer:
    """Orthogonal kernel initialiser for ``[fan_in, fan_out]`` kernels, drawn like
    ``nn.initializers.orthogonal(scale)`` (same key, same Gaussian, same Q up to rounding) but
    with the QR in plain jnp ops, so a ``vmap``-ed init calls no batched LAPACK kernel (see the
    module docstring)."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        if len(shape) != 2:
            raise ValueError(f"orthogonal: expected a 2-D kernel shape, got {tuple(shape)}")
        rows, cols = shape
        z = jax.random.normal(key, (max(rows, cols), min(rows, cols)), jnp.float32)
        q = _householder_q(z)
        q = q.T if rows < cols else q  # orthonormal rows or columns, whichever side is smaller
        return (scale * q).astype(dtype)

    return init


class MLP(nn.Module):
    """Dense layers with ``activation`` between them and a linear output of ``out_size``."""

    hidden: Sequence[int]
    out_size: int
    activation: str = "tanh"
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden:
            x = nn.Dense(width, kernel_init=orthogonal(math.sqrt(2.0)))(x)
            x = act(x)
        return nn.Dense(self.out_size, kernel_init=orthogonal(self.out_scale))(x)


class ActorCritic(nn.Module):
    """Gaussian policy (mean from an MLP, learned state-independent log-std) and a value MLP."""

    action_size: int
    policy_hidden: Sequence[int] = (256, 256)
    value_hidden: Sequence[int] = (256, 256)
    activation: str = "tanh"
    init_log_std: float = 0.0

    def setup(self) -> None:
        self.actor = MLP(self.policy_hidden, self.action_size, self.activation, out_scale=0.01)
        self.critic = MLP(self.value_hidden, 1, self.activation, out_scale=1.0)
        self.log_std = self.param(
            "log_std", nn.initializers.constant(self.init_log_std), (self.action_size,)
        )

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(action mean [..., A], log-std [..., A], value [...]) for normalised ``obs``."""
        mean, log_std = self.policy(obs)
        return mean, log_std, self.value(obs)

    def policy(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean = self.actor(obs)
        return mean, jnp.broadcast_to(self.log_std, mean.shape)

    def value(self, obs: jax.Array) -> jax.Array:
        return self.critic(obs)[..., 0]


@struct.dataclass
class RunningStats:
    """Running mean and variance of vectors, merged one batch at a time."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array  # float32: a weight, so precision loss at huge counts only slows adaptation

    @classmethod
    def create(cls, size: int) -> RunningStats:
        # A tiny prior count: the first batch effectively replaces the (0, 1) prior.
        return cls(
            mean=jnp.zeros((size,), jnp.float32),
            var=jnp.ones((size,), jnp.float32),
            count=jnp.asarray(1e-4, jnp.float32),
        )

    def update(self, batch: jax.Array) -> RunningStats:
        """Merge ``batch`` ([..., size]) into the statistics (parallel Welford/Chan update)."""
        x = batch.reshape(-1, self.mean.shape[-1]).astype(jnp.float32)
        n = jnp.asarray(x.shape[0], jnp.float32)
        batch_mean = x.mean(axis=0)
        batch_var = x.var(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        mean = self.mean + delta * (n / total)
        m2 = self.var * self.count + batch_var * n + jnp.square(delta) * (self.count * n / total)
        return RunningStats(mean=mean, var=m2 / total, count=total)

    def normalize(self, x: jax.Array, clip: float = 10.0) -> jax.Array:
        return jnp.clip((x - self.mean) / jnp.sqrt(self.var + 1e-8), -clip, clip)


def observation_features(env: Any, stats: RunningStats, obs: jax.Array, normalize: bool, angle_features: bool) -> jax.Array:
    """Network input: the observation (normalised by ``stats`` if ``normalize``), plus (cos, sin)
    of the entries the env declares as angles (``env.angle_observations``) if ``angle_features``:
    a raw angle jumps by 2 pi across the wrap, which an MLP must otherwise learn to bridge."""
    x = stats.normalize(obs) if normalize else obs
    angles = tuple(getattr(env, "angle_observations", ())) if angle_features else ()
    return with_angle_features(x, obs, angles)


def with_angle_features(x: jax.Array, obs: jax.Array, angles: tuple[int, ...]) -> jax.Array:
    """``x`` followed by (cos, sin) of the raw ``obs`` entries ``angles`` (``x`` itself if none)."""
    if not angles:
        return x
    raw = obs[..., list(angles)]
    return jnp.concatenate([x, jnp.cos(raw), jnp.sin(raw)], axis=-1)


def feature_size(env: Any, angle_features: bool) -> int:
    """Width of ``observation_features`` for ``env``."""
    angles = tuple(getattr(env, "angle_observations", ())) if angle_features else ()
    return env.observation_size + 2 * len(angles)
