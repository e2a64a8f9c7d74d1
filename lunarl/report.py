"""``python -m lunarl.report RUN_DIR [RUN_DIR ...]``: plots and one self-contained HTML page.

Reads what a training run writes (``metrics.jsonl``, ``config.yaml``, ``videos/``, and the
``eval-*.json`` results of ``lunarl.evaluate``) and writes a PNG per panel and ``report.html``
with every image and the latest video inlined, so the page can be mailed or archived as one file.
No account and no server: the offline counterpart of the wandb workspace (``PANELS`` below is
also what ``scripts/wandb_report.py`` builds there).

Several runs (a sweep's jobs, runs of different configs, or a run's seeds) are grouped by their
config without ``seed`` and the run's paths: each group is one curve, the mean over its seeds
(the ``seed{i}/...`` columns of a multi-seed run and the runs that differ only in ``seed``) with a
band of +- one standard deviation, and is labelled by the config keys in which the groups
differ. A directory without ``metrics.jsonl`` is searched for runs below it (a multirun dir).
A run still training is fine: re-run the report, or keep it fresh with ``--watch SECONDS``
(the page then reloads itself in the browser at that interval).

Exit codes: 0 written; 1 no run found under the given paths (the message names them).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import html
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PANELS", "Panel", "Run", "build_report", "find_runs", "group_runs", "load_run", "main"]

# --------------------------------------------------------------------------------------------
# What is plotted (shared with scripts/wandb_report.py)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot: ``metrics`` against ``x`` (``global_step`` = env steps per seed, or ``time``)."""

    name: str  # file name of the PNG
    title: str
    metrics: tuple[str, ...]  # metrics.jsonl keys; a "prefix/*" entry means every key under it
    ylabel: str
    x: str = "global_step"
    smooth: bool = False  # add a moving average (noisy per-chunk episode statistics)
    percent: bool = False  # values in [0, 1] shown as %
    optional: bool = False  # an agent's own metrics: drawn only for runs that log them


PANELS: tuple[Panel, ...] = (
    Panel("episode_return", "Episode return (training episodes)", ("charts/episode_return",), "return per episode", smooth=True),
    Panel("success_rate", "Success rate (training episodes)", ("charts/success_rate",), "episodes that succeeded", smooth=True, percent=True),
    Panel("eval_return", "Evaluation return (deterministic policy)", ("eval/episode_return",), "return per episode"),
    Panel("eval_success", "Evaluation success rate (deterministic policy)", ("eval/success_rate",), "episodes that succeeded", percent=True),
    Panel("losses", "Losses and optimiser statistics", ("losses/*",), ""),
    Panel("world_model", "World model: losses and latent statistics", ("world_model/*",), "", optional=True),
    Panel("behaviour", "Actor, critic and imagined rollouts", ("actor/*", "critic/*", "imagination/*"), "", optional=True),
    Panel("steps_per_second", "Training throughput", ("perf/steps_per_second",), "env steps / s (all seeds)"),
    Panel("return_vs_time", "Return against wall-clock time", ("charts/episode_return", "eval/episode_return"), "return per episode", x="time", smooth=True),
)

# Config keys that do not make a run different (paths, logging, the seed itself).
IGNORED_CONFIG = re.compile(r"^(seed|run\.dir|checkpoint\.dir|logger\..*|hydra\..*)$")

X_LABELS = {"global_step": "env steps (per seed)", "time": "wall-clock time of training (minutes)"}

# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    dir: Path
    config: dict[str, Any]  # flattened: {"agent.learning_rate": 3e-4, ...}
    rows: list[dict[str, Any]]

    @property
    def num_seeds(self) -> int:
        return int(self.config.get("num_seeds", 1) or 1)

    def keys(self) -> set[str]:
        return {k for r in self.rows for k in r}

    def curves(self, key: str, x: str = "global_step") -> list[tuple[np.ndarray, np.ndarray]]:
        """One (x, y) curve per seed: the ``seed{i}/key`` columns, or ``key`` for one seed."""
        names = [f"seed{i}/{key}" for i in range(self.num_seeds)] if self.num_seeds > 1 else [key]
        if not any(n in r for r in self.rows for n in names):
            names = [key]  # an older or hand-written run without per-seed columns
        xs = _wallclock(self.rows) if x == "time" else np.array([r.get(x, np.nan) for r in self.rows], float)
        out = []
        for n in names:
            keep = [i for i, r in enumerate(self.rows) if isinstance(r.get(n), int | float)]
            if keep:
                out.append((xs[keep], np.array([self.rows[i][n] for i in keep], float)))
        return out

    def videos(self) -> list[Path]:
        """Videos of the run, oldest step first (names carry the zero-padded step)."""
        return sorted([*self.dir.glob("videos/*.mp4"), *self.dir.glob("videos/*.gif")], key=lambda p: (_step_of(p), p.stat().st_mtime))

    def evaluations(self) -> list[dict[str, Any]]:
        """``lunarl.evaluate``'s results saved in the run dir."""
        out = []
        for p in sorted(self.dir.glob("eval-*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except json.JSONDecodeError:
                continue
        return out

    def progress(self) -> tuple[int, int | None]:
        """(env steps done, planned total per seed or None)."""
        done = max((int(r.get("global_step", 0)) for r in self.rows), default=0)
        total = self.config.get("run.total_env_steps")
        return done, int(total) if isinstance(total, int | float) else None


def _step_of(path: Path) -> int:
    m = re.search(r"step(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def _wallclock(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """``time`` in minutes, made cumulative over resumes (each process restarts its clock at 0)."""
    out, offset, last = [], 0.0, 0.0
    for r in rows:
        t = float(r.get("time", np.nan))
        if t < last:  # a resumed process: continue from where the previous one stopped
            offset += last
        last = t if math.isfinite(t) else last
        out.append((t + offset) / 60.0)
    return np.array(out, float)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(node, list):
        node = tuple(node)
    return {prefix[:-1]: node}


def load_run(run_dir: str | Path) -> Run:
    """A run directory's config and metric rows; a half-written last line (a run that is still
    training) is skipped."""
    import yaml

    run_dir = Path(run_dir)
    config: dict[str, Any] = {}
    for name in ("config.yaml", ".hydra/config.yaml"):
        if (run_dir / name).exists():
            config = _flatten(yaml.safe_load((run_dir / name).read_text()) or {})
            break
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return Run(run_dir, config, rows)


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Runs at or below ``paths`` (a run dir, or a dir holding runs such as a multirun's jobs)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").exists():
            found.append(p)
        elif p.is_dir():
            found += sorted(m.parent for m in p.rglob("metrics.jsonl") if "wandb" not in m.relative_to(p).parts)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [load_run(p) for p in unique]


# --------------------------------------------------------------------------------------------
# Grouping and statistics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    label: str
    runs: list[Run]

    def curves(self, key: str, x: str = "global_step") -> list[tuple[np.ndarray, np.ndarray]]:
        return [c for r in self.runs for c in r.curves(key, x)]

    @property
    def num_seeds(self) -> int:
        return sum(r.num_seeds for r in self.runs)


def _format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    return str(v)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs with the same config up to ``seed`` and paths form a group, labelled by the config
    keys in which the groups differ (or the experiment name when there is one group)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        key = tuple(sorted((k, repr(v)) for k, v in r.config.items() if not IGNORED_CONFIG.match(k)))
        groups.setdefault(key, []).append(r)
    items = list(groups.items())
    if len(items) == 1:
        (_, members), = items
        name = members[0].config.get("name") or members[0].dir.name
        return [Group(str(name), members)]
    keys = sorted({k for key, _ in items for k, _ in key})
    differing = [k for k in keys if len({dict(key).get(k) for key, _ in items}) > 1]
    out = []
    for _, members in items:
        config = members[0].config
        label = ", ".join(f"{k}={_format_value(config.get(k, '-'))}" for k in differing)
        out.append(Group(label or members[0].dir.name, members))
    return out


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points (shorter at the start, so no point is lost)."""
    if window <= 1 or len(y) < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, std and count over curves at every x any of them has (curves need not line up:
    a run that is still training contributes where it has values)."""
    values: dict[float, list[float]] = {}
    for x, y in curves:
        for xi, yi in zip(x, y, strict=True):
            if math.isfinite(xi) and math.isfinite(yi):
                values.setdefault(float(xi), []).append(float(yi))
    xs = np.array(sorted(values), float)
    mean = np.array([np.mean(values[x]) for x in xs])
    std = np.array([np.std(values[x]) for x in xs])
    count = np.array([len(values[x]) for x in xs])
    return xs, mean, std, count


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def _expand(panel: Panel, groups: Sequence[Group]) -> list[str]:
    keys = {k for g in groups for r in g.runs for k in r.keys()}
    out = []
    for m in panel.metrics:
        if m.endswith("/*"):
            out += sorted(k for k in keys if k.startswith(m[:-1]) and not k.startswith("seed"))
        elif m in keys:
            out.append(m)
    return out


METRIC_NAMES = {"charts/episode_return": "training episodes", "eval/episode_return": "evaluation (deterministic)"}


def _x_extent(groups: Sequence[Group], x: str) -> float:
    """The right end of the x axis: the furthest any run got (so one early point is not the
    whole axis, and every panel of a report shares the same range)."""
    if x == "time":
        return max((float(np.nanmax(_wallclock(r.rows))) for g in groups for r in g.runs if r.rows), default=1.0)
    return float(max((r.progress()[0] for g in groups for r in g.runs), default=1))


def _style_axis(ax: Any, panel: Panel, metric: str, multi: bool, right: float) -> None:
    from matplotlib.ticker import EngFormatter, PercentFormatter

    ax.set_xlabel(X_LABELS[panel.x])
    if panel.x == "global_step":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlim(0, right * 1.02 if right > 0 else 1)
    if not multi:  # in a grid of small plots the title already names the metric
        ax.set_ylabel(panel.ylabel or metric.split("/")[-1].replace("_", " "))
    if panel.percent:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylim(-0.03, 1.03)
    if multi:
        # With several prefixes in one grid (actor/loss, critic/loss) the prefix tells them apart.
        name = metric if len(panel.metrics) > 1 else metric.split("/")[-1]
        ax.set_title(name.replace("/", ": ").replace("_", " "), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=8)


def _draw(ax: Any, panel: Panel, metric: str, groups: Sequence[Group], smooth: int, index: int = 0) -> bool:
    """Draw every group's mean and band of ``metric`` (the panel's ``index``-th) on ``ax``;
    False when nothing to draw. One group with several metrics: a colour per metric; otherwise
    a colour per group and a line style per metric."""
    drew = False
    single = all(g.num_seeds == 1 for g in groups)
    several_metrics = len(panel.metrics) > 1 and not panel.metrics[0].endswith("/*")
    linestyle = "-" if index == 0 or len(groups) == 1 else "--"
    for gi, g in enumerate(groups):
        curves = g.curves(metric, panel.x)
        if not curves:
            continue
        color = COLORS[(index if several_metrics and len(groups) == 1 else gi) % len(COLORS)]
        label = g.label if len(groups) > 1 else None
        if several_metrics:
            name = METRIC_NAMES.get(metric, metric)
            label = f"{name}: {g.label}" if len(groups) > 1 else name
        if panel.smooth and smooth > 1 and metric.startswith("charts/"):
            raw_x, raw_mean, _, _ = band(curves)
            ax.plot(raw_x, raw_mean, color=color, alpha=0.25, linewidth=1, linestyle=linestyle)
            curves = [(x, moving_average(y, smooth)) for x, y in curves]
        xs, mean, std, count = band(curves)
        if single and metric == "eval/episode_return":
            # One seed: the band is the spread over the evaluation's episodes instead.
            spread = g.curves("eval/episode_return_std", panel.x)
            if spread:
                sx, s, _, _ = band(spread)
                std = np.interp(xs, sx, s) if len(sx) else std
                count = np.full_like(count, 2)
        ax.plot(xs, mean, color=color, linewidth=1.8, label=label, marker="o" if len(xs) < 12 else None, markersize=3, linestyle=linestyle)
        shown = count > 1
        if shown.any():
            ax.fill_between(xs, mean - std, mean + std, where=shown, color=color, alpha=0.18, linewidth=0, interpolate=True)
        drew = True
    return drew


def _band_note(panel: Panel, groups: Sequence[Group]) -> str:
    seeds = max(g.num_seeds for g in groups)
    if seeds > 1:
        return f"line: mean, band: ± 1 std over {seeds} seeds" if len(groups) == 1 else "line: mean, band: ± 1 std over seeds"
    if "eval/episode_return" in panel.metrics:
        return "band: ± 1 std over the evaluation's episodes"
    return "one seed" + (", bold: moving average" if panel.smooth else "")


def plot_panel(panel: Panel, groups: Sequence[Group], path: Path, smooth: int) -> Path | None:
    """Write ``path`` (PNG) for ``panel``; None when no run has its metrics."""
    from matplotlib.figure import Figure

    metrics = _expand(panel, groups)
    if not metrics:
        return None
    right = _x_extent(groups, panel.x)
    several = panel.metrics[0].endswith("/*")
    if several:
        cols = min(3, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig = Figure(figsize=(4.2 * cols, 2.9 * rows + 0.6), dpi=100, layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics, strict=False):
            _draw(ax, panel, metric, groups, smooth)
            _style_axis(ax, panel, metric, multi=True, right=right)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
    else:
        fig = Figure(figsize=(7.5, 4.0), dpi=100, layout="constrained")
        ax = fig.subplots()
        for i, metric in enumerate(metrics):
            _draw(ax, panel, metric, groups, smooth, index=i)
        _style_axis(ax, panel, metrics[0], multi=False, right=right)
        axes = [ax]
    fig.suptitle(panel.title, fontsize=12, fontweight="bold")
    if not several:  # in a grid the subplots' titles name the metrics
        axes[0].set_title(_band_note(panel, groups), fontsize=8, color="#666", loc="right")
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 2), fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# The HTML page
# --------------------------------------------------------------------------------------------

MAX_INLINE_VIDEO_BYTES = 25 * 1024 * 1024  # larger ones are linked, not inlined

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 12px; }
.grid img, .wide img { width: 100%; border: 1px solid #eee; }
video, .video img { max-width: 100%; border: 1px solid #ccc; }
"""


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(v: Any, percent: bool = False) -> str:
    if not isinstance(v, int | float) or not math.isfinite(v):
        return "–"
    return f"{v:.0%}" if percent else (f"{v:,.2f}" if isinstance(v, float) else f"{v:,}")


def _last(run: Run, key: str) -> Any:
    return next((r[key] for r in reversed(run.rows) if isinstance(r.get(key), int | float)), None)


def _runs_table(groups: Sequence[Group]) -> str:
    head = "<tr><th>curve</th><th>run directory</th><th>env</th><th>agent</th><th>seeds</th><th>env steps</th><th>last eval return</th><th>last eval success</th></tr>"
    body = []
    for g in groups:
        for r in g.runs:
            done, total = r.progress()
            steps = f"{done:,}" + (f" / {total:,}" if total else "")
            if total and done < total:
                steps += " (running or stopped)"
            body.append(
                f"<tr><td>{html.escape(g.label)}</td><td><code>{html.escape(str(r.dir))}</code></td>"
                f"<td>{html.escape(str(r.config.get('env.name', '?')))}</td><td>{html.escape(str(r.config.get('agent.name', '?')))}</td>"
                f"<td class=num>{r.num_seeds}</td><td class=num>{steps}</td>"
                f"<td class=num>{_fmt(_last(r, 'eval/episode_return'))}</td>"
                f"<td class=num>{_fmt(_last(r, 'eval/success_rate'), percent=True)}</td></tr>"
            )
    return f"<table>{head}{''.join(body)}</table>"


def _evaluations_table(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        for e in r.evaluations():
            variant = " ".join(f"{k}={v}" for k, v in (e.get("env_overrides") or {}).items())
            rows.append(
                f"<tr><td><code>{html.escape(r.dir.name)}</code></td><td>{html.escape(str(e.get('checkpoint')))}</td>"
                f"<td class=num>{_fmt(e.get('global_step'))}</td><td>{html.escape(variant) or '–'}</td>"
                f"<td class=num>{_fmt(e.get('episodes_per_seed'))}</td>"
                f"<td class=num>{_fmt(e.get('eval/episode_return'))} ± {_fmt(e.get('eval/episode_return_std'))}</td>"
                f"<td class=num>{_fmt(e.get('eval/success_rate'), percent=True)}</td></tr>"
            )
    if not rows:
        return ""
    head = "<tr><th>run</th><th>checkpoint</th><th>env steps</th><th>env variant</th><th>episodes per seed</th><th>return</th><th>success</th></tr>"
    return f"<h2>Evaluations (lunarl.evaluate)</h2><table>{head}{''.join(rows)}</table>"


def _video_html(groups: Sequence[Group]) -> str:
    videos = [(g, v) for g in groups for r in g.runs for v in r.videos()]
    if not videos:
        return "<h2>Latest video</h2><p class=meta>No video yet: train with <code>run.video_every=N</code> or evaluate with <code>eval.video=true</code>.</p>"
    group, path = max(videos, key=lambda gv: (_step_of(gv[1]), gv[1].stat().st_mtime))
    step = _step_of(path)
    caption = (
        f"<p class=meta><code>{html.escape(str(path))}</code>"
        + (f", after {step:,} env steps" if step >= 0 else "")
        + (f" ({html.escape(group.label)})" if len(groups) > 1 else "")
        + "; seed 0's deterministic policy</p>"
    )
    if path.stat().st_size > MAX_INLINE_VIDEO_BYTES:
        return f"<h2>Latest video</h2>{caption}<p><a href='{html.escape(path.as_uri())}'>open the video</a> (too large to inline)</p>"
    if path.suffix == ".gif":
        body = f"<div class=video><img src='{_data_uri(path, 'image/gif')}' alt='latest rollout'></div>"
    else:
        body = f"<video controls loop muted autoplay playsinline src='{_data_uri(path, 'video/mp4')}'></video>"
    return f"<h2>Latest video</h2>{caption}{body}"


def build_report(run_paths: Sequence[str | Path], out: str | Path | None = None, smooth: int = 5, refresh: int | None = None) -> Path:
    """Write the PNGs and ``report.html`` into ``out`` (default ``RUN_DIR/report`` for one run,
    ``./report`` for several); returns the HTML path. Raises ``FileNotFoundError`` when no run
    is found."""
    runs = find_runs(run_paths)
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl at or below {', '.join(map(str, run_paths))} (is it a run directory?)")
    out = Path(out) if out is not None else (runs[0].dir / "report" if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    images = [(p, path) for p in PANELS if (path := plot_panel(p, groups, out / f"{p.name}.png", smooth)) is not None]
    title = "lunarl report: " + (groups[0].label if len(groups) == 1 else f"{len(groups)} configurations")
    seeds = sum(g.num_seeds for g in groups)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    refresh_tag = f"<meta http-equiv='refresh' content='{int(refresh)}'>" if refresh else ""
    figures = []
    for panel, path in images:
        css = "wide" if panel.metrics[0].endswith("/*") else ""
        figures.append(f"<div class='{css}'><img src='{_data_uri(path, 'image/png')}' alt='{html.escape(panel.title)}'></div>")
    wide = [f for f, (p, _) in zip(figures, images, strict=True) if p.metrics[0].endswith("/*")]
    narrow = [f for f, (p, _) in zip(figures, images, strict=True) if not p.metrics[0].endswith("/*")]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh_tag}<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class=meta>{len(runs)} run(s), {seeds} seed(s) in all; curves are means over seeds with a band of ± one standard deviation
(one seed: the evaluation band is the spread over its episodes); training episode statistics also show a moving average over {smooth} points.
Generated {now}{f', refreshed every {int(refresh)} s' if refresh else ''}.</p>
<h2>Runs</h2>{_runs_table(groups)}
{_video_html(groups)}
<h2>Curves</h2>
<div class=grid>{''.join(narrow)}</div>
{''.join(wide)}
{_evaluations_table(runs)}
</body></html>
"""
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(path)  # a browser reloading mid-write never sees half a page
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lunarl.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or directories holding runs, such as a multirun dir)")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/report for one run, ./report for several)")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window in logged points (default 5; 1 = off)")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="rewrite the report every SECONDS until Ctrl-C")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth={args.smooth}: must be >= 1")
    if args.watch is not None and args.watch <= 0:
        parser.error(f"--watch={args.watch}: must be > 0 seconds")
    try:
        while True:
            try:
                path = build_report(args.runs, args.out, args.smooth, refresh=math.ceil(args.watch) if args.watch else None)
            except FileNotFoundError as e:
                if args.watch is None:
                    print(f"lunarl.report: error: {e}", file=sys.stderr)
                    return 1
                print(f"lunarl.report: waiting: {e}", file=sys.stderr)
            else:
                print(f"wrote {path}", flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
