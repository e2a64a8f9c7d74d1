"""``lunarl.play`` headless (``SDL_VIDEODRIVER=dummy``): a few hundred frames on each env with
scripted key events; a key press changes the action the env receives; a trained run's policy
drives until a key takes over."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ["SDL_VIDEODRIVER"] = "dummy"  # before pygame opens a display
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pytest  # noqa: E402
from smoke_runs import video_run  # noqa: E402

import lunarl  # noqa: E402
from lunarl import play  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def keys(schedule: dict[int, list[tuple[int, int]]]):
    """A script: at frame n post (event type, key) events."""
    return lambda frame: [pygame.event.Event(kind, key=key) for kind, key in schedule.get(frame, [])]


def session(name: str, **config) -> play.PlaySession:
    env = lunarl.envs.make(name, **config)
    return play.PlaySession(env, name, env.default_episode_length, seed=0)


def test_rover_keys_drive_turn_and_dig(tmp_path):
    s = session("rover")
    script = keys({
        20: [(pygame.KEYDOWN, pygame.K_LEFT)],
        40: [(pygame.KEYUP, pygame.K_LEFT)],
        60: [(pygame.KEYDOWN, pygame.K_UP)],
        120: [(pygame.KEYDOWN, pygame.K_SPACE)],
        121: [(pygame.KEYUP, pygame.K_SPACE)],
        200: [(pygame.KEYUP, pygame.K_UP)],
    })  # fmt: skip
    log = play.run_window(s, fps=0, frames=300, script=script)
    actions = np.array(log.actions)
    assert actions.shape == (300, 3) and set(log.modes) == {"manual"}
    np.testing.assert_array_equal(actions[:20], np.tile([0, 0, -1], (20, 1)))  # no key: stand still
    np.testing.assert_array_equal(actions[20:40], np.tile([0, 1, -1], (20, 1)))  # left: turn left
    assert (actions[60:200, 0] == 1).all() and (actions[200:, 0] == 0).all()  # up: full speed, then stop
    assert actions[120, 2] == 1 and (np.delete(actions[:, 2], 120) == -1).all()  # space: dig once


def test_rover_turns_left_with_the_left_key():
    s = session("rover")
    play.run_window(s, fps=0, frames=30, script=keys({0: [(pygame.KEYDOWN, pygame.K_LEFT)]}))
    ps = s.state.pipeline_state
    assert float(ps.omega) > 0  # counter-clockwise, as seen from above = left


def test_car_track_keys_steer_and_throttle():
    s = session("car_track")
    script = keys({10: [(pygame.KEYDOWN, pygame.K_UP)], 50: [(pygame.KEYDOWN, pygame.K_RIGHT)], 80: [(pygame.KEYUP, pygame.K_RIGHT)]})
    log = play.run_window(s, fps=0, frames=300, script=script)
    actions = np.array(log.actions)
    assert actions.shape == (300, 2)
    np.testing.assert_array_equal(actions[:10], 0)
    assert (actions[10:, 1] == 1).all()  # throttle from frame 10 on
    np.testing.assert_array_equal(actions[50:80, 0], -1)  # right = negative steering
    assert (actions[80:, 0] == 0).all()


@pytest.mark.slow  # compiling MJX's step on the CPU takes ~30 s
def test_kuka_keys_move_the_chosen_joint_and_the_gripper():
    s = session("kuka", render_width=96, render_height=64)
    script = keys({
        5: [(pygame.KEYDOWN, pygame.K_3)],
        6: [(pygame.KEYUP, pygame.K_3), (pygame.KEYDOWN, pygame.K_UP)],
        40: [(pygame.KEYUP, pygame.K_UP), (pygame.KEYDOWN, pygame.K_SPACE)],
        41: [(pygame.KEYUP, pygame.K_SPACE)],
    })  # fmt: skip
    log = play.run_window(s, fps=0, frames=200, script=script)
    actions = np.array(log.actions)
    assert actions.shape == (200, 8)
    assert (actions[6:40, 2] == 1).all() and (np.delete(actions[6:40], [2, 7], axis=1) == 0).all()
    assert (actions[:40, 7] == 1).all() and (actions[40:, 7] == -1).all()  # space closed the gripper


def test_a_trained_policy_drives_until_a_key_takes_over(tmp_path_factory, app_env):
    run_dir: Path = video_run(tmp_path_factory, app_env)
    opts = play.parse_args([f"run.dir={run_dir}", "checkpoint=latest"])
    s = play.make_session(opts)
    assert s.mode == "policy" and s.episode_length == 200
    log = play.run_window(s, fps=0, frames=120, script=keys({60: [(pygame.KEYDOWN, pygame.K_DOWN)]}))
    assert log.modes[:60] == ["policy"] * 60 and log.modes[60:] == ["manual"] * 60
    actions = np.array(log.actions)
    assert not np.array_equal(actions[:60], np.tile([0, 0, -1], (60, 1)))  # the policy, not the idle keyboard
    np.testing.assert_array_equal(actions[60:], np.tile([-1, 0, -1], (60, 1)))  # down: reverse
    assert any("you took over" in e for e in log.events)


def test_bad_options_are_one_line_errors():
    for argv, match in (
        ([], "give env="),
        (["env=rover", "fps=-1"], "fps=-1"),
        (["env=rover", "colour=red"], "known key"),
        (["env=rover", "viewer=vr"], "viewer="),
    ):
        with pytest.raises(play.PlayError, match=match) as err:
            play.parse_args(argv)
        assert "\n" not in str(err.value)
    with pytest.raises(play.PlayError, match="unknown; known"):
        play.make_session(play.parse_args(["env=moon"]))


_VIEWER_DRIVER = """
import json, subprocess, threading, time
import numpy as np
from lunarl import play

def press_keys():
    # Wait for the viewer's window, focus it (Xvfb has no window manager), press 3 then Up.
    found = subprocess.run(["xdotool", "search", "--sync", "--onlyvisible", "--name", "MuJoCo"],
                           capture_output=True, text=True, timeout=900)
    window = found.stdout.split()[0]
    time.sleep(1.0)
    subprocess.run(["xdotool", "windowfocus", "--sync", window], timeout=30, check=True)
    subprocess.run(["xdotool", "key", "3"], timeout=30, check=True)
    time.sleep(0.3)
    subprocess.run(["xdotool", "key", "Up"], timeout=30, check=True)

session = play.make_session(play.parse_args(["env=kuka", "viewer=mujoco"]))
threading.Thread(target=press_keys, daemon=True).start()
log = play.run_mujoco_viewer(session, fps=30, frames=120)
print("ACTIONS", json.dumps(np.asarray(log.actions).tolist()))
"""


@pytest.mark.slow  # MJX compile plus a real GLFW window on a virtual X server: minutes
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not all(shutil.which(t) for t in ("xvfb-run", "xdotool")), reason="needs xvfb-run and xdotool (apt install xvfb xdotool)")
def test_kuka_in_the_mujoco_viewer_takes_real_key_presses(tmp_path):
    """``viewer=mujoco`` opens ``mujoco.viewer`` on a virtual X display (Xvfb, software GL); keys
    sent by xdotool through X reach the viewer's key callback and move the chosen joint."""
    script = tmp_path / "driver.py"
    script.write_text(_VIEWER_DRIVER)
    env = {**os.environ, "MUJOCO_GL": "glfw"}
    env.pop("SDL_VIDEODRIVER", None)
    proc = subprocess.run(
        ["xvfb-run", "-a", "-s", "-screen 0 1024x768x24", sys.executable, str(script)],
        capture_output=True, text=True, timeout=1100, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("ACTIONS "))
    actions = np.array(json.loads(line.removeprefix("ACTIONS ")))
    assert actions.shape == (120, 8)
    moved = actions[:, 2] == 1  # joint 3 driven up by the Up key, for a few frames per press
    assert 1 <= moved.sum() <= 10
    assert (np.delete(actions, [2, 7], axis=1) == 0).all()  # no other joint moved
