"""The PPO benchmark runs end to end on a tiny setting and writes every field the issue asks for.

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
