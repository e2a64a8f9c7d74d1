"""The Dreamer agent as the host sees it: config, TrainState, ``train_step`` and the policy.

One ``train_step`` is one XLA program: ``lax.scan`` over ``unroll_length`` steps of the vmapped
training envs, each acting from its filtered RSSM carry (``Policy.act``: reset where
``is_first``, one prior step with the previous action, the posterior with the new observation,
the actor on the latent); the steps are appended to the on-device replay
(``lunarl.agents.replay``, ``[capacity, num_envs, ...]``) that lives in the TrainState; then
``updates_per_iteration`` gradient updates in a second ``lax.scan``, each on ``batch_size``
freshly sampled sequences of ``seq_len`` steps (uniform, or a ``terminal_fraction`` of them
drawn around terminal steps: ``terminal_replay``): ``update`` is ``world_model_update`` (the
world model), then ``behavior_update`` (actor and critic on imagination from the batch's posterior
latents, then the slow critic); ``scripts/bench_dreamer.py`` times the two apart. Until
``prefill`` env steps have been taken the actions are uniform in [-1, 1] (each held for
``prefill_hold`` steps on average) and the updates are skipped with ``lax.cond``
(``base.seed_cond``, so they are skipped under the host's seed vmap too), so the program is the
same from the first iteration to the last.

``updates_per_iteration = train_ratio * env_steps_per_iteration / (batch_size * seq_len)``:
``train_ratio`` is DreamerV3's replayed steps per env step. With ``train_ratio_ramp > 0`` the
ratio starts at ``train_ratio_start`` when the prefill ends and rises linearly to ``train_ratio``
over that many env steps: the scan still has ``updates_per_iteration`` steps, and those past the
iteration's share (``active_updates``) are skipped (``seed_cond``) and leave the parameters as they
are. Why: the early updates learn from the prefill's random crashes, and more of them per env step
left more car seeds with a critic that expects every state to end in a crash
(scripts/results/dreamer.md, session 23).

Size presets (``size``): ``tiny`` (the CPU default), ``1m`` and ``12m``, after DreamerV3's
``size1m``/``size12m`` (deter, hidden, classes, MLP units; 32 categoricals). DreamerV3's newer
code splits the GRU into blocks; this GRU is dense, so its presets hold more parameters than
their names say (``scripts/bench_dreamer.py`` prints the counts). A run resumed with another
``agent.size`` is refused by the host before any array is read, because ``agent.*`` must match the
checkpoint's saved config (``lunarl.run.checkpoint.config_differences``).

The evaluated actor (``actor_ema_rate``, 0 = off). With a rate ``r > 0`` the TrainState also
holds an exponential moving average of the actor's parameters, moved after every update
(``ema += r (actor - ema)``: an average over the last ~``1/r`` updates, as the slow critic is for
the critic). Collection and imagination use the live actor, so training is the same to the bit;
``policy_params`` (the in-loop and final evaluations, the best checkpoint, videos, exports) hands
out the average. Why: on the car the live actor's held-out laps swing by tens of points between
checkpoints 2,560 env steps apart; its average over ~250 updates held its peaks longer and passed
90% on more seeds than the live actor of the same runs (scripts/results/dreamer.md, session 14).

Replay rows (``Step``) keep both the observation acted on and the one the step produced before
the auto-reset (``info["final_obs"]``), so terminal outcomes (crash penalty, lap bonus) are
learned and a time limit is not taught as a termination; see ``world_model``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
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
    reset_carry,
    seed_cond,
    split_on_data,
)
from lunarl.agents.dreamer import behavior, probe, terminal_replay
from lunarl.agents.dreamer.world_model import (
    Latent,
    ModelDims,
    Observed,
    TwoHot,
    WorldModelNet,
    sample_stoch,
    unimix_logits,
    world_model_loss,
)
from lunarl.config import bounded
from lunarl.envs.base import LunarEnv, State, wrap_for_training

__all__ = [
    "AGENT",
    "METRIC_NAMES",
    "SIZES",
    "DreamerConfig",
    "Step",
    "TrainState",
    "init",
    "learn",
    "make_policy",
    "policy_params",
    "train_step",
]

SIZES: dict[str, ModelDims] = {
    "tiny": ModelDims(deter=128, hidden=64, stoch=8, classes=8, units=64, layers=1),
    "1m": ModelDims(deter=512, hidden=64, stoch=32, classes=4, units=64, layers=2),
    "12m": ModelDims(deter=2048, hidden=256, stoch=32, classes=16, units=256, layers=2),
}
ACTOR_GRADS = ("backprop", "reinforce", "mix")
#: The smallest parameter norm the adaptive clip (``agc``) scales by, so a zero bias still moves.
AGC_MIN_NORM = 1e-3
#: What ``behavior_reset_at`` restarts: the critic (and its slow copy), or the actor (and its average) too.
BEHAVIOR_RESETS = ("critic", "actor_critic")


@dataclasses.dataclass(frozen=True)
class DreamerConfig(AgentConfig):
    """Dreamer hyperparameters. Defaults follow DreamerV3 where the CPU allows (discount
    1 - 1/333, lambda 0.95, horizon 15, free nats 1, unimix 1%, 255 bins, slow critic 0.02,
    return percentiles 5-95 with EMA 0.01 and limit 1, entropy 3e-4, dyn 1.0 / rep 0.1);
    learning rates and clipping are those of its 2023 code (Adam; ``agc > 0`` clips as its current
    code does, per tensor), and the batch, sequence length and ``train_ratio`` are smaller so a CPU
    iteration stays short."""

    size: str = "tiny"
    behavior_layers: int = bounded(
        0, 0, None, "hidden layers of the actor and the critic (0 = the size preset's; DreamerV3: 3)"
    )
    unroll_length: int = bounded(16, 1, None, "env steps per env per iteration")
    train_ratio: float = bounded(64.0, 0.0, None, "replayed steps per env step")
    train_ratio_start: float = bounded(
        0.0, 0.0, None, "replayed steps per env step when the prefill ends (with train_ratio_ramp > 0)"
    )
    train_ratio_ramp: int = bounded(
        0, 0, None, "env steps after the prefill over which the ratio rises from train_ratio_start to train_ratio (0 = off)"
    )
    batch_size: int = bounded(16, 1, None, "sequences per update")
    seq_len: int = bounded(32, 2, None, "steps per sequence")
    buffer_size: int = bounded(1_000_000, 1, None, "replay capacity in env steps (all envs)")
    prefill: int = bounded(2_500, 0, None, "env steps of uniform actions before any update")
    prefill_hold: float = bounded(
        1.0, 1.0, None, "mean steps each prefill action is held (1 = a fresh uniform action every step)"
    )
    terminal_fraction: float = bounded(0.0, 0.0, 1.0, "share of each batch's windows drawn around a terminal step")
    terminal_recent: int = bounded(0, 0, None, "env steps (all envs) whose terminal steps those windows draw from (0 = all)")
    horizon: int = bounded(15, 1, None, "imagination steps")
    imagine_starts: int = bounded(0, 0, None, "posterior latents imagined from per update (0 = all batch_size x seq_len)")
    gamma: float = bounded(0.997, 0.0, 1.0)
    lam: float = bounded(0.95, 0.0, 1.0)
    model_lr: float = bounded(1e-4, 1e-8, 1.0)
    actor_lr: float = bounded(3e-5, 1e-8, 1.0)
    critic_lr: float = bounded(3e-5, 1e-8, 1.0)
    model_clip: float = bounded(1000.0, 1e-6, None, "global-norm gradient clip of the world model")
    actor_clip: float = bounded(100.0, 1e-6, None)
    critic_clip: float = bounded(100.0, 1e-6, None)
    agc: float = bounded(
        0.0, 0.0, None, "adaptive clip: each tensor's gradient norm at most this x its parameter norm, "
        "in place of the global-norm clips (0 = off; DreamerV3: 0.3)"
    )
    model_eps: float = bounded(1e-8, 0.0, 1.0, "Adam epsilon")
    ac_eps: float = bounded(1e-5, 0.0, 1.0, "Adam epsilon of actor and critic")
    dyn_scale: float = bounded(1.0, 0.0, None)
    rep_scale: float = bounded(0.1, 0.0, None)
    reward_scale: float = bounded(1.0, 0.0, None, "world-model loss scale of the reward head")
    cont_scale: float = bounded(1.0, 0.0, None, "world-model loss scale of the continue head")
    free_nats: float = bounded(1.0, 0.0, None)
    unimix: float = bounded(0.01, 0.0, 1.0)
    num_bins: int = bounded(255, 3, None)
    twohot_limit: float = bounded(20.0, 0.1, None, "reward and critic bins span symlog [-limit, limit] (DreamerV3: 20)")
    actor_grad: str = "backprop"
    actor_reinforce_share: float = bounded(0.9, 0.0, 1.0, "REINFORCE's weight in the actor objective with actor_grad=mix")
    actor_entropy: float = bounded(3e-4, 0.0, None)
    actor_min_std: float = bounded(0.1, 1e-4, None)
    actor_max_std: float = bounded(1.0, 1e-4, None)
    actor_out_scale: float = bounded(1.0, 0.0, None, "init variance scale of the actor's output layer (DreamerV3: 0.01)")
    collect_noise_corr: float = bounded(
        0.0, 0.0, 0.999, "AR(1) coefficient of the collecting policy's Gaussian noise over steps (0 = independent)"
    )
    imagine_noise_corr: float = bounded(
        0.0, 0.0, 0.999, "AR(1) coefficient of the actor's noise over imagined steps (backprop only; 0 = independent)"
    )
    imagine_noise_share: float = bounded(1.0, 0.0, 1.0, "share of imagined rollouts whose noise is imagine_noise_corr's")
    probe_scale: float = bounded(0.0, 0.0, None, "weight of the committed-action probes' distillation loss (0 = off; probe.py)")
    probe_starts: int = bounded(32, 1, None, "start latents probed per update")
    probe_steps: int = bounded(8, 1, None, "steps each probe holds its action at +-1")
    probe_margin: float = bounded(0.05, 0.0, None, "normalised gain over the plan a probe needs to be distilled")
    probe_min_end: float = bounded(
        0.0, 0.0, 1.0, "probe only starts whose plan imagines an episode end with at least this probability (0 = all)"
    )
    probe_from: int = bounded(0, 0, None, "env steps (this seed's) before which no update probes")
    probe_max_return: float = bounded(
        float("inf"), None, None, "probe only in updates whose mean imagined return is below this (inf = all)"
    )
    lookahead: bool = bounded(
        False, doc="act through an imagined search: take a held action where it beats the actor's plan (probe.py)"
    )
    lookahead_steps: int = bounded(8, 1, None, "steps each act-time candidate holds its action at +-1")
    lookahead_margin: float = bounded(0.05, 0.0, None, "normalised gain over the plan a held action needs to be taken")
    lookahead_min_end: float = bounded(
        0.1, 0.0, 1.0, "search only where the plan imagines an episode end with at least this probability"
    )
    slow_critic_rate: float = bounded(0.02, 0.0, 1.0)
    actor_ema_rate: float = bounded(
        0.0, 0.0, 1.0, "EMA rate per update of the actor that evaluation uses (0 = the live actor)"
    )
    behavior_reset_at: tuple[int, ...] = bounded(
        (), 1, None, "env steps after which the behaviour restarts from fresh parameters (behavior_reset says which part)"
    )
    behavior_reset: str = bounded("critic", doc="what behavior_reset_at restarts: critic | actor_critic")
    slow_reg: float = bounded(1.0, 0.0, None)
    replay_value_scale: float = bounded(0.0, 0.0, None, "critic loss on replayed latents and real returns (DreamerV3 repval: 0.3)")
    return_norm_rate: float = bounded(0.01, 0.0, 1.0)
    return_norm_limit: float = bounded(1.0, 1e-8, None)
    angle_features: bool = bounded(True, doc="also encode the env's angle observations (rover heading) as (cos, sin)")

    def check(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"DreamerConfig.size={self.size!r} is not allowed: allowed {sorted(SIZES)}")
        if self.actor_grad not in ACTOR_GRADS:
            raise ValueError(f"DreamerConfig.actor_grad={self.actor_grad!r} is not allowed: allowed {list(ACTOR_GRADS)}")
        if self.behavior_reset not in BEHAVIOR_RESETS:
            raise ValueError(
                f"DreamerConfig.behavior_reset={self.behavior_reset!r} is not allowed: allowed {list(BEHAVIOR_RESETS)}"
            )
        if any(at <= self.prefill for at in self.behavior_reset_at):
            raise ValueError(
                f"DreamerConfig.behavior_reset_at={list(self.behavior_reset_at)} must lie past prefill={self.prefill}: "
                "no update runs before it, so the behaviour is still fresh there"
            )
        if self.actor_min_std >= self.actor_max_std:
            raise ValueError(
                f"DreamerConfig.actor_min_std={self.actor_min_std} must be below actor_max_std={self.actor_max_std}"
            )
        if self.imagine_noise_corr > 0 and self.actor_grad != "backprop":
            raise ValueError(
                f"DreamerConfig.imagine_noise_corr={self.imagine_noise_corr} needs actor_grad=backprop "
                f"(got {self.actor_grad!r}): the REINFORCE score assumes independent steps"
            )
        if self.probe_scale > 0 and self.probe_steps > self.horizon:
            raise ValueError(
                f"DreamerConfig.probe_steps={self.probe_steps} must not exceed horizon={self.horizon}"
            )
        if self.probes_gated and self.probe_scale == 0:
            raise ValueError(
                f"DreamerConfig.probe_from={self.probe_from} / probe_max_return={self.probe_max_return} "
                "gate the probes, which are off: set probe_scale > 0"
            )
        if self.lookahead and self.lookahead_steps > self.horizon:
            raise ValueError(
                f"DreamerConfig.lookahead_steps={self.lookahead_steps} must not exceed horizon={self.horizon}"
            )
        if self.updates_per_iteration < 1:
            raise ValueError(
                f"DreamerConfig.train_ratio={self.train_ratio} gives less than one update per iteration "
                f"(train_ratio x num_envs x unroll_length / (batch_size x seq_len) = "
                f"{self.train_ratio * self.env_steps_per_iteration / (self.batch_size * self.seq_len):.2f}); "
                "raise train_ratio or unroll_length"
            )
        if self.train_ratio_ramp > 0 and not 0 < self.train_ratio_start <= self.train_ratio:
            raise ValueError(
                f"DreamerConfig.train_ratio_start={self.train_ratio_start} must be in (0, train_ratio="
                f"{self.train_ratio}] when train_ratio_ramp={self.train_ratio_ramp} > 0"
            )
        if self.capacity < max(self.seq_len, self.unroll_length):
            raise ValueError(
                f"DreamerConfig.buffer_size={self.buffer_size} holds {self.capacity} rows of num_envs="
                f"{self.num_envs}; it needs at least seq_len={self.seq_len} and unroll_length={self.unroll_length}"
            )

    @property
    def dims(self) -> ModelDims:
        return SIZES[self.size]

    @property
    def capacity(self) -> int:
        """Replay rows (one vectorised env step each)."""
        return -(-self.buffer_size // self.num_envs)

    @property
    def probes_gated(self) -> bool:
        """Whether the probes run only in some updates (``probe_from``, ``probe_max_return``)."""
        return self.probe_from > 0 or self.probe_max_return < float("inf")

    @property
    def updates_per_iteration(self) -> int:
        return round(self.train_ratio * self.env_steps_per_iteration / (self.batch_size * self.seq_len))

    def active_updates(self, env_steps: jax.Array) -> jax.Array:
        """Updates of the iteration that ends at ``env_steps`` that change the parameters: all
        ``updates_per_iteration`` without a ramp, else the ramped ratio's share (at least one)."""
        if self.train_ratio_ramp == 0:
            return jnp.asarray(self.updates_per_iteration, jnp.int32)
        done = jnp.clip((env_steps - self.prefill) / self.train_ratio_ramp, 0.0, 1.0)
        ratio = self.train_ratio_start + done * (self.train_ratio - self.train_ratio_start)
        updates = jnp.round(ratio * self.env_steps_per_iteration / (self.batch_size * self.seq_len))
        return jnp.clip(updates, 1, self.updates_per_iteration).astype(jnp.int32)

    @property
    def terminal_windows(self) -> int:
        """Windows of each batch drawn around a terminal step (``terminal_replay``)."""
        return round(self.terminal_fraction * self.batch_size)

    @property
    def terminal_recent_rows(self) -> int:
        """Newest replay rows whose terminal steps the prioritised windows draw from (0 = all)."""
        return -(-self.terminal_recent // self.num_envs)

    @property
    def env_steps_per_iteration(self) -> int:
        return self.num_envs * self.unroll_length


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@struct.dataclass
class Step:
    """One env step as the replay stores it (leaves gain [capacity, num_envs] there)."""

    obs: jax.Array  # the observation acted on
    is_first: jax.Array  # 1.0 where ``obs`` starts an episode
    action: jax.Array  # in [-1, 1], the action taken
    reward: jax.Array
    next_obs: jax.Array  # the observation the step produced, before any auto-reset
    terminated: jax.Array  # 1.0 on a true termination (not a time limit)


#: Config fields a population may set per row (``lunarl.run.population``): the learning rates.
HYPERPARAMETERS = ("model_lr", "actor_lr", "critic_lr")


class TrainState(struct.PyTreeNode):
    """Everything one Dreamer run carries between iterations; only arrays are pytree leaves."""

    params: dict[str, Any]  # world_model, actor, critic, slow_critic (+ actor_ema if actor_ema_rate > 0)
    opt_state: dict[str, Any]  # world_model, actor, critic
    return_norm: behavior.ReturnNorm
    replay: replay_lib.Replay
    env_state: State  # batched, from the training wrapper stack
    carry: dict[str, jax.Array]  # the policy carry of the training envs (leaves [N, ...])
    is_first: jax.Array  # bool[N]: the env's current observation starts an episode
    rng: jax.Array
    iteration: jax.Array  # int32
    env_steps: jax.Array  # int32, this seed's env steps
    gradient_steps: jax.Array  # int32
    hparams: dict[str, jax.Array]  # per-row learning rates (``HYPERPARAMETERS``); empty: ``cfg``'s
    env: LunarEnv = struct.field(pytree_node=False)
    cfg: DreamerConfig = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class Nets:
    """The Flax modules of one config (stateless; parameters live in the TrainState)."""

    world_model: WorldModelNet
    actor: behavior.ActorNet
    critic: behavior.CriticNet
    twohot: TwoHot


def nets(env: LunarEnv, cfg: DreamerConfig) -> Nets:
    d = cfg.dims
    behavior_layers = cfg.behavior_layers or d.layers
    return Nets(
        world_model=WorldModelNet(
            env.observation_size, env.action_size, d, cfg.num_bins,
            angle_indices=tuple(env.angle_observations) if cfg.angle_features else (),
        ),
        actor=behavior.ActorNet(
            env.action_size, behavior_layers, d.units, cfg.actor_min_std, cfg.actor_max_std, cfg.actor_out_scale
        ),
        critic=behavior.CriticNet(behavior_layers, d.units, cfg.num_bins),
        twohot=TwoHot(cfg.num_bins, -cfg.twohot_limit, cfg.twohot_limit),
    )


def _agc_limit(param: jax.Array, ratio: float, min_norm: float = AGC_MIN_NORM) -> jax.Array:
    return ratio * jnp.maximum(jnp.linalg.norm(param.ravel()), min_norm)


def _global_clip(cfg: DreamerConfig, part: str) -> float:
    """The global-norm clip of one optimiser (``part``: world_model | actor | critic)."""
    return {"world_model": cfg.model_clip, "actor": cfg.actor_clip, "critic": cfg.critic_clip}[part]


def clip_by_parameter_norm(ratio: float, min_norm: float = AGC_MIN_NORM) -> optax.GradientTransformation:
    """DreamerV3's adaptive gradient clipping: scale each tensor's gradient down so its norm is at
    most ``ratio`` x that tensor's parameter norm (at least ``min_norm``, so a zero-initialised bias
    still moves). Per tensor, unlike ``optax.adaptive_grad_clip``, which clips each output unit of a
    kernel on its own (NFNets). Its state is ``EmptyState`` like the global-norm clip's, so the
    optimiser state has one structure either way."""

    def update(grads: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        if params is None:
            raise ValueError("clip_by_parameter_norm needs the parameters: call update(grads, state, params)")

        def clip(grad: jax.Array, param: jax.Array) -> jax.Array:
            return grad / jnp.maximum(1.0, jnp.linalg.norm(grad.ravel()) / _agc_limit(param, ratio, min_norm))

        return jax.tree.map(clip, grads, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _gradient_metrics(part: str, grads: Any, params: Any, cfg: DreamerConfig) -> dict[str, jax.Array]:
    """``GRADIENT_METRICS`` of one optimiser (``part``) for its raw gradient."""
    norm = optax.tree.norm(grads)
    if cfg.agc > 0:
        bound = jax.tree.map(lambda g, p: jnp.linalg.norm(g.ravel()) > _agc_limit(p, cfg.agc), grads, params)
        clipped = jnp.mean(jnp.stack(jax.tree.leaves(bound)).astype(jnp.float32))
    else:
        clipped = (norm > _global_clip(cfg, part)).astype(jnp.float32)
    return {f"{part}/grad_norm": norm, f"{part}/clipped": clipped}


def _optimizers(cfg: DreamerConfig, lrs: dict[str, Any] | None = None) -> dict[str, optax.GradientTransformation]:
    """The three optimisers; ``lrs`` overrides ``cfg``'s learning rates (a population row's
    arrays: Adam's state does not depend on them, so it is the same state either way)."""
    lr = {k: getattr(cfg, k) for k in HYPERPARAMETERS} | dict(lrs or {})

    def opt(part: str, lr: Any, eps: float) -> optax.GradientTransformation:
        if cfg.agc > 0:
            clipping = clip_by_parameter_norm(cfg.agc)
        else:
            clipping = optax.clip_by_global_norm(_global_clip(cfg, part))
        return optax.chain(clipping, optax.adam(lr, eps=eps))

    return {
        "world_model": opt("world_model", lr["model_lr"], cfg.model_eps),
        "actor": opt("actor", lr["actor_lr"], cfg.ac_eps),
        "critic": opt("critic", lr["critic_lr"], cfg.ac_eps),
    }


def _training_env(env: LunarEnv, cfg: DreamerConfig):
    return wrap_for_training(env, cfg.episode_length)


def _example_step(env: LunarEnv) -> Step:
    obs = jnp.zeros((env.observation_size,), jnp.float32)
    scalar = jnp.zeros((), jnp.float32)
    return Step(obs=obs, is_first=scalar, action=jnp.zeros((env.action_size,), jnp.float32),
                reward=scalar, next_obs=obs, terminated=scalar)  # fmt: skip


def init(rng: jax.Array, env: LunarEnv, cfg: DreamerConfig) -> TrainState:
    """A fresh train state: networks, optimisers, an empty replay, reset envs and carries."""
    rng = as_raw_key(rng)
    k_wm, k_actor, k_critic, k_env, k_state = jax.random.split(rng, 5)
    n = nets(env, cfg)
    obs = jnp.zeros((1, env.observation_size), jnp.float32)
    wm = n.world_model.init(k_wm, obs, jnp.zeros((1, env.action_size), jnp.float32))
    params = {"world_model": wm, **_behavior_params(n, cfg, k_actor, k_critic)}
    opts = _optimizers(cfg)
    return TrainState(
        params=params,
        opt_state={k: opts[k].init(params[k]) for k in opts},
        return_norm=behavior.ReturnNorm.create(),
        replay=replay_lib.init(cfg.capacity, cfg.num_envs, _example_step(env)),
        env_state=_training_env(env, cfg).reset(jax.random.split(k_env, cfg.num_envs)),
        carry=_initial_carry(env, cfg, cfg.num_envs),
        is_first=jnp.ones((cfg.num_envs,), bool),
        rng=k_state,
        iteration=jnp.zeros((), jnp.int32),
        env_steps=jnp.zeros((), jnp.int32),
        gradient_steps=jnp.zeros((), jnp.int32),
        hparams={},
        env=env,
        cfg=cfg,
    )


def _behavior_params(n: Nets, cfg: DreamerConfig, k_actor: jax.Array, k_critic: jax.Array) -> dict[str, Any]:
    """Fresh actor and critic parameters, with the slow critic (and the actor's average) equal to
    them in buffers of their own (a donated state cannot hold one buffer twice)."""
    feat = jnp.zeros((1, cfg.dims.feat_size), jnp.float32)
    actor = n.actor.init(k_actor, feat)
    critic = n.critic.init(k_critic, feat)
    params = {"actor": actor, "critic": critic, "slow_critic": jax.tree.map(jnp.copy, critic)}
    if cfg.actor_ema_rate > 0:
        params["actor_ema"] = jax.tree.map(jnp.copy, actor)
    return params


def reset_behavior(ts: TrainState, due: jax.Array, rng: jax.Array) -> tuple[dict[str, Any], dict[str, Any]]:
    """Where ``due``, the critic (``behavior_reset=critic``) or the actor and the critic
    (``actor_critic``) restart from fresh parameters and fresh optimiser states; the world model,
    the replay and the return normaliser keep what they learned. Why: a critic fitted to the
    prefill's crashes might stay pessimistic after the data holds driving (the primacy bias of
    Nikishin et al. 2022); a fresh one is refitted on imagination from the current world model.
    On the car the fresh parts relearned the same values within one iteration (off by default;
    scripts/results/dreamer.md, session 26). Returns the (params, opt_state) to learn from."""
    cfg = ts.cfg
    fresh = _behavior_params(nets(ts.env, cfg), cfg, *jax.random.split(rng))
    parts = ["critic", "slow_critic"]
    if cfg.behavior_reset == "actor_critic":
        parts += ["actor", "actor_ema"]
    params = {**ts.params, **{k: fresh[k] for k in parts if k in ts.params}}
    opts = _optimizers(cfg)  # Adam's state does not depend on the learning rates
    opt_state = {**ts.opt_state, **{k: opts[k].init(params[k]) for k in ("actor", "critic") if k in parts}}

    def pick(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(due, new, old)

    return jax.tree.map(pick, params, ts.params), jax.tree.map(pick, opt_state, ts.opt_state)


# --------------------------------------------------------------------------------------------
# Acting
# --------------------------------------------------------------------------------------------


def _initial_carry(env: LunarEnv, cfg: DreamerConfig, batch_size: int) -> dict[str, jax.Array]:
    """The reset carry: zero latent and zero previous action (what ``observe`` restarts from)."""
    d = cfg.dims
    carry = {
        "deter": jnp.zeros((batch_size, d.deter), jnp.float32),
        "stoch": jnp.zeros((batch_size, d.stoch_size), jnp.float32),
        "action": jnp.zeros((batch_size, env.action_size), jnp.float32),
    }
    if cfg.collect_noise_corr > 0:
        carry["noise"] = jnp.zeros((batch_size, env.action_size), jnp.float32)
    return carry


def _search_params(ts: TrainState) -> dict[str, Any]:
    """What the act-time search scores with (``lookahead``): the critic and the return scale."""
    if not ts.cfg.lookahead:
        return {}
    return {"critic": ts.params["critic"], "return_scale": ts.return_norm.scale(ts.cfg.return_norm_limit)}


def policy_params(ts: TrainState) -> dict[str, Any]:
    """The policy that evaluation, videos and exports run: the world model (to filter the latent)
    and the actor, its EMA copy when ``actor_ema_rate > 0`` (with ``lookahead``, what the search
    scores with too)."""
    actor = ts.params.get("actor_ema", ts.params["actor"])
    return {"world_model": ts.params["world_model"], "actor": actor, **_search_params(ts)}


def _acting_params(ts: TrainState) -> dict[str, Any]:
    """What collection acts with: always the live actor, so the EMA changes no training data."""
    return {"world_model": ts.params["world_model"], "actor": ts.params["actor"], **_search_params(ts)}


def make_policy(env: LunarEnv, cfg: DreamerConfig) -> Policy:
    """Dreamer's ``Policy``: the carry is the filtered latent and the previous action.

    ``deterministic`` acts with the actor's mean; the latent is sampled either way (the actor was
    trained on sampled latents), from ``rng``, so evaluation is reproducible. With ``lookahead``,
    where the search finds a held action that beats the plan ahead of an imagined episode end,
    that action is taken instead, in training and evaluation alike.
    """
    n = nets(env, cfg)
    wm, classes, rho = n.world_model, cfg.dims.classes, cfg.collect_noise_corr

    def act(params: dict[str, Any], obs: jax.Array, carry: dict[str, jax.Array], is_first: jax.Array,
            rng: jax.Array, deterministic: Any = True) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
        chex.assert_rank(obs, 2)
        carry = reset_carry(carry, _initial_carry(env, cfg, obs.shape[0]), is_first)
        k_stoch, k_action = jax.random.split(rng)
        wp = params["world_model"]
        deter, _ = wm.apply(wp, carry["deter"], carry["stoch"], carry["action"], method=WorldModelNet.img_step)
        post = wm.apply(wp, deter, wm.apply(wp, obs, method=WorldModelNet.embed), method=WorldModelNet.posterior)
        stoch = jax.lax.stop_gradient(sample_stoch(k_stoch, unimix_logits(post, classes, cfg.unimix)))
        mean, std = n.actor.apply(params["actor"], Latent(deter, stoch).feat)
        new_carry = {"deter": deter, "stoch": stoch}
        noise = jax.random.normal(k_action, mean.shape)
        if rho > 0:
            # The same Gaussian per step, correlated over steps: z_t = rho z_{t-1} + sqrt(1 - rho^2) eps,
            # stationary (a fresh episode starts from eps), so each step's action keeps its law.
            noise = jnp.where(is_first[:, None], noise, rho * carry["noise"] + jnp.sqrt(1.0 - rho**2) * noise)
            new_carry["noise"] = noise
        sampled, _ = behavior.sample_action(k_action, mean, std, noise)
        action = jnp.where(deterministic, mean, sampled)
        if cfg.lookahead:
            # Re-planned every step, so a swerve is held for as long as it keeps winning.
            search = probe.candidate_search(
                wm, wp, n.actor, params["actor"], n.critic, params["critic"], Latent(deter, stoch),
                params["return_scale"], jax.random.fold_in(rng, 2), horizon=cfg.horizon,
                hold_steps=cfg.lookahead_steps, unimix=cfg.unimix, gamma=cfg.gamma, lam=cfg.lam,
                twohot=n.twohot, margin=cfg.lookahead_margin, min_end=cfg.lookahead_min_end,
            )  # fmt: skip
            action = jnp.where(search.wins[:, None], search.first_action(), action)
        return action, {**new_carry, "action": action}

    return Policy(initial_carry=lambda batch_size: _initial_carry(env, cfg, batch_size), act=act)


@struct.dataclass
class _Episode:
    done: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array
    success: jax.Array


def collect(ts: TrainState, rng: jax.Array) -> tuple[State, dict[str, jax.Array], jax.Array, Step, _Episode]:
    """``unroll_length`` steps of the training envs from their carries (uniform actions during
    prefill): (env state, carry, is_first, steps [T, N, ...], episode stats [T, N])."""
    cfg = ts.cfg
    env = _training_env(ts.env, cfg)
    policy = make_policy(ts.env, cfg)
    params = _acting_params(ts)

    def step(carry: tuple, xs: tuple) -> tuple[tuple, tuple]:
        env_state, policy_carry, is_first = carry
        t, key = xs
        k_act, k_uniform = jax.random.split(key)
        previous_action = policy_carry["action"]
        action, policy_carry = policy.act(params, env_state.obs, policy_carry, is_first, k_act, False)
        uniform = jax.random.uniform(k_uniform, action.shape, minval=-1.0, maxval=1.0)
        if cfg.prefill_hold > 1:
            # Sticky prefill actions: each env keeps its previous action with probability
            # 1 - 1/hold (held for `hold` steps on average), a fresh draw on an episode's first
            # step. Uniform per step either way, but held long enough to build speed.
            keep = jax.random.uniform(jax.random.fold_in(k_uniform, 1), is_first.shape) >= 1.0 / cfg.prefill_hold
            uniform = jnp.where((keep & ~is_first)[:, None], previous_action, uniform)
        action = jnp.where(ts.env_steps + t * cfg.num_envs < cfg.prefill, uniform, action)
        policy_carry = {**policy_carry, "action": action}  # the carry holds the action taken
        nxt = env.step(env_state, action)
        episode = nxt.info["episode_metrics"]
        row = Step(
            obs=env_state.obs,
            is_first=is_first.astype(jnp.float32),
            action=action,
            reward=nxt.reward,
            next_obs=nxt.info["final_obs"],
            terminated=nxt.done * (1.0 - nxt.info["truncation"]),
        )
        stats = _Episode(
            done=nxt.done,
            episode_return=episode["sum_reward"],
            episode_length=episode["length"],
            success=(episode.get("success", jnp.zeros_like(nxt.reward)) > 0).astype(jnp.float32),
        )
        return (nxt, policy_carry, nxt.done.astype(bool)), (row, stats)

    xs = (jnp.arange(cfg.unroll_length, dtype=jnp.int32), jax.random.split(rng, cfg.unroll_length))
    (env_state, carry, is_first), (rows, stats) = jax.lax.scan(step, (ts.env_state, ts.carry, ts.is_first), xs)
    return env_state, carry, is_first, rows, stats


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------

WORLD_MODEL_METRICS = (
    "world_model/loss",
    "world_model/reconstruction",
    "world_model/reward",
    "world_model/continue",
    "world_model/kl_dynamics",
    "world_model/kl_representation",
    "world_model/kl",
    "world_model/reward_error",
    "world_model/posterior_entropy",
)
BEHAVIOR_METRICS = (
    "actor/loss",
    "actor/entropy",
    "actor/std",
    "imagination/return",
    "imagination/reward",
    "imagination/continue",
    "imagination/return_scale",
    "critic/loss",
    "critic/value",
    "critic/replay_loss",
    "critic/replay_return",
    "probe/improved",
    "probe/gain",
    "probe/active",  # share of updates whose probes ran
)
REPLAY_METRICS = ("replay/terminal_windows",)  # share of the sampled windows holding a terminal step
# Per optimiser, averaged over the iteration's updates: the global norm of the raw gradient, and how
# often the clip bound (the global-norm clip: the share of updates; agc: of tensors x updates).
GRADIENT_METRICS = tuple(f"{part}/{m}" for part in ("world_model", "actor", "critic") for m in ("grad_norm", "clipped"))
LOSS_METRICS = WORLD_MODEL_METRICS + BEHAVIOR_METRICS + REPLAY_METRICS + GRADIENT_METRICS


def _no_loss_metrics() -> dict[str, jax.Array]:
    """The ``LOSS_METRICS`` of a skipped update (zeros: they are weighted out or logged as 0)."""
    return {k: jnp.zeros((), jnp.float32) for k in LOSS_METRICS}


def _no_probe_metrics() -> dict[str, jax.Array]:
    return {"probe/improved": jnp.zeros(()), "probe/gain": jnp.zeros(())}


def time_major(seq: Any) -> Any:
    """[B, T, ...] -> [T, B, ...]."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), seq)


def update(
    n: Nets, cfg: DreamerConfig, params: dict[str, Any], opt_state: dict[str, Any],
    norm: behavior.ReturnNorm, seq: Step, rng: jax.Array, lrs: dict[str, Any] | None = None,
    probing: jax.Array | bool = True,
) -> tuple[dict[str, Any], dict[str, Any], behavior.ReturnNorm, dict[str, jax.Array]]:  # fmt: skip
    """One gradient update on time-major sequences ``seq``: world model, actor, critic, slow critic
    (``lrs``: a population row's learning rates; ``probing``: whether the probes may run, with
    ``probe_scale > 0``)."""
    k_wm, k_imagine = jax.random.split(rng)
    wm_params, wm_opt, observed, wm_metrics = world_model_update(n, cfg, params, opt_state, seq, k_wm, lrs)
    new_params, new_opt, norm, metrics = behavior_update(
        n, cfg, params, opt_state, norm, seq, observed, k_imagine, lrs, probing
    )
    return ({"world_model": wm_params, **new_params}, {"world_model": wm_opt, **new_opt}, norm,
            {**wm_metrics, **metrics})  # fmt: skip


def world_model_update(
    n: Nets, cfg: DreamerConfig, params: dict[str, Any], opt_state: dict[str, Any], seq: Step, rng: jax.Array,
    lrs: dict[str, Any] | None = None,
) -> tuple[Any, Any, Observed, dict[str, jax.Array]]:  # fmt: skip
    """The world model's part of ``update``: (its new parameters, its optimiser state, the
    posterior of ``seq`` under the old parameters, its loss and gradient metrics)."""
    opts = _optimizers(cfg, lrs)
    wm_grad = jax.value_and_grad(world_model_loss, argnums=1, has_aux=True)
    (_, (observed, wm_metrics)), grads = wm_grad(
        n.world_model, params["world_model"], seq, rng, unimix=cfg.unimix, free_nats=cfg.free_nats,
        dyn_scale=cfg.dyn_scale, rep_scale=cfg.rep_scale, twohot=n.twohot, reward_scale=cfg.reward_scale,
        cont_scale=cfg.cont_scale,
    )  # fmt: skip
    gradient_metrics = _gradient_metrics("world_model", grads, params["world_model"], cfg)
    updates, wm_opt = opts["world_model"].update(grads, opt_state["world_model"], params["world_model"])
    wm_params = optax.apply_updates(params["world_model"], updates)
    return wm_params, wm_opt, observed, {**wm_metrics, **gradient_metrics}


def behavior_update(
    n: Nets, cfg: DreamerConfig, params: dict[str, Any], opt_state: dict[str, Any],
    norm: behavior.ReturnNorm, seq: Step, observed: Observed, rng: jax.Array, lrs: dict[str, Any] | None = None,
    probing: jax.Array | bool = True,
) -> tuple[dict[str, Any], dict[str, Any], behavior.ReturnNorm, dict[str, jax.Array]]:  # fmt: skip
    """The behaviour's part of ``update``, on ``observed`` (``seq``'s posterior from
    ``world_model_update``): the new actor, critic, slow critic (and actor average) with the actor
    and critic optimiser states, the return normaliser and the metrics."""
    opts = _optimizers(cfg, lrs)
    # Imagine from the posterior latents of the batch (all of them, or a random subset of
    # ``imagine_starts``), with the world model the latents came from.
    start = jax.tree.map(lambda x: jax.lax.stop_gradient(x.reshape((-1,) + x.shape[2:])), observed.latent)
    start_cont = 1.0 - seq.terminated.reshape(-1)
    num_starts = cfg.batch_size * cfg.seq_len
    if 0 < cfg.imagine_starts < num_starts:
        k_starts, rng = jax.random.split(rng)
        chosen = jax.random.choice(k_starts, num_starts, (cfg.imagine_starts,), replace=False)
        start, start_cont = jax.tree.map(lambda x: x[chosen], (start, start_cont))
    actor_grad = jax.value_and_grad(behavior.behavior_losses, argnums=3, has_aux=True)
    (_, (traj, returns, weight, norm, actor_metrics)), grads = actor_grad(
        n.world_model, params["world_model"], n.actor, params["actor"], n.critic, params["critic"], start,
        start_cont, norm, rng, horizon=cfg.horizon, unimix=cfg.unimix, gamma=cfg.gamma, lam=cfg.lam,
        actor_grad=cfg.actor_grad, actor_entropy=cfg.actor_entropy, norm_rate=cfg.return_norm_rate,
        reinforce_share=cfg.actor_reinforce_share,
        norm_limit=cfg.return_norm_limit, twohot=n.twohot, noise_corr=cfg.imagine_noise_corr,
        noise_share=cfg.imagine_noise_share,
    )  # fmt: skip
    if cfg.probe_scale > 0:
        k_probe_starts, k_probe = jax.random.split(jax.random.fold_in(rng, 1))
        probed = jax.random.permutation(k_probe_starts, start_cont.shape[0])[: cfg.probe_starts]
        probe_start, probe_cont = jax.tree.map(lambda x: x[probed], (start, start_cont))

        def run_probes(actor_params: Any) -> tuple[Any, dict[str, jax.Array]]:
            return jax.grad(probe.probe_loss, has_aux=True)(
                actor_params, n.world_model, params["world_model"], n.actor, n.critic, params["critic"],
                probe_start, probe_cont, norm.scale(cfg.return_norm_limit), k_probe, horizon=cfg.horizon,
                hold_steps=cfg.probe_steps, unimix=cfg.unimix, gamma=cfg.gamma, lam=cfg.lam,
                margin=cfg.probe_margin, twohot=n.twohot, min_end=cfg.probe_min_end,
            )  # fmt: skip

        if cfg.probes_gated:
            # Probes only for a seed that is past ``probe_from`` and expects little (its imagined
            # return below ``probe_max_return``), so seeds that drive train as without them.
            active = jnp.asarray(probing) & (actor_metrics["imagination/return"] < cfg.probe_max_return)

            def no_probes(actor_params: Any) -> tuple[Any, dict[str, jax.Array]]:
                return jax.tree.map(jnp.zeros_like, actor_params), _no_probe_metrics()

            probe_grads, probe_metrics = seed_cond(active, run_probes, no_probes, params["actor"])
        else:  # no branch: ungated runs keep the program (and the floats) they had before the gate
            active = jnp.ones((), bool)
            probe_grads, probe_metrics = run_probes(params["actor"])
        grads = jax.tree.map(lambda g, h: g + cfg.probe_scale * h, grads, probe_grads)
        actor_metrics = {**actor_metrics, **probe_metrics, "probe/active": active.astype(jnp.float32)}
    else:
        actor_metrics = {**actor_metrics, **_no_probe_metrics(), "probe/active": jnp.zeros(())}
    gradient_metrics = _gradient_metrics("actor", grads, params["actor"], cfg)
    updates, actor_opt = opts["actor"].update(grads, opt_state["actor"], params["actor"])
    actor_params = optax.apply_updates(params["actor"], updates)

    replay_feat = jax.lax.stop_gradient(observed.latent.feat)

    def critic_losses(critic_params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss, metrics = behavior.critic_loss(
            n.critic, critic_params, params["slow_critic"], traj, returns, weight, slow_reg=cfg.slow_reg, twohot=n.twohot
        )
        if cfg.replay_value_scale == 0:
            return loss, {**metrics, "critic/replay_loss": jnp.zeros(()), "critic/replay_return": jnp.zeros(())}
        replay_loss, replay_metrics = behavior.replay_critic_loss(
            n.critic, critic_params, params["slow_critic"], replay_feat, seq.reward, seq.terminated, seq.is_first,
            gamma=cfg.gamma, lam=cfg.lam, slow_reg=cfg.slow_reg, twohot=n.twohot,
        )  # fmt: skip
        return loss + cfg.replay_value_scale * replay_loss, {**metrics, **replay_metrics}

    (_, critic_metrics), grads = jax.value_and_grad(critic_losses, has_aux=True)(params["critic"])
    gradient_metrics |= _gradient_metrics("critic", grads, params["critic"], cfg)
    updates, critic_opt = opts["critic"].update(grads, opt_state["critic"], params["critic"])
    critic_params = optax.apply_updates(params["critic"], updates)
    slow = optax.incremental_update(critic_params, params["slow_critic"], cfg.slow_critic_rate)

    new_params = {"actor": actor_params, "critic": critic_params, "slow_critic": slow}
    if cfg.actor_ema_rate > 0:  # the evaluated actor: an average over the last ~1/rate updates
        new_params["actor_ema"] = optax.incremental_update(actor_params, params["actor_ema"], cfg.actor_ema_rate)
    metrics = {**actor_metrics, **critic_metrics, **gradient_metrics}
    return new_params, {"actor": actor_opt, "critic": critic_opt}, norm, metrics


def learn(ts: TrainState, rng: jax.Array) -> tuple[dict[str, Any], dict[str, Any], behavior.ReturnNorm, dict]:
    """``active_updates`` updates, each on a fresh sample of the replay; metrics averaged over them."""
    cfg = ts.cfg
    active = cfg.active_updates(ts.env_steps)
    n = nets(ts.env, cfg)
    lrs = {k: hyperparameter(ts, k) for k in HYPERPARAMETERS}
    probing = ts.env_steps >= cfg.probe_from
    if cfg.terminal_windows > 0:
        terminals = terminal_replay.index(ts.replay, ts.replay.data.terminated, cfg.terminal_recent_rows)

    def one_update(carry: tuple, key: jax.Array) -> tuple[tuple, dict]:
        params, opt_state, norm = carry
        k_sample, k_update = jax.random.split(key)
        if cfg.terminal_windows > 0:
            batch = terminal_replay.sample(ts.replay, terminals, k_sample, cfg.batch_size, cfg.seq_len, cfg.terminal_windows)
        else:  # the uniform sampler, so runs without prioritisation keep their random streams
            batch = replay_lib.sample_sequences(ts.replay, k_sample, cfg.batch_size, cfg.seq_len)
        # Data parallel (a data mesh axis): each device takes a share of the batch's sequences and
        # XLA all-reduces the gradients, instead of every device running the whole update.
        seq = jax.tree.map(lambda x: split_on_data(x, axis=1), time_major(batch))
        *updated, metrics = update(n, cfg, params, opt_state, norm, seq, k_update, lrs, probing)
        metrics["replay/terminal_windows"] = jnp.mean(jnp.any(seq.terminated > 0.5, axis=0).astype(jnp.float32))
        return tuple(updated), metrics

    def keep(carry: tuple, key: jax.Array) -> tuple[tuple, dict]:
        return carry, _no_loss_metrics()

    def body(carry: tuple, indexed_key: tuple[jax.Array, jax.Array]) -> tuple[tuple, dict]:
        index, key = indexed_key
        if cfg.train_ratio_ramp == 0:
            return one_update(carry, key)
        # The updates past the ramp's share are skipped, not computed and thrown away: the carry
        # stays, and their zero metrics get weight 0 below.
        return seed_cond(index < active, one_update, keep, carry, key)

    keys = jax.random.split(rng, cfg.updates_per_iteration)
    indices = jnp.arange(cfg.updates_per_iteration)
    (params, opt_state, norm), metrics = jax.lax.scan(body, (ts.params, ts.opt_state, ts.return_norm), (indices, keys))
    if cfg.train_ratio_ramp == 0:
        return params, opt_state, norm, jax.tree.map(jnp.mean, metrics)
    weights = (indices < active).astype(jnp.float32) / active
    return params, opt_state, norm, jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1), metrics)


def train_step(ts: TrainState) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Dreamer iteration (collect into the replay, then learn). Pure; jit it (donating ``ts``)."""
    cfg = ts.cfg
    rng, k_collect, k_learn = jax.random.split(ts.rng, 3)
    env_state, carry, is_first, rows, stats = collect(ts, k_collect)
    env_steps = ts.env_steps + cfg.env_steps_per_iteration
    if cfg.behavior_reset_at:  # before this iteration's updates, so they train the fresh parts
        due = jnp.any(jnp.array([(ts.env_steps < at) & (at <= env_steps) for at in cfg.behavior_reset_at]))
        params, opt_state = reset_behavior(ts, due, jax.random.fold_in(k_learn, 1))
        ts = ts.replace(params=params, opt_state=opt_state)
    ts = ts.replace(
        replay=replay_lib.add(ts.replay, rows), env_state=env_state, carry=carry, is_first=is_first,
        env_steps=env_steps, rng=rng,
    )  # fmt: skip
    ready = (env_steps >= cfg.prefill) & replay_lib.can_sample(ts.replay, cfg.seq_len)

    def skip(ts: TrainState, rng: jax.Array):
        return ts.params, ts.opt_state, ts.return_norm, _no_loss_metrics()

    # ``seed_cond``: the prefill iterations skip the update work under the seed vmap too.
    params, opt_state, norm, loss_metrics = seed_cond(ready, learn, skip, ts, k_learn)
    ts = ts.replace(
        params=params, opt_state=opt_state, return_norm=norm, iteration=ts.iteration + 1,
        gradient_steps=ts.gradient_steps + ready.astype(jnp.int32) * cfg.active_updates(env_steps),
    )  # fmt: skip
    metrics = {
        **episode_metrics(stats.done, stats.episode_return, stats.episode_length, stats.success),
        "charts/gradient_steps": ts.gradient_steps,
        "charts/replay_size": ts.replay.size * cfg.num_envs,
        **loss_metrics,
    }
    return ts, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def env_axes(ts: TrainState) -> TrainState:
    """Env-batch leaves: the env states, the carries, ``is_first`` and the replay's columns."""
    specs = jax.tree.map(lambda _: REPLICATED, ts)
    return specs.replace(
        env_state=jax.tree.map(lambda _: ENV_AXIS, ts.env_state),
        carry=jax.tree.map(lambda _: ENV_AXIS, ts.carry),
        is_first=ENV_AXIS,
        replay=replay_lib.env_axes(ts.replay),
    )


METRIC_NAMES = (*EPISODE_STATISTICS, EPISODES_FINISHED, "charts/gradient_steps", "charts/replay_size", *LOSS_METRICS)

AGENT = Agent(
    name="dreamer",
    hyperparameters=HYPERPARAMETERS,
    config_class=DreamerConfig,
    init=init,
    train_step=train_step,
    policy_params=policy_params,
    make_policy=make_policy,
    env_axes=env_axes,
    metric_names=METRIC_NAMES,
    running_totals=("charts/gradient_steps", "charts/replay_size"),
)
