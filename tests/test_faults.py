"""Faults and bad input (lunarl issue 15), through the real apps as subprocesses.

* A table of bad inputs to ``python -m lunarl.train`` and ``lunarl.evaluate``: each exits
  non-zero with exactly one line on stderr naming the culprit, no traceback, and leaves the run
  dir and its checkpoints byte-for-byte as they were.
* Damaged latest checkpoints (corrupt bytes, a truncated file, a deleted file): the run resumes
  from the previous checkpoint and ends bit-identical to a run that never stopped; with every
  checkpoint damaged it exits with code 4 and changes nothing.
* ``conf/`` lists every field of the env and agent config classes; the quiet start.
* A random-kill test (SIGKILL at random moments, slow).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, assert_same_state, final_state, run_app

from lunarl.run import cli
from lunarl.run.checkpoint import CheckpointDamaged, Checkpoints, state_digest
from lunarl.run.numerics import describe_change, numerics_fingerprint
from lunarl.run.schema import TrainSchema

pytestmark = pytest.mark.timeout(900)

# A tiny PPO run: 4 envs x 4 steps, chunks of 2 iterations, a checkpoint after every chunk.
TINY = [
    "+experiment=rover_smoke",
    "env.num_envs=4",
    "env.episode_length=20",
    "agent.unroll_length=4",
    "agent.num_minibatches=2",
    "agent.num_epochs=1",
    "agent.policy_hidden=[8]",
    "agent.value_hidden=[8]",
    "run.log_every=2",
    "run.checkpoint_every=2",
    "run.eval_every=4",
    "run.eval_episodes=2",
    "checkpoint.max_to_keep=3",
    "logger.wandb.mode=disabled",
    "logger.console=false",
]
STEPS_PER_CHUNK = 2 * 4 * 4


def _train(app_env, run_dir: Path, chunks: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_app(app_env, "lunarl.train", *TINY, f"run.total_env_steps={chunks * STEPS_PER_CHUNK}",
                   f"run.dir={run_dir}", *extra, cwd=run_dir.parent)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` and its SHA-256 (the run dir byte for byte)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, app_env) -> dict[str, Path]:
    """``full``: 6 chunks uninterrupted; ``partial``: the same run stopped after 4 chunks."""
    root = tmp_path_factory.mktemp("faults")
    # One after the other: the second run loads the first one's programs from the shared JAX
    # cache (side by side, both compiled them).
    partial_proc = _train(app_env, root / "partial", 4)
    full_proc = _train(app_env, root / "full", 6)
    # A clean start prints nothing on stderr (MJX's optional-backend messages are silenced),
    # whether it compiles or finds its programs in the cache.
    for proc in (partial_proc, full_proc):
        assert proc.stderr == "", proc.stderr[-2000:]
    return {"root": root, "full": root / "full", "partial": root / "partial"}


# --------------------------------------------------------------------------------------------
# Bad input: one line, no traceback, nothing changed
# --------------------------------------------------------------------------------------------


def _foreign_run(root: Path) -> Path:
    run_dir = root / "foreign"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text("model: resnet50\nbatch_size: 64\n")
    return run_dir


def _damage_all(run_dir: Path) -> None:
    for step_dir in (run_dir / "checkpoints" / "latest").iterdir():
        for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True):
            os.remove(f)


# (app, arguments, culprit in the message, expected exit code); "{run}" is a copy of a finished
# run, "{foreign}" a dir whose config.yaml is not lunarl's, "{damaged}" a run whose checkpoints
# all lost their data files.
BAD_INPUTS = [
    ("lunarl.train", ["env.num_envs=-5"], "env.num_envs=-5 is out of range", 1),
    ("lunarl.train", ["+experiment=nope"], "no config experiment/nope; available:", 1),
    ("lunarl.train", ["env.num_rokcs=3"], "unknown key env.num_rokcs; did you mean env.num_rocks?", 1),
    ("lunarl.train", ["agent.learning_rate=abc"], "agent.learning_rate must be a number", 1),
    ("lunarl.train", ["run.eval_every=3"], "run.eval_every=3 must be a multiple of run.log_every", 1),
    ("lunarl.train", ["checkpoint.dir=/proc/nope"], "checkpoint.dir=/proc/nope is not a writable directory", 1),
    ("lunarl.train", ["run.dir={run}", "agent.policy_hidden=[16]"], "agent.policy_hidden: [8] (checkpoint) vs [16] (now)", 1),
    ("lunarl.train", ["run.dir={foreign}"], "holds a config.yaml that is not a lunarl train config", 1),
    ("lunarl.train", ["run.dir={damaged}"], "no intact checkpoint in", 4),
    ("lunarl.evaluate", ["run.dir={root}/nowhere"], "no run directory at", 1),
    ("lunarl.evaluate", ["run.dir={run}", "checkpoint=999"], "no checkpoint for iteration 999", 1),
    ("lunarl.evaluate", ["run.dir={run}", "eval.episdes=3"], "unknown key eval.episdes; did you mean eval.episodes?", 1),
    ("lunarl.evaluate", ["run.dir={run}", "eval.episodes=0"], "eval.episodes=0 is out of range", 1),
    ("lunarl.evaluate", ["run.dir={run}", "env.num_rocks=-1"], "num_rocks", 1),
    ("lunarl.evaluate", ["run.dir={foreign}"], "is not a lunarl train config", 1),
    ("lunarl.evaluate", ["run.dir={damaged}"], "is damaged", 4),
]
# Each app start costs ~6 s of imports; these take the same path as a case above (an unknown key
# with a suggestion, like env.num_rokcs; a missing config, like +experiment=nope), so they run
# with the slow tests.
MORE_BAD_INPUTS = [
    ("lunarl.train", ["agent.learning_rat=0.1"], "did you mean agent.learning_rate?", 1),
    ("lunarl.train", ["agent=nope"], "no config agent/nope", 1),
]


@pytest.mark.parametrize("cases", [BAD_INPUTS, pytest.param(MORE_BAD_INPUTS, marks=pytest.mark.slow)], ids=["default", "more"])
def test_bad_inputs_get_one_line_and_change_nothing(cases, runs, app_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["partial"], run)
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["partial"], damaged)
    _damage_all(damaged)
    places = {"run": run, "foreign": _foreign_run(tmp_path), "damaged": damaged, "root": tmp_path}
    before = {name: _tree_digest(p) for name, p in places.items()}

    def attempt(numbered):
        i, case = numbered
        app, args, culprit, code = case
        args = [a.format(**places) for a in args]
        if app == "lunarl.train" and not any(a.startswith("run.dir=") for a in args):
            args.append(f"run.dir={tmp_path / f'fresh{i}'}")
        extra = TINY if app == "lunarl.train" else []
        return case, run_app(app_env, app, *extra, *args, cwd=tmp_path, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(attempt, enumerate(cases)))
    for (app, args, culprit, code), proc in results:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        where = f"{app} {args}: rc={proc.returncode} stderr={proc.stderr[-1500:]!r}"
        assert proc.returncode == code, where
        assert len(lines) == 1 and lines[0].startswith(f"{app}: error: "), where
        assert culprit in lines[0], where
        assert "Traceback" not in proc.stdout + proc.stderr, where
    for name, p in places.items():
        assert _tree_digest(p) == before[name], f"{name} changed"
    assert not list(tmp_path.glob("fresh*"))  # refused before anything was written


# --------------------------------------------------------------------------------------------
# Damaged checkpoints
# --------------------------------------------------------------------------------------------


def _data_files(run_dir: Path, step: int) -> list[Path]:
    """The data files of a checkpoint's state (OCDBT keeps values in several files, some of them
    no longer referenced, so every one of them is damaged)."""
    return [Path(f) for f in glob.glob(str(run_dir / "checkpoints" / "latest" / str(step) / "state" / "**" / "d" / "*"), recursive=True)]


def _flip_bytes(path: Path) -> None:
    """Flip one byte in every 97, past the first 64 (a data file also holds values that are no
    longer referenced, so a single damaged spot may never be read)."""
    data = bytearray(path.read_bytes())
    for i in range(64, len(data), 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "corrupt": _flip_bytes,  # decodes without an error: only the digest notices
    "truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "delete": os.remove,
}


# "corrupt" by default: a flipped byte decodes without an error and only lunarl's digest notices.
# Orbax itself notices a truncated or deleted file; those two run with the slow tests.
@pytest.mark.parametrize(
    "kind", [k if k == "corrupt" else pytest.param(k, marks=pytest.mark.slow) for k in sorted(DAMAGE)]
)
def test_damaged_latest_checkpoint_costs_one_checkpoint(kind, runs, app_env, tmp_path):
    run_dir = tmp_path / kind
    shutil.copytree(runs["partial"], run_dir)
    for path in _data_files(run_dir, 8):
        DAMAGE[kind](path)
    proc = _train(app_env, run_dir, 6)
    assert f"the latest checkpoint at iteration 8 in {run_dir / 'checkpoints'} is damaged" in proc.stdout
    assert "resuming from checkpoint at iteration 6" in proc.stdout
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert (run_dir / "checkpoints" / "corrupt" / "8" / "state").is_dir()  # moved aside, not deleted
    (it_a, a), (it_b, b) = final_state(runs["full"]), final_state(run_dir)
    assert it_a == it_b == 12
    assert_same_state(a, b)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "losses/value_loss" in r] == [2, 4, 6, 8, 10, 12]


def test_restore_checks_the_digest(tmp_path):
    state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    config = {"env": {"name": "rover"}, "agent": {"name": "ppo"}, "seed": 0, "num_seeds": 1}
    ck = Checkpoints(str(tmp_path / "ck"))
    ck.save(1, state, config, {"iteration": 1})
    ck.wait()
    target = {"w": jax.ShapeDtypeStruct((2, 3), np.float32)}
    restored, _, meta = ck.restore(1, target)
    assert meta["state_sha256"] == state_digest(state) != state_digest({"w": state["w"] + 1})
    _flip_bytes(Path(max(glob.glob(str(tmp_path / "ck/latest/1/state/**/d/*"), recursive=True), key=os.path.getsize)))
    with pytest.raises(CheckpointDamaged, match="iteration 1 .* is damaged") as err:
        ck.restore(1, target)
    assert err.value.step == 1
    moved = ck.quarantine("latest", 1)
    assert moved == tmp_path / "ck" / "corrupt" / "1" and ck.latest_step() is None
    ck.close()


def test_a_relative_checkpoint_dir_saves_and_restores(tmp_path, monkeypatch):
    """``scripts/eval_unseen_tracks.py runs/car`` and the like name the run relative to the working
    directory; Orbax takes absolute paths only, and a relative one must not read as damaged."""
    monkeypatch.chdir(tmp_path)
    state = {"w": np.arange(4.0, dtype=np.float32)}
    ck = Checkpoints("runs/ck")
    ck.save(3, state, {"seed": 0}, {"iteration": 3})
    ck.wait()
    ck.close()
    again = Checkpoints("runs/ck", create=False)
    restored, config, meta = again.restore("latest", {"w": jax.ShapeDtypeStruct((4,), np.float32)})
    again.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta["iteration"] == 3 and config["seed"] == 0


def test_the_numerics_fingerprint_names_what_changed_and_stays_quiet_otherwise():
    """A checkpoint written on another stack is named in one line (what changed, old -> new); the
    same stack, or a checkpoint from before lunarl recorded one, gives no line."""
    now = numerics_fingerprint()
    assert {"jax", "jaxlib", "flax", "optax", "numpy", "backend", "device", "cpu"} <= set(now)
    assert now["jax"] == jax.__version__ and now["backend"] == jax.default_backend()
    assert json.loads(json.dumps(now)) == now  # saved in the checkpoint's JSON meta
    assert describe_change(now, now) is None and describe_change(None, now) is None
    older = {**now, "jaxlib": "0.4.1", "cpu": "Other CPU"}
    del older["optax"]
    assert describe_change(older, now) == (
        f"jaxlib 0.4.1 -> {now['jaxlib']}; optax unrecorded -> {now['optax']}; cpu Other CPU -> {now['cpu']}"
    )


# --------------------------------------------------------------------------------------------
# Keys and messages
# --------------------------------------------------------------------------------------------


def test_conf_lists_every_config_field():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "sync_conf.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_hydra_errors_become_one_line_with_a_suggestion():
    keys = cli.known_keys(TrainSchema)
    text = (
        "Could not override 'env.num_rokcs'.\nTo append to your config use +env.num_rokcs=3\n"
        "Key 'num_rokcs' is not in struct\n    full_key: env.num_rokcs\n    object_type=dict\n\n"
        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    )
    assert cli.one_line_hydra_error(text, keys) == "unknown key env.num_rokcs; did you mean env.num_rocks?"
    assert cli.normalize_overrides(["+env.num_rocks=3", "+env.nope=1", "env.dt=0.1"], keys) == ["env.num_rocks=3", "+env.nope=1", "env.dt=0.1"]
    assert cli.normalize_overrides(["env.num_rocks=3", "+env.dt=1"], set(), ("env",)) == ["+env.num_rocks=3", "+env.dt=1"]


def test_event_loop_noise_is_dropped_and_real_tracebacks_kept():
    import io

    out = io.StringIO()
    stream = cli._HeldStream(out)
    stream.write("held\n")
    assert out.getvalue() == ""
    assert stream.release() == "held\n"
    noise = "Traceback (most recent call last):\n  File \"x\", line 1\n    raise\nRuntimeError: Event loop is closed\n"
    stream.write("a\n" + noise + "Trace")
    stream.write("back (most recent call last):\n  File \"y\"\nValueError: real\nb\n")
    assert out.getvalue() == "a\nTraceback (most recent call last):\n  File \"y\"\nValueError: real\nb\n"


def test_unretrieved_task_tracebacks_are_dropped_and_other_asyncio_errors_kept():
    import logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    cli.quiet_libraries()
    cli.quiet_libraries()  # idempotent: one filter
    log = logging.getLogger("asyncio")
    handler = Collect()
    log.addHandler(handler)
    try:
        try:
            raise ValueError("a sibling read of a damaged checkpoint")
        except ValueError:
            log.error("Task exception was never retrieved\nfuture: <Task finished>", exc_info=True)
        log.error("Exception in callback Loop.run()")
    finally:
        log.removeHandler(handler)
    assert records == ["Exception in callback Loop.run()"]
    assert sum(isinstance(f, cli._UnretrievedTaskFilter) for f in log.filters) == 1


def test_preflight_refuses_a_disk_without_room_for_two_checkpoints(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from lunarl.run import preflight as pf
    from lunarl.run.schema import ConfigError, validate_train

    cfg = OmegaConf.structured(TrainSchema)
    cfg.env = {"name": "rover", "num_envs": 4}
    cfg.agent = {"name": "ppo"}
    cfg.checkpoint.dir = str(tmp_path / "ck")
    cfg.run.dir = str(tmp_path / "run")  # the default uses Hydra's ${now:} resolver
    plan = validate_train(cfg)
    pf.preflight(plan, tmp_path / "run", 10_000)
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: type("U", (), {"free": 15_000})())
    with pytest.raises(ConfigError, match=r"checkpoint.dir=.*ck has 14.6 KiB free; two checkpoints .* need up to 19.5 KiB"):
        pf.preflight(plan, tmp_path / "run", 10_000)
    assert not list((tmp_path / "ck").iterdir())  # the probe file is gone


# --------------------------------------------------------------------------------------------
# Random kills
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_random_sigkills_end_bit_identical(runs, app_env, tmp_path):
    """SIGKILL the training process at random moments, restart it each time; the run that
    finally completes ends bit-identical to the uninterrupted one."""
    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    args = [sys.executable, "-m", "lunarl.train", *TINY, f"run.total_env_steps={6 * STEPS_PER_CHUNK}", f"run.dir={run_dir}"]
    kills = 0
    for _ in range(30):
        proc = subprocess.Popen(args, cwd=tmp_path, env=app_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        delay = rng.uniform(3.0, 12.0)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        if kills >= 5:
            break
        shutil.rmtree(run_dir)  # finished before 5 kills: start over, the kills must land
        kills = 0
        time.sleep(0.1)
    assert kills >= 5
    assert_same_state(final_state(runs["full"])[1], final_state(run_dir)[1])
