"""``scripts/wandb_report.py``: its panels match ``lunarl.report.PANELS`` (checked offline, on the
wandb-workspaces objects and their saved form), and without a login it exits with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lunarl.report import PANELS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
wandb_report = pytest.importorskip("wandb_report")


def test_every_offline_panel_is_a_wandb_line_plot_of_the_same_metrics():
    plots = wandb_report.line_plots()
    assert [p.title for p in plots] == [p.title for p in PANELS]
    for panel, plot in zip(PANELS, plots, strict=True):
        config = plot._to_model().config  # what wandb stores; built without any network
        if panel.name == "losses":
            assert config.use_metric_regex and config.metric_regex == "^losses\\/.*"
        elif panel.name == "behaviour":
            assert config.use_metric_regex and config.metric_regex == "^(actor|critic|imagination)\\/.*"
        elif panel.metrics[0].endswith("/*"):
            assert config.use_metric_regex and config.metric_regex == "^" + panel.metrics[0][:-2] + "\\/.*"
        else:
            assert config.metrics == list(panel.metrics)
        assert config.x_axis == ("global_step" if panel.x == "global_step" else "_absolute_runtime")
        assert (config.group_agg, config.group_area) == ("mean", "stddev")  # bands over a group's runs
        if panel.percent:
            assert (config.y_axis_min, config.y_axis_max) == (0.0, 1.0)


def test_report_filters_the_group_and_browses_the_rollout_videos():
    report = wandb_report.build_report("lunarl", "someone", group="rover_smoke")
    grids = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    assert len(grids) == 2
    runset = grids[0].runsets[0]
    assert (runset.entity, runset.project, runset.filters, runset.groupby) == ("someone", "lunarl", "Group = 'rover_smoke'", ["group"])
    media = grids[1].panels[0]._to_model().config
    assert media.media_keys == ["eval/video"]  # the key lunarl.run.loop logs videos under
    assert report.title == "lunarl: rover_smoke"


def test_without_a_login_it_exits_with_one_clear_line(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    script = Path(__file__).resolve().parent.parent / "scripts" / "wandb_report.py"
    proc = subprocess.run([sys.executable, str(script), "--group", "rover"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("wandb_report: error: not logged in to wandb") and "lunarl.report" in line
