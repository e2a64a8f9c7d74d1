"""Graceful stop on SIGINT / SIGTERM (Ctrl-C, SLURM or spot preemption).

The first signal only sets a flag: the loop finishes the compiled chunk it is running, saves a
checkpoint and exits cleanly. SIGINT is then reset to the OS default, so a second Ctrl-C ends the
process at once, even while it waits inside a compiled XLA call (a Python handler would only
run after the call returns).
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType

__all__ = ["GracefulStop"]


class GracefulStop:
    """Context manager: ``stop.requested`` becomes the signal's name once one arrives."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested} received: finishing the current chunk and saving a checkpoint "
            "(press Ctrl-C again to quit at once, without saving)",
            flush=True,
        )
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def __enter__(self) -> GracefulStop:
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
