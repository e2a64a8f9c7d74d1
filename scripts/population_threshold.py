"""Env steps and wall-clock to an experiment's learning threshold: the single default
configuration (``+experiment=rover`` or ``car_track``) against the best member of a population of
8 learning rates, without and with PBT. Each is a real ``lunarl.train`` run; the threshold is the
first evaluation whose (best member's) deterministic success rate reaches ``--threshold``. Writes
``scripts/results/population_<experiment>.json`` and prints a table (``population.md`` quotes it).

    flock /tmp/lunarl-bench.lock python scripts/population_threshold.py --experiment rover
    flock /tmp/lunarl-bench.lock python scripts/population_threshold.py --experiment car_track \
        --steps 1500000 --log-every 10 --eval-every 10 --pbt-every 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POPULATION = ["population.size=8", "population.ranges.agent.learning_rate=[1e-4,3e-3,log]"]
CONFIGS = {
    "default": [],
    "population8": POPULATION,
    "population8_pbt": POPULATION,  # + population.pbt.every=--pbt-every
}


def run(name: str, extra: list[str], args: argparse.Namespace) -> dict:
    run_dir = args.dir / name
    if run_dir.exists():  # the app would resume it and report its old evaluations as new
        raise SystemExit(f"{run_dir} exists: pass another --dir or remove it")
    if name.endswith("_pbt"):
        extra = [*extra, f"population.pbt.every={args.pbt_every}"]
    cmd = [sys.executable, "-m", "lunarl.train", f"+experiment={args.experiment}", f"run.dir={run_dir}",
           f"run.total_env_steps={args.steps}", *([f"run.log_every={args.log_every}"] if args.log_every else []),
           f"run.eval_every={args.eval_every}",
           f"run.eval_episodes={args.episodes}", "run.checkpoint_every=100000", "logger.wandb.mode=disabled",
           "logger.console=false", *extra]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, "WANDB_MODE": "disabled"})  # fmt: skip
    wall = time.time() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] if (run_dir / "metrics.jsonl").exists() else []
    evals = [r for r in rows if "eval/success_rate" in r]
    hit = next((r for r in evals if r["eval/success_rate"] >= args.threshold), None)
    members = 8 if extra else 1
    return {
        "name": name,
        "overrides": extra,
        "returncode": proc.returncode,
        "wall_s": wall,
        "threshold_env_steps_per_member": hit["global_step"] if hit else None,
        "threshold_env_steps_all_members": hit["global_step"] * members if hit else None,
        "threshold_wall_s": hit["time"] if hit else None,  # seconds since the app's logger started (compile included)
        "threshold_member": hit.get("population/best_eval_member") if hit else None,
        "best_success": max((r["eval/success_rate"] for r in evals), default=None),
        "evals": [(r["global_step"], r["eval/success_rate"], r.get("population/best_eval_member")) for r in evals],
        "stderr_tail": proc.stderr[-500:] if proc.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3_000_000, help="env steps per member")
    parser.add_argument("--episodes", type=int, default=64, help="evaluation episodes per seed")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--experiment", default="rover", help="conf/experiment/<name>.yaml")
    parser.add_argument("--eval-every", type=int, default=40, help="iterations between evaluations")
    parser.add_argument("--pbt-every", type=int, default=40, help="iterations between PBT steps")
    parser.add_argument("--log-every", type=int, default=None, help="iterations per chunk (default: the experiment's)")
    parser.add_argument("--only", nargs="*", default=list(CONFIGS))
    parser.add_argument("--dir", type=Path, default=None, help="default /tmp/lunarl_population_<experiment>")
    parser.add_argument("--out", type=Path, default=None, help="default scripts/results/population_<experiment>.json")
    args = parser.parse_args()
    args.dir = args.dir or Path(f"/tmp/lunarl_population_{args.experiment}")
    args.out = args.out or Path(__file__).parent / "results" / f"population_{args.experiment}.json"
    results = []
    for name in args.only:
        r = run(name, CONFIGS[name], args)
        results.append(r)
        print(f"{name}: threshold at {r['threshold_env_steps_per_member']} env steps per member "
              f"({r['threshold_env_steps_all_members']} all members), {r['threshold_wall_s']} s; best success "
              f"{r['best_success']}; run {r['wall_s']:.0f} s, exit {r['returncode']}", flush=True)
        args.out.write_text(json.dumps({"experiment": args.experiment, "threshold": args.threshold, "eval_episodes": args.episodes, "steps": args.steps,
                                        "load_average_at_end": os.getloadavg(), "runs": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
