"""``python -m lunarl.play env=rover|car_track|kuka`` or ``python -m lunarl.play run.dir=RUN``.

A window (pygame) shows one env live. With ``env=NAME`` you drive it with the keyboard; with
``run.dir=RUN`` the run's policy (seed 0 of checkpoint ``checkpoint=latest|best|ITERATION``)
drives, deterministically, and pressing a drive key takes over; ``M`` switches between you and
the policy. The panel beside the frame shows who drives, the action the env receives, the reward
of the step and the return so far, the env's metrics, and a log of the reward terms as they fire
(a reward above ``event_reward`` in size, or a count such as ``orbs_collected`` going up).

Keys: rover -- arrows drive (up/down speed, left/right turn), space digs; car_track -- up/down
throttle, left/right steer; kuka -- 1..7 choose a joint, up/down move it, space opens/closes the
gripper. Everywhere: M manual/policy, R new episode, P pause, Esc or closing the window quits.

Options (``key=value``): ``seed=0``, ``fps=30`` (0 = as fast as it renders), ``frames=0`` (stop
after N frames; 0 = until you quit), ``scale`` (window zoom; default fits ~720 px),
``checkpoint=latest``, ``viewer=pygame|mujoco`` (kuka: ``mujoco`` opens ``mujoco.viewer``
instead, which needs a display; keys are the same). Without a display, set
``SDL_VIDEODRIVER=dummy`` (as the tests do) to run headless.

Exit codes: 0 closed; 1 a bad option, unknown env, or a run without checkpoints (one line).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PlayLog", "PlaySession", "keyboard_action", "main", "parse_args"]

OPTIONS = {
    "env": None,
    "run.dir": None,
    "checkpoint": "latest",
    "seed": 0,
    "fps": 30,
    "frames": 0,
    "scale": None,
    "viewer": "pygame",
    "event_reward": 1.0,
}
PANEL_WIDTH = 330


class PlayError(ValueError):
    """A bad option or an unusable run; printed as one line."""


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` options (see the module doc) with their defaults filled in."""
    import yaml

    opts = dict(OPTIONS)
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.lstrip("+")
        if not sep or key not in OPTIONS:
            raise PlayError(f"{arg!r} is not KEY=VALUE with a known key; known: {', '.join(OPTIONS)}")
        opts[key] = yaml.safe_load(text) if key not in ("run.dir", "env") else text
    if (opts["env"] is None) == (opts["run.dir"] is None):
        raise PlayError("give env=rover|car_track|kuka (drive it yourself) or run.dir=RUN (watch a trained policy)")
    for key in ("fps", "frames", "seed"):
        if not isinstance(opts[key], int) or opts[key] < 0:
            raise PlayError(f"{key}={opts[key]!r}: a whole number >= 0")
    if opts["scale"] is not None and (not isinstance(opts["scale"], int | float) or opts["scale"] <= 0):
        raise PlayError(f"scale={opts['scale']!r}: a number > 0")
    if opts["viewer"] not in ("pygame", "mujoco"):
        raise PlayError(f"viewer={opts['viewer']!r}: allowed pygame, mujoco")
    return opts


# --------------------------------------------------------------------------------------------
# Keys -> actions
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Keyboard:
    """Keys held now (tracked from KEYDOWN/KEYUP events, so scripted events work like real ones)
    and kuka's joint selection and gripper state."""

    held: set[int] = dataclasses.field(default_factory=set)
    joint: int = 0
    gripper_open: bool = True


def drive_keys() -> set[int]:
    import pygame

    return {pygame.K_UP, pygame.K_DOWN, pygame.K_LEFT, pygame.K_RIGHT, pygame.K_SPACE}


def keyboard_action(env_name: str, action_size: int, keys: Keyboard) -> np.ndarray:
    """The action the keys ask for, in the env's [-1, 1] action space."""
    import pygame

    held = keys.held
    axis = lambda plus, minus: float(plus in held) - float(minus in held)  # noqa: E731
    action = np.zeros(action_size, np.float32)
    if env_name == "rover":
        action[0] = axis(pygame.K_UP, pygame.K_DOWN)  # forward speed
        action[1] = axis(pygame.K_LEFT, pygame.K_RIGHT)  # turn rate, positive = left
        action[2] = 1.0 if pygame.K_SPACE in held else -1.0  # dig above 0.5
    elif env_name == "car_track":
        action[0] = axis(pygame.K_LEFT, pygame.K_RIGHT)  # steering, positive = left
        action[1] = axis(pygame.K_UP, pygame.K_DOWN)  # throttle
    else:  # kuka: joint position deltas, then the gripper (+1 open, -1 closed)
        action[keys.joint] = axis(pygame.K_UP, pygame.K_DOWN)
        action[-1] = 1.0 if keys.gripper_open else -1.0
    return action


# --------------------------------------------------------------------------------------------
# The session: env, optional policy, and what happened
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PlayLog:
    """What a session did, frame by frame (the tests read it)."""

    actions: list[np.ndarray] = dataclasses.field(default_factory=list)
    modes: list[str] = dataclasses.field(default_factory=list)  # "manual" | "policy"
    rewards: list[float] = dataclasses.field(default_factory=list)
    episodes: list[tuple[float, bool]] = dataclasses.field(default_factory=list)  # (return, success)
    events: list[str] = dataclasses.field(default_factory=list)


class PlaySession:
    """One env stepped on the host, one state at a time, by the keyboard or a policy."""

    def __init__(self, env: Any, env_name: str, episode_length: int, seed: int = 0, policy: Any = None, params: Any = None, event_reward: float = 1.0):
        import jax

        self.env, self.env_name, self.episode_length = env, env_name, episode_length
        self.policy, self.params, self.event_reward = policy, params, event_reward
        self._reset = jax.jit(env.reset)
        self._step = jax.jit(env.step)
        if policy is not None:
            self._act = jax.jit(lambda p, obs, carry, first, key: policy.act(p, obs[None], carry, first[None], key, True))
        self.key = jax.random.PRNGKey(seed)
        self.mode = "policy" if policy is not None else "manual"
        self.keys = Keyboard()
        self.log = PlayLog()
        self.recent: deque[str] = deque(maxlen=12)
        self.new_episode()

    def new_episode(self) -> None:
        import jax
        import jax.numpy as jnp

        self.key, reset_key = jax.random.split(self.key)
        self.state = self._reset(reset_key)
        self.t, self.ret, self.success = 0, 0.0, False
        self.last_reward, self.last_action = 0.0, np.zeros(self.env.action_size, np.float32)
        self.metrics = {k: float(v) for k, v in self.state.metrics.items()}
        if self.policy is not None:
            self.carry = self.policy.initial_carry(1)
            self.first = jnp.array(True)

    def action(self) -> np.ndarray:
        if self.mode == "manual" or self.policy is None:
            return keyboard_action(self.env_name, self.env.action_size, self.keys)
        import jax
        import jax.numpy as jnp

        self.key, act_key = jax.random.split(self.key)
        action, self.carry = self._act(self.params, self.state.obs, self.carry, self.first, act_key)
        self.first = jnp.array(False)
        return np.asarray(action[0], np.float32)

    def step(self) -> None:
        """One env step with the current driver's action; logs reward terms and episode ends."""
        action = self.action()
        self.state = self._step(self.state, action)
        self.t += 1
        reward = float(self.state.reward)
        self.ret += reward
        metrics = {k: float(v) for k, v in self.state.metrics.items()}
        fired = [
            f"{k} {self.metrics.get(k, 0):g}->{v:g}"
            for k, v in metrics.items()
            if v != self.metrics.get(k, 0.0) and float(v).is_integer() and float(self.metrics.get(k, 0.0)).is_integer()
        ]
        if fired or abs(reward) >= self.event_reward:
            self._event(f"t={self.t}: reward {reward:+.2f}" + (f" ({', '.join(fired)})" if fired else ""))
        self.success = self.success or metrics.get("success", 0.0) > 0
        self.metrics, self.last_reward, self.last_action = metrics, reward, action
        self.log.actions.append(action)
        self.log.modes.append(self.mode)
        self.log.rewards.append(reward)
        if float(self.state.done) > 0 or self.t >= self.episode_length:
            why = "done" if float(self.state.done) > 0 else f"time limit {self.episode_length}"
            self._event(f"episode over ({why}): return {self.ret:.2f}{', success' if self.success else ''}")
            self.log.episodes.append((self.ret, self.success))
            self.new_episode()

    def _event(self, text: str) -> None:
        self.recent.appendleft(text)
        self.log.events.append(text)

    def handle_key(self, key: int, down: bool) -> bool:
        """Apply one key event; False when the user asked to quit."""
        import pygame

        if not down:
            self.keys.held.discard(key)
            return True
        if key == pygame.K_ESCAPE:
            return False
        self.keys.held.add(key)
        if key == pygame.K_m and self.policy is not None:
            self.mode = "manual" if self.mode == "policy" else "policy"
            self._event(f"t={self.t}: {'you drive' if self.mode == 'manual' else 'the policy drives'}")
        elif key == pygame.K_r:
            self._event(f"t={self.t}: new episode (R)")
            self.new_episode()
        elif key in drive_keys() and self.mode == "policy":
            self.mode = "manual"  # any drive key takes over
            self._event(f"t={self.t}: you took over")
        if self.env_name == "kuka":
            if pygame.K_1 <= key <= pygame.K_7:
                self.keys.joint = key - pygame.K_1
            elif key == pygame.K_SPACE:
                self.keys.gripper_open = not self.keys.gripper_open
        return True

    def panel_lines(self) -> list[tuple[str, tuple[int, int, int]]]:
        white, grey, green, amber = (235, 235, 235), (160, 160, 170), (110, 210, 120), (250, 200, 90)
        driver = "you (keyboard)" if self.mode == "manual" else "policy (M or a drive key: take over)"
        lines = [
            (f"{self.env_name}   step {self.t}/{self.episode_length}", white),
            (f"driver: {driver}", amber if self.mode == "manual" else green),
            (f"reward {self.last_reward:+.3f}   return {self.ret:.2f}", white),
            ("success" if self.success else "not yet successful", green if self.success else grey),
            ("action " + " ".join(f"{a:+.1f}" for a in self.last_action), white),
        ]
        if self.env_name == "kuka":
            lines.append((f"joint {self.keys.joint + 1} selected, gripper {'open' if self.keys.gripper_open else 'closed'}", grey))
        lines.append(("metrics", grey))
        lines += [(f"  {k}: {v:.3g}", white) for k, v in list(self.metrics.items())[:10]]
        lines.append(("reward terms as they fire", grey))
        lines += [(f"  {e}", amber) for e in list(self.recent)[:8]]
        lines.append((HELP[self.env_name], grey))
        lines.append((("M policy/you   " if self.policy is not None else "") + "R reset   P pause   Esc quit", grey))
        return lines


HELP = {
    "rover": "arrows drive, space digs",
    "car_track": "up/down throttle, left/right steer",
    "kuka": "1-7 joint, up/down move it, space gripper",
}


# --------------------------------------------------------------------------------------------
# The window
# --------------------------------------------------------------------------------------------


def run_window(session: PlaySession, fps: int = 30, frames: int = 0, scale: float | None = None, script: Callable[[int], Sequence[Any]] | None = None) -> PlayLog:
    """The pygame loop: events, one step, draw. ``script(frame)`` returns events to post before
    that frame is handled (the tests drive keys this way). Returns the session's log."""
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    from lunarl.envs.render import render_frame

    # Only the display and fonts: pygame.init() would also open audio (ALSA noise on servers).
    pygame.display.init()
    pygame.font.init()
    try:
        first = render_frame(session.env, session.state)
        h, w = first.shape[:2]
        zoom = scale if scale is not None else max(1.0, 720 / w)
        size = (round(w * zoom), round(h * zoom))
        draw = _frame_drawer(session.env, size[0])
        screen = pygame.display.set_mode((size[0] + PANEL_WIDTH, max(size[1], 460)))
        pygame.display.set_caption(f"lunarl.play: {session.env_name}")
        font = pygame.font.Font(None, 20)
        clock = pygame.time.Clock()
        running, paused, frame = True, False, 0
        while running and (frames == 0 or frame < frames):
            for event in script(frame) if script else ():
                pygame.event.post(event)
            for event in pygame.event.get():
                if event.type == pygame.QUIT:
                    running = False
                elif event.type in (pygame.KEYDOWN, pygame.KEYUP):
                    if event.type == pygame.KEYDOWN and event.key == pygame.K_p:
                        paused = not paused
                    running = session.handle_key(event.key, event.type == pygame.KEYDOWN) and running
            if not running:
                break
            if not paused:
                session.step()
            image = draw(session.state)
            surface = pygame.surfarray.make_surface(np.ascontiguousarray(image.transpose(1, 0, 2)))
            screen.fill((22, 22, 28))
            screen.blit(pygame.transform.smoothscale(surface, size), (0, 0))
            y = 10
            for text, color in session.panel_lines():
                screen.blit(font.render(_fit(font, text, PANEL_WIDTH - 16), True, color), (size[0] + 10, y))
                y += 19
            if paused:
                screen.blit(font.render("paused (P)", True, (250, 200, 90)), (10, 10))
            pygame.display.flip()
            frame += 1
            if fps:
                clock.tick(fps)
    finally:
        pygame.quit()
    return session.log


def _frame_drawer(env: Any, width: int) -> Callable[[Any], np.ndarray]:
    """Frames drawn at the window's width where the env's ``render`` takes a ``width`` (the 2-D
    envs: sharp lines instead of a scaled-up bitmap); the others are scaled by pygame."""
    import inspect

    from lunarl.envs.render import render_frame

    if "width" in inspect.signature(env.render).parameters:
        return lambda state: env.render(state, width=width)
    return lambda state: render_frame(env, state)


def _fit(font: Any, text: str, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if font.size(text)[0] <= width:
        return text
    while text and font.size(text + "…")[0] > width:
        text = text[:-1]
    return text + "…"


def run_mujoco_viewer(session: PlaySession, fps: int = 30, frames: int = 0) -> PlayLog:
    """Kuka in ``mujoco.viewer`` (needs a display): the same keys through the viewer's key
    callback, which reports presses only, so a move key nudges the joint for a few steps."""
    import time

    import mujoco
    import mujoco.viewer
    import pygame

    glfw_to_pygame = {265: pygame.K_UP, 264: pygame.K_DOWN, 32: pygame.K_SPACE, 77: pygame.K_m, 82: pygame.K_r}
    glfw_to_pygame |= {49 + i: pygame.K_1 + i for i in range(7)}
    pending: list[int] = []
    release_at: dict[int, int] = {}

    data = session.env.mj_data(session.state)
    with mujoco.viewer.launch_passive(session.env.mj_model, data, key_callback=lambda k: pending.append(k)) as viewer:
        frame = 0
        while viewer.is_running() and (frames == 0 or frame < frames):
            start = time.perf_counter()
            for k in pending:
                if k in glfw_to_pygame:
                    session.handle_key(glfw_to_pygame[k], True)
                    release_at[glfw_to_pygame[k]] = frame + 5
            pending.clear()
            for k, at in list(release_at.items()):
                if frame >= at:
                    session.handle_key(k, False)
                    del release_at[k]
            session.step()
            new = session.env.mj_data(session.state)
            with viewer.lock():
                data.qpos[:], data.qvel[:], data.mocap_pos[:] = new.qpos, new.qvel, new.mocap_pos
                mujoco.mj_forward(session.env.mj_model, data)
            viewer.sync()
            frame += 1
            if fps:
                time.sleep(max(0.0, 1.0 / fps - (time.perf_counter() - start)))
    return session.log


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def make_session(opts: dict[str, Any]) -> PlaySession:
    """An env to drive (``env=``) or a trained run's env and policy (``run.dir=``)."""
    import jax

    import lunarl.envs

    if opts["env"] is not None:
        if opts["env"] not in lunarl.envs.registered():
            raise PlayError(f"env={opts['env']}: unknown; known: {', '.join(lunarl.envs.registered())}")
        env = lunarl.envs.make(opts["env"])
        return PlaySession(env, opts["env"], env.default_episode_length, opts["seed"], event_reward=opts["event_reward"])
    from lunarl.run.checkpoint import CheckpointError
    from lunarl.run.restore import checkpoint_dir_of, restore_run

    run_dir = Path(opts["run.dir"])
    if not run_dir.is_dir():
        raise PlayError(f"run.dir={run_dir}: no such directory")
    try:
        saved = restore_run(checkpoint_dir_of(run_dir), opts["checkpoint"])
    except CheckpointError as e:
        raise PlayError(str(e)) from e
    params = jax.tree.map(lambda x: x[0], jax.vmap(saved.agent.policy_params)(saved.state))
    policy = saved.agent.make_policy(saved.env, saved.plan.agent_config)
    return PlaySession(
        saved.env, saved.plan.env_name, saved.plan.agent_config.episode_length, opts["seed"], policy, params, opts["event_reward"]
    )


def main(argv: Sequence[str] | None = None, script: Callable[[int], Sequence[Any]] | None = None) -> PlayLog:
    """Parse options, open the window (or kuka's MuJoCo viewer), play until closed."""
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    session = make_session(opts)
    if opts["viewer"] == "mujoco":
        if session.env_name != "kuka":
            raise PlayError("viewer=mujoco is for the kuka env")
        return run_mujoco_viewer(session, opts["fps"], opts["frames"])
    return run_window(session, opts["fps"], opts["frames"], opts["scale"], script)


if __name__ == "__main__":
    from lunarl.run.cli import quiet_libraries

    quiet_libraries()
    try:
        log = main()
    except PlayError as e:
        print(f"lunarl.play: error: {e}", file=sys.stderr)
        sys.exit(1)
    done = [f"{r:.2f}{' (success)' if s else ''}" for r, s in log.episodes]
    print(f"played {len(log.actions)} steps; finished episodes: {', '.join(done) or 'none'}")
