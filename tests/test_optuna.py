"""Optuna through Hydra (hydra/sweeper=optuna_tpe): a sweep of tiny trials runs end to end, every
trial returns its run.objective, the study's SQLite file records them, and a second invocation
with the same run.dir resumes the study. Also the objective itself, and the refusal of a
minimising sweeper.

The trials are the counter agent's tiny program of tests/test_agent_contract.py (same settings,
so the session's compilation cache serves them), one chunk each. The default test sweeps ``seed``,
which changes what is trained but not the compiled program, so 4 trials compile once; the slow
tests resume a study and sweep the learning rate as in the README.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import run_app

from lunarl.run.objective import objective, read_objective
from tests.test_agent_contract import COUNTER, STEPS_PER_CHUNK

SWEEP = [
    "-m",
    "hydra/sweeper=optuna_tpe",
    *COUNTER,
    f"run.total_env_steps={STEPS_PER_CHUNK}",
    "hydra.sweep.subdir=trial${hydra.job.num}-${now:%H%M%S%f}",
    "name=optuna_test",
]


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="optuna_test", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def _trial_objectives(sweep_dir: Path) -> dict[int, float]:
    """Each trial dir's seed -> the objective its metrics.jsonl gives."""
    out = {}
    for d in sweep_dir.glob("trial*"):
        config = yaml.safe_load((d / "config.yaml").read_text())
        out[config["seed"]] = read_objective(d / "metrics.jsonl", "eval_success", config["run"]["eval_episodes"], config["num_seeds"])
    return out


def _sweep(app_env, tmp_path: Path, trials: int, *extra: str) -> Path:
    sweep_dir = tmp_path / "sweep"
    args = [*SWEEP, f"run.dir={sweep_dir}", "seed=int(interval(0,100000))", *extra]
    proc = run_app(app_env, "lunarl.train", *args, f"hydra.sweeper.n_trials={trials}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_optuna_sweep_records_every_trial(app_env, tmp_path):
    sweep_dir = _sweep(app_env, tmp_path, 4)
    study = _study(sweep_dir)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 4 == len(study.trials)
    by_seed = _trial_objectives(sweep_dir)
    assert len(by_seed) == 4, sorted(p.name for p in sweep_dir.iterdir())
    for t in trials:  # the value Optuna stored is the objective the trial's own run logged
        assert math.isfinite(t.value)
        assert t.value == pytest.approx(by_seed[t.params["seed"]], rel=0, abs=1e-12)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(t.value for t in trials))


@pytest.mark.slow
def test_the_same_run_dir_resumes_the_study(app_env, tmp_path):
    _sweep(app_env, tmp_path, 2)
    # 2 more trials in the same study, in new trial dirs; a new sampler seed, or its first
    # (random) draws would repeat the first process's.
    sweep_dir = _sweep(app_env, tmp_path, 2, "hydra.sweeper.sampler.seed=1")
    study = _study(sweep_dir)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert len(list(sweep_dir.glob("trial*"))) == 4
    by_seed = _trial_objectives(sweep_dir)
    assert {t.params["seed"] for t in study.trials} == set(by_seed) and len(by_seed) == 4


def test_a_minimising_sweeper_is_refused(app_env, tmp_path):
    proc = run_app(app_env, "lunarl.train", "-m", "hydra/sweeper=optuna", *COUNTER, f"run.dir={tmp_path / 'sweep'}",
                   "seed=int(interval(0,10))", "hydra.sweeper.n_trials=1", cwd=tmp_path)
    assert proc.returncode == 1
    assert "hydra.sweeper.direction=Direction.minimize" in proc.stderr and "maximize" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_optuna_tunes_the_learning_rate(app_env, tmp_path):
    """The README's form: a log-uniform learning rate, each trial its own program."""
    sweep_dir = tmp_path / "sweep"
    proc = run_app(app_env, "lunarl.train", *SWEEP, f"run.dir={sweep_dir}", "agent.learning_rate=tag(log,interval(1e-4,1e-1))",
                   "hydra.sweeper.n_trials=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _study(sweep_dir).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    rates = {t.params["agent.learning_rate"] for t in trials}
    assert len(rates) == 3 and all(1e-4 <= r <= 1e-1 for r in rates)
    for d in sweep_dir.glob("trial*"):
        config = yaml.safe_load((d / "config.yaml").read_text())
        assert config["agent"]["learning_rate"] in rates


def test_objective_ranks_success_first_then_return():
    step = 1 / 32
    rows = [{"eval/success_rate": 0.5, "eval/episode_return": 1e6}, {"eval/success_rate": 0.5 + step, "eval/episode_return": -1e6}]
    assert objective(rows, "eval_success", step) > 0.5 + step  # a higher success rate always wins
    assert objective(rows, "eval_success", step) < 0.5 + 1.5 * step
    tie = [{"eval/success_rate": 0.5, "eval/episode_return": r} for r in (10.0, 11.0)]
    assert objective(tie, "eval_success", step) == objective(tie[1:], "eval_success", step)
    assert objective(tie[:1], "eval_success", step) < objective(tie[1:], "eval_success", step)
    assert objective(rows, "eval_return", step) == 1e6
    assert objective([{"charts/episode_return": 3.0}, {"charts/episode_return": 4.0}], "train_return", step) == 4.0
    assert math.isnan(objective([{"charts/episode_return": 3.0}], "eval_success", step))
    with pytest.raises(ValueError, match="run.objective='best'"):
        objective(rows, "best", step)


def test_objective_reads_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"iteration": 1, "eval/success_rate": 0.25, "eval/episode_return": 2.0}]))
    assert 0.25 < read_objective(path, "eval_success", 4, 1) < 0.25 + 0.125
    assert math.isnan(read_objective(tmp_path / "missing.jsonl", "eval_success", 4, 1))
