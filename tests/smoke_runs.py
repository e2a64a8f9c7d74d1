"""One short real training run, shared by the video, TensorBoard and report tests.

``lunarl.train`` on the rover smoke experiment cut to 20 iterations, with 2 seeds (so the report
has seed bands), a video at every evaluation, TensorBoard on and wandb offline. It is trained once
per test session: the first module that asks runs it; later ones find it finished in the session's
temporary directory.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from conftest import run_app, shared_tmp

# 20 iterations of 16 envs x 16 steps per seed, chunks of 5, evaluations (and videos) at 10 and 20.
VIDEO_RUN = [
    "+experiment=rover_smoke",
    "num_seeds=2",
    "run.total_env_steps=5120",
    "run.log_every=5",
    "run.eval_every=10",
    "run.video_every=10",
    "run.checkpoint_every=20",
    "logger.wandb.mode=offline",
    "logger.tensorboard=true",
]
VIDEO_STEPS = (2560, 5120)  # global steps of the evaluations, so of the videos


def video_run(tmp_path_factory, app_env) -> Path:
    """The finished run directory (trained on first use in this session; an xdist worker that
    asks while another trains it waits for that run instead of training its own)."""
    base = shared_tmp(tmp_path_factory)
    run_dir = base / "shared_video_run"
    done = run_dir / "TEST_RUN_FINISHED"
    with open(base / "shared_video_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            env = {**app_env, "WANDB_MODE": "offline"}  # app_env disables wandb; this run logs offline
            proc = run_app(env, "lunarl.train", *VIDEO_RUN, f"run.dir={run_dir}", cwd=run_dir.parent)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
            (run_dir / "train.stdout").write_text(proc.stdout)
            done.write_text("ok\n")
    return run_dir
