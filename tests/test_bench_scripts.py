"""The benchmarks run end to end on a tiny setting and write every field the issue asks for.

Not a timing test: only the JSON's shape and sanity are checked (speeds are whatever they are)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


# Compiles both trainers (lunarl's and Brax's) and runs them: ~2 min on 2 cores, so `make test-all`.
@pytest.mark.slow
def test_bench_ppo_writes_side_by_side_results(tmp_path):
    out = tmp_path / "bench_ppo.json"
    args = [
        "--num-envs", "8", "--total-steps", "1024", "--chunks", "2", "--repeats", "1",
        "--seeds", "1,2", "--seed-iters", "1", "--eval-episodes", "4",
        "--set", "unroll_length=8", "--set", "num_minibatches=2", "--set", "num_epochs=1",
        "--set", "policy_hidden=8", "--set", "value_hidden=8",
        "--env-set", "reward_rock_hit=-0.1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_ppo.py"), *args], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("lunarl_sps", "brax_sps", "ratio", "lunarl_compile_s", "brax_compile_s", "lunarl_return", "brax_return"):
        assert isinstance(result[key], float), key
    assert result["lunarl_sps"] > 0 and result["brax_sps"] > 0
    assert result["ratio"] == result["runs"][0]["ratio"]
    assert result["settings"]["num_envs"] == 8 and result["settings"]["policy_hidden"] == [8]
    assert result["env_overrides"] == {"reward_rock_hit": -0.1}
    assert set(result["lunarl_seeds_sps"]) == {"1", "2"}
    assert "ratio lunarl/brax" in proc.stdout


def test_bench_ppo_rejects_bad_flags(tmp_path):
    for bad, culprit in ((["--repeats", "0"], "--repeats=0"), (["--set", "nope=1"], "nope")):
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS / "bench_ppo.py"), *bad, "--out", str(tmp_path / "x.json")],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode != 0 and culprit in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow  # compiles every part of the iteration as its own program: ~30 s
def test_profile_ppo_times_every_part(tmp_path):
    out = tmp_path / "profile_ppo.json"
    args = [
        "--num-envs", "8", "--iterations", "2", "--repeats", "1",
        "--set", "unroll_length=8", "--set", "num_minibatches=2", "--set", "num_epochs=1",
        "--set", "policy_hidden=8", "--set", "value_hidden=8", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "profile_ppo.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["parts"]) == {"iteration", "rollout", "learn", "shuffles"}
    assert "minibatch_steps_ms" in result and "rest_ms" in result
    assert all(p["ms"] > 0 and p["cores"] > 0 for p in result["parts"].values())
    assert result["settings"]["num_envs"] == 8 and result["env_steps_per_s"] > 0


def test_profile_ppo_rejects_bad_settings(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "profile_ppo.py"), "--set", "num_epochs=0", "--out", str(tmp_path / "p.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "num_epochs" in proc.stderr


# Compiles a small SAC car iteration twice for 2 seeds: ~25 s on 2 cores.
def test_bench_warmup_skip_times_both_programs_and_finds_them_equal(tmp_path):
    out = tmp_path / "warmup.json"
    args = [
        "--experiment", "car_track_sac", "--seeds", "2", "--repeats", "1", "--out", str(out),
        "--override", "env.num_envs=4", "agent.unroll_length=4", "agent.warmup_steps=64", "agent.batch_size=16",
        "agent.actor_hidden=[16]", "agent.critic_hidden=[16]", "agent.utd_ratio=1", "run.total_env_steps=256", "run.log_every=4",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_warmup_skip.py"), *args], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["agent"] == "sac" and result["seeds"] == 2
    assert result["warmup_iterations"] == 4 and result["total_iterations"] == 16
    for name in ("named", "unnamed"):
        row = result["programs"][name]
        assert row["warmup_iteration_s"] > 0 and row["learning_iteration_s"] > 0
    assert result["warmup_speedup"] > 0 and 0 < result["learning_ratio"]
    # Same iterations from the same keys: skipping the warm-up's updates changes no parameter.
    assert result["max_policy_param_difference"] == 0.0


@pytest.mark.parametrize(("args", "named"), [
    (["--experiment", "rover"], "PPOConfig"),
    (["--experiment", "car_track_sac", "--override", "agent.warmup_steps=-5"], "agent.warmup_steps"),
])  # fmt: skip
def test_bench_warmup_skip_rejects_bad_input_in_one_line(tmp_path, args, named):
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_warmup_skip.py"), *args, "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"},
    )  # fmt: skip
    assert proc.returncode != 0 and named in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "x.json").exists()


# Compiles a tiny Dreamer iteration and each of its parts: ~2 min on 2 cores, so `make test-all`.
@pytest.mark.slow
def test_device_script_runs_the_dreamer_table_rows_and_each_writes_every_part(tmp_path):
    """scripts/device_dreamer.sh (the GPU table's one device call) in its CPU check mode: the tiny
    row through bench_dreamer.py, whose parts are the agent's own world-model and behaviour updates."""
    env = {**os.environ, "DEVICE_QUICK": "1", "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPTS / "device_dreamer.sh")], cwd=SCRIPTS.parent, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cpu" in (tmp_path / "devices.txt").read_text()
    result = json.loads((tmp_path / "bench_dreamer_tiny_tr16.json").read_text())
    assert result["backend"] == "cpu" and result["overrides"] == ["imagine_starts=128", "train_ratio=16"]
    (row,) = result["results"]
    assert row["size"] == "tiny" and row["updates_per_iteration"] == 8 and row["env_steps_per_iteration"] == 256
    assert set(row["part_s"]) == {"acting", "world_model", "imagination"}
    assert all(t > 0 for t in row["part_s"].values()) and row["iteration_s"] > 0
    assert row["share"]["other"] == pytest.approx(1 - sum(row["part_s"].values()) / row["iteration_s"])


def test_bench_dreamer_takes_an_experiments_agent_settings_without_its_prefill(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_dreamer

    name, env, base = bench_dreamer.experiment_setting("car_track_dreamer")
    cfg = bench_dreamer.bench_config(env, "1m", base["num_envs"], ["horizon=10"], base)
    assert name == "car_track" and cfg.size == "1m" and cfg.prefill == 0 and cfg.horizon == 10
    # The experiment's own settings, which the agent's defaults do not have.
    assert (cfg.train_ratio, cfg.imagine_starts, cfg.terminal_fraction, cfg.actor_ema_rate) == (256.0, 128, 0.25, 0.001)
    assert cfg.num_envs == 16 and cfg.updates_per_iteration == 128
    with pytest.raises(SystemExit, match="trains ppo, not dreamer"):
        bench_dreamer.experiment_setting("rover")
