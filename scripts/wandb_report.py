"""Build a Weights & Biases Report with the panels of ``lunarl.report`` for a project (and group).

    python scripts/wandb_report.py --project lunarl --group rover [--entity ME] [--title ...]

The panels come from ``lunarl.report.PANELS`` (the same metrics, titles and axes as the offline
report): each is a line plot against ``global_step`` (env steps per seed) or wall-clock time,
the runs of each wandb group averaged with a +- one standard deviation band, plus a media browser
for the rollout videos that ``run.video_every`` logs as ``eval/video``. The report is built with
``wandb-workspaces`` and saved to wandb, which needs a login (``wandb login`` or
``WANDB_API_KEY``); without one the script exits with one line saying so, before building
anything. ``build_report`` and ``line_plots`` make the objects without any network, which is
how the tests check the panel definitions.

Exit codes: 0 saved (the URL is printed); 1 not logged in, or wandb refused the report.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from lunarl.report import PANELS, Panel

# lunarl.report's x axes -> wandb's: our own step metric, or wandb's relative wall time.
WANDB_X = {"global_step": "global_step", "time": "RelativeTime(Wall)"}
VIDEO_KEY = "eval/video"


def line_plot(panel: Panel) -> Any:
    """One ``wr.LinePlot`` for ``panel``: ``prefix/*`` entries become one regex over the prefixes."""
    import wandb_workspaces.reports.v2 as wr

    regex = [m for m in panel.metrics if m.endswith("/*")]
    kwargs: dict[str, Any] = {
        "title": panel.title,
        "x": WANDB_X[panel.x],
        "title_x": "env steps (per seed)" if panel.x == "global_step" else "wall-clock time",
        "title_y": panel.ylabel or None,
        "groupby_aggfunc": "mean",  # runs of a group (seeds, sweep jobs) as their mean ...
        "groupby_rangefunc": "stddev",  # ... with a +- std band, as in the offline report
        "smoothing_factor": 0.6 if panel.smooth else 0.0,
        "smoothing_show_original": panel.smooth,
    }
    if regex:
        prefixes = [m[:-2] for m in regex]  # "actor/*" -> "actor"
        alternatives = prefixes[0] if len(prefixes) == 1 else "(" + "|".join(prefixes) + ")"
        kwargs["metric_regex"] = "^" + alternatives + "\\/.*"
    else:
        kwargs["y"] = list(panel.metrics)
    if panel.percent:
        kwargs["range_y"] = (0.0, 1.0)
    return wr.LinePlot(**kwargs)


def line_plots() -> list[Any]:
    return [line_plot(p) for p in PANELS]


def build_report(project: str, entity: str, group: str | None = None, title: str | None = None) -> Any:
    """The ``wr.Report`` (not saved): a panel grid over the project's runs, grouped by wandb
    group (only ``group``'s runs when given), and the rollout videos."""
    import wandb_workspaces.reports.v2 as wr

    runset = wr.Runset(
        entity=entity,
        project=project,
        name=group or project,
        filters=f"Group = '{group}'" if group else "",
        groupby=["group"],
    )
    description = (
        "Curves are means over each group's runs (seeds, sweep jobs) with a +- 1 std band; "
        "built by scripts/wandb_report.py from lunarl.report.PANELS."
    )
    return wr.Report(
        project=project,
        entity=entity,
        title=title or f"lunarl: {group or project}",
        description=description,
        width="fluid",
        blocks=[
            wr.H1("Training curves"),
            wr.PanelGrid(runsets=[runset], panels=line_plots()),
            wr.H1("Rollout videos"),
            wr.P(f"Deterministic episodes logged as {VIDEO_KEY} (run.video_every)."),
            wr.PanelGrid(runsets=[runset], panels=[wr.MediaBrowser(title="Rollouts", media_keys=[VIDEO_KEY])]),
        ],
    )


def logged_in_entity() -> str | None:
    """The default entity of the logged-in wandb user, or None without a login. Looks for an
    API key first (env or netrc) so that no request is made without one."""
    import wandb

    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            from wandb.sdk.lib.apikey import api_key as stored_key

            key = stored_key()
        except Exception:
            key = None
    if not key:
        return None
    try:
        return wandb.Api(api_key=key).default_entity
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="lunarl", help="wandb project (default lunarl, as logger.wandb.project)")
    parser.add_argument("--group", help="only this wandb group (the experiment name, logger.wandb.group)")
    parser.add_argument("--entity", help="wandb entity (default: your default entity)")
    parser.add_argument("--title", help="report title")
    args = parser.parse_args(argv)
    entity = logged_in_entity()
    if entity is None:
        print(
            "wandb_report: error: not logged in to wandb: run `wandb login` or set WANDB_API_KEY "
            "(offline runs: `wandb sync RUN_DIR/wandb/offline-run-*` first); "
            "for plots without an account use `python -m lunarl.report RUN_DIR`",
            file=sys.stderr,
        )
        return 1
    report = build_report(args.project, args.entity or entity, args.group, args.title)
    try:
        report.save()
    except Exception as e:  # permissions, unknown project, network
        print(f"wandb_report: error: wandb refused the report: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(report.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
