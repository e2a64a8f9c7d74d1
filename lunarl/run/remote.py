"""Checkpoints mirrored to S3: Orbax writes to a local staging dir, this module copies finished
steps up and back down.

Orbax 0.12 cannot write to ``s3://`` itself (google/orbax#359), and a checkpoint half-written
straight into object storage would be visible to a resume. So a step becomes visible remotely
only once it is complete:

    s3://bucket/prefix/<which>/<step>/<files as Orbax wrote them>
    s3://bucket/prefix/<which>/<step>/COMMIT     written last: JSON manifest {file: size, sha256}

``which`` is ``latest`` or ``best``. A step without ``COMMIT`` does not exist for a reader (an
upload cut short, or a deletion half done: deletion removes ``COMMIT`` first). A download checks
every file against the manifest and is renamed into place only when all match.

``Mirror`` keeps the remote side equal to the newest ``keep`` steps of (local steps and committed
remote steps) for each ``which``, in a background thread: training never waits for an upload,
old steps are deleted remotely after the new one is committed, and a step whose upload fails
stays local and is retried with backoff (every new save also retries at once). ``flush`` waits
for it, up to a deadline, and raises ``UploadFailed`` naming the bucket and step if the endpoint
never answered.

One run writes under a prefix (as with a local ``checkpoint.dir``): the mirror lists the remote
side once and then keeps its own view of it. ``<staging>/.s3-commits/`` remembers the COMMIT
of each local step uploaded, so a resumed run uploads only what an earlier session left local.

Credentials, region, endpoint and retries come from boto3's standard chain (environment,
``~/.aws``, instance role; ``AWS_ENDPOINT_URL`` for an S3-compatible server; ``AWS_MAX_ATTEMPTS``
and ``AWS_RETRY_MODE``), never from lunarl's config, and nothing here logs them.

Multi-host: only the process that calls this (process 0, see ``lunarl.run.checkpoint``) uploads
and downloads; the staging dir must then be on a filesystem every process shares, as Orbax's
multi-host save needs anyway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = [
    "COMMIT",
    "Mirror",
    "RemoteUnavailable",
    "S3Location",
    "S3Store",
    "UploadFailed",
    "default_staging",
    "is_remote",
    "local_steps",
    "parse_s3_url",
    "pull",
]

COMMIT = "COMMIT"  # the marker object, written last; its body is the step's manifest
FORMAT = "lunarl-checkpoint-mirror/1"
RECORDS = ".s3-commits"  # in the staging dir: the COMMIT of each local step known to be uploaded
DOWNLOADS = ".s3-download"  # in the staging dir: steps being downloaded, renamed into place when whole
SINGLE_PUT_BYTES = 8 << 20  # files up to this size go up and down in one request
TRANSFER_THREADS = 8  # files of a step transferred at once


class RemoteUnavailable(RuntimeError):
    """The endpoint could not be reached or refused a request (after boto3's own retries)."""


class UploadFailed(RuntimeError):
    """Steps are still only local when ``Mirror.flush``'s deadline passed."""


def is_remote(directory: str) -> bool:
    return "://" in str(directory)


@dataclasses.dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing "/", may be ""

    def key(self, *parts: str | int) -> str:
        return "/".join(str(p) for p in (self.prefix, *parts) if str(p))

    def url(self, *parts: str | int) -> str:
        return f"s3://{self.bucket}/{self.key(*parts)}".rstrip("/")


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket/prefix`` as bucket and prefix; ``ValueError`` naming the URL otherwise."""
    scheme, sep, rest = str(url).partition("://")
    if scheme != "s3" or not sep:
        raise ValueError(f"checkpoint.dir={url}: only s3://bucket/prefix is supported as remote storage")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"checkpoint.dir={url} names no bucket (use s3://bucket/prefix)")
    return S3Location(bucket, prefix.strip("/"))


def default_staging(url: str) -> Path:
    """Where a reader (``lunarl.evaluate``) keeps the steps it downloads: the user's cache dir."""
    where = parse_s3_url(url)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lunarl" / "s3" / where.bucket / (where.prefix or "_")


def local_steps(directory: Path) -> set[int]:
    """Finished Orbax steps in ``directory``: Orbax writes a step under a temporary name and
    renames it to the bare number when it is complete."""
    try:
        return {int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}
    except FileNotFoundError:
        return set()


def _one_line(err: BaseException) -> str:
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        text = f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())[:240]


def _safe_relative(rel: str) -> bool:
    """A manifest's file name stays inside the step dir (no absolute path, no ``..``)."""
    parts = Path(rel).parts
    return bool(parts) and not Path(rel).is_absolute() and ".." not in parts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class S3Store:
    """The remote layout above, through one boto3 client (thread-safe, shared by both threads)."""

    def __init__(self, url: str):
        self.where = parse_s3_url(url)
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ImportError(f"checkpoint.dir={url} needs boto3: pip install -e '.[s3]'") from None
        # The standard retry mode backs off exponentially with jitter; AWS_MAX_ATTEMPTS /
        # AWS_RETRY_MODE override these defaults as for any AWS tool.
        retries = {
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
        }
        config = Config(retries=retries, connect_timeout=10, read_timeout=60, max_pool_connections=2 * TRANSFER_THREADS)
        self.client = boto3.session.Session().client("s3", config=config)

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as e:
            raise RemoteUnavailable(f"{what}: {_one_line(e)}") from None

    def listing(self, which: str) -> dict[int, bool]:
        """Every step with at least one object under ``<which>/``, and whether it is committed."""
        steps: dict[int, bool] = {}
        base = self.where.key(which) + "/"
        token: dict[str, str] = {}
        while True:
            page = self._call(
                f"listing {self.where.url(which)}",
                self.client.list_objects_v2, Bucket=self.where.bucket, Prefix=base, **token,
            )  # fmt: skip
            for obj in page.get("Contents", []):
                step, _, rest = obj["Key"][len(base):].partition("/")
                if step.isdigit():
                    steps[int(step)] = steps.get(int(step), False) or rest == COMMIT
            if not page.get("IsTruncated"):
                return steps
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def committed(self, which: str) -> list[int]:
        return sorted(s for s, done in self.listing(which).items() if done)

    def _read(self, where: str, key: str) -> bytes:
        """One object's bytes (reading the body can fail too, so it is inside ``_call``)."""
        return self._call(where, lambda: self.client.get_object(Bucket=self.where.bucket, Key=key)["Body"].read())

    def read_commit(self, which: str, step: int) -> dict[str, Any] | None:
        """A step's COMMIT, or None when it is not a manifest this version wrote."""
        body = self._read(f"reading {self.where.url(which, step, COMMIT)}", self.where.key(which, step, COMMIT))
        try:
            commit = json.loads(body)
        except ValueError:
            return None
        files = commit.get("files") if isinstance(commit, dict) and commit.get("format") == FORMAT else None
        if not isinstance(files, dict) or any(not _safe_relative(rel) for rel in files):
            return None
        return commit

    def _put(self, where: str, path: Path, key: str) -> dict[str, Any]:
        """Upload one file; returns its size and SHA-256, of the very bytes sent when it is small."""
        size = path.stat().st_size
        if size <= SINGLE_PUT_BYTES:
            data = path.read_bytes()
            self._call(where, self.client.put_object, Bucket=self.where.bucket, Key=key, Body=data)
            return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        digest = _sha256(path)  # large: streamed, then a multipart upload by s3transfer
        self._call(where, self.client.upload_file, Filename=str(path), Bucket=self.where.bucket, Key=key)
        return {"size": size, "sha256": digest}

    def upload(self, which: str, step: int, step_dir: Path, exists: bool = True) -> dict[str, Any]:
        """Copy ``step_dir`` to ``<which>/<step>/`` and commit it; returns the COMMIT written.
        A step already there (``exists``, committed or not) is deleted first, so no stale file
        survives. ``FileNotFoundError`` when Orbax deletes the step meanwhile."""
        rels = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
        if not step_dir.is_dir():
            raise FileNotFoundError(step_dir)
        if exists:
            self.delete(which, step)
        where = f"uploading iteration {step} to {self.where.url(which, step)}"
        # Many small files: the requests overlap (S3 latency, not bandwidth, bounds them).
        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            sent = pool.map(lambda rel: self._put(where, step_dir / rel, self.where.key(which, step, rel)), rels)
            files = dict(zip(rels, sent, strict=True))
        commit = {"format": FORMAT, "which": which, "step": step, "files": files}
        self._call(where, self.client.put_object, Bucket=self.where.bucket,
                   Key=self.where.key(which, step, COMMIT), Body=json.dumps(commit, sort_keys=True).encode())
        return commit

    def delete(self, which: str, step: int) -> None:
        """Remove a remote step, ``COMMIT`` first so a reader never sees it half deleted."""
        where = f"deleting {self.where.url(which, step)}"
        base = self.where.key(which, step) + "/"
        self._call(where, self.client.delete_object, Bucket=self.where.bucket, Key=base + COMMIT)
        while True:
            page = self._call(where, self.client.list_objects_v2, Bucket=self.where.bucket, Prefix=base)
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self._call(where, self.client.delete_objects, Bucket=self.where.bucket, Delete={"Objects": keys, "Quiet": True})
            if not page.get("IsTruncated"):
                return

    def _get(self, where: str, key: str, path: Path, want: dict[str, Any]) -> bool:
        """Download one file; True when its size and SHA-256 are the manifest's."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if want["size"] <= SINGLE_PUT_BYTES:
            data = self._read(where, key)
            path.write_bytes(data)
            return len(data) == want["size"] and hashlib.sha256(data).hexdigest() == want["sha256"]
        self._call(where, self.client.download_file, Bucket=self.where.bucket, Key=key, Filename=str(path))
        return path.stat().st_size == want["size"] and _sha256(path) == want["sha256"]

    def download(self, which: str, step: int, dest: Path, scratch: Path) -> dict[str, Any] | str:
        """Download committed step ``which/step`` into ``dest`` (which must not exist), checking
        every file against its manifest. Returns the COMMIT, or why the step is unusable."""
        commit = self.read_commit(which, step)
        if commit is None:
            return f"its {COMMIT} is not a lunarl manifest"
        tmp = scratch / f"{which}-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        where = f"downloading {self.where.url(which, step)}"
        files = commit["files"]
        try:
            with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
                ok = pool.map(lambda rel: self._get(where, self.where.key(which, step, rel), tmp / rel, files[rel]), files)
                bad = [rel for rel, good in zip(files, ok, strict=True) if not good]
            if bad:
                return f"{bad[0]} does not match the manifest in its COMMIT"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return commit


class Mirror:
    """Keeps ``store`` equal to the newest ``keep[which]`` steps of (the steps under
    ``root/<which>`` and the committed remote ones), in a daemon thread.

    ``expect(which, step)`` after starting an (asynchronous) Orbax save: the thread polls until
    the step is finished on disk, then uploads it. ``settled()`` once Orbax has no save in flight.
    ``report`` gets one line when uploads start failing and one when they work again.
    """

    def __init__(self, store: S3Store, root: Path, keep: dict[str, int], report: Callable[[str], None]):
        self.store, self.root, self.keep, self.report = store, Path(root), dict(keep), report
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._requested = self._synced = 0  # generations: sync requests, and the last one done
        self._expected: dict[str, int] = {}
        self._confirmed: dict[tuple[str, int], dict] = {}  # (which, step) -> files, known uploaded
        self._remote: dict[str, dict[int, bool]] = {}  # which -> the remote steps and their COMMIT
        self._error: str | None = None  # the last failure, while uploads are failing
        self._failures = 0
        self._flushing = self._closed = False
        self._flush_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="lunarl-s3-mirror", daemon=True)

    # ---- main thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.request()

    def request(self) -> None:
        with self._cond:
            self._requested += 1
        self._wake.set()

    def expect(self, which: str, step: int) -> None:
        """A save of ``which/step`` is under way: forget any earlier upload of that step number."""
        with self._cond:
            self._expected[which] = step
            self._confirmed.pop((which, step), None)
            self._flush_error = None
        (self.root / RECORDS / f"{which}-{step}.json").unlink(missing_ok=True)
        self.request()

    def settled(self) -> None:
        with self._cond:
            self._expected.clear()

    def pending(self) -> list[tuple[str, int]]:
        """Local steps (and the one being saved) the remote side should hold and does not (yet)."""
        out = []
        for which, keep in self.keep.items():
            local = local_steps(self.root / which) | ({self._expected[which]} if which in self._expected else set())
            for step in sorted(local, reverse=True)[:keep]:
                if (which, step) not in self._confirmed:
                    out.append((which, step))
        return out

    def flush(self, timeout: float) -> None:
        """Wait until every finished local step that belongs remotely is committed there. Raises
        ``UploadFailed`` (one line naming the bucket and the steps) after ``timeout`` seconds of
        failing; a second call with no save in between raises nothing (already reported)."""
        if self._flush_error is not None:
            return
        deadline = time.monotonic() + timeout
        with self._cond:
            self._requested += 1
            wanted = self._requested
            self._flushing = True
        self._wake.set()
        try:
            with self._cond:
                while self._synced < wanted and time.monotonic() < deadline and self._thread.is_alive():
                    self._cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                done = self._synced >= wanted
                error = self._error
        finally:
            self._flushing = False
        if done:
            return
        pending = self.pending()
        steps = ", ".join(f"{w} {s}" for w, s in pending) or "none"
        self._flush_error = (
            f"could not upload checkpoints to {self.store.where.url()} within checkpoint.upload_timeout="
            f"{timeout:g}s ({error or 'no answer'}); still only local, in {self.root}: {steps}. "
            "Nothing is lost: run the same command again (same run.dir) once the endpoint answers to upload them"
        )
        raise UploadFailed(self._flush_error)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)

    # ---- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        delay: float | None = None
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._closed:
                return
            with self._cond:
                generation = self._requested
            try:
                busy = self._sync()
            except RemoteUnavailable as e:
                self._failed(str(e))
                delay = 1.0 if self._flushing else min(2.0**self._failures, 30.0)
                continue
            except Exception as e:  # never let the thread die silently: report and retry
                self._failed(f"{type(e).__name__}: {e}")
                delay = min(2.0**self._failures, 30.0)
                continue
            if self._failures:
                self.report(f"S3 answers again: checkpoints mirrored to {self.store.where.url()} after {self._failures} failed tries")
            self._failures, self._error = 0, None
            if busy:
                delay = 0.1  # a save is being written: look again shortly
                continue
            delay = None
            with self._cond:
                self._synced = max(self._synced, generation)
                self._cond.notify_all()

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self._error = reason
        if self._failures == 1:
            steps = ", ".join(f"{w} {s}" for w, s in self.pending()) or "none yet"
            self.report(
                f"warning: S3 checkpoint mirror failed ({reason}); training continues, the checkpoints not "
                f"uploaded ({steps}) stay in {self.root} and are uploaded once the endpoint answers (retrying with backoff)"
            )

    def _sync(self) -> bool:
        """One pass over latest and best; True while an expected save is not finished on disk
        (then the thread looks again shortly: without S3 requests when nothing else changed)."""
        with self._cond:
            expected = dict(self._expected)
        busy = any(step not in local_steps(self.root / which) for which, step in expected.items())
        try:
            for which, keep in self.keep.items():
                self._sync_one(which, keep)
        except BaseException:
            self._remote = {}  # unknown after a failure: list again
            raise
        return busy

    def _sync_one(self, which: str, keep: int) -> None:
        # This is the only writer under the prefix, so the listing is kept up to date here
        # instead of being asked for again on every pass.
        if which not in self._remote:
            self._remote[which] = self.store.listing(which)
        remote = self._remote[which]
        local = local_steps(self.root / which)
        committed = {s for s, done in remote.items() if done}
        wanted = sorted(local | committed, reverse=True)[:keep]
        for step in wanted:  # newest first, then the old ones go
            if step in local and not self._is_uploaded(which, step, step in committed):
                self._upload(which, step, remote)
        for step in [s for s in remote if s not in wanted]:
            self.store.delete(which, step)
            del remote[step]
            (self.root / RECORDS / f"{which}-{step}.json").unlink(missing_ok=True)

    def _is_uploaded(self, which: str, step: int, committed: bool) -> bool:
        if (which, step) in self._confirmed:
            return True
        record = self.root / RECORDS / f"{which}-{step}.json"
        if not committed or not record.is_file():
            return False
        # Uploaded by an earlier session of this run: the same COMMIT as the one written then.
        try:
            saved = json.loads(record.read_text())
        except ValueError:
            return False
        if saved != self.store.read_commit(which, step):
            return False
        self._confirmed[(which, step)] = {}
        return True

    def _upload(self, which: str, step: int, remote: dict[int, bool]) -> None:
        try:
            exists = step in remote
            remote.setdefault(step, False)  # from here on objects of it may exist remotely
            commit = self.store.upload(which, step, self.root / which / str(step), exists=exists)
        except FileNotFoundError:
            # Orbax deleted the step meanwhile (it kept newer ones); its COMMIT was never written.
            # (Reading a file being deleted under a POSIX open handle gives whole bytes.)
            self.store.delete(which, step)
            del remote[step]
            return
        remote[step] = True
        records = self.root / RECORDS
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{which}-{step}.json").write_text(json.dumps(commit, sort_keys=True))
        with self._cond:
            self._confirmed[(which, step)] = commit["files"]


def pull(store: S3Store, root: Path, which: str, steps: Iterable[int], report: Callable[[str], None]) -> int | None:
    """Download the first of ``steps`` (committed remote steps, in order of preference) that
    arrives intact into ``root/<which>/<step>``; returns it, or None when none did. A step whose
    files do not match its manifest is reported and skipped."""
    for step in steps:
        dest = root / which / str(step)
        if dest.exists():
            return step
        got = store.download(which, step, dest, root / DOWNLOADS)
        if isinstance(got, str):
            report(f"warning: skipping {store.where.url(which, step)}: {got}")
            continue
        records = root / RECORDS
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{which}-{step}.json").write_text(json.dumps(got, sort_keys=True))
        return step
    return None
