"""Videos: a file from every env read back with imageio (frame count and size), the status bar,
the kuka fallback without OpenGL, and a training run with ``run.video_every`` that writes its
videos and logs them to wandb offline, plus TensorBoard event files read back with
TensorBoard's own event reader."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_runs import VIDEO_STEPS, video_run

import lunarl
from lunarl.agents import ppo
from lunarl.envs import render as render_mod
from lunarl.envs.render import STATUS_BAR_HEIGHT, episode_frames, render_frame, status_bar, write_video
from lunarl.run.video import VideoRecorder, video_name

pytestmark = pytest.mark.timeout(600)


def even(n: int) -> int:
    return n + n % 2


def read_video(path: Path) -> np.ndarray:
    return iio.imread(path, index=None)  # [frames, H, W, 3]; ffmpeg for MP4, Pillow for GIF


@pytest.mark.parametrize(("name", "formats"), [("rover", ("mp4", "gif")), ("car_track", ("mp4",))])
def test_policy_video_has_one_frame_per_step_and_the_env_frame_size(name, formats, tmp_path):
    env = lunarl.envs.make(name)
    cfg = ppo.PPOConfig.build(num_envs=2, policy_hidden=(8,), value_hidden=(8,), episode_length=40)
    ts = ppo.init(jax.random.PRNGKey(0), env, cfg)
    recorder = VideoRecorder(ppo.AGENT, env, cfg)
    h, w, _ = env.render(jax.jit(env.reset)(jax.random.PRNGKey(0))).shape
    for fmt in formats:  # the format follows the file name
        video = recorder.record(ppo.policy_params(ts), jax.random.PRNGKey(1), tmp_path / video_name(1280, fmt))
        assert video.path.name == f"eval-step000001280.{fmt}"
        frames = read_video(video.path)
        assert 2 <= video.frames <= 41  # the state after reset, then one per step (crashes end early)
        size = (even(h + STATUS_BAR_HEIGHT), even(w)) if fmt == "mp4" else (h + STATUS_BAR_HEIGHT, w)
        assert frames.shape == (video.frames, *size, 3)  # MP4 pads to even sizes (yuv420p)
        assert frames[0].std() > 10  # not a blank frame
        assert video.render_seconds > 0 and video.encode_seconds > 0


@pytest.fixture(scope="module")
def kuka():
    """A small-frame kuka env and a reset state (compiling MJX's reset once for the module)."""
    env = lunarl.envs.make("kuka", render_width=96, render_height=64)
    return env, jax.jit(env.reset)(jax.random.PRNGKey(0))


def test_kuka_video_frames_come_from_mujoco_with_the_configured_size(kuka, tmp_path):
    env, state = kuka
    # A scripted trajectory (joint 2 swings), set on the host: drawing needs no physics step.
    qpos = np.asarray(state.pipeline_state.data.qpos)
    states = []
    for t in range(12):
        q = qpos.copy()
        q[1] += 0.05 * t
        data = state.pipeline_state.data.replace(qpos=jnp.asarray(q))
        states.append(state.replace(pipeline_state=state.pipeline_state.replace(data=data)))
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *states)
    path = write_video(episode_frames(env, stacked), tmp_path / "kuka.mp4")
    frames = read_video(path)
    assert frames.shape == (12, 64 + STATUS_BAR_HEIGHT, 96, 3)
    # the arm moves: the last frame differs from the first below the status bar
    assert np.abs(frames[-1, STATUS_BAR_HEIGHT:].astype(int) - frames[0, STATUS_BAR_HEIGHT:]).mean() > 0.5


def test_kuka_without_opengl_falls_back_to_a_schematic_with_one_warning(kuka, monkeypatch):
    env, state = kuka

    def no_gl(_state):
        raise RuntimeError("Kuka.render needs an offscreen OpenGL platform and 'egl' failed")

    monkeypatch.setattr(env, "render", no_gl)
    monkeypatch.setattr(render_mod, "_gl_error", None)
    with pytest.warns(RuntimeWarning, match="schematic"):
        frame = render_frame(env, state)
    assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8 and frame.std() > 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per frame
        assert render_frame(env, state).shape == (64, 96, 3)


def test_rover_without_a_renderer_error_is_not_hidden(monkeypatch):
    env = lunarl.envs.make("rover")

    def broken(_state):
        raise RuntimeError("a bug in the rover's drawing")

    monkeypatch.setattr(env, "render", broken)
    with pytest.raises(RuntimeError, match="bug"):
        render_frame(env, None)


def test_status_bar_shows_a_success_badge_only_when_given():
    scene = np.full((50, 320, 3), 100, np.uint8)
    plain = status_bar(scene, "step 3/10   return 1.50")
    badged = status_bar(scene, "step 3/10   return 1.50", badge="success")
    assert plain.shape == badged.shape == (50 + STATUS_BAR_HEIGHT, 320, 3)
    assert (plain[STATUS_BAR_HEIGHT:] == scene).all()  # the scene is not drawn over
    green = lambda img: ((img[..., 1] > 150) & (img[..., 0] < 100)).sum()  # noqa: E731
    assert green(plain[:STATUS_BAR_HEIGHT]) == 0 and green(badged[:STATUS_BAR_HEIGHT]) > 50


def test_write_video_refuses_unknown_formats_and_empty_episodes(tmp_path):
    frame = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="use .mp4 or .gif"):
        write_video([frame], tmp_path / "x.avi")
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "x.mp4")
    odd = write_video([np.full((7, 9, 3), 200, np.uint8)] * 3, tmp_path / "odd.mp4")
    assert read_video(odd).shape == (3, 8, 10, 3)  # padded to even sizes for yuv420p


# --------------------------------------------------------------------------------------------
# During training (one shared real run; see smoke_runs.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, app_env) -> Path:
    return video_run(tmp_path_factory, app_env)


def test_training_writes_a_video_per_video_evaluation_with_its_cost(trained):
    videos = sorted((trained / "videos").glob("*.mp4"))
    assert [p.name for p in videos] == [video_name(s, "mp4") for s in VIDEO_STEPS]
    for p in videos:
        frames = read_video(p)
        assert frames.shape[0] == 201 and frames.shape[1:] == (378, 480, 3)  # 200 steps + reset
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    costs = [r for r in rows if "perf/video_seconds" in r]
    assert [r["global_step"] for r in costs] == list(VIDEO_STEPS)
    assert all(r["perf/video_seconds"] > 0 for r in costs)
    assert "video @ 5,120 steps" in (trained / "train.stdout").read_text()


def test_training_videos_are_logged_to_wandb_offline(trained):
    media = list((trained / "wandb").glob("offline-run-*/files/media/videos/eval/*.mp4"))
    assert len(media) == len(VIDEO_STEPS)
    assert {p.stat().st_size for p in media} == {p.stat().st_size for p in (trained / "videos").glob("*.mp4")}


def test_tensorboard_event_files_hold_the_logged_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k, v in r.items() if isinstance(v, float) and k not in ("time",)}
    assert logged <= set(events.Tags()["scalars"])  # the same names as metrics.jsonl
    assert "seed1/eval/episode_return" in logged  # per-seed values of the 2-seed run too
    for key in ("losses/policy_loss", "eval/episode_return", "perf/steps_per_second"):
        expected = [(r["global_step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.eval_every=10", "run.video_every=15"], "run.video_every=15 must be a multiple of run.eval_every=10"),
        (["run.eval_every=0", "run.video_every=10"], "run.video_every=10 needs run.eval_every > 0"),
        (["run.video_format=avi"], "run.video_format='avi': allowed mp4, gif"),
    ],
)
def test_video_settings_are_checked_before_anything_compiles(overrides, message):
    from hydra import compose, initialize_config_dir

    from lunarl.run.schema import ConfigError, register_schemas, validate_train

    register_schemas()
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=rover_smoke", "run.log_every=5", *overrides])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train(cfg)


def test_tensorboard_after_a_resume_keeps_the_events_up_to_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lunarl.run.logger import TensorBoardLogger

    first = TensorBoardLogger(tmp_path)
    for step in (100, 200, 300):  # the run logged up to 300, its last checkpoint is at 100
        first.log({"global_step": step, "time": 1.0, "iteration": step // 100, "losses/x": float(step)})
    first.close()
    resumed = TensorBoardLogger(tmp_path)
    resumed.purge_after(100)  # what the loop does on resume
    for step in (200, 300):
        resumed.log({"global_step": step, "losses/x": step + 1.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == ["losses/x"]  # time and iteration are not scalars
    assert [(e.step, e.value) for e in events.Scalars("losses/x")] == [(100, 100.0), (200, 201.0), (300, 301.0)]
