"""Hyperparameter populations (lunarl.run.population): P members as rows of one vmapped program
equal P separate runs; their hyperparameters survive a checkpoint; a PBT step copies exactly the
chosen members and perturbs only hyperparameters, deterministically; config errors name the key.
PPO on the tiny point-goal env of tests/test_ppo.py, so compiles stay small."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import numpy as np
import pytest
from conftest import fast_jit
from omegaconf import OmegaConf

import lunarl  # noqa: F401  (compat shim)
from lunarl.agents import ppo
from lunarl.run.checkpoint import Checkpoints
from lunarl.run.placement import Placement
from lunarl.run.population import Population, PopulationError, exploit_and_explore
from lunarl.run.programs import abstract_state, init_state, make_chunk, seed_keys
from lunarl.run.schema import PBTSchema, PopulationSchema

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ppo_toy_env import PointGoal  # noqa: E402

TINY = dict(num_envs=8, episode_length=8, unroll_length=8, num_minibatches=2, num_epochs=2,
            policy_hidden=(16, 16), value_hidden=(16, 16), total_iterations=3)
LEARNING_RATES = [1e-4, 1e-3, 3e-3, 1e-2]
SEED = 3
ITERATIONS = 3


def _population(cfg, size=4, seeds=1, pbt_every=0, log_every=ITERATIONS, **pbt):
    node = PopulationSchema(
        size=size,
        values={"agent": {"learning_rate": LEARNING_RATES[:size]}},
        pbt=PBTSchema(every=pbt_every, **pbt),
    )
    return Population.build(node, ppo.AGENT, cfg, SEED, seeds, log_every)


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


@pytest.fixture(scope="module")
def setting(fast_compile):
    return PointGoal(), ppo.PPOConfig.build(**TINY)


@pytest.fixture(scope="module")
def trained(setting):
    """The population after one chunk, its agent, and the compiled chunk."""
    env, cfg = setting
    pop = _population(cfg, pbt_every=ITERATIONS, quantile=0.5, resample_probability=0.0)
    agent = pop.agent(ppo.AGENT)
    ts = pop.assign(init_state(agent, env, cfg, pop.keys(SEED), Placement.for_seeds(pop.rows)))
    chunk = make_chunk(agent, env, ITERATIONS)
    ts, metrics, finite = chunk(ts)
    assert bool(finite)
    return pop, agent, chunk, ts, jax.device_get(metrics)


def test_population_of_learning_rates_equals_separate_runs(setting, trained):
    env, cfg = setting
    pop, _, _, ts, metrics = trained
    np.testing.assert_array_equal(metrics["hparams/learning_rate"][-1], np.float32(LEARNING_RATES))
    # PPO's init does not read the learning rate, so the separate runs share one init program.
    # The two extreme members: each separate run is its own compile (the rate is in its config).
    fresh = init_state(ppo.AGENT, env, cfg, seed_keys(SEED, 1), Placement.for_seeds(1))
    for m in (0, len(LEARNING_RATES) - 1):
        lr = LEARNING_RATES[m]
        single = _copy(fresh).replace(cfg=cfg.replace(learning_rate=lr))
        single, single_metrics, _ = make_chunk(ppo.AGENT, env, ITERATIONS)(single)
        # XLA batches the 4-row program differently from the 1-row one: equal to float rounding,
        # the same tolerance as tests/test_ppo.py's vmapped-seeds test.
        for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(ts.agent.params), strict=True):
            np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[m], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(single_metrics["charts/learning_rate"][:, 0], metrics["charts/learning_rate"][:, m], rtol=1e-7)
        np.testing.assert_allclose(single.obs_stats.mean[0], ts.agent.obs_stats.mean[m], rtol=1e-5, atol=1e-6)
    # The learning rates made a difference (the comparison above is not trivially true).
    kernel = np.asarray(ts.agent.params["params"]["actor"]["Dense_0"]["kernel"])
    assert not np.allclose(kernel[0], kernel[3], atol=1e-4)


def test_hyperparameters_survive_checkpoint_and_resume(setting, trained, tmp_path):
    env, cfg = setting
    pop, agent, chunk, ts, _ = trained
    placement = Placement.for_seeds(pop.rows)
    ckpts = Checkpoints(str(tmp_path / "checkpoints"), 2)
    ckpts.save(ITERATIONS, ts, {"seed": SEED}, {"iteration": ITERATIONS, "global_step": 0})
    ckpts.wait()
    restored, _, meta = ckpts.restore(ITERATIONS, abstract_state(agent, env, cfg, pop.rows, placement))
    ckpts.close()
    assert meta["iteration"] == ITERATIONS
    np.testing.assert_array_equal(restored.agent.hparams["learning_rate"], np.float32(LEARNING_RATES))
    for a, b in zip(jax.tree.leaves(ts), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    # Training on from the restored state is training on from the original, bit for bit.
    a, ma, _ = chunk(_copy(ts))
    b, mb, _ = chunk(restored)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(ma["hparams/learning_rate"], mb["hparams/learning_rate"])


def test_pbt_copies_the_chosen_members_and_perturbs_only_hyperparameters(trained):
    pop, agent, _, ts, _ = trained
    assert bool(np.all(ts.scored)), "every row must have finished an episode for PBT to act"
    step = fast_jit(lambda t, k: exploit_and_explore(pop, agent, t, k))
    key = pop.pbt_key(ITERATIONS)
    new, record = jax.device_get(step(_copy(ts), key))
    again, record_again = jax.device_get(step(_copy(ts), key))
    for x, y in zip(jax.tree.leaves((new, record)), jax.tree.leaves((again, record_again)), strict=True):
        np.testing.assert_array_equal(x, y)  # deterministic under a fixed key

    before = jax.device_get(ts)
    score = np.asarray(before.score)
    order = np.argsort(score, kind="stable")
    losers, winners = set(order[:2].tolist()), set(order[2:].tolist())
    source = np.asarray(record["source"])
    assert bool(record["applied"])
    assert {m for m in range(4) if source[m] != m} == losers
    assert all(int(source[m]) in winners for m in losers)
    np.testing.assert_array_equal(record["score"], score)

    lr_before = np.asarray(before.agent.hparams["learning_rate"])
    lr_after = np.asarray(new.agent.hparams["learning_rate"])
    def pick(tree, row):
        return jax.tree.map(lambda leaf: np.asarray(leaf)[row], tree)

    for m in range(4):
        src = int(source[m])
        # Learned state (parameters, optimiser, normaliser, counters, rng) and the score: the source's.
        learned_new = dataclasses.replace(pick(new.agent, m), hparams={}, env_state=None)
        learned_src = dataclasses.replace(pick(before.agent, src), hparams={}, env_state=None)
        for x, y in zip(jax.tree.leaves(learned_new), jax.tree.leaves(learned_src), strict=True):
            np.testing.assert_array_equal(x, y)
        assert new.score[m] == before.score[src]
        # The env batch stays with its row: no episode is cut.
        for x, y in zip(jax.tree.leaves(pick(new.agent.env_state, m)), jax.tree.leaves(pick(before.agent.env_state, m)), strict=True):
            np.testing.assert_array_equal(x, y)
        if m in losers:
            ratio = lr_after[m] / lr_before[src]
            assert np.isclose(ratio, 0.8, rtol=1e-6) or np.isclose(ratio, 1.25, rtol=1e-6), ratio
        else:
            assert lr_after[m] == lr_before[m]
    np.testing.assert_array_equal(record["hparams"]["learning_rate"], lr_after)

    other, other_record = jax.device_get(step(_copy(ts), pop.pbt_key(ITERATIONS + 1)))
    assert not (np.array_equal(other_record["source"], source) and np.array_equal(other.agent.hparams["learning_rate"], lr_after)), \
        "another key must be able to choose differently"


def test_pbt_waits_until_every_member_has_a_score(trained):
    pop, agent, _, ts, _ = trained
    fresh = _copy(ts).replace(scored=ts.scored.at[1].set(False))
    new, record = jax.device_get(fast_jit(lambda t, k: exploit_and_explore(pop, agent, t, k))(fresh, pop.pbt_key(0)))
    assert not bool(record["applied"])
    np.testing.assert_array_equal(record["source"], np.arange(4))
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(jax.device_get(fresh)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_ranges_are_drawn_from_the_seed_one_per_slice(setting):
    _, cfg = setting
    node = lambda seed: Population.build(  # noqa: E731
        PopulationSchema(size=8, ranges={"agent": {"learning_rate": [1e-5, 1e-2, "log"], "gamma": [0.9, 0.999]}}),
        ppo.AGENT, cfg, seed, 2, 10,
    )
    a, b, c = node(0), node(0), node(1)
    for name in ("learning_rate", "gamma"):
        np.testing.assert_array_equal(a.table[name], b.table[name])
        assert not np.array_equal(a.table[name], c.table[name])
    slices = np.floor((np.log(a.table["learning_rate"]) - np.log(1e-5)) / (np.log(1e-2) - np.log(1e-5)) * 8)
    assert sorted(slices.astype(int).tolist()) == list(range(8))
    assert np.all((a.table["gamma"] >= 0.9) & (a.table["gamma"] <= 0.999))
    assert a.rows == 16
    np.testing.assert_array_equal(a.row_values()["gamma"], np.repeat(a.table["gamma"], 2))
    keys = np.asarray(a.keys(SEED))
    np.testing.assert_array_equal(keys[2:4], np.asarray(seed_keys(SEED, 2)))  # member 1 = the plain seeds


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (dict(size=4), "population.size=4 needs hyperparameters"),
        (dict(size=2, ranges={"agent": {"num_epochs": [1, 4]}}), "population.ranges.agent.num_epochs"),
        (dict(size=2, values={"agent": {"learning_rate": [1e-3]}}), "population.values.agent.learning_rate"),
        (dict(size=2, values={"agent": {"gamma": [0.9, 1.5]}}), "population.values.agent.gamma: value 1.5 is out of range"),
        (dict(size=2, ranges={"agent": {"learning_rate": [1e-3, 1e-4]}}), "low must be below high"),
        (dict(size=2, ranges={"env": {"speed": [0.1, 0.2]}}), "population.ranges.env"),
        (dict(size=2, ranges={"agent": {"learning_rate": [1e-4, 1e-3]}}, pbt=PBTSchema(every=15)), "multiple of run.log_every=10"),
        (dict(size=1, pbt=PBTSchema(every=10)), "needs a population"),
    ],
)
def test_bad_population_settings_name_the_key(setting, node, message):
    _, cfg = setting
    with pytest.raises(PopulationError, match=message.replace("[", r"\[").replace(".", r"\.")):
        Population.build(PopulationSchema(**node), ppo.AGENT, cfg, 0, 1, 10)


def test_no_population_by_default(setting):
    _, cfg = setting
    assert Population.build(OmegaConf.structured(PopulationSchema), ppo.AGENT, cfg, 0, 1, 10) is None


# --------------------------------------------------------------------------------------------
# Through the train app: the contract's counter agent (tests/counter_agent.py), 2 members x 2 seeds
# --------------------------------------------------------------------------------------------

POPULATION_ARGS = ["population.size=2", "population.values.agent.learning_rate=[0.001,0.05]", "population.pbt.every=2",
                   "population.pbt.quantile=0.5"]


def _train_population(app_env, run_dir: pathlib.Path, chunks: int):
    from conftest import run_app

    from tests.test_agent_contract import COUNTER, STEPS_PER_CHUNK

    proc = run_app(app_env, "lunarl.train", *COUNTER, *POPULATION_ARGS, f"run.total_env_steps={chunks * STEPS_PER_CHUNK}",
                   f"run.dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _lines(path: pathlib.Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def population_run(tmp_path_factory, app_env) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("population") / "full"
    _train_population(app_env, run_dir, 3)
    return run_dir


def test_population_trains_logs_members_and_checkpoints_through_the_app(population_run):
    from lunarl.run.restore import restore_run

    lines = _lines(population_run / "population.jsonl")
    assert [(line["iteration"], line["event"]) for line in lines] == [(0, "init"), (2, "pbt"), (4, "pbt"), (6, "pbt")]
    assert lines[0]["hparams"]["learning_rate"] == pytest.approx([0.001, 0.05])
    assert all(len(line["copies"]) == 1 and len(line["score"]) == 2 for line in lines[1:])
    rows = [r for r in _lines(population_run / "metrics.jsonl") if "toy/loss" in r]
    assert [r["iteration"] for r in rows] == [2, 4, 6]
    for r in rows:  # members (means over their seeds) and the best one under the plain keys
        best = int(r["population/best_member"])
        assert r["toy/loss"] == r[f"member{best}/toy/loss"]
        assert {"member0/hparams/learning_rate", "member1/hparams/learning_rate", "seed1/toy/loss"} <= set(r)
    evals = [r for r in _lines(population_run / "metrics.jsonl") if "eval/success_rate" in r]
    assert all("member1/eval/episode_return" in r and "population/best_eval_member" in r for r in evals)
    # The checkpoint holds every row's hyperparameters: those of the last PBT step, per seed.
    saved = restore_run(str(population_run / "checkpoints"), "latest")
    assert saved.meta["iteration"] == 6 and saved.plan.num_rows == 4
    np.testing.assert_allclose(saved.state.agent.hparams["learning_rate"], np.repeat(lines[-1]["hparams"]["learning_rate"], 2), rtol=1e-6)


@pytest.mark.slow
def test_a_resumed_population_with_pbt_ends_as_an_uninterrupted_one(population_run, tmp_path, app_env):
    from lunarl.run.restore import restore_run

    resumed = tmp_path / "resumed"
    _train_population(app_env, resumed, 2)
    proc = _train_population(app_env, resumed, 3)
    assert "resuming from checkpoint at iteration 4" in proc.stdout
    a = restore_run(str(population_run / "checkpoints"), "latest").state
    b = restore_run(str(resumed / "checkpoints"), "latest").state
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert _lines(population_run / "population.jsonl") == _lines(resumed / "population.jsonl")


@pytest.mark.parametrize(("agent_name", "varied"), [("ppo", "entropy_coef"), ("sac", "tau"), ("dreamer", "actor_lr")])
def test_every_agent_holds_its_hyperparameters_in_the_state(agent_name, varied):
    """Through the contract only (traced, nothing compiled): the population state of each agent
    carries a float32 [rows] leaf per varied hyperparameter, and the agent reads it in train_step."""
    from lunarl import agents
    from lunarl.run.programs import state_shapes

    agent = agents.get(agent_name)
    assert varied in agent.hyperparameters
    env = PointGoal()
    small = {"ppo": {}, "sac": dict(buffer_size=64, batch_size=8, warmup_steps=0),
             "dreamer": dict(buffer_size=64, batch_size=2, seq_len=4)}[agent_name]
    cfg = agent.config_class.build(num_envs=2, episode_length=8, **small)
    default = float(getattr(cfg, varied))
    pop = Population.build(PopulationSchema(size=2, values={"agent": {varied: [default, default * 0.5]}}), agent, cfg, 0, 2, 1)
    wrapped = pop.agent(agent)
    shapes = state_shapes(wrapped, env, cfg, pop.rows)
    assert shapes.agent.hparams[varied].shape == (4,) and shapes.agent.hparams[varied].dtype == np.float32
    one_row = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), shapes)
    _, metrics = jax.eval_shape(wrapped.train_step, one_row)
    assert metrics[f"hparams/{varied}"].shape == ()
    # The agent's train_step reads the value: its program takes the leaf as an input.
    jaxpr = jax.make_jaxpr(wrapped.train_step)(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), one_row))
    leaves = jax.tree_util.tree_leaves_with_path(one_row)
    index = [i for i, (path, _) in enumerate(leaves) if varied in jax.tree_util.keystr(path)]
    assert len(index) == 1
    assert id(jaxpr.jaxpr.invars[index[0]]) in {id(v) for eqn in jaxpr.jaxpr.eqns for v in eqn.invars}
