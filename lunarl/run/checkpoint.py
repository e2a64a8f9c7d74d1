"""Orbax checkpoints of a run: the whole TrainState pytree plus the resolved config as JSON.

Layout under ``checkpoint.dir`` (a local path or ``s3://bucket/prefix``, via etils.epath):

    latest/<iteration>/{state, config, meta}   the last ``max_to_keep`` saves, for resume
    best/<iteration>/{state, config, meta}     the best-by-evaluation save (one)

``state`` is written with Orbax's StandardSave (array leaves only; nothing is pickled), ``config``
is the resolved Hydra config and ``meta`` small JSON facts (env steps, evaluation score).
Restoring needs a target of the same structure: ``jax.eval_shape`` of the agent's ``init``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["CheckpointError", "Checkpoints", "config_differences"]

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


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, tuple):
        tree = list(tree)
    return {prefix: tree}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Lines ``key: saved -> current`` for the keys in ``MUST_MATCH`` that differ."""
    a = _flatten({k: saved.get(k) for k in MUST_MATCH})
    b = _flatten({k: current.get(k) for k in MUST_MATCH})
    return [f"{k}: {a.get(k)!r} (checkpoint) vs {b.get(k)!r} (now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Checkpoints:
    """Latest-K and best checkpoints of one run."""

    def __init__(self, directory: str, max_to_keep: int = 3, create: bool = True):
        self.directory = epath.Path(directory)
        if not create and not self.directory.exists():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        self.latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        )
        self.best = ocp.CheckpointManager(
            self.directory / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
        )

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
        self.latest.save(step, args=self._args(state, config, meta), force=True)

    def best_score(self) -> float:
        step = self.best.latest_step()
        if step is None:
            return float("-inf")
        return float(self.read("best", "meta")["score"])

    def save_best(self, step: int, state: Any, config: Mapping[str, Any], meta: Mapping[str, Any], score: float) -> bool:
        """Save as the best checkpoint when ``score`` beats the best so far; True when saved."""
        if not score > self.best_score() or step in self.best.all_steps():
            return False
        self.best.save(step, args=self._args(state, config, {**meta, "score": score}), force=True)
        return True

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

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
                    f"no checkpoint for iteration {step} in {self.directory / 'latest'}; "
                    f"available: {sorted(manager.all_steps())}"
                )
        if step is None:
            raise CheckpointError(f"no {which} checkpoint in {self.directory / which}")
        return manager, step

    def step_of(self, which: str | int) -> int:
        return self._manager_and_step(which)[1]

    def read(self, which: str | int, item: str) -> dict[str, Any]:
        """A JSON item (``config`` or ``meta``) of a checkpoint."""
        manager, step = self._manager_and_step(which)
        return manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def restore(self, which: str | int, target: Any, config: Mapping[str, Any] | None = None) -> tuple[Any, dict, dict]:
        """``(state, config, meta)`` of a checkpoint, restored into the structure of ``target``.

        When ``config`` is given, a checkpoint written with a different env, agent or seeds is
        refused before any array is read.
        """
        manager, step = self._manager_and_step(which)
        if config is not None:
            saved = self.read(which, "config")
            diff = config_differences(saved, config)
            if diff:
                raise CheckpointError(
                    f"the checkpoint in {self.directory} was written by a different run configuration; "
                    f"refusing to load it ({'; '.join(diff)}). Use a new run.dir or the same settings."
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
        except (ValueError, KeyError, TypeError) as e:
            # Same config, different structure: the env's or agent's state changed in the code
            # since the checkpoint was written. Never half-load it.
            first = str(e).split(". ")[0].splitlines()[0][:300]
            raise CheckpointError(
                f"the checkpoint at iteration {step} in {self.directory} does not fit the current "
                f"TrainState (written by another version of the env or agent code?): {first}"
            ) from e
        return _with_empty(out["state"], target), out["config"], out["meta"]
