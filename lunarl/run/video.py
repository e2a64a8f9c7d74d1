"""Rollout videos of a policy: one deterministic episode, recorded on device, drawn on the host.

Used by the training loop (``run.video_every``) and by ``lunarl.evaluate eval.video=true``. The
episode is one call of ``lunarl.run.evaluation.rollout(..., return_states=True)``, compiled once
and separate from the training chunk, so videos never change the compiled iteration; frames are
drawn with the env's ``render`` and encoded by ``lunarl.envs.render.write_video`` afterwards.
Every recording reports where its time went (rollout, drawing, encoding), because drawing on the
host is the expensive part and grows with the episode length.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lunarl._platform import compile_options
from lunarl.agents.base import Agent
from lunarl.envs.render import VIDEO_FORMATS, episode_frames, write_video
from lunarl.run.evaluation import rollout

__all__ = ["VIDEO_FPS", "Video", "VideoRecorder", "video_name"]

VIDEO_FPS = 30


@dataclasses.dataclass(frozen=True)
class Video:
    """A written video and what it cost."""

    path: Path
    frames: int  # steps of the episode + 1 (the state after reset)
    episode_return: float
    success: bool
    rollout_seconds: float  # the compiled episode (the first one includes compiling it)
    render_seconds: float  # drawing the frames on the host
    encode_seconds: float  # ffmpeg / GIF writer

    @property
    def seconds(self) -> float:
        return self.rollout_seconds + self.render_seconds + self.encode_seconds

    def describe(self) -> str:
        return (
            f"{self.path} ({self.frames} frames, return {self.episode_return:.2f}"
            f"{', success' if self.success else ''}; rollout {self.rollout_seconds:.2f}s, "
            f"drawing {self.render_seconds:.2f}s, encoding {self.encode_seconds:.2f}s)"
        )


def video_name(global_step: int, fmt: str, prefix: str = "eval") -> str:
    """``eval-step000005120.mp4``: zero-padded env steps, so the files sort in training order."""
    return f"{prefix}-step{global_step:09d}.{fmt}"


class VideoRecorder:
    """Records one deterministic episode of a policy (one seed's parameters) to a video file."""

    def __init__(self, agent: Agent, env: Any, agent_config: Any, fmt: str = "mp4", fps: int = VIDEO_FPS):
        if fmt not in VIDEO_FORMATS:
            raise ValueError(f"video format {fmt!r}: allowed {', '.join(VIDEO_FORMATS)}")
        self.env, self.fmt, self.fps = env, fmt, fps
        policy = agent.make_policy(env, agent_config)
        length = agent_config.episode_length
        self._rollout = jax.jit(
            lambda params, key: rollout(env, policy, params, key, 1, length, True, return_states=True),
            compiler_options=compile_options(env),
        )

    def record(self, params: Any, key: jax.Array, path: str | Path) -> Video:
        """Roll out ``params`` (one seed's ``policy_params``) from ``key`` and write ``path``."""
        t0 = time.perf_counter()
        out = jax.device_get(self._rollout(params, key))
        t1 = time.perf_counter()
        length = int(np.asarray(out["episode_length"])[0])
        frames = episode_frames(self.env, out["states"], length)
        t2 = time.perf_counter()
        path = write_video(frames, path, fps=self.fps)
        t3 = time.perf_counter()
        return Video(
            path=Path(path),
            frames=len(frames),
            episode_return=float(np.asarray(out["episode_return"])[0]),
            success=bool(np.asarray(out["success"])[0] > 0),
            rollout_seconds=t1 - t0,
            render_seconds=t2 - t1,
            encode_seconds=t3 - t2,
        )
