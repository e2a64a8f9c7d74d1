"""Drawing helpers for env frames (host side, NumPy + Pillow; never inside a jitted function).

Envs implement ``render(state) -> uint8[H, W, 3]`` with a ``Canvas`` that maps world
coordinates (metres, y up) to pixels (y down). ``write_video`` turns frames into a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int = 30) -> Path:
    """Write frames as an animated GIF (no ffmpeg needed) or, for ``.mp4``, via imageio if present."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp4":
        import imageio.v3 as iio  # optional dependency

        iio.imwrite(path, np.stack(frames), fps=fps)
        return path
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
