"""SAC (twin critics, squashed Gaussian actor, automatic temperature) as pure functions.

One ``train_step`` is one iteration and one XLA program when jitted: ``lax.scan`` over
``unroll_length`` steps of ``num_envs`` vmapped envs (uniform random actions during the warm-up,
the stochastic actor after it), the steps written into the on-device replay buffer
(``lunarl.agents.replay``) that lives in the TrainState, then ``utd_ratio * unroll_length``
gradient steps in a second ``lax.scan``. Whether to act uniformly and whether the buffer is ready
to learn from are decided on device (``jnp.where`` per step, ``base.seed_cond`` around the
updates), so the iteration is the same program from the first call to the last; several seeds
train as one program with ``jax.vmap``. The replay is part of the TrainState, so checkpoints
hold it and a resumed run continues exactly. ``AGENT`` (at the end) is SAC as the host sees it.

Design choices:

* Actor: an MLP gives the mean and a raw log-std, bounded to ``[log_std_min, log_std_max]``
  with a tanh (as CleanRL does); the action is ``tanh(u)`` with ``u ~ N(mean, std)``, a distrax
  ``Transformed`` distribution with the ``Tanh`` bijector. Its log-probability is taken from
  the pre-squash sample with the stable ``log(1 - tanh(u)^2)`` correction, never through
  ``atanh`` of a saturated action. The deterministic action is ``tanh(mean)``.
* Critics: two Q MLPs on ``[obs, action]`` (``DoubleQ``); Polyak-averaged targets (``tau``). The TD
  target uses the minimum of the two target critics and the entropy term at the next action.
* Temperature: ``log_alpha`` learned towards a target entropy of ``-action_size``
  (``autotune``), or a fixed ``init_alpha``. The alpha loss reuses the log-probabilities of
  the actor loss (no third actor pass).
* Update order within one gradient step: critics (with the current actor and alpha), then actor
  and alpha (with the just-updated critics, as in the SAC paper and CleanRL), then the targets.
  Parameters and Adam moments stay pytrees (one small update per layer). Raveling them into
  flat vectors made XLA:CPU emit the actor's gradient as one concatenate fusion that was
  often slower than all the matmuls of the step (``scripts/results/sac.md``).
* Time limits: a transition stores ``next_obs = info["final_obs"]`` (the observation the step
  produced, before the auto-reset) and ``terminated = done and not truncation``; the target
  bootstraps unless ``terminated``, so a time limit is not mistaken for a terminal state.
* n-step returns (``n_step > 1``): windows of ``n_step`` consecutive steps of one env are
  sampled from the replay (``replay.sample_sequences``, which never crosses the write head);
  rewards are summed until the first ``done`` in the window and the target bootstraps from that
  step's ``next_obs`` with ``gamma**k`` (zero after a termination). These are uncorrected
  (off-policy) n-step returns, as in Rainbow/D4PG.
* Observation normalisation: running mean/var (``RunningStats``). Raw observations go into the
  replay; batches are normalised with the statistics current at update time, which already
  include the iteration's new steps. Acting uses the statistics from the start of the iteration.
* Rewards are multiplied by ``reward_scaling`` in the targets only (logged returns are raw).
* Warm-up: for the first ``warmup_steps`` env steps of a seed, actions are uniform in [-1, 1]
  and no gradient step is taken; after that, gradient steps run once the replay holds
  ``batch_size`` transitions (and ``n_step`` rows). While they are skipped the loss metrics are 0.
* TD3 is not included as a variant: it needs a target actor, deterministic exploration noise,
  target policy smoothing and delayed actor updates, i.e. a second set of parameters and loss
  paths through most functions here; it would be its own file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from lunarl.agents import replay as replay_lib
from lunarl.agents.base import (
    ENV_AXIS,
    EPISODE_STATISTICS,
    EPISODES_FINISHED,
    REPLICATED,
    Agent,
    AgentConfig,
    Policy,
    as_raw_key,
    episode_metrics,
    hyperparameter,
    seed_cond,
    split_on_data,
    stateless,
)
from lunarl.agents.networks import ACTIVATIONS, MLP, RunningStats, feature_size, observation_features
from lunarl.config import bounded
from lunarl.envs.base import LunarEnv, State, wrap_for_training

__all__ = [
    "AGENT",
    "METRIC_NAMES",
    "Actor",
    "DoubleQ",
    "SACConfig",
    "TrainState",
    "Transition",
    "env_axes",
    "init",
    "make_policy",
    "n_step_targets",
    "policy_params",
    "squashed_gaussian",
    "td_target",
    "train_step",
]


@dataclasses.dataclass(frozen=True)
class SACConfig(AgentConfig):
    """SAC hyperparameters. Defaults follow the SAC paper (Haarnoja et al. 2018, v2): Adam 3e-4,
    batch 256, gamma 0.99, tau 0.005, [256, 256] ReLU, 1M replay, target entropy -|A|.

    ``num_envs``, ``episode_length`` and ``total_iterations`` come from ``AgentConfig``.
    """

    unroll_length: int = bounded(8, 1, None, "steps collected per env per iteration")
    utd_ratio: float = bounded(1.0, 0.0, None, "gradient steps per vectorised env step")
    batch_size: int = bounded(256, 1, None, "transitions per gradient step")
    buffer_size: int = bounded(1_000_000, 1, None, "replay capacity in transitions (all envs)")
    warmup_steps: int = bounded(5_000, 0, None, "env steps (all envs) of uniform actions, no updates")
    learning_rate: float = bounded(3e-4, 1e-8, 1.0, "Adam step size of actor, critics and alpha")
    gamma: float = bounded(0.99, 0.0, 1.0)
    tau: float = bounded(0.005, 0.0, 1.0, "Polyak rate of the target critics")
    n_step: int = bounded(1, 1, None, "steps summed in the TD target")
    autotune: bool = True  # learn alpha towards entropy -action_size; else alpha = init_alpha
    init_alpha: float = bounded(1.0, 0.0, None)
    actor_hidden: tuple[int, ...] = bounded((256, 256), 1, None)
    critic_hidden: tuple[int, ...] = bounded((256, 256), 1, None)
    activation: str = "relu"
    log_std_min: float = bounded(-5.0, -20.0, 5.0)
    log_std_max: float = bounded(2.0, -20.0, 5.0)
    normalize_observations: bool = True
    angle_features: bool = True  # also feed the env's angle observations as (cos, sin)
    reward_scaling: float = bounded(1.0, 1e-8, None)

    def check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SACConfig.activation={self.activation!r} is not allowed: allowed {sorted(ACTIVATIONS)}"
            )
        if self.log_std_min >= self.log_std_max:
            raise ValueError(f"SACConfig.log_std_min={self.log_std_min} must be below log_std_max={self.log_std_max}")
        updates = self.utd_ratio * self.unroll_length
        if updates < 1 or not math.isclose(updates, round(updates)):
            raise ValueError(
                f"SACConfig.utd_ratio={self.utd_ratio} times unroll_length={self.unroll_length} must be a "
                "whole number of gradient steps (>= 1) per iteration"
            )
        if self.capacity < max(self.unroll_length, self.n_step):
            raise ValueError(
                f"SACConfig.buffer_size={self.buffer_size} holds {self.capacity} rows of num_envs="
                f"{self.num_envs}; it needs at least unroll_length={self.unroll_length} and n_step={self.n_step}"
            )

    @property
    def capacity(self) -> int:
        """Replay rows (one vectorised env step each)."""
        return -(-self.buffer_size // self.num_envs)

    @property
    def updates_per_iteration(self) -> int:
        return round(self.utd_ratio * self.unroll_length)

    @property
    def env_steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length


# --------------------------------------------------------------------------------------------
# Networks and the squashed Gaussian
# --------------------------------------------------------------------------------------------


class Actor(nn.Module):
    """Mean and bounded log-std of the pre-squash Gaussian, from a normalised observation."""

    action_size: int
    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    log_std_min: float = -5.0
    log_std_max: float = 2.0

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = MLP(self.hidden, 2 * self.action_size, self.activation, out_scale=0.01)(obs)
        mean, raw = jnp.split(out, 2, axis=-1)
        # tanh keeps the log-std in range with gradients everywhere (a clip would cut them).
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (jnp.tanh(raw) + 1.0)
        return mean, log_std


class DoubleQ(nn.Module):
    """Two Q MLPs: ``(obs, action) -> q[2, ...]``.

    Two separate MLPs rather than one ``nn.vmap``-ed pair: XLA:CPU runs the batched matmuls of
    a vmapped pair much slower than two plain ones (``scripts/results/sac.md``).
    """

    hidden: tuple[int, ...] = (256, 256)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action], axis=-1)
        q1 = MLP(self.hidden, 1, self.activation, name="q1")(x)
        q2 = MLP(self.hidden, 1, self.activation, name="q2")(x)
        return jnp.stack([q1[..., 0], q2[..., 0]])


def squashed_gaussian(mean: jax.Array, log_std: jax.Array) -> distrax.Distribution:
    """``tanh(u)``, ``u ~ N(mean, exp(log_std))`` per dimension, as one multivariate distribution."""
    base = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))
    return distrax.Transformed(base, distrax.Block(distrax.Tanh(), ndims=1))


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@struct.dataclass
class Transition:
    """One env's step as the replay stores it (leaves gain [capacity, num_envs] there)."""

    obs: jax.Array  # raw observation acted on
    action: jax.Array  # in [-1, 1]
    reward: jax.Array  # raw (unscaled)
    next_obs: jax.Array  # the observation the step produced, before any auto-reset
    terminated: jax.Array  # 1.0 on a true termination (no bootstrap)
    done: jax.Array  # 1.0 where the episode ended (termination or truncation)


class TrainState(struct.PyTreeNode):
    """Everything one SAC run carries between iterations; only arrays are pytree leaves."""

    params: dict[str, Any]  # actor, critic, target_critic, log_alpha
    opt_state: dict[str, Any]  # Adam states of actor, critic and log_alpha (pytrees like params)
    obs_stats: RunningStats
    replay: replay_lib.Replay
    env_state: State  # batched, from the training wrapper stack
    rng: jax.Array
    iteration: jax.Array  # int32 scalar
    env_steps: jax.Array  # int32 scalar, this seed's env steps
    gradient_steps: jax.Array  # int32 scalar
    hparams: dict[str, jax.Array]  # per-row hyperparameters (``HYPERPARAMETERS``); empty: ``cfg``'s
    env: LunarEnv = struct.field(pytree_node=False)  # the unbatched env; wrapped on use
    cfg: SACConfig = struct.field(pytree_node=False)


def _actor(env: LunarEnv, cfg: SACConfig) -> Actor:
    return Actor(env.action_size, cfg.actor_hidden, cfg.activation, cfg.log_std_min, cfg.log_std_max)


def _critic(cfg: SACConfig) -> DoubleQ:
    return DoubleQ(cfg.critic_hidden, cfg.activation)


def _training_env(env: LunarEnv, cfg: SACConfig):
    return wrap_for_training(env, cfg.episode_length)


def _features(env: LunarEnv, cfg: SACConfig, stats: RunningStats, obs: jax.Array) -> jax.Array:
    return observation_features(env, stats, obs, cfg.normalize_observations, cfg.angle_features)


def _feature_size(env: LunarEnv, cfg: SACConfig) -> int:
    return feature_size(env, cfg.angle_features)


def _adam(cfg: SACConfig, learning_rate: Any = None) -> optax.GradientTransformation:
    # Adam's state does not depend on the step size, so a population's per-row learning rate
    # (an array) builds the same state as the config's.
    return optax.adam(cfg.learning_rate if learning_rate is None else learning_rate)


def _example_transition(env: LunarEnv) -> Transition:
    obs = jnp.zeros((env.observation_size,), jnp.float32)
    scalar = jnp.zeros((), jnp.float32)
    return Transition(
        obs=obs,
        action=jnp.zeros((env.action_size,), jnp.float32),
        reward=scalar,
        next_obs=obs,
        terminated=scalar,
        done=scalar,
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def init(rng: jax.Array, env: LunarEnv, cfg: SACConfig) -> TrainState:
    """A fresh train state: networks, targets, optimisers, an empty replay, reset envs."""
    rng = as_raw_key(rng)
    k_actor, k_critic, k_env, k_state = jax.random.split(rng, 4)
    features = jnp.zeros((1, _feature_size(env, cfg)), jnp.float32)
    actor = _actor(env, cfg).init(k_actor, features)
    critic = _critic(cfg).init(k_critic, features, jnp.zeros((1, env.action_size), jnp.float32))
    log_alpha = jnp.asarray(math.log(max(cfg.init_alpha, 1e-30)), jnp.float32)
    params = {"actor": actor, "critic": critic, "target_critic": critic, "log_alpha": log_alpha}
    adam = _adam(cfg)
    opt_state = {
        "actor": adam.init(actor),
        "critic": adam.init(critic),
        "log_alpha": adam.init(log_alpha),
    }
    return TrainState(
        params=params,
        opt_state=opt_state,
        obs_stats=RunningStats.create(env.observation_size),
        replay=replay_lib.init(cfg.capacity, cfg.num_envs, _example_transition(env)),
        env_state=_training_env(env, cfg).reset(jax.random.split(k_env, cfg.num_envs)),
        rng=k_state,
        iteration=jnp.zeros((), jnp.int32),
        env_steps=jnp.zeros((), jnp.int32),
        gradient_steps=jnp.zeros((), jnp.int32),
        hparams={},
        env=env,
        cfg=cfg,
    )


def policy_params(ts: TrainState) -> dict[str, Any]:
    """What acting needs: actor parameters and observation statistics."""
    return {"actor": ts.params["actor"], "obs_stats": ts.obs_stats}


def make_policy(env: LunarEnv, cfg: SACConfig) -> Policy:
    """SAC's ``Policy`` (no carry): ``tanh`` of a Gaussian sample, or of its mean."""
    actor = _actor(env, cfg)

    def policy(params: dict[str, Any], obs: jax.Array, rng: jax.Array, deterministic: Any = True) -> jax.Array:
        mean, log_std = actor.apply(params["actor"], _features(env, cfg, params["obs_stats"], obs))
        sample = squashed_gaussian(mean, log_std).sample(seed=rng)
        # ``where`` so ``deterministic`` may be a Python bool or a traced one.
        return jnp.where(deterministic, jnp.tanh(mean), sample)

    return stateless(policy)


def env_axes(ts: TrainState) -> TrainState:
    """Placement specs: env states on their leading axis, the replay on its env column axis."""
    specs = jax.tree.map(lambda _: REPLICATED, ts)
    return specs.replace(
        env_state=jax.tree.map(lambda _: ENV_AXIS, ts.env_state),
        replay=replay_lib.env_axes(ts.replay),
    )


# --------------------------------------------------------------------------------------------
# Collecting
# --------------------------------------------------------------------------------------------


@struct.dataclass
class _Episode:
    """Per-step episode statistics for the logged metrics ([T, N] after the rollout)."""

    done: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array
    success: jax.Array


def collect(ts: TrainState, rng: jax.Array) -> tuple[State, Transition, _Episode]:
    """``unroll_length`` steps of every env: (final env state, transitions and episode stats,
    both time-major [T, N, ...]). Uniform actions while this seed is in its warm-up."""
    cfg = ts.cfg
    env = _training_env(ts.env, cfg)
    actor = _actor(ts.env, cfg)

    def step(env_state: State, xs: tuple[jax.Array, jax.Array]) -> tuple[State, tuple[Transition, _Episode]]:
        t, key = xs
        k_policy, k_uniform = jax.random.split(key)
        mean, log_std = actor.apply(ts.params["actor"], _features(ts.env, cfg, ts.obs_stats, env_state.obs))
        action = squashed_gaussian(mean, log_std).sample(seed=k_policy)
        uniform = jax.random.uniform(k_uniform, action.shape, minval=-1.0, maxval=1.0)
        warm = ts.env_steps + t * cfg.num_envs < cfg.warmup_steps
        action = jnp.where(warm, uniform, action)
        next_state = env.step(env_state, action)
        truncation = next_state.info["truncation"]
        episode = next_state.info["episode_metrics"]
        success = episode.get("success", jnp.zeros_like(next_state.reward))
        transition = Transition(
            obs=env_state.obs,
            action=action,
            reward=next_state.reward,
            next_obs=next_state.info["final_obs"],
            terminated=next_state.done * (1.0 - truncation),
            done=next_state.done,
        )
        stats = _Episode(
            done=next_state.done,
            episode_return=episode["sum_reward"],
            episode_length=episode["length"],
            success=(success > 0).astype(jnp.float32),
        )
        return next_state, (transition, stats)

    xs = (jnp.arange(cfg.unroll_length, dtype=jnp.int32), jax.random.split(rng, cfg.unroll_length))
    env_state, (batch, stats) = jax.lax.scan(step, ts.env_state, xs)
    return env_state, batch, stats


# --------------------------------------------------------------------------------------------
# Targets and losses
# --------------------------------------------------------------------------------------------


@struct.dataclass
class Batch:
    """A learning batch: normalised features, the reward sum and the bootstrap discount."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array  # scaled, summed over the n steps
    discount: jax.Array  # gamma**k, 0 after a termination
    next_obs: jax.Array  # features of the bootstrap observation


def n_step_targets(seq: Transition, gamma: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reward sum, bootstrap discount, bootstrap observation) of windows ``seq`` ([B, n, ...]).

    Rewards are summed, discounted, up to and including the first step whose episode ended (or
    the window's last step); the bootstrap uses that step's ``next_obs`` with ``gamma**k`` (k
    the number of summed steps), and discount 0 if that step was a termination. With n = 1 this
    is ``(r, gamma * (1 - terminated), next_obs)``.
    """
    n = seq.reward.shape[1]
    done = seq.done > 0
    # Step k counts while no earlier step of the window ended its episode.
    ended_before = jnp.cumsum(done, axis=1) - done
    alive = (ended_before == 0).astype(jnp.float32)
    powers = gamma ** jnp.arange(n, dtype=jnp.float32)
    reward = jnp.sum(alive * powers * seq.reward, axis=1)
    last = jnp.where(done.any(axis=1), jnp.argmax(done, axis=1), n - 1)
    pick = lambda x: jnp.take_along_axis(x, last.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]  # noqa: E731
    discount = gamma ** (last + 1).astype(jnp.float32) * (1.0 - pick(seq.terminated))
    return reward, discount, pick(seq.next_obs)


def td_target(
    next_q: jax.Array, next_log_prob: jax.Array, reward: jax.Array, discount: jax.Array, alpha: jax.Array
) -> jax.Array:
    """Soft TD target ``reward + discount * (min_i Q_i(s', a') - alpha * log pi(a'|s'))``
    from the target critics' ``next_q`` [2, B] at ``a' ~ pi(s')``."""
    chex.assert_rank(next_q, 2)
    return reward + discount * (jnp.min(next_q, axis=0) - alpha * next_log_prob)


def _sample_batches(ts: TrainState, rng: jax.Array, stats: RunningStats) -> Batch:
    """``updates_per_iteration`` batches at once (leaves [U, batch_size, ...]), normalised."""
    cfg = ts.cfg
    gamma = hyperparameter(ts, "gamma")
    count = cfg.updates_per_iteration * cfg.batch_size
    if cfg.n_step == 1:
        t = replay_lib.sample(ts.replay, rng, count)
        reward, discount, next_obs = t.reward, gamma * (1.0 - t.terminated), t.next_obs
    else:
        seq = replay_lib.sample_sequences(ts.replay, rng, count, cfg.n_step)
        t = jax.tree.map(lambda x: x[:, 0], seq)
        reward, discount, next_obs = n_step_targets(seq, gamma)
    features = lambda o: _features(ts.env, cfg, stats, o)  # noqa: E731
    batch = Batch(
        obs=features(t.obs),
        action=t.action,
        reward=reward * hyperparameter(ts, "reward_scaling"),
        discount=discount,
        next_obs=features(next_obs),
    )
    return jax.tree.map(lambda x: x.reshape((cfg.updates_per_iteration, cfg.batch_size) + x.shape[1:]), batch)


def _learn(
    env: LunarEnv, cfg: SACConfig, params: dict[str, Any], opt_state: dict[str, Any], batches: Batch, rng: jax.Array,
    hparams: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, jax.Array]]:
    """``updates_per_iteration`` gradient steps on ``batches`` ([U, B, ...]): (params, opt_state,
    metrics averaged over the steps). ``hparams`` overrides ``cfg``'s learning rate and tau."""
    hp = {"learning_rate": cfg.learning_rate, "tau": cfg.tau} | dict(hparams or {})
    actor_net, critic_net = _actor(env, cfg), _critic(cfg)
    adam = _adam(cfg, hp["learning_rate"])
    target_entropy = -float(env.action_size)

    def sample_action(actor_params: Any, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = actor_net.apply(actor_params, obs)
        return squashed_gaussian(mean, log_std).sample_and_log_prob(seed=key)

    def critic_loss(critic_params: Any, batch: Batch, target: jax.Array):
        q = critic_net.apply(critic_params, batch.obs, batch.action)
        per_critic = jnp.mean(jnp.square(q - target), axis=1)
        return jnp.sum(per_critic), (per_critic, jnp.mean(q, axis=1))

    def actor_loss(actor_params: Any, critic_params: Any, alpha: jax.Array, obs: jax.Array, key):
        action, log_prob = sample_action(actor_params, obs, key)
        q = critic_net.apply(critic_params, obs, action)
        return jnp.mean(alpha * log_prob - jnp.min(q, axis=0)), log_prob

    def alpha_loss(log_alpha: jax.Array, log_prob: jax.Array) -> jax.Array:
        return -jnp.mean(jnp.exp(log_alpha) * (log_prob + target_entropy))

    def update(carry, xs):
        actor_p, critic_p, target_p, log_alpha, opt = carry
        batch, key = xs
        k_next, k_actor = jax.random.split(key)
        alpha = jnp.exp(log_alpha)

        next_action, next_log_prob = sample_action(actor_p, batch.next_obs, k_next)
        next_q = critic_net.apply(target_p, batch.next_obs, next_action)
        target = jax.lax.stop_gradient(td_target(next_q, next_log_prob, batch.reward, batch.discount, alpha))
        (qf_loss, (per_critic, q_mean)), grads = jax.value_and_grad(critic_loss, has_aux=True)(critic_p, batch, target)
        updates, critic_opt = adam.update(grads, opt["critic"])
        critic_p = optax.apply_updates(critic_p, updates)

        (a_loss, log_prob), grads = jax.value_and_grad(actor_loss, has_aux=True)(
            actor_p, critic_p, alpha, batch.obs, k_actor
        )
        updates, actor_opt = adam.update(grads, opt["actor"])
        actor_p = optax.apply_updates(actor_p, updates)

        log_prob = jax.lax.stop_gradient(log_prob)
        al_loss, grad = jax.value_and_grad(alpha_loss)(log_alpha, log_prob)
        if cfg.autotune:
            updates, alpha_opt = adam.update(grad, opt["log_alpha"])
            log_alpha = log_alpha + updates
        else:
            alpha_opt = opt["log_alpha"]

        target_p = jax.tree.map(lambda t, c: t + hp["tau"] * (c - t), target_p, critic_p)
        opt = {"actor": actor_opt, "critic": critic_opt, "log_alpha": alpha_opt}
        metrics = {
            "losses/qf1_loss": per_critic[0],
            "losses/qf2_loss": per_critic[1],
            "losses/qf_loss": qf_loss / 2.0,
            "losses/qf1_values": q_mean[0],
            "losses/qf2_values": q_mean[1],
            "losses/actor_loss": a_loss,
            "losses/alpha": alpha,
            "losses/alpha_loss": al_loss,
            "losses/entropy": -jnp.mean(log_prob),
        }
        return (actor_p, critic_p, target_p, log_alpha, opt), metrics

    keys = jax.random.split(rng, cfg.updates_per_iteration)
    carry = (params["actor"], params["critic"], params["target_critic"], params["log_alpha"], opt_state)
    (actor_p, critic_p, target_p, log_alpha, opt_state), metrics = jax.lax.scan(update, carry, (batches, keys))
    params = {"actor": actor_p, "critic": critic_p, "target_critic": target_p, "log_alpha": log_alpha}
    return params, opt_state, jax.tree.map(jnp.mean, metrics)


LOSS_METRICS = (
    "losses/qf1_loss",
    "losses/qf2_loss",
    "losses/qf_loss",
    "losses/qf1_values",
    "losses/qf2_values",
    "losses/actor_loss",
    "losses/alpha",
    "losses/alpha_loss",
    "losses/entropy",
)


def train_step(ts: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SAC iteration (collect into the replay, then learn). Pure; jit it (donating ``ts``)."""
    cfg = ts.cfg
    rng, k_collect, k_sample, k_learn = jax.random.split(ts.rng, 4)
    env_state, batch, stats = collect(ts, k_collect)
    obs_stats = ts.obs_stats.update(batch.obs) if cfg.normalize_observations else ts.obs_stats
    env_steps = ts.env_steps + cfg.env_steps_per_iteration
    ts = ts.replace(
        replay=replay_lib.add(ts.replay, batch),
        obs_stats=obs_stats,
        env_state=env_state,
        env_steps=env_steps,
        rng=rng,
    )

    ready = (
        (env_steps >= cfg.warmup_steps)
        & (ts.replay.size * cfg.num_envs >= cfg.batch_size)
        & replay_lib.can_sample(ts.replay, cfg.n_step)
    )
    # Sampling is cheap, so it runs either way and only small operands enter the ``cond``: a
    # TrainState operand would make XLA copy the whole replay into the conditional.
    batches = _sample_batches(ts, k_sample, obs_stats)
    # Data parallel (a data mesh axis): each device takes a share of every batch and XLA
    # all-reduces the gradients, instead of every device running the whole update.
    batches = jax.tree.map(lambda x: split_on_data(x, axis=1), batches)

    def learn(operand):
        params, opt_state, batches = operand
        hparams = {k: hyperparameter(ts, k) for k in ("learning_rate", "tau")}
        return _learn(ts.env, cfg, params, opt_state, batches, k_learn, hparams)

    def skip(operand):
        params, opt_state, _ = operand
        metrics = {name: jnp.zeros((), jnp.float32) for name in LOSS_METRICS}
        metrics["losses/alpha"] = jnp.exp(params["log_alpha"])
        return params, opt_state, metrics

    # ``seed_cond``: the warm-up iterations skip the update work under the seed vmap too.
    params, opt_state, loss_metrics = seed_cond(ready, learn, skip, (ts.params, ts.opt_state, batches))
    ts = ts.replace(
        params=params,
        opt_state=opt_state,
        iteration=ts.iteration + 1,
        gradient_steps=ts.gradient_steps + ready.astype(jnp.int32) * cfg.updates_per_iteration,
    )
    metrics = {
        **episode_metrics(stats.done, stats.episode_return, stats.episode_length, stats.success),
        "charts/gradient_steps": ts.gradient_steps,
        "charts/replay_size": ts.replay.size * cfg.num_envs,
        **loss_metrics,
    }
    return ts, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


METRIC_NAMES = (*EPISODE_STATISTICS, EPISODES_FINISHED, "charts/gradient_steps", "charts/replay_size", *LOSS_METRICS)

#: Config fields a population may set per row (``lunarl.run.population``). ``init_alpha`` is not
#: one: it is only the starting point of the learned temperature, built into the state by ``init``.
HYPERPARAMETERS = ("learning_rate", "tau", "gamma", "reward_scaling")

AGENT = Agent(
    name="sac",
    config_class=SACConfig,
    init=init,
    train_step=train_step,
    policy_params=policy_params,
    make_policy=make_policy,
    env_axes=env_axes,
    metric_names=METRIC_NAMES,
    running_totals=("charts/gradient_steps", "charts/replay_size"),
    hyperparameters=HYPERPARAMETERS,
)
