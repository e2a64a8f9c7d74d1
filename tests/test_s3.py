"""S3 checkpoints (lunarl issue 18) against a real S3-compatible server on 127.0.0.1.

moto's server runs in this process (``ThreadedMotoServer``); the apps reach it through
``AWS_ENDPOINT_URL`` with dummy credentials, exactly as they would reach AWS, via a small TCP
relay that plays the outage: ``stop`` cuts every open connection and refuses new ones (stopping
moto itself would leave boto3's keep-alive connections served), ``start`` lets them through again.

* In-process, with the real ``Checkpoints``: an outage while saving (warning, training goes on,
  local copies intact, the end of the run fails with one line naming the bucket and the steps,
  pending steps uploaded once the server is back); a remote step without its ``COMMIT`` is
  ignored and one whose files do not match their manifest is skipped; an unreachable endpoint
  or a missing bucket is one line.
* Through the apps (``agent=counter``, the toy agent of the contract tests): keep-K and best
  mirrored remotely, resume on an empty local disk ending bit-identical to an uninterrupted
  run, ``lunarl.evaluate`` from ``s3://``, and the server lost in the middle of a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, assert_same_state, final_state, run_app

pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from lunarl.run.checkpoint import CheckpointError, Checkpoints, CheckpointUploadFailed  # noqa: E402
from lunarl.run.remote import COMMIT, S3Location, S3Store  # noqa: E402
from lunarl.run.restore import checkpoint_dir_of, restore_run  # noqa: E402

pytestmark = pytest.mark.timeout(900)

BUCKET = "lunarl-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_MAX_ATTEMPTS": "2",  # fail fast while the server is down
    "AWS_CONFIG_FILE": os.devnull,  # nothing from this machine's ~/.aws
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class S3Server:
    """moto on 127.0.0.1 behind a relay at ``endpoint``; ``stop``/``start`` the outage."""

    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
        self.moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        self.target = self.moto.get_host_and_port()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.up, self.open, self.lock = True, set(), threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def stop(self) -> None:
        self.up = False
        with self.lock:
            cut = list(self.open)
        for sock in cut:
            self._close(sock)

    def start(self) -> None:
        self.up = True

    def close(self) -> None:
        self.listener.close()
        self.stop()
        self.moto.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, with AWS_* set in this process too (for the in-process tests and boto3 here)."""
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL", "XDG_CACHE_HOME"]}
    server = S3Server()
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=server.endpoint, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")))
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield server
    server.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def s3_env(s3, app_env, tmp_path_factory) -> dict[str, str]:
    return {**app_env, **AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("app_cache"))}


def _client():
    import boto3

    return boto3.client("s3")


def _remote(prefix: str, which: str) -> dict[int, bool]:
    """Every remote step of ``which`` and whether it has its COMMIT."""
    return S3Store(f"s3://{BUCKET}/{prefix}").listing(which)


def _local(staging: Path, which: str) -> list[int]:
    return sorted(int(p.name) for p in (staging / which).iterdir() if p.name.isdigit())


def _file_digests(step_dir: Path) -> dict[str, dict]:
    return {
        p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(step_dir.rglob("*")) if p.is_file()
    }  # fmt: skip


def _commit(prefix: str, which: str, step: int) -> dict:
    body = _client().get_object(Bucket=BUCKET, Key=f"{prefix}/{which}/{step}/{COMMIT}")["Body"].read()
    return json.loads(body)


def _assert_mirrored(prefix: str, staging: Path, which: str, steps: list[int]) -> None:
    """The remote side holds exactly ``steps``, each committed, byte for byte the local copy."""
    assert _local(staging, which) == steps
    assert _remote(prefix, which) == {s: True for s in steps}
    for step in steps:
        assert _commit(prefix, which, step)["files"] == _file_digests(staging / which / str(step))


def _wait_for(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# In-process: the real Checkpoints and mirror against the server
# --------------------------------------------------------------------------------------------

CONFIG = {"env": {"name": "toy"}, "agent": {"name": "toy"}, "seed": 0, "num_seeds": 1}


def _state(i: int) -> dict:
    return {"w": jnp.arange(1000, dtype=jnp.float32) * i, "step": jnp.int32(i)}


def test_outage_keeps_saving_locally_and_uploads_once_the_server_is_back(s3, tmp_path):
    prefix, staging, notes = "outage-unit", tmp_path / "staging", []
    ckpts = Checkpoints(f"s3://{BUCKET}/{prefix}", max_to_keep=2, staging=str(staging), upload_timeout=2.0, report=notes.append)
    try:
        ckpts.save(2, _state(2), CONFIG, {"iteration": 2})
        ckpts.save_best(2, _state(2), CONFIG, {"iteration": 2}, score=1.0)
        # The healthy first upload can outlast the 2 s upload_timeout (short for the outage below)
        # on a loaded machine (it did once in a fresh-clone run): let it land, then wait() must pass.
        _wait_for(lambda: _remote(prefix, "latest") == {2: True} and _remote(prefix, "best") == {2: True},
                  what="the first upload")  # fmt: skip
        ckpts.wait()
        _assert_mirrored(prefix, staging, "latest", [2])
        _assert_mirrored(prefix, staging, "best", [2])

        s3.stop()
        ckpts.save(4, _state(4), CONFIG, {"iteration": 4})
        _wait_for(lambda: any("warning" in n for n in notes), what="the mirror's warning")
        warning = next(n for n in notes if "warning" in n)
        assert f"s3://{BUCKET}/{prefix}" in warning and "latest 4" in warning
        assert str(staging) in warning and "training continues" in warning
        ckpts.save(6, _state(6), CONFIG, {"iteration": 6})  # training goes on
        ckpts.save_best(6, _state(6), CONFIG, {"iteration": 6}, score=2.0)
        t0 = time.monotonic()
        with pytest.raises(CheckpointUploadFailed) as failed:
            ckpts.wait()
        assert 2.0 <= time.monotonic() - t0 < 30
        message = str(failed.value)
        assert "\n" not in message and f"s3://{BUCKET}/{prefix}" in message
        assert "latest 6" in message and "latest 4" in message and "best 6" in message
        ckpts.wait()  # already reported: no second wait
        # Nothing lost locally: the managers' own rotation, and every step reads back intact.
        assert _local(staging, "latest") == [4, 6] and _local(staging, "best") == [6]
        state, _, _ = ckpts.restore(6, _state(0))
        np.testing.assert_array_equal(state["w"], _state(6)["w"])

        s3.start()
        ckpts.save(8, _state(8), CONFIG, {"iteration": 8})
        # The mirror may be inside botocore's own retry backoff when the server comes back, which
        # can outlast the 2 s upload_timeout on a loaded machine: give it time, then wait() must pass.
        _wait_for(lambda: _remote(prefix, "latest") == {6: True, 8: True}, what="the upload after the outage")
        ckpts.wait()
        _assert_mirrored(prefix, staging, "latest", [6, 8])  # old steps deleted remotely too
        _assert_mirrored(prefix, staging, "best", [6])
        assert any("answers again" in n for n in notes)
    finally:
        s3.start()
        ckpts.close()


def test_remote_step_without_commit_is_ignored_and_a_damaged_one_skipped(s3, tmp_path):
    prefix, notes = "pull-unit", []
    writer = Checkpoints(f"s3://{BUCKET}/{prefix}", max_to_keep=3, staging=str(tmp_path / "writer"), report=notes.append)
    for step in (2, 4):
        writer.save(step, _state(step), CONFIG, {"iteration": step})
    writer.wait()
    writer.close()
    client = _client()
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/latest/4/")["Contents"]]
    for key in objects:  # step 6: every file of step 4 but no COMMIT (an upload cut short)
        if not key.endswith(COMMIT):
            client.copy_object(Bucket=BUCKET, Key=key.replace("/latest/4/", "/latest/6/"), CopySource={"Bucket": BUCKET, "Key": key})
    for key in objects:  # step 8: committed, but one file is not what its manifest says
        client.copy_object(Bucket=BUCKET, Key=key.replace("/latest/4/", "/latest/8/"), CopySource={"Bucket": BUCKET, "Key": key})
    damaged = next(k for k in objects if k.endswith("_CHECKPOINT_METADATA")).replace("/latest/4/", "/latest/8/")
    client.put_object(Bucket=BUCKET, Key=damaged, Body=b"{}")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/latest/10/{COMMIT}", Body=b"not json")  # a foreign marker
    assert _remote(prefix, "latest") == {2: True, 4: True, 6: False, 8: True, 10: True}

    # A fresh machine: nothing local.
    reader = Checkpoints(f"s3://{BUCKET}/{prefix}", create=False, staging=str(tmp_path / "fresh"), pull=("latest",), report=notes.append)
    try:
        assert reader.latest_step() == 4
        assert any(f"skipping s3://{BUCKET}/{prefix}/latest/10: its COMMIT is not a lunarl manifest" in n for n in notes)
        assert any(f"skipping s3://{BUCKET}/{prefix}/latest/8" in n and "_CHECKPOINT_METADATA" in n for n in notes)
        state, _, meta = reader.restore("latest", _state(0))
        assert meta["iteration"] == 4
        np.testing.assert_array_equal(state["w"], _state(4)["w"])
        assert not (tmp_path / "fresh" / "latest" / "8").exists() and not (tmp_path / "fresh" / "latest" / "6").exists()
    finally:
        reader.close()
    assert _remote(prefix, "latest") == {2: True, 4: True, 6: False, 8: True, 10: True}  # a reader writes nothing


def test_unreachable_endpoint_or_missing_bucket_is_one_line(s3, tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    with pytest.raises(CheckpointError) as e:
        Checkpoints(f"s3://{BUCKET}/nowhere", staging=str(tmp_path / "a"))
    assert "\n" not in str(e.value) and f"s3://{BUCKET}/nowhere" in str(e.value) and "Could not connect" in str(e.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    with pytest.raises(CheckpointError) as e:
        Checkpoints("s3://no-such-bucket/x", staging=str(tmp_path / "b"))
    assert "NoSuchBucket" in str(e.value) and "s3://no-such-bucket/x" in str(e.value)


def test_s3_urls_and_the_staging_dir_are_checked_before_anything_starts(tmp_path):
    from lunarl.run.remote import parse_s3_url

    assert parse_s3_url("s3://bucket/a/b/") == S3Location("bucket", "a/b")
    assert parse_s3_url("s3://bucket").url("latest", 3) == "s3://bucket/latest/3"
    for bad, culprit in (("s3:///x", "names no bucket"), ("gs://bucket/x", "only s3://bucket/prefix")):
        with pytest.raises(ValueError, match=culprit):
            parse_s3_url(bad)
    with pytest.raises(CheckpointError, match="names no bucket"):
        Checkpoints("s3:///x", staging=str(tmp_path))


# --------------------------------------------------------------------------------------------
# Through the apps
# --------------------------------------------------------------------------------------------

# The toy agent of the contract tests: 2 seeds x 4 envs x 8 steps, chunks of 2 iterations, an
# evaluation and a checkpoint after each; two latest checkpoints kept.
COUNTER = [
    f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]",
    "agent=counter",
    "env=rover",
    "env.num_envs=4",
    "env.episode_length=5",
    "num_seeds=2",
    "run.log_every=2",
    "run.eval_every=2",
    "run.eval_episodes=4",
    "run.checkpoint_every=2",
    "checkpoint.max_to_keep=2",
    "logger.wandb.mode=disabled",
    "logger.console=false",
]
STEPS_PER_CHUNK = 2 * 4 * 8


def _args(run_dir: Path, prefix: str, chunks: int, *extra: str) -> list[str]:
    return [*COUNTER, f"run.total_env_steps={chunks * STEPS_PER_CHUNK}", f"run.dir={run_dir}",
            f"checkpoint.dir=s3://{BUCKET}/{prefix}", *extra]  # fmt: skip


def _train(env, run_dir: Path, prefix: str, chunks: int, *extra: str) -> subprocess.CompletedProcess:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = run_app(env, "lunarl.train", *_args(run_dir, prefix, chunks, *extra), cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(s3_env, tmp_path_factory) -> dict[str, Path]:
    """Side by side: ``full``, 4 chunks uninterrupted to s3://lunarl-test/full, and ``partial``,
    the same run stopped after 2 chunks, to s3://lunarl-test/resume."""
    root = tmp_path_factory.mktemp("s3")
    with ThreadPoolExecutor(2) as pool:
        full = pool.submit(_train, s3_env, root / "full", "full", 4)
        partial = pool.submit(_train, s3_env, root / "partial", "resume", 2)
        proc, _ = full.result(), partial.result()
    assert proc.stderr == "", proc.stderr[-2000:]
    assert f"checkpoints in s3://{BUCKET}/full" in proc.stdout
    assert not any(p.name.startswith("s3:") for p in root.rglob("*"))  # the old failure mode
    return {"full": root / "full", "partial": root / "partial"}


@pytest.fixture(scope="module")
def full(runs) -> Path:
    return runs["full"]


def test_run_mirrors_keep_k_and_best(full):
    staging = full / "checkpoints"
    _assert_mirrored("full", staging, "latest", [6, 8])
    best = _local(staging, "best")
    assert len(best) == 1
    _assert_mirrored("full", staging, "best", best)


def test_resume_on_an_empty_local_disk_is_bit_identical(runs, s3_env):
    full, run_dir = runs["full"], runs["partial"]
    _assert_mirrored("resume", run_dir / "checkpoints", "latest", [2, 4])
    shutil.rmtree(run_dir)  # a fresh machine: only the bucket remains
    proc = _train(s3_env, run_dir, "resume", 4)
    assert f"resuming from checkpoint at iteration 4 (env step {2 * STEPS_PER_CHUNK:,}) in s3://{BUCKET}/resume" in proc.stdout
    (it_a, a), (it_b, b) = final_state(full), final_state(run_dir)
    assert it_a == it_b == 8
    assert_same_state(a, b)
    _assert_mirrored("resume", run_dir / "checkpoints", "latest", [6, 8])
    assert _local(run_dir / "checkpoints", "best") == _local(full / "checkpoints", "best")


def test_a_saved_run_restores_from_s3_on_an_empty_disk(full, s3, tmp_path):
    """What lunarl.evaluate does (its app run is the slow test below), in this process."""
    # The run's config.yaml names its s3:// dir: lunarl.evaluate run.dir=RUN reads from there.
    assert checkpoint_dir_of(full) == f"s3://{BUCKET}/full"
    best = _local(full / "checkpoints", "best")[0]
    for which, step in (("best", best), (6, 6)):
        # Restoring checks the arrays against the digest in meta; the meta is the run's own.
        saved = restore_run(f"s3://{BUCKET}/full", which, staging=str(tmp_path / "cache"))
        assert saved.meta == json.loads((full / "checkpoints" / ("best" if which == "best" else "latest") / str(step) / "meta" / "metadata").read_text())
    assert _local(tmp_path / "cache", "latest") == [6] and _local(tmp_path / "cache", "best") == [best]
    with pytest.raises(CheckpointError, match=f"no checkpoint for iteration 4 in s3://{BUCKET}/full/latest"):
        restore_run(f"s3://{BUCKET}/full", 4, staging=str(tmp_path / "cache"))


@pytest.mark.slow
def test_evaluate_reads_an_s3_checkpoint(full, s3_env, tmp_path):
    # Another machine: nothing but the bucket, and a dir for the results.
    cache = Path(s3_env["XDG_CACHE_HOME"]) / "lunarl" / "s3" / BUCKET / "full"
    best = _local(full / "checkpoints", "best")[0]
    proc = run_app(s3_env, "lunarl.evaluate", f"run.dir={tmp_path}", f"checkpoint_dir=s3://{BUCKET}/full",
                   "checkpoint=best", "eval.episodes=3", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1].split()[1]).read_text())
    assert result["iteration"] == best and result["agent"] == "counter" and np.isfinite(result["eval/episode_return"])
    assert _local(cache, "best") == [best]
    assert _file_digests(cache / "best" / str(best)) == _file_digests(full / "checkpoints" / "best" / str(best))


class _Output:
    """A process's stdout and stderr, read in threads (so no pipe fills) as growing lists."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.errors = proc, [], []
        self.threads = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                        for stream, into in ((proc.stdout, self.lines), (proc.stderr, self.errors))]  # fmt: skip
        for t in self.threads:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in iter(stream.readline, ""):
            into.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait(self, timeout: float) -> str:
        """The exit code is ``proc.returncode``; returns stderr."""
        self.proc.wait(timeout)
        for t in self.threads:
            t.join(10)
        return "".join(self.errors)


def _start(env, run_dir: Path, prefix: str, chunks: int, *extra: str) -> tuple[subprocess.Popen, _Output]:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "lunarl.train", *_args(run_dir, prefix, chunks, *extra)],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    return proc, _Output(proc)


@pytest.mark.slow
def test_server_lost_mid_run_keeps_training_then_exits_5_and_a_rerun_uploads(s3, s3_env, tmp_path):
    """The endpoint goes away after the first upload and stays away: the run warns, trains to
    the end with its local checkpoints, and exits with code 5 naming the bucket and the steps
    still only local; the same command once the server is back uploads them."""
    run_dir, prefix, chunks = tmp_path / "lost", "lost", 20
    proc, out = _start(s3_env, run_dir, prefix, chunks, "checkpoint.upload_timeout=2")
    try:
        _wait_for(lambda: any(_remote(prefix, "latest").values()) or proc.poll() is not None, 300, "the first upload")
        s3.stop()
        stderr = out.wait(300)
    finally:
        s3.start()
    last = chunks * 2
    assert proc.returncode == 5, stderr[-2000:]
    assert out.has("warning: S3 checkpoint mirror failed") and out.has("training continues")
    assert out.has(f"eval @ {chunks * STEPS_PER_CHUNK:,} steps")  # trained to the end
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lunarl.train: error: could not upload checkpoints to s3://lunarl-test/lost")
    assert f"latest {last}" in lines[0] and str(run_dir / "checkpoints") in lines[0]
    assert final_state(run_dir)[0] == last  # the local checkpoint is whole
    assert _remote(prefix, "latest").get(last) is None

    rerun = _train(s3_env, run_dir, prefix, chunks)
    assert f"run already finished: iteration {last}" in rerun.stdout
    _assert_mirrored(prefix, run_dir / "checkpoints", "latest", [last - 2, last])
    _assert_mirrored(prefix, run_dir / "checkpoints", "best", _local(run_dir / "checkpoints", "best"))


@pytest.mark.slow
def test_server_back_mid_run_and_sigterm_upload_then_resume_elsewhere(s3, s3_env, tmp_path):
    """The endpoint goes away and comes back while the run trains: pending checkpoints are
    uploaded; SIGTERM then stops the run with its last checkpoint uploaded before the exit, and
    a resume on an empty disk ends bit-identical to a run that never stopped."""
    chunks, prefix = 300, "back"
    reference = tmp_path / "reference"
    proc = run_app(s3_env, "lunarl.train", *COUNTER, f"run.total_env_steps={chunks * STEPS_PER_CHUNK}",
                   f"run.dir={reference}", cwd=tmp_path)  # a local checkpoint.dir
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "interrupted"
    proc, out = _start(s3_env, run_dir, prefix, chunks)
    try:
        _wait_for(lambda: any(_remote(prefix, "latest").values()), 300, "the first upload")
        s3.stop()
        _wait_for(lambda: out.has("warning: S3 checkpoint mirror failed") or proc.poll() is not None, 300, "the warning")
        time.sleep(1.0)  # a few more checkpoints while the server is down
        s3.start()
        _wait_for(lambda: out.has("S3 answers again") or proc.poll() is not None, 300, "the recovery")
        assert proc.poll() is None, "the run ended before the test could interrupt it: make it longer"
        proc.send_signal(signal.SIGTERM)
        stderr = out.wait(300)
    finally:
        s3.start()
    assert proc.returncode == 0, stderr[-2000:]
    assert out.has("stopped by SIGTERM")
    stopped = _local(run_dir / "checkpoints", "latest")[-1]
    assert 0 < stopped < chunks * 2
    _assert_mirrored(prefix, run_dir / "checkpoints", "latest", _local(run_dir / "checkpoints", "latest"))

    shutil.rmtree(run_dir)
    resumed = _train(s3_env, run_dir, prefix, chunks)
    assert f"resuming from checkpoint at iteration {stopped} " in resumed.stdout
    (it_a, a), (it_b, b) = final_state(reference), final_state(run_dir)
    assert it_a == it_b == chunks * 2
    assert_same_state(a, b)
