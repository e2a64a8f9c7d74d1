"""Print a run's learning curve (from its ``metrics.jsonl``) as a Markdown table, and write it as JSON.

One row per evaluation: env steps, wall-clock minutes since the run started (compile
included), the latest training return and success rate before that evaluation (stochastic
policy, finished episodes), and the evaluation's deterministic return and success rate. Also
reports the first evaluation that reached ``--target`` success: of the seeds' mean, and, for a
run of several seeds (``num_seeds``), of each seed, since "steps to 90%" is a per-seed question.

    python scripts/learning_curve.py runs/2026-11-21/16-05-12 --target 0.9
    python scripts/learning_curve.py RUN_DIR --every 4     # every 4th evaluation
    python scripts/learning_curve.py RUN_DIR --metrics critic/value,actor/std

``--metrics``: training metrics to carry into each evaluation row, each the newest value logged
before it, as the seeds' mean and per seed (``train_metrics`` in the JSON, and a second
table). How the car Dreamer's seeds that fail early were told apart (critic value and actor std
at each evaluation: the ``*_early_metrics.json`` files of ``scripts/results/dreamer.md``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def read_curve(run_dir: pathlib.Path, metrics: tuple[str, ...] = ()) -> list[dict]:
    """Evaluation rows of ``run_dir/metrics.jsonl``, each with the latest training metrics logged
    before it (and, under ``train_metrics``, those named in ``metrics``: mean and per seed)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics file at {path}: is {run_dir} a lunarl run directory?")
    rows, last_train = [], {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "eval/success_rate" in record:
            rows.append(
                {
                    "env_steps": record["global_step"],
                    "minutes": record["time"] / 60.0,
                    "train_return": last_train.get("charts/episode_return"),
                    "train_success": last_train.get("charts/success_rate"),
                    "eval_return": record["eval/episode_return"],
                    "eval_return_std": record.get("eval/episode_return_std"),
                    "eval_success": record["eval/success_rate"],
                    "eval_length": record.get("eval/episode_length"),
                    "seed_eval_success": _per_seed(record, "eval/success_rate"),
                }
            )
            if metrics:
                rows[-1]["train_metrics"] = {
                    name: {"mean": last_train.get(name), "per_seed": _per_seed(last_train, name)} for name in metrics
                }
        else:
            # A training row. Its episode metrics are missing when no episode ended in its window
            # (long car episodes), so each value is the latest logged, not the last row's.
            last_train = {**last_train, **record}
    return rows


def _per_seed(record: dict, metric: str) -> list[float]:
    """``seed0/METRIC, seed1/METRIC, ...`` of a run of several seeds; empty for one seed."""
    values = []
    while f"seed{len(values)}/{metric}" in record:
        values.append(record[f"seed{len(values)}/{metric}"])
    return values


def first_reached_per_seed(rows: list[dict], target: float) -> list[int | None]:
    """Env steps of each seed's first evaluation with success >= ``target`` (None: never)."""
    num_seeds = len(rows[0]["seed_eval_success"]) if rows else 0
    return [
        next((r["env_steps"] for r in rows if r["seed_eval_success"][k] >= target), None)
        for k in range(num_seeds)
    ]


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=pathlib.Path)
    parser.add_argument("--target", type=float, default=0.9, help="eval success rate to report first reaching")
    parser.add_argument("--every", type=int, default=1, help="print every k-th evaluation (the last is always printed)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON path (default RUN_DIR/learning_curve.json)")
    parser.add_argument("--metrics", default="", help="NAME,NAME: training metrics to report at each evaluation")
    args = parser.parse_args()
    if args.every < 1:
        raise SystemExit(f"--every={args.every} is out of range: allowed >= 1")
    metrics = tuple(name for name in args.metrics.split(",") if name)

    rows = read_curve(args.run_dir, metrics)
    if not rows:
        sys.exit(f"{args.run_dir}/metrics.jsonl has no evaluations yet")
    for name in metrics:
        if all(r["train_metrics"][name]["mean"] is None for r in rows):
            sys.exit(f"--metrics: no training row before an evaluation in {args.run_dir}/metrics.jsonl has {name!r}")
    print("| env steps (M) | minutes | train return | train success | eval return | eval success | eval length |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        if i % args.every and i != len(rows) - 1:
            continue
        print(
            f"| {r['env_steps'] / 1e6:.2f} | {r['minutes']:.1f} | {_fmt(r['train_return'], '.1f')} "
            f"| {_fmt(r['train_success'], '.2f')} | {r['eval_return']:.1f} ± {_fmt(r['eval_return_std'], '.1f')} "
            f"| {r['eval_success']:.3f} | {_fmt(r['eval_length'], '.0f')} |"
        )
    if metrics:
        print("\n| env steps | " + " | ".join(f"{name} (mean; per seed)" for name in metrics) + " |")
        print("|---:|" + "---|" * len(metrics))
        for r in rows:
            cells = [
                f"{_fmt(m['mean'], '.3f')}; " + " ".join(format(v, ".3f") for v in m["per_seed"])
                for m in (r["train_metrics"][name] for name in metrics)
            ]
            print(f"| {r['env_steps']:,} | " + " | ".join(cells) + " |")
    first = next((r for r in rows if r["eval_success"] >= args.target), None)
    if first is None:
        print(f"\nnever reached eval success >= {args.target}")
    else:
        print(
            f"\nfirst eval success >= {args.target}: {first['eval_success']:.3f} at "
            f"{first['env_steps']:,} env steps, {first['minutes']:.1f} min"
        )
    per_seed = first_reached_per_seed(rows, args.target)
    if per_seed:
        steps = ", ".join("never" if s is None else f"{s:,}" for s in per_seed)
        print(f"per seed (first eval success >= {args.target}, env steps): {steps}")
    out = args.out or args.run_dir / "learning_curve.json"
    report = {"target": args.target, "first_reached": first, "first_reached_per_seed": per_seed, "evaluations": rows}
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
