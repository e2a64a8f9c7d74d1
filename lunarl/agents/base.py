"""The agent contract: everything the host loop, evaluation and checkpoints need from an agent.

An agent is an ``Agent``: a frozen set of pure, jittable functions over its own ``TrainState``
pytree, plus the names of what it logs. The host (``lunarl.run``) uses nothing else, so adding
an agent means writing a module under ``lunarl/agents/`` that defines ``AGENT`` and a
``conf/agent/NAME.yaml``; nothing under ``lunarl/run/`` changes.

Acting carries state. ``make_policy(env, cfg)`` returns a ``Policy``: ``initial_carry(batch)``
and ``act(params, obs, carry, is_first, rng, deterministic) -> (action, carry)``. ``is_first``
is True for the envs whose episode starts at this observation; the agent resets their carry
there (``reset_carry``). A feed-forward agent's carry is an empty pytree (``stateless``); a
recurrent one carries e.g. a GRU state or a world model's filtered latent. Training, the
in-loop evaluation, ``lunarl.evaluate`` and videos all act through this one function.

Placement. ``env_axes(ts)`` returns, for every leaf of one seed's ``TrainState``, a
``PartitionSpec`` naming which of its axes is the env batch (``ENV_AXIS``, the ``data`` mesh
axis) or none (``REPLICATED``), so the host can shard the env batch over devices without
knowing what the leaves are.

Hyperparameters that vary per row. ``Agent.hyperparameters`` names the config fields (floats that
change no shape: a learning rate, a discount, a loss coefficient) that the agent reads through
``hyperparameter(ts, name)`` rather than from ``ts.cfg``. Such an agent's TrainState has an
``hparams`` dict leaf, empty by default, so ``hyperparameter`` returns the config's Python number
and a run without a population compiles exactly as before. A population
(``lunarl.run.population``) puts float32 scalars there with ``with_hyperparameters``; stacked on
the leading seed axis they give every row its own values inside one vmapped program, and they
are saved and restored with the rest of the state.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lunarl.config import Config, bounded
from lunarl.envs import base as envs_base
from lunarl.envs.base import LunarEnv

__all__ = [
    "ENV_AXIS",
    "ENV_METRICS_PREFIX",
    "EPISODES_FINISHED",
    "EPISODE_LENGTH",
    "EPISODE_RETURN",
    "EPISODE_STATISTICS",
    "REPLICATED",
    "SUCCESS_RATE",
    "Agent",
    "AgentConfig",
    "Policy",
    "as_raw_key",
    "episode_metrics",
    "hyperparameter",
    "reset_carry",
    "seed_cond",
    "split_on_data",
    "stateless",
    "with_hyperparameters",
]

#: Mesh axis names the host builds (``lunarl.run.placement``): independent seeds, env batch.
SEED_AXIS_NAME = "seed"
DATA_AXIS_NAME = envs_base.DATA_AXIS_NAME
#: A leaf whose leading axis is the env batch.
ENV_AXIS = PartitionSpec(DATA_AXIS_NAME)
#: A leaf every device holds whole (parameters, optimiser state, counters, keys).
REPLICATED = PartitionSpec()

# Per-episode statistics every agent logs, with CleanRL's names. Each is an average over the
# episodes that finished in one iteration, so the host weights them by ``EPISODES_FINISHED``
# when it averages iterations (an iteration where nothing finished must not count as 0).
EPISODE_RETURN = "charts/episode_return"
EPISODE_LENGTH = "charts/episode_length"
SUCCESS_RATE = "charts/success_rate"
EPISODES_FINISHED = "charts/episodes_finished"
EPISODE_STATISTICS = (EPISODE_RETURN, EPISODE_LENGTH, SUCCESS_RATE)
# The host logs every entry of the env's ``State.metrics`` (reward terms, a curriculum level,
# collision counts) under this prefix: its mean over the envs after each iteration, read from
# ``Agent.env_state``. A snapshot per iteration, so the agents' own code need not carry it.
ENV_METRICS_PREFIX = "env/"


@dataclasses.dataclass(frozen=True)
class AgentConfig(Config):
    """Base of every agent's config: the fields the host sets and the iteration size it reads.

    ``num_envs``, ``episode_length`` and ``total_iterations`` are filled in by the train app from
    ``env.num_envs``, ``env.episode_length`` (default: the env's own) and
    ``run.total_env_steps`` (see ``HOST_FIELDS``), so each number has one home in the config.
    """

    num_envs: int = bounded(64, 1, None, "parallel environments (from env.num_envs)")
    episode_length: int = bounded(1000, 1, None, "episode limit in env steps (from env.episode_length)")
    total_iterations: int = bounded(1000, 1, None, "iterations of the whole run (from run.total_env_steps)")

    #: Agent field -> the key the user sets instead.
    HOST_FIELDS = {
        "num_envs": "env.num_envs",
        "episode_length": "env.episode_length",
        "total_iterations": "run.total_env_steps",
    }

    @property
    def env_steps_per_iteration(self) -> int:
        """Env steps one ``train_step`` takes, over all of its envs (one seed)."""
        raise NotImplementedError(f"{type(self).__name__} must define env_steps_per_iteration")

    def iterations_for(self, total_env_steps: int, multiple_of: int = 1) -> int:
        """Iterations that cover ``total_env_steps``, rounded up to a multiple of ``multiple_of``."""
        block = self.env_steps_per_iteration * multiple_of
        return math.ceil(total_env_steps / block) * multiple_of


Carry = Any


@dataclasses.dataclass(frozen=True)
class Policy:
    """How an agent acts, bound to one env and config (networks are built once).

    ``initial_carry(batch_size)`` is the carry of ``batch_size`` envs before their first step;
    ``act(params, obs[B, ...], carry, is_first[B], rng, deterministic) -> (action[B, A], carry)``
    with actions in [-1, 1]. ``deterministic`` may be a Python or a traced bool.
    """

    initial_carry: Callable[[int], Carry]
    act: Callable[[Any, jax.Array, Carry, jax.Array, jax.Array, Any], tuple[jax.Array, Carry]]


def stateless(policy: Callable[[Any, jax.Array, jax.Array, Any], jax.Array]) -> Policy:
    """A ``Policy`` with an empty carry from ``policy(params, obs, rng, deterministic) -> action``."""

    def act(params: Any, obs: jax.Array, carry: Carry, is_first: jax.Array, rng: jax.Array, deterministic: Any = True):
        return policy(params, obs, rng, deterministic), carry

    return Policy(initial_carry=lambda batch_size: (), act=act)


def as_raw_key(rng: jax.Array) -> jax.Array:
    """A raw uint32[2] key from a new-style typed key too (the env contract stores raw keys)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def split_on_data(x: jax.Array, axis: int = 0) -> jax.Array:
    """``x`` with ``axis`` split over the ``data`` mesh axis, for arrays made from the env batch
    that are not TrainState leaves (e.g. PPO's minibatches: each device computes the gradient of
    its share and XLA all-reduces them). Unchanged unless traced in the host's chunk on a mesh
    whose ``data`` axis has several devices (``lunarl.run.programs.make_chunk`` traces under its
    mesh, with seeds vmapped as ``seed``), so single-device programs stay exactly as they were."""
    if envs_base.data_axis_size() == 1:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*(None,) * axis, DATA_AXIS_NAME))


def seed_cond(pred: jax.Array, true_fun: Callable, false_fun: Callable, *operands: Any) -> Any:
    """``lax.cond(pred, true_fun, false_fun, *operands)`` that stays a branch under the host's
    seed vmap (``make_chunk`` names that axis ``SEED_AXIS_NAME``).

    Under vmap a batched predicate turns ``lax.cond`` into a select, so both branches run for
    every seed, e.g. a replay warm-up's updates, computed and thrown away. Here the branch is
    taken when any seed's ``pred`` holds and each seed keeps the result of its own ``pred``, so
    the outputs equal ``lax.cond``'s and the iterations where no seed's ``pred`` holds (the
    seeds step in lockstep, so a warm-up ends for all at once) skip ``true_fun``'s work.
    Outside a vmap named ``seed`` it is ``lax.cond``."""
    try:
        any_seed = jax.lax.pmax(pred, SEED_AXIS_NAME)
    except NameError:  # not under the host's seed vmap: one seed, or a test's own vmap
        return jax.lax.cond(pred, true_fun, false_fun, *operands)

    def per_seed(*ops: Any) -> Any:
        taken, skipped = true_fun(*ops), false_fun(*ops)
        return jax.tree.map(lambda t, f: jnp.where(pred, t, f), taken, skipped)

    return jax.lax.cond(any_seed, per_seed, false_fun, *operands)


def reset_carry(carry: Carry, initial: Carry, is_first: jax.Array) -> Carry:
    """``carry`` with the envs where ``is_first`` replaced by ``initial`` (leaves [B, ...])."""

    def pick(init: jax.Array, current: jax.Array) -> jax.Array:
        mask = jnp.reshape(is_first, is_first.shape + (1,) * (current.ndim - is_first.ndim))
        return jnp.where(mask, init, current)

    return jax.tree.map(pick, initial, carry)


def episode_metrics(
    done: jax.Array, episode_return: jax.Array, episode_length: jax.Array, success: jax.Array
) -> dict[str, jax.Array]:
    """The ``EPISODE_STATISTICS`` and ``EPISODES_FINISHED`` of one iteration's steps.

    Arrays share one shape (e.g. [T, N]); the three statistics are meaningful where ``done``
    (the wrapper's running episode values at the step an episode ended) and averaged over
    those steps.
    """
    done = done.astype(jnp.float32)
    finished = done.sum()
    mean = lambda x: (x * done).sum() / jnp.maximum(finished, 1.0)  # noqa: E731
    return {
        EPISODE_RETURN: mean(episode_return),
        EPISODE_LENGTH: mean(episode_length),
        SUCCESS_RATE: mean((success > 0).astype(jnp.float32)),
        EPISODES_FINISHED: finished,
    }


def hyperparameter(ts: Any, name: str) -> Any:
    """The value of hyperparameter ``name`` that ``ts`` trains with: its own ``ts.hparams[name]``
    when a population set one, else ``ts.cfg.<name>`` (a Python number, so the default program is
    unchanged bit for bit)."""
    return ts.hparams[name] if name in ts.hparams else getattr(ts.cfg, name)


def with_hyperparameters(ts: Any, values: Mapping[str, Any]) -> Any:
    """``ts`` training with ``values`` (name -> float32 scalar, or ``[rows]`` on a stacked state)."""
    return ts.replace(hparams={**ts.hparams, **{k: jnp.asarray(v, jnp.float32) for k, v in values.items()}})


@dataclasses.dataclass(frozen=True)
class Agent:
    """An agent as the host sees it. All functions are pure and jittable.

    * ``init(rng, env, cfg) -> TrainState`` for one seed (the host vmaps it over seeds);
    * ``train_step(ts) -> (ts, metrics)``: one iteration, collect and learn, as one program;
      ``metrics`` maps exactly ``metric_names`` to float32 scalars. The host vmaps it over seeds
      with the axis named ``SEED_AXIS_NAME`` (the seeds step in lockstep), which ``seed_cond``
      uses;
    * ``policy_params(ts)``: what ``Policy.act`` needs (saved best checkpoints are judged by it);
    * ``make_policy(env, cfg) -> Policy``;
    * ``env_axes(ts)``: a ``PartitionSpec`` per leaf of one seed's TrainState (``ENV_AXIS`` or
      ``REPLICATED``);
    * ``episode_statistics`` / ``episode_count``: which metrics are per-episode averages and
      which counts the episodes they average over;
    * ``running_totals``: metrics that are cumulative counters (gradient steps so far, replay
      size), logged as their value at the end of a chunk rather than averaged over it;
    * ``hyperparameters``: float config fields the agent reads with ``hyperparameter(ts, name)``,
      which a population may set per row (its TrainState then has an ``hparams`` dict field);
    * ``env_state(ts)``: the batched env ``State`` in one seed's TrainState (by default its
      ``env_state`` field), whose ``metrics`` the host logs under ``ENV_METRICS_PREFIX``.
    """

    name: str
    config_class: type[AgentConfig]
    init: Callable[[jax.Array, LunarEnv, Any], Any]
    train_step: Callable[[Any], tuple[Any, dict[str, jax.Array]]]
    policy_params: Callable[[Any], Any]
    make_policy: Callable[[LunarEnv, Any], Policy]
    env_axes: Callable[[Any], Any]
    metric_names: tuple[str, ...]
    episode_statistics: tuple[str, ...] = EPISODE_STATISTICS
    episode_count: str = EPISODES_FINISHED
    running_totals: tuple[str, ...] = ()
    hyperparameters: tuple[str, ...] = ()
    env_state: Callable[[Any], Any] = operator.attrgetter("env_state")

    def __post_init__(self) -> None:
        if not issubclass(self.config_class, AgentConfig):
            raise TypeError(f"agent {self.name!r}: config_class must subclass AgentConfig")
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}
        bad = [k for k in self.hyperparameters if k not in fields or fields[k].type not in (float, "float")]
        if bad:
            raise ValueError(f"agent {self.name!r}: hyperparameters {bad} are not float fields of {self.config_class.__name__}")
        declared = (*self.episode_statistics, self.episode_count, *self.running_totals)
        missing = [k for k in declared if k not in self.metric_names]
        if missing:
            raise ValueError(f"agent {self.name!r}: episode metrics {missing} are not in metric_names")
