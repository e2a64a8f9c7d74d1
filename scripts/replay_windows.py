"""What a Dreamer run collected, window by window: the actions, rewards and episode ends its replay holds.

    python scripts/replay_windows.py RUN_DIR [--checkpoint best|latest|ITER] [--window 2048] [--out FILE.json]

The replay is part of every Dreamer checkpoint, so this reads what each training seed actually
drove (the prefill's uniform actions, then its own policy's samples) without rerunning anything.
Per seed, the written rows are cut, oldest first, into windows of ``--window`` env steps (all of
the seed's envs together; the last window may be shorter), and per window it reports

* ``env_steps``: the seed's env steps at the window's end (counted from the oldest row the buffer
  still holds: the first row written, unless the ring buffer has wrapped);
* ``action_mean`` and ``action_abs_mean``: per action dimension (the car: steering, throttle);
* ``positive_reward_share``: the share of steps with a reward above 0 (the car: steps that made
  progress along the track);
* ``reward_sum``, ``terminations`` (true terminations, not time limits) and ``episode_starts``.

Written for the car's pessimistic early phase (``scripts/results/dreamer.md``, session 32): which
seeds stop making progress, and when.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lunarl.agents import replay as replay_lib
from lunarl.run.checkpoint import CheckpointError
from lunarl.run.restore import checkpoint_dir_of, restore_run

#: The replay fields read (``lunarl.agents.dreamer.agent.Step``).
FIELDS = ("action", "reward", "terminated", "is_first")


def time_ordered(replay: replay_lib.Replay, seed: int) -> dict[str, np.ndarray]:
    """One seed's written rows of a seed-stacked replay (leaves ``[seeds, capacity, num_envs,
    ...]``), oldest first: ``FIELDS`` as ``[size, num_envs, ...]`` arrays."""
    one = jax.tree.map(lambda x: x[seed], replay)
    rows = (np.asarray(replay_lib.oldest_row(one)) + np.arange(int(one.size))) % one.capacity
    return {f: np.asarray(getattr(one.data, f))[rows] for f in FIELDS}


def windows(data: dict[str, np.ndarray], num_envs: int, window: int) -> list[dict[str, Any]]:
    """One seed's written rows (leaves ``[rows, num_envs, ...]``, oldest first) in windows of
    ``window`` env steps."""
    rows_per_window = window // num_envs
    out = []
    for start in range(0, data["reward"].shape[0], rows_per_window):
        part = {k: v[start : start + rows_per_window] for k, v in data.items()}
        action = part["action"].reshape(-1, part["action"].shape[-1])
        out.append(
            {
                "env_steps": (start + part["reward"].shape[0]) * num_envs,
                "action_mean": [round(float(x), 4) for x in action.mean(0)],
                "action_abs_mean": [round(float(x), 4) for x in np.abs(action).mean(0)],
                "positive_reward_share": round(float((part["reward"] > 0).mean()), 4),
                "reward_sum": round(float(part["reward"].sum()), 3),
                "terminations": int(part["terminated"].sum()),
                "episode_starts": int(part["is_first"].sum()),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="latest", help="best | latest | an iteration number")
    parser.add_argument("--window", type=int, default=2048, help="env steps per window (all of a seed's envs)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: RUN_DIR/replay-windows-ITER.json)")
    args = parser.parse_args(argv)
    try:
        saved = restore_run(checkpoint_dir_of(args.run_dir), args.checkpoint)
    except CheckpointError as e:
        print(f"replay_windows: {e}", file=sys.stderr)
        return 1
    replay = getattr(saved.state, "replay", None)
    if replay is None or any(not hasattr(replay.data, f) for f in FIELDS):
        print(f"replay_windows: needs a Dreamer run (its checkpoint holds no replay of steps): {args.run_dir}", file=sys.stderr)
        return 1
    num_envs = replay.data.reward.shape[2]  # seed-stacked: [seeds, capacity, num_envs]
    if args.window < num_envs or args.window % num_envs:
        print(f"replay_windows: --window={args.window} must be a positive multiple of the run's {num_envs} envs", file=sys.stderr)
        return 1
    per_seed = []
    for seed in range(replay.size.shape[0]):
        per_seed.append(windows(time_ordered(replay, seed), num_envs, args.window))
        print(f"seed {seed}: " + "  ".join(
            f"{w['env_steps']}: action {w['action_mean']} reward>0 {w['positive_reward_share']:.2f} "
            f"ends {w['terminations']}" for w in per_seed[-1]))  # fmt: skip
    report = {
        "run_dir": str(args.run_dir),
        "checkpoint": args.checkpoint,
        "iteration": saved.meta["iteration"],
        "global_step": saved.meta["global_step"],
        "window": args.window,
        "per_seed": per_seed,
    }
    out = args.out or args.run_dir / f"replay-windows-{saved.meta['iteration']}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
