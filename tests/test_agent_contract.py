"""The agent contract (lunarl issue 12): an agent that is not PPO, with a recurrent carry, goes
through the real host side unchanged.

``tests/counter_agent.py`` carries a step counter that must be reset at every episode start; it
trains through the compiled chunk (whose input is donated), is evaluated through the one rollout
with its carry, runs through ``python -m lunarl.train`` / ``lunarl.evaluate`` with its own
``tests/conf/agent/counter.yaml``, checkpoints and resumes bit-identically from a checkpoint
written with 2 devices onto 1 (same-device resume is covered for PPO in ``test_train_app.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, assert_same_state, final_state, run_app

import lunarl
from lunarl.agents import get as get_agent
from lunarl.agents.base import SEED_AXIS_NAME, reset_carry, seed_cond
from lunarl.run.evaluation import rollout
from lunarl.run.placement import Placement
from lunarl.run.programs import init_state, make_chunk, seed_keys
from tests import counter_agent

pytestmark = pytest.mark.timeout(900)

EPISODE = 5


@pytest.fixture(scope="module")
def setting():
    env = lunarl.envs.make("rover")
    cfg = counter_agent.CounterConfig.build(num_envs=4, episode_length=EPISODE, unroll_length=8)
    return env, cfg


def test_agent_is_found_by_module_path():
    assert get_agent("tests.counter_agent") is counter_agent.AGENT


def test_reset_carry_replaces_only_the_envs_that_start():
    carry = {"count": jnp.array([3, 4, 5]), "h": jnp.ones((3, 2))}
    initial = {"count": jnp.zeros(3, jnp.int32), "h": jnp.zeros((3, 2))}
    out = reset_carry(carry, initial, jnp.array([False, True, False]))
    np.testing.assert_array_equal(out["count"], [3, 0, 5])
    np.testing.assert_array_equal(out["h"], [[1, 1], [0, 0], [1, 1]])


def test_training_resets_the_carry_at_every_episode_start_and_donates_the_state(setting):
    env, cfg = setting
    placement = Placement.for_seeds(2)
    ts = init_state(counter_agent.AGENT, env, cfg, seed_keys(0, 2), placement)
    before = jax.tree.leaves(ts)
    chunk = make_chunk(counter_agent.AGENT, env, 3)
    ts, metrics, finite = chunk(ts)
    assert bool(finite)
    # The donated input's buffers now belong to the output.
    assert all(x.is_deleted() for x in before)
    assert not any(x.is_deleted() for x in jax.tree.leaves(ts))
    # 3 iterations x 8 steps of 5-step episodes: several resets per env, all exact.
    np.testing.assert_array_equal(metrics["toy/carry_mismatches"], 0)
    assert float(np.max(metrics["toy/max_count"])) == EPISODE - 1
    assert float(np.sum(metrics["charts/episodes_finished"])) == 2 * 4 * (24 // EPISODE)
    np.testing.assert_array_equal(metrics["charts/episode_length"][1:], EPISODE)
    # The env's State.metrics, averaged over each seed's envs after every iteration, under env/.
    state_metrics = ts.env_state.metrics
    assert {k for k in metrics if k.startswith("env/")} == {f"env/{k}" for k in state_metrics}
    for key, values in state_metrics.items():
        assert metrics[f"env/{key}"].shape == (3, 2)
        np.testing.assert_allclose(metrics[f"env/{key}"][-1], np.asarray(values).mean(axis=1), rtol=1e-6, err_msg=key)


def _counted_cond(calls: list[int]):
    """``seed_cond`` whose true branch (x + 1) records each time it runs."""

    def taken(x):
        jax.debug.callback(lambda: calls.append(1))
        return x + 1.0

    return lambda pred, x: seed_cond(pred, taken, lambda x: x - 1.0, x)


def test_seed_cond_runs_the_branch_only_when_some_seed_takes_it_and_keeps_each_seeds_result():
    calls: list[int] = []
    per_seed = jax.jit(jax.vmap(_counted_cond(calls), axis_name=SEED_AXIS_NAME))
    x = jnp.array([10.0, 20.0, 30.0])
    # No seed takes it: the branch's work is skipped (``lax.cond`` under vmap would run it).
    np.testing.assert_array_equal(per_seed(jnp.array([False, False, False]), x), [9, 19, 29])
    jax.effects_barrier()
    assert calls == []
    # Some do: each seed gets its own branch's result, as ``lax.cond`` per seed would give.
    np.testing.assert_array_equal(per_seed(jnp.array([True, False, True]), x), [11, 19, 31])
    jax.effects_barrier()
    assert len(calls) == 1
    # Outside the seed vmap it is ``lax.cond``.
    one_seed = jax.jit(_counted_cond(calls))
    assert float(one_seed(jnp.bool_(False), jnp.float32(5))) == 4.0
    assert float(one_seed(jnp.bool_(True), jnp.float32(5))) == 6.0
    jax.effects_barrier()
    assert len(calls) == 2


def test_the_hosts_chunk_names_the_seed_axis_so_a_branch_no_seed_takes_is_skipped(setting):
    """Through ``make_chunk`` (2 seeds): an agent's ``seed_cond`` that no seed takes never runs,
    as a replay warm-up's updates must not."""
    env, cfg = setting
    calls: list[int] = []
    cond = _counted_cond(calls)

    def train_step(ts):
        ts, metrics = counter_agent.train_step(ts)
        bias = cond(jnp.sum(ts.params["b"]) > 1e6, ts.params["b"])
        return ts.replace(params={**ts.params, "b": bias}), metrics

    agent = dataclasses.replace(counter_agent.AGENT, train_step=train_step)
    ts = init_state(agent, env, cfg, seed_keys(0, 2), Placement.for_seeds(2))
    ts, _, finite = make_chunk(agent, env, 3)(ts)
    jax.effects_barrier()
    assert bool(finite) and calls == []
    # The false branch ran in each of the 3 iterations, for both seeds.
    assert np.all(np.asarray(ts.params["b"]) < -2.5)


def test_evaluation_starts_from_a_reset_carry_and_carries_it(setting):
    env, cfg = setting
    params = counter_agent.init(jax.random.PRNGKey(0), env, cfg).params
    policy = counter_agent.make_policy(env, cfg)
    out = jax.jit(lambda p, k: rollout(env, policy, p, k, 3, 7, return_states=True))(params, jax.random.PRNGKey(1))
    # Episode 0's carry after reset and after each of the 7 steps (the rover does not end in 7).
    np.testing.assert_array_equal(out["carries"]["count"], np.arange(8))
    assert out["states"].obs.shape[0] == 8
    # is_first resets whatever carry the policy is handed.
    action, carry = policy.act(params, out["states"].obs[:2], {"count": jnp.array([9, 9])},
                               jnp.array([True, False]), jax.random.PRNGKey(2), True)
    np.testing.assert_array_equal(carry["count"], [1, 10])
    assert action.shape == (2, env.action_size)


# --------------------------------------------------------------------------------------------
# Through the apps
# --------------------------------------------------------------------------------------------

# 2 seeds x 4 envs x 8 steps, 5-step episodes; chunks of 2 iterations, a checkpoint after each.
COUNTER = [
    f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]",
    "agent=counter",
    "env=rover",
    "env.num_envs=4",
    f"env.episode_length={EPISODE}",
    "num_seeds=2",
    "run.log_every=2",
    "run.eval_every=2",
    "run.eval_episodes=4",
    "run.checkpoint_every=2",
    "logger.wandb.mode=disabled",
    "logger.console=false",
]
STEPS_PER_CHUNK = 2 * 4 * 8


@pytest.fixture(scope="module")
def app_env(exact_app_env) -> dict[str, str]:
    """XLA's default optimisation level for this module's app runs: a run on 2 devices resumed
    on 1 ends bit for bit as a 1-device run there, not at the fast-compile level 0."""
    return exact_app_env


def _train(app_env, run_dir: Path, chunks: int, extra_env: dict | None = None):
    env = {**app_env, **(extra_env or {})}
    proc = run_app(env, "lunarl.train", *COUNTER, f"run.total_env_steps={chunks * STEPS_PER_CHUNK}",
                   f"run.dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, app_env) -> Path:
    run_dir = tmp_path_factory.mktemp("counter") / "full"
    proc = _train(app_env, run_dir, 4)
    assert "tests.counter_agent" not in proc.stderr
    return run_dir


def test_counter_agent_trains_logs_and_evaluates_through_the_apps(uninterrupted, app_env):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "toy/loss" in r]
    assert [r["iteration"] for r in train_rows] == [2, 4, 6, 8]
    assert all(r["toy/carry_mismatches"] == 0 and r["seed1/toy/carry_mismatches"] == 0 for r in train_rows)
    assert all(r["charts/episode_length"] == EPISODE for r in train_rows)
    # Every rover State.metrics entry reaches the log (mean over seeds, and per seed).
    rover_metrics = ("deposits", "orbs_collected", "rock_hits", "success", "wall_hits")
    assert all(f"env/{k}" in r and f"seed1/env/{k}" in r for r in train_rows for k in rover_metrics)
    assert [r["iteration"] for r in rows if "eval/episode_return" in r] == [2, 4, 6, 8]

    proc = run_app(app_env, "lunarl.evaluate", f"run.dir={uninterrupted}", "eval.episodes=3", cwd=uninterrupted)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1].split()[1]).read_text())
    assert result["agent"] == "counter" and result["iteration"] == 8 and result["episodes_per_seed"] == 3
    assert np.isfinite(result["eval/episode_return"])


def test_checkpoint_written_on_two_devices_resumes_on_one(uninterrupted, tmp_path, app_env):
    # Stopped after 2 of 4 chunks on a (seed=2) mesh of two devices, resumed on one: the whole
    # TrainState, carry included, ends as in the uninterrupted one-device run. Integer leaves
    # (steps, keys, counters) match bit for bit; floats to rounding, because XLA may compile a
    # one-seed shard differently from the two-seed program (on an AMD EPYC family 25 model 1 two
    # parameters differed by 1 ulp; on model 17 none). A lost or re-initialised state is far off.
    run_dir = tmp_path / "two_devices"
    flags = f"{app_env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    proc = _train(app_env, run_dir, 2, {"XLA_FLAGS": flags})
    assert "seed=2 x data=1 over 2 cpu device(s)" in proc.stdout
    proc = _train(app_env, run_dir, 4)
    assert "resuming from checkpoint at iteration 4" in proc.stdout
    assert "over 1 cpu device(s)" in proc.stdout
    assert_same_state(final_state(uninterrupted)[1], final_state(run_dir)[1], float_rtol=1e-5)
    assert os.listdir(run_dir / "checkpoints" / "latest")
