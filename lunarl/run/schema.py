"""Structured-config schemas of the two Hydra apps and the checks that run before any compile.

Hydra composes ``conf/`` on top of these dataclasses (registered in its ``ConfigStore``), so an
unknown key or a value of the wrong type is rejected while composing, naming the key. Ranges are
checked by ``validate_train`` (``bounded`` fields here, and the env's and agent's own ``Config``
classes for ``env.*`` and ``agent.*``), which turns the composed config into the objects the loop
needs and raises ``ConfigError`` with a one-line message naming the key.

``env`` and ``agent`` are open dictionaries in the schema: their fields belong to each env's and
agent's config class (``lunarl.envs.config_class(name)``, ``lunarl.agents.get(name).config_class``),
which is the single place their names, types and ranges are declared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lunarl.config import Config, bounded, range_violation

__all__ = [
    "ConfigError",
    "EvalAppSchema",
    "Plan",
    "TrainSchema",
    "register_schemas",
    "validate_train",
]

# Keys of the ``env`` node that the train app consumes itself; the rest go to the env's config.
ENV_RUN_KEYS = ("name", "num_envs", "episode_length")


class ConfigError(ValueError):
    """A user error in the composed config; the apps print it as one line and exit non-zero."""


# --------------------------------------------------------------------------------------------
# Schemas (non-frozen: Hydra must be able to apply overrides to them)
# --------------------------------------------------------------------------------------------


@dataclass
class RunSchema:
    # Where everything of a run lives (checkpoints, metrics.jsonl, .hydra/, wandb/). In a
    # multirun, each job uses ``<run.dir>/<job number>``.
    dir: str = "runs/${name}/${now:%Y-%m-%d_%H-%M-%S}"
    total_env_steps: int = bounded(1_000_000, 1)  # per seed; rounded up to whole chunks
    # What the train app returns to a Hydra sweeper (Optuna), to maximise: eval_success (the best
    # evaluation's success rate, ties broken by its return), eval_return, or train_return (the
    # last logged training episode return); see lunarl.run.objective.
    objective: str = "eval_success"
    # Iterations per compiled chunk (one lax.scan); metrics are logged after every chunk.
    log_every: int = bounded(10, 1)
    # In iterations, multiples of log_every; eval_every=0 turns evaluation off.
    eval_every: int = bounded(50, 0)
    eval_episodes: int = bounded(32, 1)
    checkpoint_every: int = bounded(50, 1)
    # Record a video of one deterministic episode (seed 0's policy) at every evaluation whose
    # iteration this divides, and at the last one, into <run.dir>/videos/; 0 = no videos.
    # A multiple of eval_every. Drawn on the host after the evaluation, never in the chunk.
    video_every: int = bounded(0, 0)
    video_format: str = "mp4"  # mp4 (H.264) | gif
    # Devices of the (seed, data) mesh: null = all (every process's), N = the first N, or a list
    # of device ids. Seeds split over them where they divide; the rest shard the env batch.
    devices: Any = None
    # Split this host's CPU into N JAX devices (XLA's --xla_force_host_platform_device_count):
    # each runs its share of the env batch on its own thread. null = JAX's default (one).
    cpu_devices: int | None = bounded(None, 1)
    # One run over several processes (lunarl.run.distributed): all three, or none. Under SLURM
    # with more than one task JAX reads them from SLURM's variables instead.
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = bounded(None, 1)
    process_id: int | None = bounded(None, 0)
    # Exit code of a run stopped by SIGINT/SIGTERM after its checkpoint (0 = same as finished).
    # Schedulers that retry on an exit code set it, e.g. 75 on AWS Batch and in slurm/.
    stop_exit_code: int = bounded(0, 0, 255)


@dataclass
class CheckpointSchema:
    dir: str = "${run.dir}/checkpoints"
    max_to_keep: int = bounded(3, 1)
    # Keep a separate best-by-evaluation checkpoint (needs run.eval_every > 0).
    keep_best: bool = True
    # s3:// only: seconds the end of a run (or a SIGTERM stop) waits for uploads still pending
    # before it exits with code 5; the checkpoints stay in <run.dir>/checkpoints either way.
    upload_timeout: float = bounded(60.0, 0.0)


@dataclass
class WandbSchema:
    mode: str = "offline"  # offline | online | disabled
    project: str = "lunarl"
    entity: str | None = None
    group: str | None = "${name}"
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerSchema:
    wandb: WandbSchema = field(default_factory=WandbSchema)
    # rich progress bar when stdout is a terminal, one plain line per chunk otherwise.
    console: bool = True
    # TensorBoard event files in <run.dir>/tensorboard, same metric names as metrics.jsonl.
    tensorboard: bool = False


@dataclass
class PBTSchema:
    # Iterations between exploit/explore steps (a multiple of run.log_every); 0 = no PBT.
    every: int = bounded(0, 0)
    quantile: float = bounded(0.25, 0.0, 0.5)  # the worst members copy from the best, this fraction each
    perturb: list[float] = field(default_factory=lambda: [0.8, 1.25])  # factors a copied hyperparameter is multiplied by
    resample_probability: float = bounded(0.25, 0.0, 1.0)  # else draw it afresh from its range or listed values
    smoothing: float = bounded(0.9, 0.0, 1.0)  # score = smoothing * score + (1 - smoothing) * episode return


@dataclass
class PopulationSchema:
    # Members trained as one program (each with num_seeds seeds); see lunarl.run.population.
    size: int = bounded(1, 1)
    # agent.NAME: [low, high] or [low, high, log], drawn per member from seed.
    ranges: dict[str, Any] = field(default_factory=dict)
    # agent.NAME: [v1, ..., v_size], one value per member.
    values: dict[str, Any] = field(default_factory=dict)
    pbt: PBTSchema = field(default_factory=PBTSchema)


@dataclass
class TrainSchema:
    name: str = "default"  # experiment name; wandb groups runs by it
    seed: int = 0
    num_seeds: int = bounded(1, 1)  # independent seeds trained as one vmapped program
    env: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    run: RunSchema = field(default_factory=RunSchema)
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    population: PopulationSchema = field(default_factory=PopulationSchema)


@dataclass
class EvalSchema:
    episodes: int = bounded(100, 1)
    video: bool = False
    video_format: str = "mp4"  # mp4 (H.264) | gif
    deterministic: bool = True
    seed: int = 0


@dataclass
class EvalRunSchema:
    dir: str = "???"


@dataclass
class EvalAppSchema:
    run: EvalRunSchema = field(default_factory=EvalRunSchema)
    checkpoint: str = "latest"  # latest | best | an iteration number
    checkpoint_dir: str | None = None  # default: checkpoint.dir of the run's config.yaml
    eval: EvalSchema = field(default_factory=EvalSchema)
    # Env fields to change for this evaluation only (``+env.reward_rock_hit=-10``,
    # ``+env.num_rocks=12``): the policy trained on the saved env, tested on a variant of it.
    env: dict[str, Any] = field(default_factory=dict)


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/*.yaml`` list them first in defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    cs.store(name="evaluate_schema", node=EvalAppSchema)


# --------------------------------------------------------------------------------------------
# Validation: composed DictConfig -> checked plan
# --------------------------------------------------------------------------------------------


def check_bounds(obj: Any, prefix: str) -> None:
    """Raise ``ConfigError`` for any ``bounded`` field of dataclass ``obj`` outside its range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_bounds(value, key)
            continue
        problem = range_violation(f, value)
        if problem:
            raise ConfigError(f"{key}={value!r} {problem}")


@dataclasses.dataclass(frozen=True)
class EnvRunConfig(Config):
    """The ``env`` keys the app consumes (the rest are the env's own config)."""

    name: str = "rover"
    num_envs: int = bounded(2048, 1, 1 << 20)
    episode_length: int | None = bounded(None, 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the train loop needs, validated; built from the composed config."""

    cfg: TrainSchema
    env_name: str
    env_config: Any  # the env's EnvConfig
    agent_name: str
    agent_config: Any  # the agent's Config
    steps_per_iteration: int
    total_iterations: int
    population: Any = None  # lunarl.run.population.Population, or None without one

    @property
    def num_rows(self) -> int:
        """Rows of the stacked TrainState: seeds, times members with a population."""
        return self.population.rows if self.population is not None else self.cfg.num_seeds

    def env_and_agent(self) -> tuple[Any, Any]:
        import lunarl.agents
        import lunarl.envs

        env = lunarl.envs.env_class(self.env_name)(self.env_config)
        return env, lunarl.agents.get(self.agent_name)


def _user_message(err: Exception, node: str) -> str:
    """``SomeConfig.field=...`` -> ``agent.field=...`` (the key the user typed)."""
    msg = str(err)
    head, dot, rest = msg.partition(".")
    if dot and head.endswith("Config") and " " not in head:
        return f"{node}.{rest}"
    return f"{node}: {msg}"


def _check_video(run: RunSchema) -> None:
    """Videos are recorded at evaluations, so ``run.video_every`` is a multiple of ``eval_every``."""
    if run.video_format not in ("mp4", "gif"):
        raise ConfigError(f"run.video_format={run.video_format!r}: allowed mp4, gif")
    if not run.video_every:
        return
    if not run.eval_every:
        raise ConfigError(f"run.video_every={run.video_every} needs run.eval_every > 0 (videos are recorded at evaluations)")
    if run.video_every % run.eval_every:
        raise ConfigError(
            f"run.video_every={run.video_every} must be a multiple of run.eval_every={run.eval_every} "
            "(videos are recorded at evaluations)"
        )


def validate_train(cfg: DictConfig) -> Plan:
    """Check the composed train config and build the env and agent configs from it.

    Raises ``ConfigError`` naming the offending key; nothing is compiled here.
    """
    try:
        # Merging onto the schema also checks configs that did not come through Hydra (the one
        # saved in a checkpoint, for evaluation).
        schema: TrainSchema = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainSchema), cfg))  # type: ignore[assignment]
    except Exception as e:  # unknown keys, wrong types, unresolvable interpolations
        raise ConfigError(" ".join(str(e).split())) from e
    check_bounds(schema, "")
    if schema.logger.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(
            f"logger.wandb.mode={schema.logger.wandb.mode!r}: allowed offline, online, disabled"
        )
    run = schema.run
    _check_video(run)
    for key in ("eval_every", "checkpoint_every"):
        every = getattr(run, key)
        if every % run.log_every:
            raise ConfigError(
                f"run.{key}={every} must be a multiple of run.log_every={run.log_every} "
                "(evaluation and checkpoints happen between compiled chunks)"
            )

    import lunarl.agents
    import lunarl.envs

    env_node = dict(schema.env)
    env_run_keys = {k: env_node.pop(k) for k in ENV_RUN_KEYS if k in env_node}
    if "name" not in env_run_keys:
        raise ConfigError("env.name is missing: choose an env with env=rover|car_track|kuka")
    try:
        env_run = EnvRunConfig.build(**env_run_keys)
    except ValueError as e:
        raise ConfigError(_user_message(e, "env")) from e
    try:
        env_cls = lunarl.envs.env_class(env_run.name)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"env.name={env_run.name!r}: {e}") from e
    try:
        env_config = env_cls.config_cls.build(**env_node)
    except ValueError as e:
        raise ConfigError(_user_message(e, "env")) from e

    agent_node = dict(schema.agent)
    agent_name = agent_node.pop("name", None)
    if agent_name is None:
        raise ConfigError(f"agent.name is missing: choose an agent with agent=NAME (known: {lunarl.agents.known()})")
    try:
        agent = lunarl.agents.get(agent_name)
    except ValueError as e:
        raise ConfigError(f"agent.name={agent_name!r}: {e}") from e
    config_class = agent.config_class
    for key, home in config_class.HOST_FIELDS.items():
        if key in agent_node:
            raise ConfigError(f"agent.{key} is derived by the train app; set {home} instead")
    episode_length = env_run.episode_length or env_cls.default_episode_length
    try:
        probe = config_class.build(**agent_node, num_envs=env_run.num_envs, episode_length=episode_length)
    except ValueError as e:
        raise ConfigError(_user_message(e, "agent")) from e
    # Whole chunks only, so every chunk is the same compiled program (and resumes line up).
    # run.total_env_steps counts the env steps of one seed.
    total_iterations = probe.iterations_for(run.total_env_steps, multiple_of=run.log_every)
    agent_config = probe.replace(total_iterations=total_iterations)
    from lunarl.run.objective import check_objective
    from lunarl.run.population import Population, PopulationError

    try:
        check_objective(run.objective)
        population = Population.build(schema.population, agent, agent_config, schema.seed, schema.num_seeds, run.log_every)
    except (PopulationError, ValueError) as e:
        raise ConfigError(str(e)) from e
    return Plan(
        cfg=schema,
        env_name=env_run.name,
        env_config=env_config,
        agent_name=agent_name,
        agent_config=agent_config,
        steps_per_iteration=agent_config.env_steps_per_iteration,
        total_iterations=total_iterations,
        population=population,
    )
