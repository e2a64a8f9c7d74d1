"""PPO (clipped surrogate, GAE) as pure functions: ``init``, ``train_step``, ``make_policy``.

One ``train_step`` is one iteration, a single XLA program when jitted: ``lax.scan`` over
``unroll_length`` steps of ``num_envs`` vmapped envs, GAE by a reverse ``lax.scan``, then
``num_epochs`` passes over shuffled minibatches (a permutation reshaped into minibatches, another
``lax.scan``). Nothing leaves the device inside an iteration. Several seeds train as one program
with ``jax.vmap(train_step)`` over a ``jax.vmap``-ed ``init``. ``AGENT`` (at the end) is PPO as
the host sees it (``lunarl.agents.base.Agent``); PPO acts without a carry.

Design choices:

* Actions: a diagonal Gaussian with a learned state-independent log-std. The env receives the
  sample clipped to [-1, 1], while log-probabilities are of the unclipped sample. Unlike a
  tanh-squashed Gaussian this keeps the log-prob and entropy exact and cheap (no Jacobian term,
  no atanh of saturated actions), and the deterministic action is simply the clipped mean.
* Time limits: the episode-limit wrapper ends episodes that did not terminate. At such a
  truncation we bootstrap from the value of the last observation of the finished episode
  (``info["final_obs"]``, kept by lunarl's auto-reset wrapper) instead of treating it as terminal;
  only real terminations cut the return.
* Observation normalisation: running mean/var (``RunningStats``) in the train state. The stats
  that collected a batch are also used to learn from it (so the first epoch's ratio is exactly
  1), then the batch is merged into them for the next iteration.
* Angle features: observation entries the env declares as angles (``angle_observations``, e.g.
  the rover's heading) are also fed to the networks as (cos, sin), continuous across the wrap.
* Reward scaling: rewards are multiplied by ``reward_scaling`` before GAE (logged episode returns
  stay unscaled).
* Hyperparameters: ``HYPERPARAMETERS`` (learning rate, clip range, loss coefficients, discount,
  GAE lambda, reward scaling, gradient clip) are read with ``base.hyperparameter``, so a population
  can give every row its own values as arrays in ``TrainState.hparams``. The optimiser is rebuilt
  with the row's learning rate inside ``train_step``: Adam's state does not depend on it, so the
  optimiser state has the same structure with and without a population, and the learning rate
  has one home (``hparams``) that PBT perturbs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

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
    split_on_data,
    stateless,
)
from lunarl.agents.networks import ACTIVATIONS, ActorCritic, RunningStats, feature_size, observation_features
from lunarl.config import bounded
from lunarl.envs.base import LunarEnv, State, wrap_for_training

__all__ = [
    "AGENT",
    "HYPERPARAMETERS",
    "METRIC_NAMES",
    "PPOConfig",
    "TrainState",
    "Transition",
    "compute_gae",
    "env_axes",
    "init",
    "make_policy",
    "policy_params",
    "ppo_loss",
    "rollout",
    "shuffled_indices",
    "train_step",
]


@dataclasses.dataclass(frozen=True)
class PPOConfig(AgentConfig):
    """PPO hyperparameters. Defaults follow the rover seed (lr 3e-4, 10 epochs, [256, 256] tanh).

    ``num_envs``, ``episode_length`` and ``total_iterations`` (the span of the linear LR decay)
    come from ``AgentConfig``.
    """

    unroll_length: int = bounded(32, 1, None, "steps collected per env per iteration")
    num_minibatches: int = bounded(8, 1, None, "minibatches per epoch")
    num_epochs: int = bounded(10, 1, None, "passes over each batch")
    learning_rate: float = bounded(3e-4, 1e-8, 1.0)
    lr_decay: bool = False
    gamma: float = bounded(0.99, 0.0, 1.0)
    gae_lambda: float = bounded(0.95, 0.0, 1.0)
    clip_eps: float = bounded(0.2, 1e-3, 1.0)
    value_coef: float = bounded(0.5, 0.0, None)
    entropy_coef: float = bounded(0.0, 0.0, None)
    max_grad_norm: float = bounded(0.5, 1e-6, None)
    policy_hidden: tuple[int, ...] = bounded((256, 256), 1, None)
    value_hidden: tuple[int, ...] = bounded((256, 256), 1, None)
    activation: str = "tanh"
    init_log_std: float = bounded(0.0, -5.0, 2.0, "initial log standard deviation of the policy")
    normalize_observations: bool = True
    angle_features: bool = bounded(True, doc="also feed the env's angle observations (rover heading) as (cos, sin)")
    reward_scaling: float = bounded(1.0, 1e-8, None)
    normalize_advantages: bool = True

    def check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"PPOConfig.activation={self.activation!r} is not allowed: allowed {sorted(ACTIVATIONS)}"
            )
        batch = self.num_envs * self.unroll_length
        if batch % self.num_minibatches:
            raise ValueError(
                f"PPOConfig.num_minibatches={self.num_minibatches} must divide "
                f"num_envs * unroll_length = {batch}"
            )

    @property
    def updates_per_iteration(self) -> int:
        return self.num_epochs * self.num_minibatches

    @property
    def env_steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length


class TrainState(struct.PyTreeNode):
    """Everything one PPO run carries between iterations; only arrays are pytree leaves."""

    params: Any
    opt_state: Any
    obs_stats: RunningStats
    env_state: State  # batched, from the training wrapper stack
    rng: jax.Array
    iteration: jax.Array  # int32 scalar
    env_steps: jax.Array  # int32 scalar
    hparams: dict[str, jax.Array]  # per-row hyperparameters (``HYPERPARAMETERS``); empty: ``cfg``'s
    env: LunarEnv = struct.field(pytree_node=False)  # the unbatched env; wrapped on use
    cfg: PPOConfig = struct.field(pytree_node=False)


@struct.dataclass
class Transition:
    """One collected step of every env (leaves time-major: [T, N, ...] after the rollout)."""

    obs: jax.Array  # raw observation the action was taken from
    action: jax.Array  # unclipped Gaussian sample
    log_prob: jax.Array
    reward: jax.Array  # scaled
    done: jax.Array  # episode ended: termination or truncation
    truncation: jax.Array  # ended by the episode limit only
    final_obs: jax.Array  # observation after the step, before any auto-reset
    episode_return: jax.Array  # the episode's (unscaled) return; meaningful where done
    episode_length: jax.Array
    episode_success: jax.Array


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _network(env: LunarEnv, cfg: PPOConfig) -> ActorCritic:
    return ActorCritic(
        action_size=env.action_size,
        policy_hidden=cfg.policy_hidden,
        value_hidden=cfg.value_hidden,
        activation=cfg.activation,
        init_log_std=cfg.init_log_std,
    )


def _training_env(env: LunarEnv, cfg: PPOConfig):
    # Wrapping is cheap Python; keeping the unwrapped env in the state keeps the state's treedef
    # equal across ``init`` calls with the same env, so jitted functions are not recompiled.
    return wrap_for_training(env, cfg.episode_length)


def _lr_schedule(cfg: PPOConfig, learning_rate: Any) -> optax.Schedule:
    if cfg.lr_decay:
        return optax.linear_schedule(
            learning_rate, 0.0, cfg.total_iterations * cfg.updates_per_iteration
        )
    return optax.constant_schedule(learning_rate)


def _flat_optimizer(cfg: PPOConfig, learning_rate: Any, max_grad_norm: Any) -> optax.GradientTransformation:
    """Global-norm clipping and Adam on one flat parameter vector (see ``_optimizer``).

    ``learning_rate`` and ``max_grad_norm`` are Python numbers or (a population's) arrays; the
    state is the same either way.
    """
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm),
        optax.adam(_lr_schedule(cfg, learning_rate), eps=1e-5),
    )


def _optimizer(cfg: PPOConfig) -> optax.GradientTransformation:
    # ``flatten``: the clip and Adam run on one concatenated vector instead of leaf by leaf,
    # a few fused ops per minibatch step rather than a few per parameter. Its state is exactly
    # ``_flat_optimizer``'s state for the raveled parameters, which ``_learn`` relies on.
    return optax.flatten(_flat_optimizer(cfg, cfg.learning_rate, cfg.max_grad_norm))


def _features(env: LunarEnv, cfg: PPOConfig, stats: RunningStats, obs: jax.Array) -> jax.Array:
    return observation_features(env, stats, obs, cfg.normalize_observations, cfg.angle_features)


def _feature_size(env: LunarEnv, cfg: PPOConfig) -> int:
    return feature_size(env, cfg.angle_features)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def init(rng: jax.Array, env: LunarEnv, cfg: PPOConfig) -> TrainState:
    """A fresh train state: network, optimiser, normaliser and ``cfg.num_envs`` reset envs."""
    rng = as_raw_key(rng)
    k_params, k_env, k_state = jax.random.split(rng, 3)
    params = _network(env, cfg).init(k_params, jnp.zeros((1, _feature_size(env, cfg)), jnp.float32))
    env_state = _training_env(env, cfg).reset(jax.random.split(k_env, cfg.num_envs))
    return TrainState(
        params=params,
        opt_state=_optimizer(cfg).init(params),
        obs_stats=RunningStats.create(env.observation_size),
        env_state=env_state,
        rng=k_state,
        iteration=jnp.zeros((), jnp.int32),
        env_steps=jnp.zeros((), jnp.int32),
        hparams={},
        env=env,
        cfg=cfg,
    )


def policy_params(ts: TrainState) -> dict[str, Any]:
    """What acting needs: network parameters and observation statistics."""
    return {"params": ts.params, "obs_stats": ts.obs_stats}


def make_policy(env: LunarEnv, cfg: PPOConfig) -> Policy:
    """PPO's ``Policy`` (no carry): a Gaussian sample, or its mean, clipped to [-1, 1]."""
    net = _network(env, cfg)

    def policy(params: dict[str, Any], obs: jax.Array, rng: jax.Array, deterministic: Any = True) -> jax.Array:
        obs = _features(env, cfg, params["obs_stats"], obs)
        mean, log_std = net.apply(params["params"], obs, method=ActorCritic.policy)
        sample = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std)).sample(seed=rng)
        # ``where`` so ``deterministic`` may be a Python bool or a traced one.
        return jnp.clip(jnp.where(deterministic, mean, sample), -1.0, 1.0)

    return stateless(policy)


def env_axes(ts: TrainState) -> TrainState:
    """Placement specs: the env states carry the env batch on their leading axis."""
    specs = jax.tree.map(lambda _: REPLICATED, ts)
    return specs.replace(env_state=jax.tree.map(lambda _: ENV_AXIS, ts.env_state))


def rollout(ts: TrainState) -> tuple[State, Transition, jax.Array]:
    """Collect ``unroll_length`` steps of every env: (final env state, time-major batch, new rng)."""
    cfg = ts.cfg
    env = _training_env(ts.env, cfg)
    net = _network(ts.env, cfg)
    rng, key = jax.random.split(ts.rng)

    def step(env_state: State, key: jax.Array) -> tuple[State, Transition]:
        obs = _features(ts.env, cfg, ts.obs_stats, env_state.obs)
        mean, log_std = net.apply(ts.params, obs, method=ActorCritic.policy)
        dist = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))
        action, log_prob = dist.sample_and_log_prob(seed=key)
        next_state = env.step(env_state, jnp.clip(action, -1.0, 1.0))
        episode = next_state.info["episode_metrics"]
        success = episode.get("success", jnp.zeros_like(next_state.reward))
        transition = Transition(
            obs=env_state.obs,
            action=action,
            log_prob=log_prob,
            reward=next_state.reward * hyperparameter(ts, "reward_scaling"),
            done=next_state.done,
            truncation=next_state.info["truncation"],
            final_obs=next_state.info["final_obs"],
            episode_return=episode["sum_reward"],
            episode_length=episode["length"],
            episode_success=(success > 0).astype(jnp.float32),
        )
        return next_state, transition

    env_state, batch = jax.lax.scan(step, ts.env_state, jax.random.split(key, cfg.unroll_length))
    return env_state, batch, rng


def compute_gae(
    rewards: jax.Array,
    values: jax.Array,
    next_values: jax.Array,
    done: jax.Array,
    truncation: jax.Array,
    gamma: float,
    gae_lambda: float,
) -> tuple[jax.Array, jax.Array]:
    """GAE advantages and value targets for time-major [T, ...] arrays.

    ``next_values[t]`` is the value of the observation step t produced, before any auto-reset
    (the final observation of a finished episode). A termination (``done`` and not
    ``truncation``) contributes no bootstrap; a truncation bootstraps from ``next_values[t]``.
    Either way the advantage recursion stops at the episode boundary.
    """
    terminated = done * (1.0 - truncation)
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values

    def backward(next_advantage: jax.Array, xs: tuple[jax.Array, jax.Array]):
        delta, d = xs
        advantage = delta + gamma * gae_lambda * (1.0 - d) * next_advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(
        backward, jnp.zeros_like(values[0]), (deltas, done), reverse=True
    )
    return advantages, advantages + values


@struct.dataclass
class _Sample:
    obs: jax.Array  # normalised
    action: jax.Array
    log_prob: jax.Array
    advantage: jax.Array
    target: jax.Array


def ppo_loss(
    params: Any, net: ActorCritic, batch: _Sample, cfg: PPOConfig, hparams: dict[str, Any] | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate + value loss - entropy bonus on one minibatch, and diagnostics.

    ``hparams`` overrides ``cfg``'s ``clip_eps``, ``value_coef`` and ``entropy_coef`` (a row's own).
    """
    hp = {k: getattr(cfg, k) for k in ("clip_eps", "value_coef", "entropy_coef")} | dict(hparams or {})
    mean, log_std, value = net.apply(params, batch.obs)
    dist = distrax.MultivariateNormalDiag(mean, jnp.exp(log_std))
    log_ratio = dist.log_prob(batch.action) - batch.log_prob
    ratio = jnp.exp(log_ratio)
    advantage = batch.advantage
    if cfg.normalize_advantages:
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
    clipped = jnp.clip(ratio, 1.0 - hp["clip_eps"], 1.0 + hp["clip_eps"])
    policy_loss = -jnp.minimum(ratio * advantage, clipped * advantage).mean()
    value_loss = 0.5 * jnp.square(value - batch.target).mean()
    entropy = dist.entropy().mean()
    loss = policy_loss + hp["value_coef"] * value_loss - hp["entropy_coef"] * entropy
    aux = {
        "losses/policy_loss": policy_loss,
        "losses/value_loss": value_loss,
        "losses/entropy": entropy,
        # The low-variance estimator of KL(old || new) (Schulman's "k3").
        "losses/approx_kl": ((ratio - 1.0) - log_ratio).mean(),
        "losses/clip_fraction": (jnp.abs(ratio - 1.0) > hp["clip_eps"]).mean(),
    }
    return loss, aux


def shuffled_indices(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of ``range(n)`` (int32), for shuffling minibatches.

    Like ``jax.random.permutation`` it orders random keys, but each uint32 key carries its
    index in its low bits, so XLA sorts one plain integer array instead of running two
    key-value sorts, which XLA:CPU runs through a comparator call per comparison (measured in
    ``scripts/results/xla_cpu_notes.md``). The remaining ``32 - log2(n)`` random bits leave about
    ``n**2 / 2**(33 - log2(n))`` tied pairs per shuffle (about one for 2,048 samples); a tied
    pair keeps its index order, which does not matter for SGD. Above 2**16 samples fewer than
    16 random bits would remain, so larger batches use ``jax.random.permutation``.
    """
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > 16:
        return jax.random.permutation(key, n)
    low = jnp.uint32((1 << index_bits) - 1)
    keys = (jax.random.bits(key, (n,), jnp.uint32) & ~low) | jnp.arange(n, dtype=jnp.uint32)
    return (jnp.sort(keys) & low).astype(jnp.int32)


def _learn(
    ts: TrainState, net: ActorCritic, data: _Sample, rng: jax.Array
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """``num_epochs`` passes of shuffled minibatch Adam steps over ``data`` ([B, ...])."""
    cfg = ts.cfg
    # The minibatch loop works on one flat parameter vector (raveled once per iteration, in
    # the order optax.flatten uses, so ``ts.opt_state`` fits as it is): no ravel of the
    # parameters and unravel of the updates in every step.
    optimizer = _flat_optimizer(cfg, hyperparameter(ts, "learning_rate"), hyperparameter(ts, "max_grad_norm"))
    flat_params, unravel = ravel_pytree(ts.params)
    batch_size = data.advantage.shape[0]
    coefs = {k: hyperparameter(ts, k) for k in ("clip_eps", "value_coef", "entropy_coef")}
    grad_fn = jax.value_and_grad(lambda flat, mb: ppo_loss(unravel(flat), net, mb, cfg, coefs), has_aux=True)

    def minibatch_step(carry, minibatch: _Sample):
        params, opt_state = carry
        (_, aux), grads = grad_fn(params, minibatch)
        updates, opt_state = optimizer.update(grads, opt_state)
        aux["losses/grad_norm"] = jnp.sqrt(jnp.sum(jnp.square(grads)))
        return (params + updates, opt_state), aux

    def epoch(carry, key: jax.Array):
        perm = shuffled_indices(key, batch_size)
        shuffled = jax.tree.map(lambda x: x[perm], data)
        minibatches = jax.tree.map(lambda x: x.reshape((cfg.num_minibatches, -1) + x.shape[1:]), shuffled)
        # Data parallel (a data mesh axis): each device takes a share of every minibatch.
        minibatches = jax.tree.map(lambda x: split_on_data(x, axis=1), minibatches)
        return jax.lax.scan(minibatch_step, carry, minibatches)

    (flat_params, opt_state), aux = jax.lax.scan(
        epoch, (flat_params, ts.opt_state), jax.random.split(rng, cfg.num_epochs)
    )
    return unravel(flat_params), opt_state, jax.tree.map(jnp.mean, aux)


def train_step(ts: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
    """One PPO iteration (collect, then learn). Pure; jit it (optionally donating ``ts``)."""
    cfg = ts.cfg
    net = _network(ts.env, cfg)
    env_state, batch, rng = rollout(ts)
    rng, learn_key = jax.random.split(rng)

    # Values of the observations acted on and of the observations each step produced, in one
    # batched call after the rollout (the rollout itself only needs the actor).
    obs = _features(ts.env, cfg, ts.obs_stats, batch.obs)
    final_obs = _features(ts.env, cfg, ts.obs_stats, batch.final_obs)
    values, next_values = jnp.split(
        net.apply(ts.params, jnp.concatenate([obs, final_obs]), method=ActorCritic.value), 2
    )
    advantages, targets = compute_gae(
        batch.reward, values, next_values, batch.done, batch.truncation,
        hyperparameter(ts, "gamma"), hyperparameter(ts, "gae_lambda"),
    )
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    data = _Sample(
        obs=flat(obs),
        action=flat(batch.action),
        log_prob=flat(batch.log_prob),
        advantage=flat(advantages),
        target=flat(targets),
    )
    params, opt_state, loss_metrics = _learn(ts, net, data, learn_key)

    obs_stats = ts.obs_stats.update(batch.obs) if cfg.normalize_observations else ts.obs_stats
    new_ts = ts.replace(
        params=params,
        opt_state=opt_state,
        obs_stats=obs_stats,
        env_state=env_state,
        rng=rng,
        iteration=ts.iteration + 1,
        env_steps=ts.env_steps + cfg.num_envs * cfg.unroll_length,
    )

    target_var = jnp.var(targets)
    explained = jnp.where(target_var > 0, 1.0 - jnp.var(targets - values) / target_var, 0.0)
    lr = _lr_schedule(cfg, hyperparameter(ts, "learning_rate"))(ts.iteration * cfg.updates_per_iteration)
    metrics = {
        **episode_metrics(batch.done, batch.episode_return, batch.episode_length, batch.episode_success),
        "charts/learning_rate": lr,
        "losses/explained_variance": explained,
        **loss_metrics,
    }
    return new_ts, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


METRIC_NAMES = (
    *EPISODE_STATISTICS,
    EPISODES_FINISHED,
    "charts/learning_rate",
    "losses/explained_variance",
    "losses/policy_loss",
    "losses/value_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clip_fraction",
    "losses/grad_norm",
)

#: Config fields a population may set per row (``lunarl.run.population``); none changes a shape.
HYPERPARAMETERS = (
    "learning_rate",
    "entropy_coef",
    "clip_eps",
    "gae_lambda",
    "gamma",
    "reward_scaling",
    "value_coef",
    "max_grad_norm",
)

AGENT = Agent(
    name="ppo",
    config_class=PPOConfig,
    init=init,
    train_step=train_step,
    policy_params=policy_params,
    make_policy=make_policy,
    env_axes=env_axes,
    metric_names=METRIC_NAMES,
    hyperparameters=HYPERPARAMETERS,
)
