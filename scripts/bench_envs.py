"""Environment throughput: jitted, vmapped lunarl envs against the single-env Gymnasium adapter.

For each ``num_envs`` it compiles one ``lax.scan`` of ``--steps`` env steps with the random
actions drawn inside the scan (so their cost is included), then times ``--repeats`` runs that
continue from the previous state, and reports the median (and best) env steps per second.
Two stacks are measured:

* ``wrapped``: ``wrap_for_training`` (vmap -> episode limit -> auto-reset with a fresh
  randomised reset every step, what agents train on), and
* ``raw``: the batched ``env.step`` alone (``VmapWrapper``; finished episodes keep stepping;
  no resets).

``--cpu-devices N`` splits the CPU into N JAX devices (as ``run.cpu_devices=N`` does for
training) and shards the env batch over them on a ``data`` mesh axis: each device steps its own
envs on its own thread (``lunarl.envs.base.VmapWrapper``).

Compile time is the ahead-of-time ``lower().compile()`` of the scan. The Gymnasium adapter
(``gymnasium.make("lunarl/<Env>-v0")``, one env, host round-trip per step) is timed for
comparison. For env modules that expose ``mujoco_reference_steps_per_second(env, num_steps)``
(kuka) the C MuJoCo rate (one ``MjData``, one thread) is measured in the same run and every row's
MJX/C-MuJoCo ratio printed; kuka's env step is one control step, so its rows are control steps/s.
``--baseline`` compares each row with the same (mode, num_envs) row of an earlier JSON (e.g. one
written from an older commit), for before/after tables.

    python scripts/bench_envs.py                                  # rover, 1..16384 envs
    python scripts/bench_envs.py --env car_track --num-envs 1024,4096 --repeats 3
    python scripts/bench_envs.py --xla-cpu-fusion-emitters on     # compare the XLA flag
    python scripts/bench_envs.py --env kuka --baseline before.json   # 16/64/256 envs, vs an earlier run
    python scripts/bench_envs.py --env kuka --cpu-devices 2          # the env batch over both cores

Results go to ``--out`` (default ``bench_results/bench_envs.json``). Numbers from a shared
machine are noisy: quote medians and say so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any

CPU_DEFAULT_NUM_ENVS = (1, 64, 1024, 4096, 16384)
ACCELERATOR_DEFAULT_NUM_ENVS = (1, 64, 1024, 4096, 16384, 65536, 262144)
# MJX on a CPU: thousands of env steps/s, so large batches take minutes per timed scan.
CPU_DEFAULT_NUM_ENVS_BY_ENV = {"kuka": (16, 64, 256)}


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--env", default="rover", help="registered env name (rover, car_track, kuka, ...)")
    p.add_argument(
        "--num-envs",
        default=None,
        help="comma-separated batch sizes (default: 1..16384 on CPU, up to 262144 on GPU)",
    )
    p.add_argument("--steps", type=int, default=200, help="env steps per timed scan")
    p.add_argument("--repeats", type=int, default=5, help="timed scans per setting; the median is reported")
    p.add_argument("--modes", default="wrapped,raw", help="comma-separated subset of: wrapped, raw")
    p.add_argument(
        "--episode-length",
        type=int,
        default=None,
        help="episode limit of the wrapped stack (default: the env's)",
    )
    p.add_argument(
        "--gym-steps", type=int, default=2000, help="steps timed through the Gymnasium adapter (0 to skip)"
    )
    p.add_argument(
        "--reference-steps",
        type=int,
        default=2000,
        help="steps of the C MuJoCo reference where the env has one (0 to skip)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="env config override (repeatable)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="split the CPU into N JAX devices and shard the env batch over them (run.cpu_devices)",
    )
    p.add_argument(
        "--xla-cpu-fusion-emitters",
        choices=("on", "off", "default"),
        default="default",
        help="set XLA's CPU fusion emitters before JAX starts (lunarl turns them off by default, for MJX)",
    )
    p.add_argument(
        "--xla-cpu-multi-thread",
        choices=("on", "off", "default"),
        default="default",
        help="XLA's multi-threaded CPU kernels (off can win on a busy, shared machine)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="JSON of an earlier run of this script (same env): print and store each row's speed-up over it",
    )
    p.add_argument("--out", default="bench_results/bench_envs.json", help="JSON results file")
    return p.parse_args(argv)


def _configure_xla(**choices: str) -> None:
    """Set XLA boolean flags (``flag=on|off|default``); must run before JAX initialises its backend."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag, choice in choices.items():
        if choice == "default":
            continue
        flags = [f for f in flags if not f.startswith(f"--{flag}")]
        flags.append(f"--{flag}={'true' if choice == 'on' else 'false'}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def bench_jax(
    env,
    num_envs: int,
    steps: int,
    repeats: int,
    mode: str,
    episode_length: int | None,
    seed: int,
    cpu_devices: int = 1,
) -> dict[str, Any]:
    """Median env steps/s of a jitted scan over ``steps`` batched steps with in-scan random actions."""
    import contextlib

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lunarl.envs import wrap_for_training
    from lunarl.envs.base import VmapWrapper

    if mode == "wrapped":
        stack = wrap_for_training(env, episode_length=episode_length)
        reset_fn, step_fn = stack.reset, stack.step
    elif mode == "raw":
        stack = VmapWrapper(env)
        reset_fn, step_fn = stack.reset, stack.step
    else:
        raise ValueError(f"unknown mode {mode!r}; expected 'wrapped' or 'raw'")

    def rollout(state, key):
        def body(carry, _):
            state, key = carry
            key, action_key = jax.random.split(key)
            action = jax.random.uniform(action_key, (num_envs, env.action_size), minval=-1.0, maxval=1.0)
            return (step_fn(state, action), key), None

        (state, key), _ = jax.lax.scan(body, (state, key), None, length=steps)
        return state, key

    # On several devices the programs are traced under a mesh whose ``data`` axis splits the envs.
    if cpu_devices > 1:
        if num_envs % cpu_devices:
            raise SystemExit(f"--num-envs {num_envs} does not split over --cpu-devices {cpu_devices}")
        mesh = Mesh(np.array(jax.devices()[:cpu_devices]), ("data",))
        on_mesh = lambda: jax.sharding.use_abstract_mesh(mesh.abstract_mesh)  # noqa: E731
        keys_sharding = NamedSharding(mesh, PartitionSpec("data"))
    else:
        on_mesh, keys_sharding = contextlib.nullcontext, None

    key = jax.random.PRNGKey(seed)
    key, reset_key = jax.random.split(key)
    reset_keys = jax.device_put(jax.random.split(reset_key, num_envs), keys_sharding)
    with on_mesh():
        state = jax.block_until_ready(jax.jit(reset_fn)(reset_keys))
        t0 = time.perf_counter()
        compiled = jax.jit(rollout, donate_argnums=0).lower(state, key).compile()
    compile_s = time.perf_counter() - t0
    # Feed the state in the layout the program was compiled for (a no-op on one device).
    state_sharding = compiled.input_shardings[0][0]
    state, key = jax.block_until_ready(compiled(jax.device_put(state, state_sharding), key))  # warm-up
    times = []
    for _ in range(repeats):
        state = jax.device_put(state, state_sharding)
        t0 = time.perf_counter()
        state, key = jax.block_until_ready(compiled(state, key))
        times.append(time.perf_counter() - t0)
    n = num_envs * steps
    return {
        "mode": mode,
        "num_envs": num_envs,
        "cpu_devices": cpu_devices,
        "steps_per_scan": steps,
        "repeats": repeats,
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "steps_per_s": n / statistics.median(times),
        "best_steps_per_s": n / min(times),
        "times_s": times,
    }


def bench_gym(env_name: str, num_steps: int, seed: int, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """Steps/s of the single-env Gymnasium adapter (host round-trip per step), compile excluded."""
    import gymnasium

    import lunarl  # noqa: F401  (registers the ids)
    from lunarl.envs.gym import GYMNASIUM_IDS

    ids = [gid for gid, name in GYMNASIUM_IDS.items() if name == env_name]
    if not ids or num_steps <= 0:
        return None
    env = gymnasium.make(ids[0], **overrides)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    for _ in range(5):  # compiles reset/step
        env.step(env.action_space.sample())
    env.reset(seed=seed + 1)
    t0 = time.perf_counter()
    for _ in range(num_steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - t0
    env.close()
    return {"gym_id": ids[0], "steps": num_steps, "steps_per_s": num_steps / elapsed}


def compare_with_baseline(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """Add ``baseline_steps_per_s`` and ``speedup`` to each row that has a (mode, num_envs) match."""
    before = {(r["mode"], r["num_envs"]): r["steps_per_s"] for r in baseline.get("results", [])}
    for r in rows:
        old = before.get((r["mode"], r["num_envs"]))
        if old:
            r["baseline_steps_per_s"] = old
            r["speedup"] = r["steps_per_s"] / old


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    headers = ["mode", "num_envs", "median steps/s", "best steps/s", "compile s"]
    extra = [k for k in ("over_reference", "baseline_steps_per_s", "speedup") if any(k in r for r in rows)]
    names = {"over_reference": "/ C mj_step", "baseline_steps_per_s": "baseline steps/s", "speedup": "speed-up"}
    headers += [names[k] for k in extra]
    fmt = {"over_reference": "{:.2f}", "baseline_steps_per_s": "{:,.0f}", "speedup": "{:.2f}x"}
    cells = [
        [
            r["mode"],
            f"{r['num_envs']:,}",
            f"{r['steps_per_s']:,.0f}",
            f"{r['best_steps_per_s']:,.0f}",
            f"{r['compile_s']:.1f}",
        ]
        + [fmt[k].format(r[k]) if k in r else "-" for k in extra]
        for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="right")
        for row in cells:
            table.add_row(*row)
        Console().print(table)
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
        for row in cells:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    if args.cpu_devices < 1:
        raise SystemExit(f"--cpu-devices must be >= 1, got {args.cpu_devices}")
    if args.cpu_devices > 1:
        from lunarl.run import distributed
        from lunarl.run.schema import RunSchema

        distributed.set_cpu_devices(RunSchema(cpu_devices=args.cpu_devices))  # before JAX starts
    _configure_xla(
        xla_cpu_use_fusion_emitters=args.xla_cpu_fusion_emitters,
        xla_cpu_multi_thread_eigen=args.xla_cpu_multi_thread,
    )

    import importlib

    import jax

    import lunarl

    env_cls = lunarl.envs.env_class(args.env)
    try:
        overrides = env_cls.config_cls.parse_overrides(args.set)
        env = lunarl.envs.make(args.env, **overrides)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from e
    backend = jax.default_backend()
    baseline = None
    if args.baseline:
        baseline = json.loads(pathlib.Path(args.baseline).read_text())
        if baseline.get("env") != args.env:
            raise SystemExit(f"--baseline {args.baseline} is a run of env {baseline.get('env')!r}, not {args.env!r}")
    if args.num_envs:
        sizes = [int(s) for s in args.num_envs.split(",") if s]
    elif backend == "cpu":
        sizes = list(CPU_DEFAULT_NUM_ENVS_BY_ENV.get(args.env, CPU_DEFAULT_NUM_ENVS))
    else:
        sizes = list(ACCELERATOR_DEFAULT_NUM_ENVS)
    modes = [m for m in args.modes.split(",") if m]

    rows = []
    for mode in modes:
        for n in sizes:
            row = bench_jax(env, n, args.steps, args.repeats, mode, args.episode_length, args.seed, args.cpu_devices)
            rows.append(row)
            print(
                f"{args.env} {mode:7s} num_envs={n:>7,}: {row['steps_per_s']:>13,.0f} steps/s (median of {args.repeats}), compile {row['compile_s']:.1f} s, {args.cpu_devices} CPU device(s)",
                flush=True,
            )

    gym = bench_gym(args.env, args.gym_steps, args.seed, overrides)
    reference = None
    ref_fn = getattr(importlib.import_module(type(env).__module__), "mujoco_reference_steps_per_second", None)
    if ref_fn is not None and args.reference_steps > 0:
        ref_sps = float(ref_fn(env, args.reference_steps))
        best_jax = max(r["steps_per_s"] for r in rows) if rows else float("nan")
        reference = {
            "name": "C MuJoCo (mujoco.mj_step, one thread)",
            "steps_per_s": ref_sps,
            "jax_over_reference": best_jax / ref_sps,
        }
        for r in rows:
            r["over_reference"] = r["steps_per_s"] / ref_sps
    if baseline is not None:
        compare_with_baseline(rows, baseline)

    _print_table(
        f"{args.env}: env steps/s on {backend} ({jax.devices()[0].device_kind}), {args.steps} steps per scan, median of {args.repeats}",
        rows,
    )
    if gym:
        print(
            f"Gymnasium adapter {gym['gym_id']}: {gym['steps_per_s']:,.0f} steps/s (one env, {gym['steps']} steps)"
        )
        if rows:
            best = max(rows, key=lambda r: r["steps_per_s"])
            print(
                f"  best jitted/vmapped ({best['mode']}, {best['num_envs']:,} envs) is {best['steps_per_s'] / gym['steps_per_s']:,.0f}x the adapter"
            )
    if reference:
        print(
            f"{reference['name']}: {reference['steps_per_s']:,.0f} steps/s; best MJX / C MuJoCo = {reference['jax_over_reference']:.2f}"
        )

    result = {
        "env": args.env,
        "config": {k: getattr(env.config, k) for k in env.config.__dataclass_fields__},
        "results": rows,
        "gym": gym,
        "reference": reference,
        "baseline": (
            {"path": args.baseline, "date_utc": baseline.get("date_utc"), "reference": baseline.get("reference")}
            if baseline is not None
            else None
        ),
        "machine": {
            "backend": backend,
            "device": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average": os.getloadavg(),
        },
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
