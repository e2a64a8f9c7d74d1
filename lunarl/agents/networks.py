"""Flax modules and running statistics shared by lunarl's agents.

* ``MLP`` and ``ActorCritic``: separate policy and value MLPs (no shared torso, so the value
  loss cannot disturb the policy features), orthogonal initialisation as in the PPO
  implementation studies (hidden gain sqrt(2), policy head 0.01 so the initial policy is close
  to the state-independent Gaussian, value head 1.0), and a learned state-independent log-std.
* ``RunningStats``: observation mean/variance merged batch by batch (Chan et al.'s parallel
  form of Welford's update), a pytree that lives in the agent's train state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["ACTIVATIONS", "ActorCritic", "MLP", "RunningStats"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": nn.tanh,
    "relu": nn.relu,
    "elu": nn.elu,
    "silu": nn.silu,
    "gelu": nn.gelu,
}


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
            x = nn.Dense(width, kernel_init=nn.initializers.orthogonal(jnp.sqrt(2.0)))(x)
            x = act(x)
        return nn.Dense(self.out_size, kernel_init=nn.initializers.orthogonal(self.out_scale))(x)


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
