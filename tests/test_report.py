"""``lunarl.report``: PNGs and one self-contained HTML page from a real short run (2 seeds, so
seed bands), from two runs with different configs, from runs that differ only in the seed, and
from a run that is still writing ``metrics.jsonl``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from smoke_runs import video_run

from lunarl import report

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, app_env) -> Path:
    return video_run(tmp_path_factory, app_env)


def copy_run(src: Path, dst: Path, scale: float = 1.0, **config: object) -> Path:
    """A copy of a run's config, metrics and videos with ``config`` changed and the returns scaled
    (a second run of another config, without training one more)."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "videos", dst / "videos")
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    for key, value in config.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines()]
    scaled = [{k: v * scale if "episode_return" in k else v for k, v in r.items()} for r in rows]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scaled))
    return dst


def inlined(html: str) -> tuple[int, int]:
    return html.count("data:image/png;base64,"), html.count("data:video/mp4;base64,")


def test_report_of_a_real_two_seed_run_has_every_panel_with_seed_bands(trained, tmp_path):
    out = tmp_path / "report"
    assert report.main([str(trained), "--out", str(out)]) == 0
    pngs = sorted(p.stem for p in out.glob("*.png"))
    assert pngs == sorted(p.name for p in report.PANELS if not p.optional)  # PPO logs no world model
    html = (out / "report.html").read_text()
    assert inlined(html) == (len(pngs), 1)  # every image and the latest video, inlined
    assert not re.search(r"""(src|href)=['"](?!data:)""", html)  # nothing outside the page
    assert "eval-step000005120.mp4" in html and "2 seed(s)" in html and "rover_smoke" in html
    (group,) = report.group_runs(report.find_runs([trained]))
    assert group.num_seeds == 2
    xs, mean, std, count = report.band(group.curves("eval/episode_return"))
    assert list(xs) == [2560, 5120] and list(count) == [2, 2] and (std > 0).all()  # a band over seeds


def test_report_of_two_configs_labels_each_curve_by_the_key_that_differs(trained, tmp_path):
    other = copy_run(trained, tmp_path / "lr", scale=0.5, **{"agent.learning_rate": 0.001})
    out = tmp_path / "report"
    assert report.main([str(trained), str(other), "--out", str(out)]) == 0
    groups = report.group_runs(report.find_runs([trained, other]))
    assert sorted(g.label for g in groups) == ["agent.learning_rate=0.0003", "agent.learning_rate=0.001"]
    html = (out / "report.html").read_text()
    assert "agent.learning_rate=0.001" in html and "2 configurations" in html
    assert len(list(out.glob("*.png"))) == len([p for p in report.PANELS if not p.optional])


def test_a_sweep_directory_of_seeds_is_one_curve_over_all_its_seeds(trained, tmp_path):
    sweep = tmp_path / "sweep"
    copy_run(trained, sweep / "0", seed=0)
    copy_run(trained, sweep / "1", scale=2.0, seed=1)
    (group,) = report.group_runs(report.find_runs([sweep]))  # found below the multirun dir
    assert group.num_seeds == 4 and group.label == "rover_smoke"
    html = report.build_report([sweep], tmp_path / "out")
    assert "4 seed(s)" in html.read_text()


def test_report_of_a_run_still_writing_its_metrics(trained, tmp_path):
    live = copy_run(trained, tmp_path / "live")
    lines = (live / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # half a line
    run = report.load_run(live)
    assert len(run.rows) == 3 and run.progress() == (2560, 5120)
    html = report.build_report([live]).read_text()  # default: <run>/report/report.html
    assert "(running or stopped)" in html and (live / "report" / "report.html").exists()


def test_watch_rewrites_the_page_and_makes_the_browser_reload(trained, tmp_path, monkeypatch):
    ticks = []

    def sleep(seconds):
        ticks.append(seconds)
        if len(ticks) == 2:
            raise KeyboardInterrupt  # Ctrl-C after two rounds

    monkeypatch.setattr(report.time, "sleep", sleep)
    run = copy_run(trained, tmp_path / "run")
    assert report.main([str(run), "--watch", "30", "--smooth", "1"]) == 0
    assert ticks == [30, 30]
    assert "http-equiv='refresh' content='30'" in (run / "report" / "report.html").read_text()


def test_no_run_is_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lunarl.report: error: no metrics.jsonl") and "\n" not in err


def test_moving_average_keeps_every_point_and_the_wall_clock_survives_resumes():
    np.testing.assert_allclose(report.moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    minutes = report._wallclock([{"time": 30.0}, {"time": 60.0}, {"time": 6.0}, {"time": 36.0}])
    np.testing.assert_allclose(minutes * 60, [30, 60, 66, 96])  # the resumed process adds on
