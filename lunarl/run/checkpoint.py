"""Orbax checkpoints of a run: the whole TrainState pytree plus the resolved config as JSON.

Layout under ``checkpoint.dir`` (a local path; for ``s3://bucket/prefix`` see below):

    latest/<iteration>/{state, config, meta}   the last ``max_to_keep`` saves, for resume
    best/<iteration>/{state, config, meta}     the best-by-evaluation save (one)

``state`` is written with Orbax's StandardSave (array leaves only; nothing is pickled), ``config``
is the resolved Hydra config and ``meta`` small JSON facts (env steps, evaluation score, and the
SHA-256 of the state's contents). Restoring needs a target of the same structure:
``jax.eval_shape`` of the agent's ``init``.

Integrity: Orbax notices missing or truncated files but not every damaged byte (a flipped byte
inside a compressed chunk can decode to other numbers), so every restore recomputes the digest
of what it read and compares it with the one saved in ``meta``. A checkpoint that cannot be read
or does not match raises ``CheckpointDamaged`` naming the step and the reason; ``quarantine``
moves it aside to ``corrupt/<step>`` (never deletes it), so the run can resume from an older one.

Remote (``checkpoint.dir=s3://bucket/prefix``): Orbax writes to a local staging dir with the
layout above (the train loop uses ``RUN_DIR/checkpoints``), and ``lunarl.run.remote`` mirrors
``latest/`` and ``best/`` to the bucket, each step made visible by a ``COMMIT`` object written
last. Opening the checkpoints of a run first downloads the newest committed remote steps that
are newer than the local ones (a fresh machine starts with an empty staging dir); every read
then works on the local copy, so the digest check and the quarantine work as for a local dir
(``corrupt/`` stays local). Only JAX process 0 talks to S3.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lunarl.run.distributed import to_host
from lunarl.run.remote import is_remote

__all__ = [
    "CheckpointDamaged",
    "CheckpointError",
    "CheckpointUploadFailed",
    "Checkpoints",
    "config_differences",
    "state_digest",
]

# Config keys that must match for a checkpoint to be restored into the current run. Run-length,
# logging and checkpoint settings may change between sessions (e.g. to extend a run).
MUST_MATCH = ("env", "agent", "seed", "num_seeds")


def _without_empty(tree: Any) -> Any:
    """Zero-size leaves as None: Orbax refuses to save them (MJX's ``Data.act`` is [N, 0] when a
    model has no activation states), and they carry no data, so the target's shape rebuilds them."""
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _with_empty(restored: Any, target: Any) -> Any:
    def fill(t: Any, r: Any) -> Any:
        if r is not None:
            return r
        empty = jnp.zeros(t.shape, t.dtype)
        sharding = getattr(t, "sharding", None)
        return jax.device_put(empty, sharding) if sharding is not None else empty

    return jax.tree.map(fill, target, restored)


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not fit the current run; the message names the path."""


class CheckpointUploadFailed(CheckpointError):
    """Checkpoints that should be in S3 are still only in the local staging dir (nothing lost)."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files cannot be read, or what they hold is not what was written."""

    def __init__(self, which: str, step: int, directory: Any, reason: str):
        self.which, self.step, self.reason = which, step, reason
        super().__init__(f"the {which} checkpoint at iteration {step} in {directory} is damaged: {reason}")


def state_digest(state: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes (host copy), in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        value = np.ascontiguousarray(to_host(leaf))  # gathered from every process's shards
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _path(path: tuple) -> str:
    """A leaf's path as ``a.b.0``, the same for a dataclass field and the dict Orbax saved it as."""
    names = (getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return ".".join(str(n) for n in names)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text.split(". See full TensorStore")[0][:240] or type(err).__name__).rstrip(".")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, tuple):
        tree = list(tree)
    return {prefix: tree}


def _with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the env's and agent's config-class defaults filled in for missing fields,
    so a config saved before a field was listed in ``conf/`` compares equal when it ran with the
    same values."""
    import dataclasses

    import lunarl.agents
    import lunarl.envs

    out = dict(config)
    for group, lookup in (("env", lunarl.envs.config_class), ("agent", lambda n: lunarl.agents.get(n).config_class)):
        node = config.get(group)
        if not isinstance(node, Mapping) or "name" not in node:
            continue
        try:
            cls = lookup(node["name"])
        except (ValueError, ImportError):
            continue
        skip = getattr(cls, "HOST_FIELDS", {})
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}
        out[group] = {**defaults, **node}
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Lines ``key: saved -> current`` for the keys in ``MUST_MATCH`` that differ (fields a
    config does not list count with their default)."""
    saved, current = _with_defaults(saved), _with_defaults(current)
    a = _flatten({k: saved.get(k) for k in MUST_MATCH})
    b = _flatten({k: current.get(k) for k in MUST_MATCH})
    return [f"{k}: {a.get(k)!r} (checkpoint) vs {b.get(k)!r} (now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _report_to_stderr(message: str) -> None:
    print(f"lunarl: {message}", file=sys.stderr, flush=True)


class Checkpoints:
    """Latest-K and best checkpoints of one run, in a local dir or mirrored to ``s3://``.

    ``create``: a writer (the train loop): creates the dir and, for S3, uploads what it saves.
    A reader (``create=False``, e.g. ``lunarl.evaluate``) never writes to the remote side.
    ``staging``: the local dir of an ``s3://`` run (default: the user's cache dir, see
    ``lunarl.run.remote.default_staging``). ``pull``: which checkpoints to download from S3
    when the remote copy is newer (``latest``, ``best`` or an iteration). ``upload_timeout``:
    seconds ``wait`` waits for pending uploads. ``report``: one-line notices (upload failures).
    """

    def __init__(
        self,
        directory: str,
        max_to_keep: int = 3,
        create: bool = True,
        staging: str | None = None,
        pull: tuple[str | int, ...] = ("latest", "best"),
        upload_timeout: float = 60.0,
        report: Callable[[str], None] = _report_to_stderr,
    ):
        self.where = str(directory)  # what the user named: for messages
        self.mirror = None
        self.upload_timeout = upload_timeout
        if is_remote(self.where):
            local = self._open_remote(staging, pull, create, max_to_keep, report)
            self.directory, create = epath.Path(local), True
        else:
            # Absolute: Orbax refuses a relative path (and that refusal read as a damaged checkpoint).
            self.directory = epath.Path(os.path.abspath(directory))
        if not create and not self.directory.exists():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        self.latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        )
        self.best = ocp.CheckpointManager(
            self.directory / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
        )
        if self.mirror is not None:
            self.mirror.start()  # uploads what an earlier session of the run left only local

    def _open_remote(
        self, staging: str | None, pull: tuple[str | int, ...], writer: bool, max_to_keep: int, report: Callable[[str], None]
    ) -> str:
        """Download what ``pull`` asks for (process 0; the others wait for it) and, for a writer
        on process 0, set up the mirror. Returns the local staging dir."""
        from pathlib import Path

        from lunarl.run import remote

        try:
            local = Path(staging) if staging is not None else remote.default_staging(self.where)
            store = remote.S3Store(self.where) if jax.process_index() == 0 else None
        except (ValueError, ImportError) as e:
            raise CheckpointError(str(e)) from None
        if store is not None:
            try:
                for which in pull:
                    self._pull(store, local, which, report)
            except remote.RemoteUnavailable as e:
                raise CheckpointError(
                    f"cannot read the checkpoints in {self.where} ({e}); check the bucket name, "
                    "AWS_ENDPOINT_URL and the AWS credentials"
                ) from None
            if writer:
                keep = {"latest": max_to_keep, "best": 1}
                self.mirror = remote.Mirror(store, local, keep, report)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lunarl-checkpoints-pulled")
        return str(local)

    @staticmethod
    def _pull(store: Any, local: Any, which: str | int, report: Callable[[str], None]) -> None:
        from lunarl.run import remote

        if which in ("latest", "best"):
            have = max(remote.local_steps(local / str(which)), default=-1)
            newer = [s for s in reversed(store.committed(str(which))) if s > have]
            remote.pull(store, local, str(which), newer, report)
        else:
            step = int(which)
            if step in store.committed("latest"):
                remote.pull(store, local, "latest", [step], report)

    # ---- saving ------------------------------------------------------------------------------

    @staticmethod
    def _args(state: Any, config: Mapping[str, Any], meta: Mapping[str, Any]) -> ocp.args.Composite:
        return ocp.args.Composite(
            state=ocp.args.StandardSave(_without_empty(state)),
            config=ocp.args.JsonSave(dict(config)),
            meta=ocp.args.JsonSave(dict(meta)),
        )

    def save(self, step: int, state: Any, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Save to latest (asynchronously; ``wait`` before reading it back or exiting)."""
        if step in self.latest.all_steps():
            return
        meta = {**meta, "state_sha256": state_digest(state)}
        if self.mirror is not None:
            self.mirror.expect("latest", step)
        self.latest.save(step, args=self._args(state, config, meta), force=True)
        if self.mirror is not None:
            self.mirror.request()

    def best_score(self) -> float:
        """The saved best checkpoint's score; raises ``CheckpointDamaged`` if it cannot be read."""
        step = self.best.latest_step()
        if step is None:
            return float("-inf")
        return float(self.read("best", "meta")["score"])

    def save_best(self, step: int, state: Any, config: Mapping[str, Any], meta: Mapping[str, Any], score: float) -> bool:
        """Save as the best checkpoint when ``score`` beats the best so far; True when saved."""
        if not score > self.best_score() or step in self.best.all_steps():
            return False
        meta = {**meta, "score": score, "state_sha256": state_digest(state)}
        if self.mirror is not None:
            self.mirror.expect("best", step)
        self.best.save(step, args=self._args(state, config, meta), force=True)
        if self.mirror is not None:
            self.mirror.request()
        return True

    def quarantine(self, which: str, step: int) -> epath.Path:
        """Move checkpoint ``which``/``step`` aside to ``corrupt/<step>`` (a free name), never
        deleting it, so the managers no longer see it. Returns where it went. (A remote copy
        stays; the next save of that iteration replaces it.)"""
        self._wait_local()
        manager = self.best if which == "best" else self.latest
        dest_dir = self.directory / "corrupt"
        dest_dir.mkdir(parents=True, exist_ok=True)
        name = str(step) if which == "latest" else f"best-{step}"
        dest, n = dest_dir / name, 1
        while dest.exists():
            dest, n = dest_dir / f"{name}.{n}", n + 1
        (self.directory / which / str(step)).rename(dest)
        manager.reload()
        return dest

    def _wait_local(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        if self.mirror is not None:
            self.mirror.settled()

    def wait(self) -> None:
        """Until every save is on disk and, for S3, uploaded; ``CheckpointUploadFailed`` when the
        uploads still fail after ``upload_timeout`` seconds (the local copies stay)."""
        self._wait_local()
        if self.mirror is not None:
            from lunarl.run.remote import UploadFailed

            try:
                self.mirror.flush(self.upload_timeout)
            except UploadFailed as e:
                raise CheckpointUploadFailed(str(e)) from None

    def close(self) -> None:
        self.latest.close()
        self.best.close()
        if self.mirror is not None:
            self.mirror.close()

    # ---- reading -----------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def _manager_and_step(self, which: str | int) -> tuple[ocp.CheckpointManager, int]:
        if which == "best":
            manager, step = self.best, self.best.latest_step()
        elif which == "latest":
            manager, step = self.latest, self.latest.latest_step()
        else:
            try:
                step = int(which)
            except ValueError:
                raise CheckpointError(f"checkpoint={which!r}: use latest, best or an iteration number") from None
            manager = self.latest
            if step not in manager.all_steps():
                raise CheckpointError(
                    f"no checkpoint for iteration {step} in {self.where}/latest; "
                    f"available: {sorted(manager.all_steps())}"
                )
        if step is None:
            raise CheckpointError(f"no {which} checkpoint in {self.where}/{which}")
        return manager, step

    def step_of(self, which: str | int) -> int:
        return self._manager_and_step(which)[1]

    def read(self, which: str | int, item: str) -> dict[str, Any]:
        """A JSON item (``config`` or ``meta``) of a checkpoint."""
        manager, step = self._manager_and_step(which)
        try:
            return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # Orbax and TensorStore raise many types for unreadable files
            raise CheckpointDamaged(self._name(which), step, self.directory, f"its {item} cannot be read ({_first_line(e)})") from None

    def _name(self, which: str | int) -> str:
        return "best" if which == "best" else "latest"

    def _fits(self, manager: ocp.CheckpointManager, step: int, target: Any) -> str | None:
        """None when the saved state's leaves have the target's paths and shapes, else why not
        (None too when its metadata cannot be read: then the arrays decide)."""
        absl = logging.getLogger("absl")  # Orbax warns that the item has no step metadata file
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            with ocp.StandardCheckpointer() as reader:
                saved = reader.metadata(manager.directory / str(step) / "state")
            saved = getattr(saved, "item_metadata", saved)
            saved_leaves = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
        except Exception:
            return None
        finally:
            absl.setLevel(level)
        if not saved_leaves:
            return None
        wanted = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(_without_empty(target))}
        if saved_leaves.keys() != wanted.keys():
            extra, missing = sorted(saved_leaves.keys() - wanted.keys()), sorted(wanted.keys() - saved_leaves.keys())
            return f"leaves only in the checkpoint: {extra[:3]}; only in the current TrainState: {missing[:3]}"
        shapes = [f"{k} {saved_leaves[k]} vs {wanted[k]}" for k in wanted if saved_leaves[k] != wanted[k]]
        return f"shapes differ: {shapes[:3]}" if shapes else None

    def restore(self, which: str | int, target: Any, config: Mapping[str, Any] | None = None) -> tuple[Any, dict, dict]:
        """``(state, config, meta)`` of a checkpoint, restored into the structure of ``target``
        and checked against the digest saved with it.

        When ``config`` is given, a checkpoint written with a different env, agent or seeds is
        refused before any array is read (``CheckpointError``). A checkpoint that cannot be read
        or whose contents do not match raises ``CheckpointDamaged``.
        """
        manager, step = self._manager_and_step(which)
        name = self._name(which)
        if config is not None:
            saved = self.read(which, "config")
            diff = config_differences(saved, config)
            if diff:
                raise CheckpointError(
                    f"the checkpoint in {self.directory} was written by a different run configuration; "
                    f"refusing to load it ({'; '.join(diff)}). Use a new run.dir or the same settings."
                )
        misfit = self._fits(manager, step, target)
        if misfit:
            # Same config, different structure: the env's or agent's state changed in the code
            # since the checkpoint was written. Never half-load it.
            raise CheckpointError(
                f"the checkpoint at iteration {step} in {self.directory} does not fit the current "
                f"TrainState (written by another version of the env or agent code?): {misfit}"
            )
        try:
            out = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_without_empty(target)),
                    config=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # unreadable, truncated or missing files
            raise CheckpointDamaged(name, step, self.directory, _first_line(e)) from None
        state = _with_empty(out["state"], target)
        expected = out["meta"].get("state_sha256")
        if expected is not None and state_digest(state) != expected:
            raise CheckpointDamaged(name, step, self.directory, "its arrays do not match the digest saved with them")
        return state, out["config"], out["meta"]
