"""PPO iteration throughput with the env batch sharded over 1, 2, 4 ... devices (``data`` mesh axis).

Each device count runs in its own subprocess (the forced CPU device count is an XLA flag read when
JAX starts) with the train app's own programs: ``Placement.for_run``, the seed-vmapped init and the
donated chunk pinned to the mesh. Every run trains the same PPO config from the same seed for
``--chunks`` chunks; the first includes compilation, so steps/s = env steps of one chunk / median
wall time of chunks 2.., and compile = first chunk - that median. The final policy parameters of
each run are compared with the 1-device run's (max abs difference): the sharded program must give
the same training to float rounding.

On CPU the "devices" are XLA host-platform devices sharing the machine's cores, so this measures
correctness and overhead, not scaling; on a GPU machine use ``--platform gpu`` (real devices).

    flock /tmp/lunarl-bench.lock python scripts/bench_scaling.py          # 1, 2, 4 CPU devices
    python scripts/bench_scaling.py --platform gpu --devices 1,2,4,8 --num-envs 4096
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def child(args: argparse.Namespace) -> None:
    """One device count: train, time the chunks, save the final policy parameters."""
    import jax
    import numpy as np

    import lunarl
    from lunarl.agents import ppo
    from lunarl.run.placement import Placement
    from lunarl.run.programs import init_state, make_chunk, seed_keys

    env = lunarl.envs.make(args.env)
    cfg = ppo.PPOConfig.build(
        num_envs=args.num_envs,
        episode_length=env.default_episode_length,
        unroll_length=args.unroll_length,
        num_minibatches=8,
        num_epochs=4,
        policy_hidden=(64, 64),
        value_hidden=(64, 64),
    )
    devices = jax.devices()[: args.child]
    assert len(devices) == args.child, f"asked for {args.child} devices, have {len(jax.devices())}"
    placement = Placement.for_run(1, cfg.num_envs, devices)
    ts = jax.block_until_ready(init_state(ppo.AGENT, env, cfg, seed_keys(0, 1), placement))
    chunk = make_chunk(ppo.AGENT, env, args.chunk_iters, placement)
    times = []
    for _ in range(args.chunks):
        start = time.perf_counter()
        ts, metrics, finite = chunk(ts)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    assert bool(finite)
    steady = statistics.median(times[1:])
    steps = args.chunk_iters * cfg.env_steps_per_iteration
    leaves = jax.tree.leaves(jax.device_get(ppo.policy_params(jax.tree.map(lambda x: x[0], ts))))
    np.savez(args.out, *[np.asarray(x) for x in leaves])
    env_leaf = jax.tree.leaves(ts.env_state)[0]
    print(json.dumps({
        "devices": len(devices),
        "mesh": placement.describe(),
        "env_leaf_shards": len({str(s.index) for s in env_leaf.addressable_shards}),
        "steps_per_second": steps / steady,
        "median_chunk_s": steady,
        "compile_s": max(times[0] - steady, 0.0),
        "chunk_s": times,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="rover")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--unroll-length", type=int, default=32)
    parser.add_argument("--chunk-iters", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=6, help="first one includes the compile")
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--name", default="scaling", help="results file stem in scripts/results/")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    counts = [int(n) for n in args.devices.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            env = dict(os.environ)
            if args.platform == "cpu":
                flags = env.get("XLA_FLAGS", "")
                env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
                env["JAX_PLATFORMS"] = "cpu"
            out = f"{tmp}/params{n}.npz"
            cmd = [sys.executable, __file__, "--child", str(n), "--out", out, "--env", args.env,
                   "--num-envs", str(args.num_envs), "--unroll-length", str(args.unroll_length),
                   "--chunk-iters", str(args.chunk_iters), "--chunks", str(args.chunks)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{n} device(s) failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"params": out})
            print(f"{n} device(s): {runs[-1]['steps_per_second']:,.0f} steps/s", flush=True)
        import numpy as np

        with np.load(runs[0]["params"]) as base:
            for run in runs:
                with np.load(run.pop("params")) as other:
                    run["max_abs_param_diff_vs_first"] = max(float(np.max(np.abs(base[k] - other[k]))) for k in base.files)

    base_sps = runs[0]["steps_per_second"]
    for run in runs:
        run["speedup"] = run["steps_per_second"] / base_sps
        run["efficiency"] = run["speedup"] * counts[0] / run["devices"]
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "env": args.env,
        "num_envs": args.num_envs,
        "unroll_length": args.unroll_length,
        "chunk_iters": args.chunk_iters,
        "chunks": args.chunks,
        "platform": args.platform,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_end": os.getloadavg(),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# PPO data-parallel scaling ({args.platform})",
        "",
        f"`{result['command']}` on {result['machine']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load_average_at_end'])}.",
        f"{args.env}, {args.num_envs} envs x {args.unroll_length} steps per iteration, one seed, the env batch "
        f"sharded on the `data` mesh axis; {args.chunks} chunks of {args.chunk_iters} iterations, steps/s from the "
        "median of chunks 2.. (the first compiles).",
        "",
        "| devices | mesh | steps/s | speedup | efficiency | compile s | max abs param diff vs 1 device |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run['devices']} | {run['mesh']} | {run['steps_per_second']:,.0f} | {run['speedup']:.2f} | "
            f"{run['efficiency']:.2f} | {run['compile_s']:.1f} | {run['max_abs_param_diff_vs_first']:.1e} |"
        )
    if args.platform == "cpu":
        lines += [
            "",
            f"Forced CPU devices share the machine's {os.cpu_count()} cores, so more devices cannot be faster here:",
            "the numbers show the sharded program's overhead and that it trains the same parameters (to float",
            "rounding), not scaling. Real scaling needs a machine with several accelerators (`--platform gpu`).",
        ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
