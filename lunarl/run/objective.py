"""The number a finished (or stopped) training run returns to a Hydra sweeper such as Optuna.

``run.objective`` names it; every objective is maximised (``conf/hydra/sweeper/optuna.yaml`` sets
``direction: maximize``). It is read back from the run's ``metrics.jsonl``, so a resumed or
already-finished run returns the same value as one that ran in one go:

* ``eval_success`` (default): the best deterministic evaluation of the run, by success rate and,
  among equal success rates, by return. One number ranks both: ``success + tie(return)``, where
  ``tie`` maps the return monotonically (an arctangent) into ``[0, step / 2)`` and ``step`` is the
  smallest possible difference of two success rates, ``1 / (run.eval_episodes * num_seeds)``.
  A higher success rate therefore always wins, and the return only orders equal ones;
* ``eval_return``: the best evaluation return;
* ``train_return``: the last logged training episode return (runs without evaluation).

A population run logs its best member under the plain ``eval/`` keys, so these objectives are
the best member's. NaN (no evaluation logged) makes Optuna record the trial as failed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["OBJECTIVES", "check_objective", "objective", "read_objective"]

OBJECTIVES = ("eval_success", "eval_return", "train_return")


def check_objective(name: str) -> None:
    if name not in OBJECTIVES:
        raise ValueError(f"run.objective={name!r}: allowed {', '.join(OBJECTIVES)}")


def objective(rows: list[dict], name: str, success_step: float) -> float:
    """``name``'s value over the logged ``rows`` (``metrics.jsonl``), NaN when they have none."""
    check_objective(name)
    if name == "train_return":
        values = [r["charts/episode_return"] for r in rows if "charts/episode_return" in r]
        return float(values[-1]) if values else math.nan
    evals = [r for r in rows if "eval/success_rate" in r and "eval/episode_return" in r]
    if not evals:
        return math.nan
    if name == "eval_return":
        return max(float(r["eval/episode_return"]) for r in evals)
    tie = lambda ret: 0.5 * success_step * (0.5 + math.atan(ret) / math.pi)  # noqa: E731  in [0, step/2)
    return max(float(r["eval/success_rate"]) + tie(float(r["eval/episode_return"])) for r in evals)


def read_objective(metrics_path: Path, name: str, eval_episodes: int, num_seeds: int) -> float:
    """``objective`` of the rows in ``metrics_path`` (NaN when the file is missing)."""
    if not metrics_path.exists():
        return math.nan
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return objective(rows, name, 1.0 / (eval_episodes * num_seeds))
