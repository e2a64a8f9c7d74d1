"""Host-side reduction of compiled metrics to the flat rows that are logged.

A chunk returns every metric as ``[iterations, seeds]``; a row holds the mean over seeds under
the plain key and, with several seeds, each seed under ``seed{i}/key``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["first_bad_metric", "per_seed_row", "reduce_chunk"]


def per_seed_row(per_seed: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    """Mean over seeds under the plain key; with several seeds also ``seed{i}/key``.

    NaN marks "no data" (no episode finished in the chunk): such values are left out of the row
    and of the mean, rather than logged as a misleading 0.
    """
    row: dict[str, float] = {}
    for key, values in per_seed.items():
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        known = values[~np.isnan(values)]
        if known.size:
            row[prefix + key] = float(np.mean(known))
        if values.shape[0] > 1:
            for i, v in enumerate(values):
                if not np.isnan(v):
                    row[f"seed{i}/{prefix}{key}"] = float(v)
    return row


def reduce_chunk(
    metrics: Mapping[str, np.ndarray],
    episode_statistics: tuple[str, ...],
    episode_count: str,
    running_totals: tuple[str, ...] = (),
) -> dict[str, float]:
    """One row from a chunk's metrics ``[K, S]``.

    ``episode_statistics`` are averages over the episodes that finished in an iteration, so over
    the chunk they are weighted by ``episode_count`` (an iteration where nothing finished does
    not count as 0, and a chunk where nothing finished logs none of them); ``episode_count`` is
    summed; ``running_totals`` (cumulative counters) take their last value; everything else is
    averaged.
    """
    per_seed: dict[str, np.ndarray] = {}
    count = metrics.get(episode_count)
    for key, values in metrics.items():
        values = np.asarray(values, dtype=np.float64)
        if key in episode_statistics and count is not None:
            n = np.asarray(count, dtype=np.float64)
            total = n.sum(axis=0)
            per_seed[key] = np.where(total > 0, (values * n).sum(axis=0) / np.maximum(total, 1), np.nan)
        elif key == episode_count:
            per_seed[key] = values.sum(axis=0)
        elif key in running_totals:
            per_seed[key] = values[-1]
        else:
            per_seed[key] = values.mean(axis=0)
    return per_seed_row(per_seed)


def first_bad_metric(metrics: Mapping[str, np.ndarray]) -> str:
    """The first metric holding NaN/inf, or "the parameters" when all metrics are finite."""
    for key, values in metrics.items():
        if not np.all(np.isfinite(np.asarray(values))):
            return key
    return "the parameters"
