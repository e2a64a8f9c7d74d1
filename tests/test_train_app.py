"""End-to-end tests of ``python -m lunarl.train`` and ``python -m lunarl.evaluate`` (subprocesses).

Real PPO on the real rover env, with the smoke experiment cut to 20 iterations. One finished run
is shared by the tests (module fixture); every process shares a persistent JAX compilation
cache, so only the first run pays the full compile. wandb is disabled (offline in the multirun),
so nothing touches the network. Bad overrides and refused resumes are tested once, as a table,
in ``test_faults.py``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import run_app  # noqa: E402  (the app_env fixture comes from conftest too)
from omegaconf import OmegaConf

from lunarl.run.checkpoint import Checkpoints
from lunarl.run.numerics import numerics_fingerprint
from lunarl.run.restore import restore_run

pytestmark = pytest.mark.timeout(900)

# 20 iterations of 16 envs x 16 steps, in chunks of 5: checkpoints at 5, 10, 15, 20; eval at 10, 20.
SMOKE = [
    "+experiment=rover_smoke",
    "logger.wandb.mode=disabled",
    "run.total_env_steps=5120",
    "run.log_every=5",
    "run.checkpoint_every=5",
    "run.eval_every=10",
]


def restore_final(ckpt_dir: Path, which: str = "latest"):
    """The iteration and TrainState of a checkpoint, restored into the structure ``init`` produces."""
    saved = restore_run(str(ckpt_dir), which)
    return saved.meta["iteration"], saved.state


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, app_env) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    proc = run_app(app_env, "lunarl.train", *SMOKE, f"run.dir={run_dir}", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished 20 iterations" in proc.stdout
    return run_dir


def test_train_writes_checkpoints_metrics_and_resolved_config(finished_run):
    ck = finished_run / "checkpoints"
    assert sorted(int(p.name) for p in (ck / "latest").iterdir() if p.name.isdigit()) == [5, 10, 15, 20]
    assert [p.name for p in (ck / "best").iterdir() if p.name.isdigit()] in (["10"], ["20"])
    assert (finished_run / ".hydra" / "config.yaml").exists()  # Hydra's, with interpolations
    resolved = OmegaConf.load(finished_run / "config.yaml")  # as it ran
    assert resolved.checkpoint.dir == str(ck) and resolved.run.dir == str(finished_run)
    rows = metric_rows(finished_run)
    train_rows = [r for r in rows if "losses/policy_loss" in r]
    eval_rows = [r for r in rows if "eval/episode_return" in r]
    assert [r["iteration"] for r in train_rows] == [5, 10, 15, 20]
    assert [r["global_step"] for r in train_rows] == [1280, 2560, 3840, 5120]
    assert [r["iteration"] for r in eval_rows] == [10, 20]
    for key in ("losses/policy_loss", "losses/value_loss", "losses/approx_kl", "charts/learning_rate"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    step, state = restore_final(ck)
    assert step == 20 and int(state.iteration[0]) == 20


def test_resume_ends_bitwise_equal_to_uninterrupted(finished_run, tmp_path, app_env):
    # Make a copy of the finished run look like one stopped at iteration 10, then rerun it.
    run_dir = tmp_path / "resumed"
    shutil.copytree(finished_run, run_dir)
    for path in [run_dir / "checkpoints/latest/15", run_dir / "checkpoints/latest/20", run_dir / "checkpoints/best"]:
        shutil.rmtree(path)
    # Every checkpoint records the numerical stack it was written on; pretend iteration 10's came
    # from an older jaxlib: the resume says so in one line and changes nothing else.
    meta_file = run_dir / "checkpoints/latest/10/meta/metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["numerics"] == numerics_fingerprint()
    meta_file.write_text(json.dumps({**meta, "numerics": {**meta["numerics"], "jaxlib": "0.0.1"}}))
    proc = run_app(app_env, "lunarl.train", *SMOKE, f"run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoint at iteration 10" in proc.stdout
    changed = [line for line in proc.stdout.splitlines() if "another machine or install" in line]
    assert changed == [
        f"iteration 10 was saved on another machine or install (jaxlib 0.0.1 -> {meta['numerics']['jaxlib']}); "
        "the run continues, but will not end bit-identical to one that never stopped (lunarl.run.numerics)"
    ]
    _, resumed = restore_final(run_dir / "checkpoints")
    _, uninterrupted = restore_final(finished_run / "checkpoints")
    a, b = jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    assert metric_rows(run_dir) == metric_rows(finished_run)  # rows after iteration 10 replaced, not duplicated


def test_sigterm_mid_run_leaves_a_loadable_checkpoint(tmp_path, app_env):
    run_dir = tmp_path / "preempted"
    args = [*SMOKE, "run.total_env_steps=100000000", "run.checkpoint_every=100000", "run.eval_every=0", f"run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lunarl.train", *args], cwd=tmp_path, env=app_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 600
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no chunk finished in time"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    step, state = restore_final(run_dir / "checkpoints")
    assert 5 <= step < 390625 and step % 5 == 0
    assert int(state.iteration[0]) == step


def test_evaluate_a_finished_run(finished_run, app_env, tmp_path):
    proc = run_app(
        app_env, "lunarl.evaluate", f"run.dir={finished_run}", "checkpoint=best", "eval.episodes=8", "eval.video=true", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "return" in proc.stdout and "success" in proc.stdout
    [saved] = list(finished_run.glob("eval-best-*.json"))
    result = json.loads(saved.read_text())
    assert result["episodes_per_seed"] == 8 and result["env"] == "rover"
    assert 0.0 <= result["eval/success_rate"] <= 1.0
    assert 1.0 <= result["eval/episode_length"] <= 200.0
    assert np.isfinite(result["eval/episode_return"]) and result["eval/episode_return_std"] >= 0
    assert Path(result["video"]).stat().st_size > 0


def test_evaluate_in_a_variant_of_the_saved_env(finished_run, app_env, tmp_path):
    args = [f"run.dir={finished_run}", "eval.episodes=4", "+env.reward_rock_hit=-10", "+env.num_rocks=9"]
    proc = run_app(app_env, "lunarl.evaluate", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reward_rock_hit=-10 num_rocks=9" in proc.stdout
    [saved] = list(finished_run.glob("eval-latest-*-reward_rock_hit=-10-num_rocks=9.json"))
    assert json.loads(saved.read_text())["env_overrides"] == {"reward_rock_hit": -10, "num_rocks": 9}


def run_learning_curve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    script = Path(__file__).parents[1] / "scripts" / "learning_curve.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout)


def test_learning_curve_script_reads_a_finished_run(finished_run, tmp_path):
    out = tmp_path / "curve.json"
    proc = run_learning_curve(str(finished_run), "--target", "0.0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads(out.read_text())
    # Evaluations at iterations 10 and 20 of 16 envs x 16 steps.
    assert [row["env_steps"] for row in curve["evaluations"]] == [2560, 5120]
    assert curve["first_reached"]["env_steps"] == 2560  # any success rate is >= 0
    assert "| 0.00 |" in proc.stdout and "first eval success >= 0.0" in proc.stdout
    proc = run_learning_curve(str(tmp_path), timeout=60)
    assert proc.returncode != 0 and "no metrics file" in proc.stderr


def test_learning_curve_script_reports_each_seeds_first_evaluation_past_the_target(tmp_path):
    # Two seeds whose mean crosses 0.9 later than seed 1 alone, and seed 0 never does.
    evals = [(1000, 0.2, 0.5), (2000, 0.5, 0.95), (3000, 0.85, 0.97)]
    lines = [json.dumps({"global_step": 500, "time": 1.0, "charts/episode_return": -1.0})]
    for step, s0, s1 in evals:
        lines.append(json.dumps({
            "global_step": step, "time": step / 100, "eval/episode_return": 0.0,
            "eval/success_rate": (s0 + s1) / 2, "seed0/eval/success_rate": s0, "seed1/eval/success_rate": s1,
        }))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "curve.json"
    proc = run_learning_curve(str(tmp_path), "--target", "0.9", "--out", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads(out.read_text())
    assert curve["first_reached"]["env_steps"] == 3000
    assert curve["first_reached_per_seed"] == [None, 2000]
    assert "per seed (first eval success >= 0.9, env steps): never, 2,000" in proc.stdout


def test_learning_curve_script_carries_named_training_metrics_into_each_evaluation(tmp_path):
    # A training row before each evaluation; each evaluation must carry the one just before it.
    lines = []
    for step, value in ((1000, -2.0), (2000, 0.5)):
        lines.append(json.dumps({
            "global_step": step, "time": 1.0, "charts/episode_return": -1.0, "critic/value": value,
            "seed0/critic/value": value - 1.0, "seed1/critic/value": value + 1.0,
        }))
        lines.append(json.dumps({"global_step": step, "time": 2.0, "eval/episode_return": 0.0, "eval/success_rate": 0.0}))
    lines.insert(1, json.dumps({
        "global_step": 1000, "time": 1.5, "charts/episode_return": -1.0, "critic/value": -3.0,
        "seed0/critic/value": -4.0, "seed1/critic/value": -2.0,
    }))
    # A training row in whose window no episode ended has no episode metrics, and a video row
    # has neither: the evaluation still carries the newest value of each.
    lines[4:4] = [
        json.dumps({"global_step": 2000, "time": 2.5, "critic/value": 7.0, "seed0/critic/value": 6.0, "seed1/critic/value": 8.0}),
        json.dumps({"global_step": 2000, "time": 2.6, "perf/video_seconds": 1.0}),
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "curve.json"
    proc = run_learning_curve(str(tmp_path), "--metrics", "critic/value", "--out", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    carried = [row["train_metrics"]["critic/value"] for row in json.loads(out.read_text())["evaluations"]]
    assert carried == [{"mean": -3.0, "per_seed": [-4.0, -2.0]}, {"mean": 7.0, "per_seed": [6.0, 8.0]}]
    assert "| 2,000 | 7.000; 6.000 8.000 |" in proc.stdout
    proc = run_learning_curve(str(tmp_path), "--metrics", "critic/valu", "--out", str(out), timeout=60)
    assert proc.returncode != 0 and "'critic/valu'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_multirun_gives_each_job_its_own_run_dir(tmp_path, app_env):
    sweep = tmp_path / "sweep"
    args = ["-m", *SMOKE, "seed=0,1", f"run.dir={sweep}", "run.total_env_steps=1280", "run.eval_every=0", "logger.wandb.mode=offline"]
    temp = tmp_path / "temp"  # the jobs' system temp dir
    temp.mkdir()
    proc = run_app({**app_env, "TMPDIR": str(temp)}, "lunarl.train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [p.name for p in temp.iterdir() if "wandb" in p.name]  # wandb's staging dirs removed
    configs = []
    for job in ("0", "1"):
        job_dir = sweep / job
        assert (job_dir / "metrics.jsonl").exists()
        assert list((job_dir / "wandb").glob("offline-run-*")), "wandb offline run missing"
        ck = Checkpoints(str(job_dir / "checkpoints"), create=False)
        configs.append(ck.read("latest", "config"))
        ck.close()
    assert [c["seed"] for c in configs] == [0, 1]
    assert [c["run"]["dir"] for c in configs] == [str(sweep / "0"), str(sweep / "1")]
    assert configs[0]["logger"]["wandb"]["group"] == configs[1]["logger"]["wandb"]["group"] == "rover_smoke"


@pytest.mark.slow
def test_seeds_split_over_devices_and_restore_on_one(tmp_path, app_env):
    """Two CPU devices (XLA's host-device flag) carry one seed each; the checkpoint written there
    restores in this single-device process."""
    run_dir = tmp_path / "two_devices"
    env = {**app_env, "XLA_FLAGS": app_env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    args = [*SMOKE, "num_seeds=2", "run.total_env_steps=1280", "run.eval_every=0", f"run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "lunarl.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed=2 x data=1 over 2 cpu device(s)" in proc.stdout
    step, state = restore_final(run_dir / "checkpoints")
    assert step == 5 and state.iteration.shape == (2,)
    params = jax.tree.leaves(state.params)
    assert all(np.all(np.isfinite(p)) for p in params)
    assert not np.array_equal(params[0][0], params[0][1])  # two different seeds
