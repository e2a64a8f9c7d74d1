"""Hyperparameter populations trained as one XLA program, and population-based training (PBT).

A population of ``P`` members with ``S`` seeds each reuses the run's leading seed axis: the
stacked TrainState has ``R = P * S`` rows, member-major (row ``m * S + s`` is seed ``s`` of member
``m``), and every row trains with its own hyperparameter values, stored as float32 arrays in the
agent's TrainState (``hparams``, read by the agent with ``lunarl.agents.base.hyperparameter``). So
placement, the compiled chunk, the evaluator and Orbax checkpoints need nothing new: they see
``R`` seeds. Row ``m * S + s`` starts from the key of seed ``s`` of a plain run with the same
``seed`` and is evaluated on the same episodes, so member ``m`` is the run a user would get by
setting its hyperparameters by hand (``tests/test_population.py`` checks this parameter for
parameter).

Which fields may vary is the agent's declaration (``Agent.hyperparameters``: floats that change
no shape). Values come from ``population.ranges.agent.NAME=[low, high]`` or ``[low, high, log]``
(drawn from ``seed``, stratified: one draw in each of ``P`` equal slices of the range, in a
shuffled order, so even 4 members cover the range) or ``population.values.agent.NAME=[v1, ..., vP]``.

``population_agent`` wraps the agent so that its state (``MemberState``) also keeps a running
average of each row's training episode return (``score``) and logs it with the row's
hyperparameters (``population/score``, ``hparams/NAME``). Rows are reported per member (the
mean over its seeds) under ``member{m}/...``; the plain keys, and so the console, show the best
member: by ``score`` for training rows, by evaluation success rate and then return for
evaluations (so ``eval/...`` and the best checkpoint follow the best member).

PBT (``population.pbt.every=N`` iterations, a multiple of ``run.log_every``): after the
evaluation at such an iteration, one jitted program ranks members by score, and each member in
the worst ``quantile`` copies every non-env leaf of a member drawn from the best ``quantile``
(parameters, optimiser state, normaliser, its score and hyperparameters; each member keeps its
own envs, so no episode is cut) and then perturbs the copied hyperparameters (x a factor drawn
from ``perturb``, or, with probability ``resample_probability``, a fresh draw from the range or
the listed values), clipped to the agent config's bounds. The keys come from ``seed`` and the
iteration, and nothing is decided on the host, so a PBT run is deterministic and a resumed one
continues exactly. The host only writes the step's record (who copied whom, scores,
hyperparameters) to ``RUN_DIR/population.jsonl``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from omegaconf import DictConfig, ListConfig, OmegaConf

from lunarl.agents.base import EPISODE_RETURN, REPLICATED, Agent, with_hyperparameters
from lunarl.config import range_violation
from lunarl.run.evaluation import eval_keys, eval_row
from lunarl.run.metrics import reduce_chunk
from lunarl.run.programs import seed_keys

__all__ = [
    "MemberState",
    "Population",
    "exploit_and_explore",
    "member_rows",
    "population_agent",
]

SCORE = "population/score"
_PBT_SALT = 0x9B7  # PBT keys never collide with training or evaluation keys
_DRAW_SALT = 0x9095  # nor the draws of the initial hyperparameters


class PopulationError(ValueError):
    """A bad ``population.*`` setting; the train app reports it as a ``ConfigError``."""


@dataclasses.dataclass(frozen=True)
class PBT:
    every: int
    quantile: float
    perturb: tuple[float, ...]
    resample_probability: float
    smoothing: float


@dataclasses.dataclass(frozen=True)
class Population:
    """The members' hyperparameters and how they train: built by ``Population.build``.

    ``table`` maps each varied hyperparameter to its ``P`` member values; ``bounds`` are the
    agent config's allowed ranges (PBT clips to them); ``ranges`` are the ``(low, high, log)``
    draws and ``choices`` the listed values, which PBT resamples from.
    """

    size: int
    seeds: int
    table: Mapping[str, np.ndarray]
    bounds: Mapping[str, tuple[float | None, float | None]]
    ranges: Mapping[str, tuple[float, float, bool]]
    choices: Mapping[str, np.ndarray]
    pbt: PBT | None
    seed: int
    smoothing: float = 0.9  # of the running score (population.pbt.smoothing; used with or without PBT)

    @property
    def rows(self) -> int:
        return self.size * self.seeds

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.table)

    # ----------------------------------------------------------------------------------------
    # From config
    # ----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, node: Any, agent: Agent, agent_config: Any, seed: int, num_seeds: int, log_every: int) -> Population | None:
        """The population of ``node`` (the ``population`` config: ``size``, ``ranges``,
        ``values``, ``pbt``), or None when none is configured. Raises ``PopulationError``
        naming the key."""
        node = _fields(node)
        size = int(node["size"])
        ranges_node = _group(node["ranges"], "population.ranges")
        values_node = _group(node["values"], "population.values")
        pbt_node = _fields(node["pbt"])
        if size == 1 and not ranges_node and not values_node:
            if pbt_node["every"]:
                raise PopulationError(f"population.pbt.every={pbt_node['every']} needs a population: set population.size and population.ranges or population.values")
            return None
        if not ranges_node and not values_node:
            raise PopulationError(
                f"population.size={size} needs hyperparameters that differ: set population.ranges.agent.NAME=[low,high] "
                f"or population.values.agent.NAME=[...] (agent {agent.name!r} allows {', '.join(agent.hyperparameters) or 'none'})"
            )
        fields = {f.name: f for f in dataclasses.fields(agent_config)}
        rng = np.random.default_rng([seed, _DRAW_SALT])
        table: dict[str, np.ndarray] = {}
        ranges: dict[str, tuple[float, float, bool]] = {}
        choices: dict[str, np.ndarray] = {}
        for name in sorted(set(ranges_node) | set(values_node)):
            if name not in agent.hyperparameters:
                where = "population.ranges" if name in ranges_node else "population.values"
                raise PopulationError(
                    f"{where}.agent.{name}: agent {agent.name!r} cannot vary {name!r} within one program; "
                    f"it allows {', '.join(agent.hyperparameters) or 'none'}"
                )
            if name in ranges_node and name in values_node:
                raise PopulationError(f"population.ranges.agent.{name} and population.values.agent.{name}: set one of them")
            if name in ranges_node:
                low, high, log = _range(ranges_node[name], f"population.ranges.agent.{name}")
                ranges[name] = (low, high, log)
                u = (rng.permutation(size) + rng.random(size)) / size
                values = np.exp(math.log(low) + u * (math.log(high) - math.log(low))) if log else low + u * (high - low)
            else:
                values = _listed(values_node[name], size, f"population.values.agent.{name}")
                choices[name] = values
            for v in values:
                problem = range_violation(fields[name], float(v))
                if problem:
                    key = "ranges" if name in ranges_node else "values"
                    raise PopulationError(f"population.{key}.agent.{name}: value {float(v):g} {problem}")
            table[name] = np.asarray(values, np.float32)
        pbt = None
        if pbt_node["every"]:
            every = int(pbt_node["every"])
            if every % log_every:
                raise PopulationError(
                    f"population.pbt.every={every} must be a multiple of run.log_every={log_every} "
                    "(PBT steps happen between compiled chunks)"
                )
            if size < 2:
                raise PopulationError(f"population.pbt.every={every} needs population.size >= 2")
            perturb = tuple(float(f) for f in pbt_node["perturb"])
            if not perturb or any(f <= 0 for f in perturb):
                raise PopulationError(f"population.pbt.perturb={list(perturb)} must be positive factors")
            pbt = PBT(every, float(pbt_node["quantile"]), perturb, float(pbt_node["resample_probability"]), float(pbt_node["smoothing"]))
        bounds = {name: fields[name].metadata.get("range", (None, None)) for name in table}
        return cls(size, num_seeds, table, bounds, ranges, choices, pbt, seed, float(pbt_node["smoothing"]))

    # ----------------------------------------------------------------------------------------
    # Rows
    # ----------------------------------------------------------------------------------------

    def keys(self, seed: int) -> jax.Array:
        """Init keys of the ``R`` rows: member ``m``'s seed ``s`` gets plain seed ``s``'s key."""
        return jnp.tile(seed_keys(seed, self.seeds), (self.size, 1))

    def eval_keys(self, seed: int, iteration: int) -> jax.Array:
        """Evaluation keys of the rows: every member is evaluated on its plain seeds' episodes."""
        return jnp.tile(eval_keys(seed, iteration, self.seeds), (self.size, 1))

    def row_values(self) -> dict[str, np.ndarray]:
        """Each varied hyperparameter per row, float32 ``[R]``."""
        return {k: np.repeat(v, self.seeds) for k, v in self.table.items()}

    def agent(self, agent: Agent) -> Agent:
        return population_agent(agent, self.table, self.smoothing)

    def assign(self, ts: Any) -> Any:
        """The stacked ``MemberState`` with every row's hyperparameters set, placed as it was."""
        values = self.row_values()

        def put(ms: MemberState) -> MemberState:
            return ms.replace(agent=with_hyperparameters(ms.agent, values))

        shardings = jax.tree.map(lambda x: x.sharding, ts)
        return jax.jit(put, out_shardings=shardings, donate_argnums=0)(ts)

    def chunk_row(self, metrics: Mapping[str, np.ndarray], agent: Agent) -> dict[str, float]:
        """A chunk's log row (metrics ``[K, R]``): the best member by score under the plain keys
        (and its seeds under ``seed{i}/``), each member's means under ``member{m}/``."""
        rows = [
            reduce_chunk({k: np.asarray(v)[:, m * self.seeds:(m + 1) * self.seeds] for k, v in metrics.items()},
                         agent.episode_statistics, agent.episode_count, agent.running_totals)
            for m in range(self.size)
        ]  # fmt: skip
        best = int(np.argmax([r.get(SCORE, -np.inf) if np.isfinite(r.get(SCORE, np.nan)) else -np.inf for r in rows]))
        return member_rows(rows, best, "population/best_member")

    def eval_row(self, result: Mapping[str, np.ndarray]) -> dict[str, float]:
        """An evaluation's log row (``[R, N]`` episodes): the best member by success rate, then
        return, under the plain ``eval/`` keys, each member under ``member{m}/eval/``."""
        rows = [eval_row({k: np.asarray(v)[m * self.seeds:(m + 1) * self.seeds] for k, v in result.items()}) for m in range(self.size)]
        best = max(range(self.size), key=lambda m: (rows[m]["eval/success_rate"], rows[m]["eval/episode_return"], -m))
        return member_rows(rows, best, "population/best_eval_member")

    def pbt_due(self, iteration: int, total: int) -> bool:
        # Also at the run's last iteration (after its final evaluation): a run resumed with a
        # larger run.total_env_steps then continues exactly as one that ran on in one go.
        return self.pbt is not None and iteration % self.pbt.every == 0

    def pbt_key(self, iteration: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), _PBT_SALT), iteration)

    def describe(self) -> str:
        spread = ", ".join(f"{k} {v.min():.3g}..{v.max():.3g}" for k, v in self.table.items())
        pbt = f"; PBT every {self.pbt.every} iterations" if self.pbt else ""
        return f"population of {self.size} x {self.seeds} seed(s) ({spread}){pbt}"


def _fields(node: Any) -> dict[str, Any]:
    """A schema dataclass or a mapping as a dict (``values`` is a method of a DictConfig)."""
    if dataclasses.is_dataclass(node):
        node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    return {k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v for k, v in dict(node).items()}


def _group(node: Any, key: str) -> dict[str, Any]:
    """The ``agent`` entries of ``population.ranges`` / ``population.values``."""
    node = dict(node or {})
    other = sorted(set(node) - {"agent"})
    if other:
        raise PopulationError(f"{key}.{other[0]}: only agent hyperparameters can vary ({key}.agent.NAME=...)")
    return dict(node.get("agent") or {})


def _range(spec: Any, key: str) -> tuple[float, float, bool]:
    spec = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    log = len(spec) == 3 and spec[2] == "log"
    if len(spec) not in (2, 3) or (len(spec) == 3 and not log) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[:2]):
        raise PopulationError(f"{key}={spec}: give [low,high] or [low,high,log]")
    low, high = float(spec[0]), float(spec[1])
    if not low < high:
        raise PopulationError(f"{key}={spec}: low must be below high")
    if log and low <= 0:
        raise PopulationError(f"{key}={spec}: a log range needs low > 0")
    return low, high, log


def _listed(spec: Any, size: int, key: str) -> np.ndarray:
    spec = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if len(spec) != size or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec):
        raise PopulationError(f"{key}={spec}: give population.size={size} numbers")
    return np.asarray(spec, np.float64)


def member_rows(rows: list[dict[str, float]], best: int, best_key: str) -> dict[str, float]:
    """One log row from per-member rows: ``rows[best]`` as it is, every member's plain keys
    under ``member{m}/``, and ``best_key``: ``best``."""
    out = dict(rows[best])
    for m, row in enumerate(rows):
        out.update({f"member{m}/{k}": v for k, v in row.items() if not k.startswith("seed")})
    out[best_key] = float(best)
    return out


# --------------------------------------------------------------------------------------------
# The agent of one row, with its score
# --------------------------------------------------------------------------------------------


class MemberState(struct.PyTreeNode):
    """One row of a population: the agent's TrainState and its running score."""

    agent: Any
    score: jax.Array  # float32: running average of the training episode return
    scored: jax.Array  # bool: an episode has finished, so ``score`` means something


def population_agent(agent: Agent, defaults: Mapping[str, Any], smoothing: float = 0.9) -> Agent:
    """``agent`` as a population row: its state is a ``MemberState`` whose agent state holds the
    hyperparameters named in ``defaults`` (init puts the config's values there; the host then
    sets each row's own), and whose score is ``smoothing * score + (1 - smoothing) * return``
    over the iterations in which episodes finished."""
    if EPISODE_RETURN not in agent.metric_names:
        raise ValueError(f"agent {agent.name!r} logs no {EPISODE_RETURN}: a population has nothing to rank members by")
    names = tuple(defaults)
    extra = (SCORE, *(f"hparams/{k}" for k in names))

    def init(rng: jax.Array, env: Any, cfg: Any) -> MemberState:
        ts = with_hyperparameters(agent.init(rng, env, cfg), {k: getattr(cfg, k) for k in names})
        return MemberState(ts, jnp.zeros((), jnp.float32), jnp.zeros((), bool))

    def train_step(ms: MemberState) -> tuple[MemberState, dict[str, jax.Array]]:
        ts, metrics = agent.train_step(ms.agent)
        finished = metrics[agent.episode_count] > 0
        ret = metrics[EPISODE_RETURN]
        smoothed = jnp.where(ms.scored, smoothing * ms.score + (1.0 - smoothing) * ret, ret)
        score = jnp.where(finished, smoothed, ms.score)
        out = MemberState(ts, score, ms.scored | finished)
        metrics = {**metrics, SCORE: score, **{f"hparams/{k}": ts.hparams[k] for k in names}}
        return out, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    def env_axes(ms: MemberState) -> MemberState:
        return MemberState(agent.env_axes(ms.agent), REPLICATED, REPLICATED)

    return dataclasses.replace(
        agent,
        init=init,
        train_step=train_step,
        policy_params=lambda ms: agent.policy_params(ms.agent),
        env_axes=env_axes,
        env_state=lambda ms: agent.env_state(ms.agent),
        metric_names=(*agent.metric_names, *extra),
        running_totals=(*agent.running_totals, *extra),
    )


# --------------------------------------------------------------------------------------------
# PBT
# --------------------------------------------------------------------------------------------


def exploit_and_explore(population: Population, agent: Agent, ts: MemberState, key: jax.Array) -> tuple[MemberState, dict]:
    """One PBT step on the stacked ``[R]`` state (pure; jit it). ``agent`` is the population's
    (wrapped) agent, whose ``env_axes`` say which leaves stay with their row.

    Returns the new state and a record: ``source[P]`` (the member each member's state now comes
    from; itself when untouched), ``replaced[P]``, ``score[P]`` (before the step) and the
    hyperparameters ``[P]`` after it. Does nothing until every row has a score.
    """
    pbt = population.pbt
    assert pbt is not None
    P, S = population.size, population.seeds
    k = max(1, int(math.floor(pbt.quantile * P)))
    k_pick, k_factor, k_resample, k_draw = jax.random.split(key, 4)

    score = jnp.where(ts.scored, ts.score, -jnp.inf).reshape(P, S).mean(axis=1)
    ready = jnp.all(ts.scored)
    order = jnp.argsort(score, stable=True)  # worst first; ties by member index
    losers, winners = order[:k], order[P - k:]
    picked = winners[jax.random.randint(k_pick, (k,), 0, k)]
    source = jnp.where(ready, jnp.arange(P).at[losers].set(picked), jnp.arange(P))
    replaced = source != jnp.arange(P)
    row_source = (source[:, None] * S + jnp.arange(S)[None, :]).reshape(-1)

    one_row = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), ts)
    specs = agent.env_axes(one_row)
    copied = jax.tree.map(lambda spec, x: x if len(spec) else x[row_source], specs, ts)

    hparams = dict(copied.agent.hparams)
    record_hparams = {}
    for i, name in enumerate(population.names):
        current = hparams[name].reshape(P, S)[:, 0]  # the source's value, after the copy
        factors = jnp.asarray(pbt.perturb, jnp.float32)[jax.random.randint(jax.random.fold_in(k_factor, i), (P,), 0, len(pbt.perturb))]
        explored = current * factors
        if pbt.resample_probability > 0:
            resample = jax.random.uniform(jax.random.fold_in(k_resample, i), (P,)) < pbt.resample_probability
            explored = jnp.where(resample, _draw(population, name, jax.random.fold_in(k_draw, i), P), explored)
        low, high = population.bounds[name]
        explored = jnp.clip(explored, low, high)
        member = jnp.where(replaced, explored, current).astype(jnp.float32)
        record_hparams[name] = member
        hparams[name] = jnp.repeat(member, S)
    new = copied.replace(agent=copied.agent.replace(hparams=hparams))
    return new, {"source": source, "replaced": replaced, "score": score, "applied": ready, "hparams": record_hparams}


def _draw(population: Population, name: str, key: jax.Array, n: int) -> jax.Array:
    """``n`` fresh values of ``name``: from its range, or one of its listed values."""
    if name in population.ranges:
        low, high, log = population.ranges[name]
        u = jax.random.uniform(key, (n,))
        if log:
            return jnp.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        return low + u * (high - low)
    listed = jnp.asarray(population.choices[name], jnp.float32)
    return listed[jax.random.randint(key, (n,), 0, listed.shape[0])]


class PopulationLog:
    """``RUN_DIR/population.jsonl``: the initial hyperparameters, then one line per PBT step
    (iteration, scores, who copied whom, hyperparameters after the step). On resume the lines
    after the checkpoint's iteration are dropped, like ``metrics.jsonl``'s rows."""

    def __init__(self, path: Path, enabled: bool = True):
        from lunarl.run.logger import JsonlWriter

        self.writer = JsonlWriter(path, enabled)

    def start(self, population: Population, iteration: int) -> None:
        if iteration == 0:
            self.writer.drop_after(-1)
            self.writer.write({"iteration": 0, "global_step": 0, "event": "init", "hparams": {k: v.tolist() for k, v in population.table.items()}})
        else:
            self.writer.drop_after(iteration)

    def pbt(self, meta: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
        record = jax.device_get(record)
        source = [int(s) for s in record["source"]]
        line = {
            **meta,
            "event": "pbt" if bool(record["applied"]) else "pbt-skipped (a member has no finished episode yet)",
            "score": [float(s) for s in record["score"]],
            "copies": [{"member": m, "from": s} for m, s in enumerate(source) if s != m],
            "hparams": {k: [float(x) for x in v] for k, v in record["hparams"].items()},
        }
        self.writer.write(line)
        return line


class PopulationRun:
    """What the host loop needs from a population: the rows, the wrapped agent, the row keys,
    the per-member log rows and the PBT step between chunks (compiled once)."""

    def __init__(self, population: Population, agent: Agent, run_dir: Path | None, enabled: bool = True):
        self.population = population
        self.agent = population.agent(agent)
        self.log = PopulationLog(run_dir / "population.jsonl", enabled) if run_dir is not None else None
        self._pbt = None

    def keys(self, seed: int) -> jax.Array:
        return self.population.keys(seed)

    def eval_keys(self, seed: int, iteration: int) -> jax.Array:
        return self.population.eval_keys(seed, iteration)

    def start(self, ts: Any, iteration: int) -> Any:
        """A fresh state (``iteration`` 0) gets its rows' hyperparameters; ``population.jsonl``
        starts over, or loses the lines after a resumed checkpoint."""
        if iteration == 0:
            ts = self.population.assign(ts)
        if self.log is not None:
            self.log.start(self.population, iteration)
        return ts

    def chunk_row(self, metrics: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self.population.chunk_row(metrics, self.agent)

    def eval_row(self, result: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self.population.eval_row(result)

    def after_evaluation(self, ts: Any, iteration: int, total: int, meta: Mapping[str, Any], print_fn: Any) -> Any:
        """The PBT step when one is due at ``iteration`` (``ts`` is donated), else ``ts``."""
        if not self.population.pbt_due(iteration, total):
            return ts
        if self._pbt is None:
            shardings = jax.tree.map(lambda x: x.sharding, ts)
            step = lambda t, k: exploit_and_explore(self.population, self.agent, t, k)  # noqa: E731
            self._pbt = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))
        ts, record = self._pbt(ts, self.population.pbt_key(iteration))
        if self.log is not None:
            line = self.log.pbt(meta, record)
            copies = ", ".join(f"{c['member']}<-{c['from']}" for c in line["copies"]) or "none"
            print_fn(f"PBT @ iteration {iteration}: copies {copies}")
        return ts
