"""The config tree and the train app's host-side pieces, in-process.

Composition uses Hydra's compose API on ``conf/``; validation builds the env and agent config
classes, which is all that happens before the first compile in ``lunarl.train``. Only the last
test compiles (PPO on the tiny toy env) to check the NaN stop.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import lunarl.envs
from lunarl.run.checkpoint import CheckpointError, Checkpoints, config_differences
from lunarl.run.evaluation import eval_row
from lunarl.run.metrics import reduce_chunk
from lunarl.run.schema import ConfigError, register_schemas, validate_train
from lunarl.run.signals import GracefulStop

CONF = str(Path(__file__).resolve().parents[1] / "conf")
EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))

register_schemas()


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_experiments_present():
    assert {"rover", "rover_smoke", "car_track", "kuka"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose_train(f"+experiment={name}")
    plan = validate_train(cfg)
    assert plan.env_name == cfg.env.name
    assert plan.agent_config.num_envs == cfg.env.num_envs
    assert plan.total_iterations % cfg.run.log_every == 0
    assert plan.total_iterations * plan.steps_per_iteration >= cfg.run.total_env_steps
    assert cfg.logger.wandb.group == name  # sweeps of one experiment share a wandb group
    assert cfg.checkpoint.dir == f"{cfg.run.dir}/checkpoints"


def test_env_yaml_keys_are_env_fields():
    # Every env group option's extra keys must be fields of that env's config class.
    for path in Path(CONF, "env").glob("*.yaml"):
        cfg = compose_train(f"env={path.stem}")
        validate_train(cfg)  # raises naming the field otherwise
        assert cfg.env.name in lunarl.envs.registered()


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("env.num_envs=-5", "env.num_envs"),
        ("env.num_envs=abc", "env.num_envs"),
        ("+env.no_such_field=1", "no_such_field"),
        ("agent.learning_rate=5.0", "agent.learning_rate"),
        ("agent.num_minibatches=7", "num_minibatches"),
        ("agent.activation=swish", "activation"),
        ("env.name=mars", "mars"),
        ("+agent.num_envs=4", "env.num_envs"),
        ("run.eval_every=7", "run.eval_every"),
        ("run.total_env_steps=0", "run.total_env_steps"),
        ("num_seeds=0", "num_seeds"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode"),
    ],
)
def test_bad_values_name_the_key(override, culprit):
    cfg = compose_train("+experiment=rover_smoke", override)
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        validate_train(cfg)


@pytest.mark.parametrize("override", ["run.foo=1", "env.no_such_field=1", "run.total_env_steps=abc", "+experiment=nope"])
def test_unknown_keys_and_types_fail_while_composing(override):
    with pytest.raises(Exception, match="foo|no_such_field|total_env_steps|nope"):
        compose_train("+experiment=rover_smoke", override)


def test_config_differences_name_the_keys():
    saved = {"env": {"name": "rover", "num_envs": 16}, "agent": {"policy_hidden": [32, 32]}, "seed": 0, "num_seeds": 1, "run": {"dir": "a"}}
    now = {"env": {"name": "car_track", "num_envs": 16}, "agent": {"policy_hidden": [64, 64]}, "seed": 0, "num_seeds": 1, "run": {"dir": "b"}}
    diff = config_differences(saved, now)
    assert diff[0].startswith("agent.policy_hidden") and any(line.startswith("env.name:") for line in diff)
    assert config_differences(saved, {**saved, "run": {"dir": "elsewhere"}}) == []
    # A config saved before conf/ listed every field equals one that lists them at their defaults.
    listed = {**saved, "env": {**saved["env"], "num_rocks": 7}, "agent": {"name": "ppo", "gamma": 0.99}}
    assert config_differences({**saved, "agent": {"name": "ppo"}}, listed) == []
    assert config_differences(listed, {**listed, "env": {**listed["env"], "num_rocks": 3}}) == ["env.num_rocks: 7 (checkpoint) vs 3 (now)"]


def test_checkpoints_round_trip_zero_size_leaves(tmp_path):
    # MJX's Data.act is [num_envs, 0] for models without activation states (the kuka arm);
    # Orbax refuses zero-size arrays, so they are dropped on save and rebuilt on restore.
    state = {"act": jnp.zeros((4, 0)), "qpos": jnp.arange(8.0).reshape(4, 2)}
    config = {"env": {"name": "kuka"}, "agent": {"name": "ppo"}, "seed": 0, "num_seeds": 1}
    ck = Checkpoints(str(tmp_path / "ck"))
    ck.save(1, state, config, {"iteration": 1})
    assert ck.save_best(1, state, config, {"iteration": 1}, score=0.0)
    ck.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    for which in ("latest", "best"):
        restored, _, _ = ck.restore(which, target, config=config)
        assert restored["act"].shape == (4, 0)
        np.testing.assert_array_equal(restored["qpos"], state["qpos"])
    ck.close()


def test_checkpoints_refuse_a_different_config_and_keep_best(tmp_path):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "rng": jax.random.PRNGKey(1)}
    config = {"env": {"name": "rover"}, "agent": {"name": "ppo"}, "seed": 0, "num_seeds": 1}
    ck = Checkpoints(str(tmp_path / "ck"), max_to_keep=2)
    for it in (5, 10, 15):
        ck.save(it, state, config, {"iteration": it, "global_step": it * 10})
    assert ck.save_best(5, state, config, {"iteration": 5, "global_step": 50}, score=1.0)
    ck.wait()
    assert not ck.save_best(10, state, config, {"iteration": 10, "global_step": 100}, score=0.5)
    ck.wait()
    assert sorted(ck.latest.all_steps()) == [10, 15] and ck.step_of("best") == 5
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, saved_config, meta = ck.restore("latest", target, config=config)
    assert saved_config == config and meta["iteration"] == 15
    np.testing.assert_array_equal(restored["w"], state["w"])
    with pytest.raises(CheckpointError, match=r"env\.name: 'rover' \(checkpoint\) vs 'kuka'"):
        ck.restore("latest", target, config={**config, "env": {"name": "kuka"}})
    with pytest.raises(CheckpointError, match="iteration 7"):
        ck.restore(7, target)
    # Same config but a state of another structure (env or agent code changed): refused.
    with pytest.raises(CheckpointError, match="does not fit the current TrainState"):
        ck.restore("latest", {**target, "extra": jax.ShapeDtypeStruct((3,), jnp.float32)})
    ck.close()
    with pytest.raises(CheckpointError, match=str(tmp_path / "missing")):
        Checkpoints(str(tmp_path / "missing"), create=False)


def test_reduce_chunk_weights_episode_stats_by_finished_count():
    # Two iterations, two seeds: seed 0 finished 3 episodes then none; seed 1 one then one.
    metrics = {
        "charts/episode_return": np.array([[2.0, 4.0], [0.0, 8.0]]),
        "charts/episodes_finished": np.array([[3.0, 1.0], [0.0, 1.0]]),
        "losses/value_loss": np.array([[1.0, 2.0], [3.0, 4.0]]),
    }
    stats, count = ("charts/episode_return",), "charts/episodes_finished"
    row = reduce_chunk(metrics, stats, count)
    assert row["seed0/charts/episode_return"] == 2.0  # not diluted by the empty iteration
    assert row["seed1/charts/episode_return"] == 6.0
    assert row["charts/episode_return"] == 4.0
    assert row["charts/episodes_finished"] == 2.5
    assert row["losses/value_loss"] == 2.5
    # A seed with no finished episode has no return (not 0), and the mean skips it.
    metrics["charts/episodes_finished"] = np.array([[0.0, 1.0], [0.0, 1.0]])
    row = reduce_chunk(metrics, stats, count)
    assert "seed0/charts/episode_return" not in row and row["charts/episode_return"] == 6.0
    metrics["charts/episodes_finished"] = np.zeros((2, 2))
    assert "charts/episode_return" not in reduce_chunk(metrics, stats, count)
    # A running total (gradient steps so far) is its value at the end of the chunk.
    totals = {"charts/gradient_steps": np.array([[8.0, 8.0], [18.0, 16.0]])}
    assert reduce_chunk(totals, stats, count, ("charts/gradient_steps",))["charts/gradient_steps"] == 17.0
    ev = eval_row({"episode_return": np.array([[1.0, 3.0]]), "success": np.array([[1.0, 0.0]]), "episode_length": np.array([[5, 7]])})
    assert ev == {"eval/episode_return": 2.0, "eval/episode_return_std": 1.0, "eval/success_rate": 0.5, "eval/episode_length": 6.0}


def test_graceful_stop_flags_first_signal_and_arms_a_hard_second_sigint():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        # The next Ctrl-C must kill the process at once, not wait for the current XLA call.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == before


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fast_compile):
    """In-process: PPO on the toy env, with parameters poisoned after iteration 10."""
    import dataclasses
    import sys
    import types

    import lunarl.agents
    import lunarl.agents.ppo as ppo
    from lunarl.run.logger import ConsoleProgress, JsonlWriter, RunLogger, WandbLogger
    from lunarl.run.loop import TrainingDiverged, train

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(lunarl.envs._REGISTRY, "point_goal", "ppo_toy_env:PointGoal")

    def train_step(ts):
        ts, metrics = ppo.train_step(ts)
        poison = jnp.where(ts.iteration > 10, jnp.nan, 0.0)
        return ts.replace(params=jax.tree.map(lambda p: p + poison, ts.params)), metrics

    module = types.ModuleType("nan_ppo")
    module.AGENT = dataclasses.replace(ppo.AGENT, name="nan_ppo", train_step=train_step)
    monkeypatch.setitem(sys.modules, "nan_ppo", module)
    monkeypatch.setitem(lunarl.agents._AGENTS, "nan_ppo", "nan_ppo")

    cfg = compose_train(
        "+experiment=rover_smoke", "agent.name=nan_ppo",
        "agent.unroll_length=4", "agent.num_minibatches=2", "agent.num_epochs=1", "agent.policy_hidden=[8]",
        "agent.value_hidden=[8]", "run.total_env_steps=320", "run.log_every=5", "run.checkpoint_every=5",
        "run.eval_every=0", "num_seeds=2", f"run.dir={tmp_path}",
    )
    cfg.env = {"name": "point_goal", "num_envs": 4}  # a test env with no conf/env file
    plan = validate_train(cfg)
    assert plan.total_iterations == 20
    logger = RunLogger(JsonlWriter(tmp_path / "metrics.jsonl"), WandbLogger("disabled", "", None, None, [], "", tmp_path, {}), ConsoleProgress(1, 0, enabled=False))
    from omegaconf import OmegaConf

    with pytest.raises(TrainingDiverged, match=r"NaN/inf.*iterations 10-15.*Last good checkpoint: iteration 10"):
        train(plan, tmp_path, OmegaConf.to_container(cfg, resolve=True), logger)
    ck = Checkpoints(str(tmp_path / "checkpoints"), create=False)
    assert sorted(ck.latest.all_steps()) == [5, 10]
    ck.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [5, 10]  # the diverged chunk is not logged
    for key in ("losses/value_loss", "losses/entropy"):  # both seeds, and their mean
        assert all(r[key] == pytest.approx((r[f"seed0/{key}"] + r[f"seed1/{key}"]) / 2) for r in rows)


def test_console_eta_counts_steps_per_seed(capsys):
    from lunarl.run.logger import ConsoleProgress

    # global_step and the total are env steps per seed; steps/s counts all seeds together.
    progress = ConsoleProgress(1000, 0, enabled=True, num_seeds=2)
    assert not progress.live  # pytest's captured stdout is not a terminal: plain lines
    progress.update({"global_step": 500, "perf/steps_per_second": 100.0})
    out = capsys.readouterr().out
    assert "eta 10s" in out  # 500 steps x 2 seeds / 100 per s
    assert "return -  success -" in out and "nan" not in out  # no episode has finished yet
    progress.update({"global_step": 600, "perf/steps_per_second": 100.0, "charts/episode_return": 1.5, "charts/success_rate": 0.25})
    assert "return 1.50  success 25%" in capsys.readouterr().out


def test_parse_overrides_types_values_and_names_bad_fields():
    from lunarl.agents.ppo import PPOConfig

    got = PPOConfig.parse_overrides(
        ["num_envs=8", "learning_rate=1e-3", "lr_decay=true", "policy_hidden=32,32", "value_hidden=[16]", "activation=relu"]
    )
    assert got == {
        "num_envs": 8, "learning_rate": 1e-3, "lr_decay": True, "policy_hidden": [32, 32],
        "value_hidden": [16], "activation": "relu",
    }  # fmt: skip
    cfg = PPOConfig.build(**got)
    assert cfg.policy_hidden == (32, 32) and cfg.value_hidden == (16,)
    for bad in ("nope=1", "num_envs"):
        with pytest.raises(ValueError, match="known fields"):
            PPOConfig.parse_overrides([bad])
    # Values are parsed, then checked by build like any override.
    with pytest.raises(ValueError, match="num_envs"):
        PPOConfig.build(**PPOConfig.parse_overrides(["num_envs=abc"]))
