"""Throughput of hyperparameter populations trained as one program against separate runs.

For P members (PPO on the rover, small settings, one seed each, learning rates spread
log-uniformly) this builds the run's own programs (``lunarl.run.population`` on the seed axis,
``lunarl.run.programs.make_chunk``), and times, after compiling, ``--chunks`` chunks of
``--iterations`` iterations: env steps per second of all members together. P separate runs are
P default-path programs (each its own learning rate, so each its own compile) run one after
another on the same device; their throughput is one run's, and their wall-clock P times one
run's (compile included). Writes ``scripts/results/population.json`` and the table in
``scripts/results/population.md`` (between its ``<!-- bench -->`` markers).

    flock /tmp/lunarl-bench.lock python scripts/bench_population.py --members 1 8 32
    python scripts/bench_population.py --table-only    # rewrite the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lunarl  # noqa: E402
from lunarl.agents import ppo  # noqa: E402
from lunarl.run.placement import Placement  # noqa: E402
from lunarl.run.population import Population  # noqa: E402
from lunarl.run.programs import init_state, make_chunk, seed_keys  # noqa: E402
from lunarl.run.schema import PopulationSchema  # noqa: E402

SETTINGS = dict(num_envs=32, episode_length=200, unroll_length=32, num_minibatches=4, num_epochs=2,
                policy_hidden=(32, 32), value_hidden=(32, 32), total_iterations=1000, entropy_coef=0.001)


def _time_chunks(chunk, ts, chunks: int) -> tuple[float, object]:
    ts, metrics, _ = chunk(ts)  # warm-up (first call after compile)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(chunks):
        ts, metrics, _ = chunk(ts)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0, ts


def bench_population(env, cfg, members: int, iterations: int, chunks: int) -> dict:
    lrs = np.geomspace(1e-4, 3e-3, members) if members > 1 else np.array([3e-4])
    node = PopulationSchema(size=members, values={"agent": {"learning_rate": lrs.tolist()}})
    pop = Population.build(node, ppo.AGENT, cfg, 0, 1, iterations)
    agent = pop.agent(ppo.AGENT)
    t0 = time.perf_counter()
    ts = pop.assign(init_state(agent, env, cfg, pop.keys(0), Placement.for_seeds(pop.rows)))
    chunk = make_chunk(agent, env, iterations).lower(ts).compile()
    compile_s = time.perf_counter() - t0
    seconds, _ = _time_chunks(chunk, ts, chunks)
    steps = members * chunks * iterations * cfg.env_steps_per_iteration
    return {"members": members, "compile_s": compile_s, "train_s": seconds, "env_steps": steps, "steps_per_s": steps / seconds}


def bench_single(env, cfg, iterations: int, chunks: int) -> dict:
    """One default-path run (what each of P separate runs is)."""
    t0 = time.perf_counter()
    ts = init_state(ppo.AGENT, env, cfg, seed_keys(0, 1), Placement.for_seeds(1))
    chunk = make_chunk(ppo.AGENT, env, iterations).lower(ts).compile()
    compile_s = time.perf_counter() - t0
    seconds, _ = _time_chunks(chunk, ts, chunks)
    steps = chunks * iterations * cfg.env_steps_per_iteration
    return {"compile_s": compile_s, "train_s": seconds, "env_steps": steps, "steps_per_s": steps / seconds}


def table(result: dict) -> str:
    """The markdown table of a result JSON."""
    single = result["single"]
    lines = [
        f"Rover, PPO {result['settings']['num_envs']} envs x {result['settings']['unroll_length']} steps per member-iteration, "
        f"({result['settings']['policy_hidden'][0]}, {result['settings']['policy_hidden'][1]}) nets; "
        f"{result['timed_chunks']} timed chunks of {result['iterations_per_chunk']} iterations after a warm-up chunk; "
        f"{result['machine']['cpus']} CPUs, load average at the end {result['machine']['load_average_at_end'][0]:.1f}.",
        "",
        f"One default-path run: {single['steps_per_s']:,.0f} env steps/s, compile {single['compile_s']:.0f} s.",
        "",
        "| members P | env steps/s, all members | x one run's rate | compile s | wall-clock for these steps: population | P separate runs |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["population"]:
        lines.append(
            f"| {r['members']} | {r['steps_per_s']:,.0f} | {r['speedup_vs_separate']:.2f} | {r['compile_s']:.0f} | "
            f"{r['population_wall_s']:.0f} s | {r['separate_wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def write_table(result: dict, md: Path) -> None:
    begin, end = "<!-- bench -->", "<!-- /bench -->"
    text = md.read_text() if md.exists() else f"# Populations\n\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    md.write_text(f"{head}{begin}\n{table(result)}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iterations", type=int, default=5, help="iterations per chunk")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "population.json")
    parser.add_argument("--table-only", action="store_true", help="only rewrite population.md's table from --out")
    args = parser.parse_args()
    md = args.out.with_suffix(".md")
    if args.table_only:
        write_table(json.loads(args.out.read_text()), md)
        return

    env = lunarl.envs.make("rover", reward_rock_hit=-0.1, reward_wall_hit=-0.1)
    cfg = ppo.PPOConfig.build(**SETTINGS)
    single = bench_single(env, cfg, args.iterations, args.chunks)
    print(f"single run: {single['steps_per_s']:,.0f} steps/s (compile {single['compile_s']:.1f}s)", flush=True)
    rows = []
    for p in args.members:
        r = bench_population(env, cfg, p, args.iterations, args.chunks)
        # P separate runs, one after another: P compiles, and P times the env steps at one run's rate.
        separate_wall = p * (single["compile_s"] + r["env_steps"] / p / single["steps_per_s"])
        r.update(
            speedup_vs_separate=r["steps_per_s"] / single["steps_per_s"],
            population_wall_s=r["compile_s"] + r["train_s"],
            separate_wall_s=separate_wall,
        )
        rows.append(r)
        print(f"P={p:3d}: {r['steps_per_s']:,.0f} steps/s all members, x{r['speedup_vs_separate']:.2f} one run's rate; "
              f"compile {r['compile_s']:.1f}s; wall for these steps {r['population_wall_s']:.0f}s vs {separate_wall:.0f}s separately", flush=True)
    result = {
        "settings": SETTINGS,
        "env": "rover",
        "iterations_per_chunk": args.iterations,
        "timed_chunks": args.chunks,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "backend": jax.default_backend(),
                    "load_average_at_end": os.getloadavg()},
        "single": single,
        "population": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_table(result, md)
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
