"""Print the kuka curriculum's levels at every checkpoint a run kept, read from the checkpointed
env states. The training log has only their mean (``env/curriculum_level`` in metrics.jsonl, the
mean over envs after every iteration); this adds the min, median, max and share at the full task.

Each env keeps its level in ``State.info["curriculum"]`` (lunarl/envs/kuka.py); one row per kept
checkpoint: iteration, env steps, and the mean / min / median / max level over the run's envs
(all seeds). Keep more checkpoints for a finer curve (``checkpoint.max_to_keep=100``).

    python scripts/kuka_curriculum.py RUN_DIR [--out levels.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from lunarl.run.checkpoint import Checkpoints
from lunarl.run.restore import checkpoint_dir_of, restore_run


def curriculum_levels(run_dir: pathlib.Path) -> list[dict]:
    """One dict per kept checkpoint of ``run_dir``: iteration, env steps and level statistics."""
    directory = checkpoint_dir_of(run_dir)
    ckpts = Checkpoints(directory, create=False)
    steps = sorted(ckpts.latest.all_steps())
    ckpts.close()
    rows = []
    for step in steps:
        saved = restore_run(directory, step)
        info = saved.state.env_state.info
        if "curriculum" not in info:
            raise SystemExit(f"{run_dir}: the env state has no curriculum (env.curriculum=false?)")
        level = np.asarray(info["curriculum"].level, np.float64).reshape(-1)
        rows.append(
            {
                "iteration": int(saved.meta["iteration"]),
                "env_steps": int(saved.meta.get("global_step", -1)),
                "mean": float(level.mean()),
                "min": float(level.min()),
                "median": float(np.median(level)),
                "max": float(level.max()),
                "at_full": float((level >= 1.0).mean()),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=pathlib.Path)
    p.add_argument("--out", type=pathlib.Path, default=None, help="also write the rows as JSON")
    args = p.parse_args()
    rows = curriculum_levels(args.run_dir)
    print("| iteration | env steps | mean level | min | median | max | envs at 1.0 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['iteration']} | {r['env_steps']:,} | {r['mean']:.3f} | {r['min']:.2f} | "
            f"{r['median']:.2f} | {r['max']:.2f} | {100 * r['at_full']:.0f} % |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
