"""A recurrent toy agent for the agent-contract tests: its policy carry counts the steps since the
start of the current episode and feeds that count to the policy.

It lives outside lunarl on purpose: the train and evaluate apps reach it by module path
(``agent.name=tests.counter_agent``, see ``tests/conf/agent/counter.yaml``), so the tests show
that the host side needs no agent names. It learns a linear Gaussian policy with a one-step
REINFORCE loss, which is enough to have parameters and optimiser state that change.

Every step of ``train_step`` also checks its carry against the episode wrapper's own step counter
and logs the number of disagreements as ``toy/carry_mismatches`` (0 when the carry is reset
exactly at every episode start).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lunarl.agents.base import (
    ENV_AXIS,
    EPISODE_STATISTICS,
    EPISODES_FINISHED,
    REPLICATED,
    Agent,
    AgentConfig,
    Policy,
    episode_metrics,
    hyperparameter,
    reset_carry,
)
from lunarl.config import bounded
from lunarl.envs.base import LunarEnv, State, wrap_for_training

NOISE_STD = 0.3


@dataclasses.dataclass(frozen=True)
class CounterConfig(AgentConfig):
    unroll_length: int = bounded(8, 1, None, "steps collected per env per iteration")
    learning_rate: float = bounded(1e-2, 0.0, 1.0)

    @property
    def env_steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length


class TrainState(struct.PyTreeNode):
    params: Any
    opt_state: Any
    env_state: State
    carry: Any  # the policy carry of the training envs: {"count": int32[N]}
    is_first: jax.Array  # bool[N]: the env's next observation starts an episode
    rng: jax.Array
    hparams: dict[str, jax.Array]  # a population's per-row learning rate (tests/test_population.py)
    env: LunarEnv = struct.field(pytree_node=False)
    cfg: CounterConfig = struct.field(pytree_node=False)


def initial_carry(batch_size: int) -> dict[str, jax.Array]:
    return {"count": jnp.zeros((batch_size,), jnp.int32)}


def _mean(params: Any, obs: jax.Array, count: jax.Array, cfg: CounterConfig) -> jax.Array:
    x = jnp.concatenate([jnp.tanh(obs), (count / cfg.episode_length)[:, None]], axis=-1)
    return jnp.tanh(x @ params["w"] + params["b"])


def make_policy(env: LunarEnv, cfg: CounterConfig) -> Policy:
    def act(params, obs, carry, is_first, rng, deterministic=True):
        count = reset_carry(carry, initial_carry(obs.shape[0]), is_first)["count"]
        mean = _mean(params, obs, count, cfg)
        noise = NOISE_STD * jax.random.normal(rng, mean.shape)
        action = jnp.clip(jnp.where(deterministic, mean, mean + noise), -1.0, 1.0)
        return action, {"count": count + 1}

    return Policy(initial_carry=initial_carry, act=act)


def init(rng: jax.Array, env: LunarEnv, cfg: CounterConfig) -> TrainState:
    k_w, k_env, k_state = jax.random.split(rng, 3)
    params = {
        "w": 0.01 * jax.random.normal(k_w, (env.observation_size + 1, env.action_size)),
        "b": jnp.zeros((env.action_size,)),
    }
    return TrainState(
        params=params,
        opt_state=optax.sgd(cfg.learning_rate).init(params),
        env_state=wrap_for_training(env, cfg.episode_length).reset(jax.random.split(k_env, cfg.num_envs)),
        carry=initial_carry(cfg.num_envs),
        is_first=jnp.ones((cfg.num_envs,), bool),
        rng=k_state,
        hparams={},
        env=env,
        cfg=cfg,
    )


def train_step(ts: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
    cfg = ts.cfg
    env = wrap_for_training(ts.env, cfg.episode_length)
    policy = make_policy(ts.env, cfg)
    rng, key = jax.random.split(ts.rng)

    def step(carry, key):
        env_state, policy_carry, is_first = carry
        action, policy_carry = policy.act(ts.params, env_state.obs, policy_carry, is_first, key, False)
        # The wrapper's count of steps taken in the episode this observation belongs to.
        expected = jnp.where(is_first, 0, env_state.info["steps"]).astype(jnp.int32)
        mismatch = (policy_carry["count"] - 1 != expected).sum()
        nxt = env.step(env_state, action)
        episode = nxt.info["episode_metrics"]
        out = (env_state.obs, policy_carry["count"] - 1, action, nxt.reward, nxt.done,
               episode["sum_reward"], episode["length"], episode.get("success", jnp.zeros_like(nxt.reward)), mismatch)
        return (nxt, policy_carry, nxt.done.astype(bool)), out

    (env_state, carry, is_first), batch = jax.lax.scan(
        step, (ts.env_state, ts.carry, ts.is_first), jax.random.split(key, cfg.unroll_length)
    )
    obs, count, action, reward, done, ep_return, ep_length, ep_success, mismatches = batch

    def loss_fn(params):
        mean = jax.vmap(lambda o, c: _mean(params, o, c, cfg))(obs, count)
        log_prob = -0.5 * jnp.sum(jnp.square((action - mean) / NOISE_STD), axis=-1)
        return -jnp.mean((reward - reward.mean()) * log_prob)

    loss, grads = jax.value_and_grad(loss_fn)(ts.params)
    updates, opt_state = optax.sgd(hyperparameter(ts, "learning_rate")).update(grads, ts.opt_state)
    new_ts = ts.replace(
        params=optax.apply_updates(ts.params, updates), opt_state=opt_state,
        env_state=env_state, carry=carry, is_first=is_first, rng=rng,
    )  # fmt: skip
    metrics = {
        **episode_metrics(done, ep_return, ep_length, ep_success),
        "toy/loss": loss,
        "toy/carry_mismatches": mismatches.sum(),
        "toy/max_count": count.max(),
    }
    return new_ts, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def policy_params(ts: TrainState) -> Any:
    return ts.params


def env_axes(ts: TrainState) -> TrainState:
    specs = jax.tree.map(lambda _: REPLICATED, ts)
    return specs.replace(
        env_state=jax.tree.map(lambda _: ENV_AXIS, ts.env_state),
        carry=jax.tree.map(lambda _: ENV_AXIS, ts.carry),
        is_first=ENV_AXIS,
    )


AGENT = Agent(
    name="counter",
    config_class=CounterConfig,
    init=init,
    train_step=train_step,
    policy_params=policy_params,
    make_policy=make_policy,
    env_axes=env_axes,
    metric_names=(*EPISODE_STATISTICS, EPISODES_FINISHED, "toy/loss", "toy/carry_mismatches", "toy/max_count"),
    hyperparameters=("learning_rate",),
)
