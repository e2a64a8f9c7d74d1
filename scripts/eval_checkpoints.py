"""Evaluate several checkpoints of one run, by the evaluated and by the live actor.

    python scripts/eval_checkpoints.py RUN_DIR --checkpoints 80,100,120 [--episodes 256]
        [--eval-seed 0] [--out FILE.json]

Any env and agent. Each checkpoint is driven on the episodes ``python -m lunarl.evaluate
run.dir=RUN_DIR checkpoint=ITER eval.episodes=N eval.seed=S`` drives (the same keys, the
deterministic policy), so a row's ``evaluated`` success rates are that app's, per seed. A Dreamer
run with ``agent.actor_ema_rate > 0`` evaluates an average of its actor; ``live`` drives the
actor it trains, in the same checkpoint and on the same episodes. For runs that keep no average
(PPO, SAC, Dreamer without it) both names drive one actor. One compiled evaluator serves every
checkpoint. On the car's held-out tracks use ``eval_unseen_tracks.py --checkpoints`` instead.
Writes ``RUN_DIR/eval-checkpoints-FIRST-LAST.json`` (or ``--out``): one row per checkpoint with
the success rate and mean return of every seed, by each actor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lunarl.run.checkpoint import CheckpointError
from lunarl.run.evaluation import eval_keys, make_evaluator
from lunarl.run.restore import checkpoint_dir_of, restore_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_unseen_tracks import parse_iterations, score_both_actors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoints", required=True, help="ITER,ITER,...: the checkpoints to evaluate")
    parser.add_argument("--episodes", type=int, default=256, help="episodes per seed")
    parser.add_argument("--eval-seed", type=int, default=0, help="lunarl.evaluate's eval.seed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        iterations = parse_iterations(args.checkpoints)
    except ValueError as e:
        print(f"eval_checkpoints: {e}", file=sys.stderr)
        return 1
    if args.episodes < 1:
        print(f"eval_checkpoints: --episodes={args.episodes} must be at least 1", file=sys.stderr)
        return 1
    rows, evaluator = [], None
    for iteration in iterations:
        try:
            saved = restore_run(checkpoint_dir_of(args.run_dir), str(iteration))
        except CheckpointError as e:
            print(f"eval_checkpoints: {e}", file=sys.stderr)
            return 1
        if saved.plan.population is not None:
            print(f"eval_checkpoints: {args.run_dir} is a population run; evaluate it with lunarl.evaluate", file=sys.stderr)
            return 1
        plan = saved.plan
        evaluator = evaluator or make_evaluator(saved.agent, saved.env, plan.agent_config, args.episodes, True)
        keys = eval_keys(args.eval_seed, saved.meta["iteration"], plan.cfg.num_seeds)
        rows.append(score_both_actors(saved, lambda params: evaluator(params, keys)))  # noqa: B023 (called at once)
    report = {
        "run_dir": str(args.run_dir),
        "episodes_per_seed": args.episodes,
        "eval_seed": args.eval_seed,
        "deterministic": True,
        "rows": rows,
    }
    out = args.out or args.run_dir / f"eval-checkpoints-{iterations[0]}-{iterations[-1]}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
