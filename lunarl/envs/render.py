"""Frames and videos, on the host (NumPy + Pillow + ffmpeg; never inside a jitted function).

Envs implement ``render(state) -> uint8[H, W, 3]`` with a ``Canvas`` that maps world
coordinates (metres, y up) to pixels (y down). On top of that this module has what every video
needs, whichever env or app asks:

* ``render_frame`` -- one frame of one state; for kuka, whose frames come from MuJoCo's OpenGL
  renderer, it falls back to ``kuka_schematic`` (a 2-D side and top view drawn with Pillow from
  the bodies' positions) when no offscreen GL platform (EGL or OSMesa) is available, with one
  warning naming the packages to install;
* ``episode_frames`` -- one frame per step of a recorded episode, each under a status bar with
  the step, the return so far and whether the episode has succeeded yet;
* ``write_video`` -- MP4 (H.264, yuv420p, through the ffmpeg binary that ``imageio-ffmpeg``'s
  wheel ships) or GIF (Pillow), chosen by the file suffix.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]


class Canvas:
    """A world-to-pixel canvas: ``world`` is (x_min, y_min, x_max, y_max) in world units."""

    def __init__(self, world: tuple[float, float, float, float], width: int = 480, background: Color = (20, 20, 24)):
        x0, y0, x1, y1 = world
        self.world = world
        self.scale = width / (x1 - x0)
        self.width = width
        self.height = int(round((y1 - y0) * self.scale))
        self.image = Image.new("RGB", (self.width, self.height), background)
        self.draw = ImageDraw.Draw(self.image)

    def px(self, x: float, y: float) -> tuple[float, float]:
        x0, y0, _, y1 = self.world
        return ((float(x) - x0) * self.scale, (y1 - float(y)) * self.scale)

    def rect(self, x_min: float, y_min: float, x_max: float, y_max: float, fill: Color | None = None, outline: Color | None = None) -> None:
        (ax, ay), (bx, by) = self.px(x_min, y_max), self.px(x_max, y_min)
        self.draw.rectangle([ax, ay, bx, by], fill=fill, outline=outline)

    def circle(self, x: float, y: float, r: float, fill: Color | None = None, outline: Color | None = None) -> None:
        cx, cy = self.px(x, y)
        rp = max(float(r) * self.scale, 1.0)
        self.draw.ellipse([cx - rp, cy - rp, cx + rp, cy + rp], fill=fill, outline=outline)

    def polygon(self, points: Sequence[tuple[float, float]] | np.ndarray, fill: Color | None = None, outline: Color | None = None) -> None:
        self.draw.polygon([self.px(x, y) for x, y in np.asarray(points)], fill=fill, outline=outline)

    def line(self, points: Sequence[tuple[float, float]] | np.ndarray, fill: Color, width: int = 1) -> None:
        self.draw.line([self.px(x, y) for x, y in np.asarray(points)], fill=fill, width=width)

    def to_array(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)


VIDEO_FORMATS = ("mp4", "gif")
STATUS_BAR_HEIGHT = 24  # pixels above the scene; 14 px text stays readable in a 320 px wide frame


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int = 30) -> Path:
    """Write uint8 ``[H, W, 3]`` frames to ``path``: H.264 MP4 for ``.mp4``, an animated GIF for ``.gif``.

    MP4 frames are padded by one edge pixel to even sizes (yuv420p needs them); every frame must
    have the first one's size.
    """
    path = Path(path)
    if not len(frames):
        raise ValueError(f"no frames to write to {path}")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in VIDEO_FORMATS:
        raise ValueError(f"video {path}: unknown format {suffix!r}; use .mp4 or .gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    first = np.asarray(frames[0])
    for f in frames:
        if np.shape(f) != first.shape:
            raise ValueError(f"video {path}: frames differ in size ({np.shape(f)} vs {first.shape})")
    if suffix == "gif":
        images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    _encode_mp4(frames, path, fps)
    return path


def _encode_mp4(frames: Sequence[np.ndarray], path: Path, fps: int) -> None:
    """Pipe raw RGB frames into the ffmpeg binary of ``imageio-ffmpeg``'s wheel (libx264).

    ffmpeg is started here rather than through ``imageio_ffmpeg.write_frames``, whose
    ``preexec_fn`` forks the (multithreaded) JAX process and makes JAX warn about deadlocks;
    ``process_group=0`` keeps ffmpeg out of the terminal's Ctrl-C the same way, without a fork.
    """
    import subprocess

    import imageio_ffmpeg

    height, width = np.shape(frames[0])[:2]
    pad = ((0, height % 2), (0, width % 2), (0, 0))  # yuv420p needs even sizes
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width + width % 2}x{height + height % 2}",
        "-r", str(fps), "-i", "-", "-an",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "23",
        # The index first, so a browser starts playing before the whole file is loaded.
        "-movflags", "+faststart",
        str(path),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)
    assert proc.stdin is not None
    try:
        for f in frames:
            proc.stdin.write(np.ascontiguousarray(np.pad(np.asarray(f, dtype=np.uint8), pad, mode="edge")).tobytes())
    except BrokenPipeError:
        pass  # ffmpeg stopped early; its message is read below
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {err.decode(errors='replace').strip()[-500:]}")


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def status_bar(frame: np.ndarray, text: str, badge: str | None = None, badge_color: Color = (60, 170, 80)) -> np.ndarray:
    """``frame`` under a dark bar of ``STATUS_BAR_HEIGHT`` pixels holding ``text`` and, at the right,
    an optional coloured ``badge`` (``"success"``). A bar rather than text drawn on the scene, so
    nothing of the scene is hidden and the text is readable on any background."""
    frame = np.asarray(frame, dtype=np.uint8)
    width = frame.shape[1]
    bar = Image.new("RGB", (width, STATUS_BAR_HEIGHT), (16, 16, 20))
    draw = ImageDraw.Draw(bar)
    font = _font(14 if width >= 300 else 11)
    draw.text((6, STATUS_BAR_HEIGHT // 2), text, fill=(235, 235, 235), font=font, anchor="lm")
    if badge:
        left, top, right, bottom = draw.textbbox((0, 0), badge, font=font)
        x0 = width - (right - left) - 14
        draw.rounded_rectangle([x0, 3, width - 4, STATUS_BAR_HEIGHT - 4], radius=4, fill=badge_color)
        draw.text((x0 + 5, STATUS_BAR_HEIGHT // 2), badge, fill=(255, 255, 255), font=font, anchor="lm")
    return np.concatenate([np.asarray(bar, dtype=np.uint8), frame], axis=0)


# Set once an offscreen OpenGL context has failed in this process: it will not work later either,
# and retrying costs a failed context per frame.
_gl_error: str | None = None


def render_frame(env: Any, state: Any) -> np.ndarray:
    """``env.render(state)`` for one unbatched state; a MuJoCo env (kuka) without an OpenGL
    platform gets ``kuka_schematic`` instead, with one warning per process saying what to install."""
    global _gl_error
    is_mujoco = hasattr(env, "mj_data")
    if is_mujoco and _gl_error is not None:
        return kuka_schematic(env, state)
    try:
        return env.render(state)
    except RuntimeError as e:
        if not is_mujoco:
            raise
        _gl_error = str(e)
        warnings.warn(f"{e} -- drawing a schematic side/top view instead", RuntimeWarning, stacklevel=2)
        return kuka_schematic(env, state)


def kuka_schematic(env: Any, state: Any) -> np.ndarray:
    """A frame of the kuka env without OpenGL: side view (x-z) and top view (x-y), side by side.

    The arm is drawn as the polyline through its bodies' positions (from ``env.mj_data``, MuJoCo's
    forward kinematics), the fingers as their positions, the cube as a square and the target as a
    ring, in the size of ``env.config.render_width`` x ``render_height``.
    """
    import mujoco

    model, data = env.mj_model, env.mj_data(state)
    width, height = env.config.render_width, env.config.render_height

    def pos(name: str) -> np.ndarray:
        return np.asarray(data.xpos[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, name)])

    chain = [pos(n) for n in ("base", "link1", "link2", "link3", "link4", "link5", "link6", "link7")]
    fingers = [pos("finger_left"), pos("finger_right")]
    tcp = (fingers[0] + fingers[1]) / 2
    cube = pos("cube")
    target = np.asarray(data.mocap_pos[0])
    image = Image.new("RGB", (width, height), (236, 236, 232))
    half = width // 2
    views = (("side (x, z)", 2, (-0.3, -0.05, 0.9, 1.35)), ("top (x, y)", 1, (-0.3, -0.6, 0.9, 0.6)))
    for v, (label, axis, world) in enumerate(views):
        canvas = Canvas(world, width=half, background=(236, 236, 232))
        project = lambda p, axis=axis: (p[0], p[axis])  # noqa: E731
        if axis == 2:
            canvas.rect(world[0], world[1], world[2], 0.0, fill=(190, 170, 140))  # table top
        canvas.line([project(p) for p in [*chain, tcp]], fill=(245, 120, 30), width=max(2, half // 40))
        for p in chain:
            canvas.circle(*project(p), 0.02, fill=(60, 60, 60))
        for p in fingers:
            canvas.circle(*project(p), 0.012, fill=(40, 40, 40))
        c = project(cube)
        canvas.rect(c[0] - 0.025, c[1] - 0.025, c[0] + 0.025, c[1] + 0.025, fill=(60, 110, 220), outline=(20, 40, 90))
        canvas.circle(*project(target), 0.03, outline=(30, 160, 60))
        canvas.draw.text((4, 4), label, fill=(60, 60, 60), font=_font(11))
        view = canvas.image.crop((0, 0, half, min(canvas.height, height)))
        image.paste(view, (v * half, 0))
    ImageDraw.Draw(image).line([(half, 0), (half, height)], fill=(160, 160, 160))
    return np.asarray(image, dtype=np.uint8)


def episode_frames(env: Any, states: Any, length: int | None = None, overlay: bool = True) -> list[np.ndarray]:
    """Frames of one recorded episode: ``states`` is a ``State`` with a leading time axis (after
    reset, then after each step, as ``lunarl.run.evaluation.rollout(..., return_states=True)``
    gives), on the host. ``length`` steps are shown (default: all). With ``overlay`` each frame
    sits under a status bar: the step, the return so far and a ``success`` badge from the step on
    which the env's ``metrics["success"]`` first fired."""
    import jax

    states = jax.device_get(states)
    total = int(np.shape(states.reward)[0]) - 1
    length = total if length is None else min(int(length), total)
    rewards = np.asarray(states.reward, np.float64)[1 : length + 1]
    returns = np.concatenate([[0.0], np.cumsum(rewards)])
    success = np.asarray(states.metrics.get("success", np.zeros_like(states.reward)))[: length + 1] > 0
    success[0] = False  # the state after reset has not achieved anything
    succeeded = np.maximum.accumulate(success)
    frames = []
    for t in range(length + 1):
        frame = render_frame(env, jax.tree.map(lambda x, t=t: x[t], states))
        if overlay:
            frame = status_bar(
                frame,
                f"step {t}/{length}   return {returns[t]:.2f}",
                badge="success" if succeeded[t] else None,
            )
        frames.append(frame)
    return frames
