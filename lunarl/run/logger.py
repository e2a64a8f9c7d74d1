"""Where a run's metrics go: ``metrics.jsonl`` in the run dir, Weights & Biases, and the console.

All three receive the same flat dict of floats against ``global_step`` (env steps of one seed).
The console shows a ``rich`` progress bar on a terminal and one plain line per chunk otherwise
(SLURM logs, CI, tests). wandb is imported only when its mode is not ``disabled``; ``offline`` (the
default) writes under ``<run.dir>/wandb`` and needs no account (``wandb sync`` uploads later).
With ``logger.tensorboard=true`` the same rows also go to TensorBoard event files.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lunarl.agents.base import EPISODE_RETURN, SUCCESS_RATE

__all__ = ["ConsoleProgress", "JsonlWriter", "RunLogger", "TensorBoardLogger", "WandbLogger"]


class JsonlWriter:
    """Append-only ``metrics.jsonl``; one JSON object per line. With ``enabled=False`` (every
    process but 0 of a multi-process run) it writes and drops nothing."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def drop_after(self, iteration: int) -> int:
        """On resume: remove rows logged after the checkpoint we restart from. Returns how many."""
        if not self.enabled or not self.path.exists():
            return 0
        rows = self.path.read_text().splitlines()
        keep = [r for r in rows if r.strip() and json.loads(r).get("iteration", 0) <= iteration]
        self.path.write_text("".join(r + "\n" for r in keep))
        return len(rows) - len(keep)

    def write(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(_finite(row)) + "\n")


def _finite(row: Mapping[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf; write them as null so every line stays valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class WandbLogger:
    """A wandb run that survives resume: its id is kept in ``<run.dir>/wandb_id``."""

    def __init__(self, mode: str, project: str, entity: str | None, group: str | None, tags: list[str], name: str, run_dir: Path, config: Mapping[str, Any]):
        self.run = None
        if mode == "disabled":
            return
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(
            mode=mode,
            project=project,
            entity=entity,
            group=group,
            tags=list(tags),
            name=name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=dict(config),
        )
        # Every metric is plotted against env steps, not wandb's internal step counter.
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, row: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.log(dict(row))

    def log_video(self, key: str, path: Path, global_step: int) -> None:
        """Log a video file (MP4 or GIF) as ``wandb.Video``; from a file wandb needs no moviepy."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Video(str(path), format=path.suffix.lstrip(".")), "global_step": global_step})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class TensorBoardLogger:
    """Event files in ``<run.dir>/tensorboard`` (``tensorboard --logdir runs``), written with
    ``tensorboardX``: every numeric value of a row under its metrics.jsonl name, at ``global_step``.

    The writer opens on the first row, so a resumed run can first say where it restarts
    (``purge_after``): TensorBoard then hides the events that a crashed run logged past its
    checkpoint, as ``metrics.jsonl`` drops those rows.
    """

    SKIP = ("global_step", "time", "iteration")  # the x axes; TensorBoard records wall time itself

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer: Any = None
        self.purge_step: int | None = None

    def purge_after(self, global_step: int) -> None:
        self.purge_step = global_step + 1

    def log(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            from tensorboardX import SummaryWriter

            # Event files are named by the second; a suffix in nanoseconds keeps a resumed run's
            # file apart from (and sorted after) the one it resumes, even within the same second.
            self.writer = SummaryWriter(
                str(self.log_dir), purge_step=self.purge_step, flush_secs=10, filename_suffix=f".{time.time_ns():020d}"
            )
        step = int(row["global_step"])
        for key, value in row.items():
            if key not in self.SKIP and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _episode_text(ret: float, success: float) -> tuple[str, str]:
    """Return and success rate for the console; "-" until an episode has finished (a "nan" there
    reads like a diverged run)."""
    if math.isnan(ret):
        return "-", "-"
    return f"{ret:.2f}", f"{success:.0%}"


class ConsoleProgress:
    """Env steps, steps/s, return, success rate and ETA, as a live bar or plain lines."""

    def __init__(self, total_steps: int, start_steps: int, enabled: bool = True, num_seeds: int = 1):
        self.console = Console()
        self.enabled = enabled
        self.total = total_steps  # env steps per seed, like ``global_step``
        self.num_seeds = num_seeds  # steps/s counts all seeds
        self.live = enabled and self.console.is_terminal
        self.last_return = float("nan")
        self.last_success = float("nan")
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} steps"),
                TextColumn("{task.fields[sps]:,.0f} steps/s"),
                TextColumn("return {task.fields[ret]}"),
                TextColumn("success {task.fields[success]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            # "compiling" until the first chunk returns (the first compile takes a while on CPU).
            self.task = self.progress.add_task("compiling", total=total_steps, completed=start_steps, sps=0.0, ret="-", success="-")
            self.progress.start()

    def start_at(self, steps: int) -> None:
        """Where a resumed run starts (so the bar and its ETA do not count restored steps)."""
        if self.progress is not None:
            self.progress.reset(self.task, total=self.total, completed=steps, sps=0.0, ret="-", success="-")

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            self.console.print(message, highlight=False, soft_wrap=True)

    def update(self, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        steps = row["global_step"]
        sps = row.get("perf/steps_per_second", 0.0)
        # Chunks in which no episode finished carry no episode statistics: keep the last ones.
        ret = self.last_return = row.get(EPISODE_RETURN, self.last_return)
        success = self.last_success = row.get(SUCCESS_RATE, self.last_success)
        ret_text, success_text = _episode_text(ret, success)
        if self.progress is not None:
            self.progress.update(
                self.task, description="train", completed=steps, sps=sps, ret=ret_text, success=success_text
            )
            return
        eta = f"{(self.total - steps) * self.num_seeds / sps:,.0f}s" if sps > 0 else "-"
        self.print(
            f"step {steps:,}/{self.total:,}  {sps:,.0f} steps/s  return {ret_text}  "
            f"success {success_text}  eta {eta}"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class RunLogger:
    """The sinks together; ``log`` sends one row to all of them. ``quiet`` silences ``print``
    (the processes other than 0 of a multi-process run, whose sinks are all off)."""

    def __init__(
        self,
        jsonl: JsonlWriter,
        wandb_logger: WandbLogger,
        console: ConsoleProgress,
        tensorboard: TensorBoardLogger | None = None,
        quiet: bool = False,
    ):
        self.quiet = quiet
        self.jsonl = jsonl
        self.wandb = wandb_logger
        self.console = console
        self.tensorboard = tensorboard
        self.started = time.time()

    def log(self, row: Mapping[str, Any], progress: bool = True) -> None:
        row = {"time": round(time.time() - self.started, 3), **row}
        self.jsonl.write(row)
        self.wandb.log(row)
        if self.tensorboard is not None:
            self.tensorboard.log(row)
        if progress:
            self.console.update(row)

    def print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def log_video(self, key: str, path: Path, global_step: int) -> None:
        self.wandb.log_video(key, path, global_step)

    def close(self, exit_code: int = 0) -> None:
        self.console.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.wandb.finish(exit_code)
