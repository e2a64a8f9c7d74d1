"""What skipping the replay warm-up's updates saves when seeds are vmapped (``base.seed_cond``).

A replay agent does no gradient updates until its replay is ready (Dreamer's ``prefill``, SAC's
``warmup_steps``). Under the host's seed vmap a plain ``lax.cond`` on that per-seed predicate
becomes a select: the updates run in every warm-up iteration and are thrown away.
``seed_cond`` skips them while no seed is ready; it needs the vmap's axis named
``SEED_AXIS_NAME``, as ``lunarl.run.programs.make_chunk`` names it.

For each ``--experiment`` the script composes the experiment as ``lunarl.train`` does, with
``--seeds`` seeds, and times one ``train_step`` vmapped over the seeds, compiled twice:

* ``named``: the axis named, as the host's chunk runs it (the warm-up skips the updates);
* ``unnamed``: the axis unnamed, so ``seed_cond`` is a plain ``lax.cond`` (the select).

Each is timed in a warm-up iteration and in a learning iteration (median of ``--repeats`` calls,
the two programs called alternately, so both see the same machine load). ``run_saving`` is the
share of the experiment's whole training loop the named axis saves, from these medians and its
count of warm-up and learning iterations (compile, evaluation and logging excluded). Both
programs take the same iterations from the same keys, and the script reports how far apart their
policy parameters end (``seed_cond`` keeps each seed's result, so 0 is expected).

    python scripts/bench_warmup_skip.py --out scripts/results/bench_warmup_skip.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
from typing import Any

import jax
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from lunarl._platform import compile_options
from lunarl.agents.base import SEED_AXIS_NAME
from lunarl.run.placement import Placement
from lunarl.run.programs import init_state, seed_keys
from lunarl.run.schema import register_schemas, validate_train

CONF = pathlib.Path(__file__).resolve().parent.parent / "conf"


def _plan(experiment: str, seeds: int, overrides: list[str]) -> Any:
    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}", f"num_seeds={seeds}", *overrides])
    return validate_train(cfg)


def _warmup_env_steps(cfg: Any) -> int:
    for field in ("prefill", "warmup_steps"):
        if hasattr(cfg, field):
            return int(getattr(cfg, field))
    raise ValueError(f"{type(cfg).__name__} has no prefill or warmup_steps: not a replay agent")


def bench_experiment(experiment: str, seeds: int, repeats: int, overrides: list[str]) -> dict[str, Any]:
    plan = _plan(experiment, seeds, overrides)
    env, agent = plan.env_and_agent()
    cfg = plan.agent_config
    per_iteration = cfg.env_steps_per_iteration
    warmup = _warmup_env_steps(cfg)
    warmup_iterations = -(-warmup // per_iteration)
    if warmup_iterations < repeats + 1:
        raise ValueError(f"{experiment}: {warmup_iterations} warm-up iterations, fewer than --repeats + 1")
    total_iterations = cfg.total_iterations
    keys = seed_keys(0, seeds)
    programs, states = {}, {}
    for name, axis in (("named", SEED_AXIS_NAME), ("unnamed", None)):
        step = jax.jit(jax.vmap(agent.train_step, axis_name=axis), donate_argnums=0,
                       compiler_options=compile_options(env))  # fmt: skip
        states[name] = init_state(agent, env, cfg, keys, Placement.for_seeds(seeds))
        programs[name] = step.lower(states[name]).compile()

    def time_phase(calls: int) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in programs}
        for _ in range(calls):
            for name, step in programs.items():
                t0 = time.perf_counter()
                states[name], metrics = step(states[name])
                jax.block_until_ready(metrics)
                times[name].append(time.perf_counter() - t0)
        return times

    # Warm-up iterations: the first call of each program is its warm-up and is not counted.
    warm = time_phase(repeats + 1)
    ready = [int(jax.device_get(states[n].env_steps[0])) for n in programs]
    assert all(steps <= warmup for steps in ready), f"{experiment}: timed past the warm-up ({ready})"
    # Step both to the first learning iteration, then time learning iterations.
    for name, step in programs.items():
        while int(jax.device_get(states[name].env_steps[0])) < warmup:
            states[name], _ = step(states[name])
    learn = time_phase(repeats + 1)
    # Both programs took the same iterations from the same keys: the skip must change no result.
    named, unnamed = (jax.device_get(jax.vmap(agent.policy_params)(states[n])) for n in programs)
    differences = [float(abs(a - b).max()) for a, b in zip(*map(jax.tree.leaves, (named, unnamed)), strict=True)]
    rows = {}
    for name in programs:
        warm_s = statistics.median(warm[name][1:])
        learn_s = statistics.median(learn[name][1:])
        loop_s = warmup_iterations * warm_s + (total_iterations - warmup_iterations) * learn_s
        rows[name] = {"warmup_iteration_s": warm_s, "learning_iteration_s": learn_s, "loop_s": loop_s}
    return {
        "experiment": experiment,
        "agent": agent.name,
        "seeds": seeds,
        "overrides": overrides,
        "env_steps_per_iteration": per_iteration,
        "warmup_iterations": warmup_iterations,
        "total_iterations": total_iterations,
        "programs": rows,
        "warmup_speedup": rows["unnamed"]["warmup_iteration_s"] / rows["named"]["warmup_iteration_s"],
        "learning_ratio": rows["named"]["learning_iteration_s"] / rows["unnamed"]["learning_iteration_s"],
        "run_saving": 1.0 - rows["named"]["loop_s"] / rows["unnamed"]["loop_s"],
        "max_policy_param_difference": max(differences),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", nargs="+", default=["car_track_dreamer", "car_track_sac"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides after the experiment's, e.g. env.num_envs=4")  # fmt: skip
    parser.add_argument("--out", default="bench_results/bench_warmup_skip.json")
    args = parser.parse_args()
    try:
        results = [bench_experiment(e, args.seeds, args.repeats, args.override) for e in args.experiment]
    except (HydraException, ValueError) as e:  # one line naming the key or experiment (ConfigError too)
        raise SystemExit(f"bench_warmup_skip.py: {str(e).splitlines()[0]}") from None
    print(f"{'experiment':<20} {'program':<8} {'warm-up it. s':>13} {'learning it. s':>14} {'loop s':>8}")
    for r in results:
        for name, row in r["programs"].items():
            print(f"{r['experiment']:<20} {name:<8} {row['warmup_iteration_s']:>13.3f} "
                  f"{row['learning_iteration_s']:>14.3f} {row['loop_s']:>8.1f}")  # fmt: skip
        print(f"{'':<20} warm-up {r['warmup_speedup']:.1f}x faster named; learning named/unnamed "
              f"{r['learning_ratio']:.3f}; loop saving {100 * r['run_saving']:.1f}% "
              f"({r['warmup_iterations']} of {r['total_iterations']} iterations warm up); policy "
              f"parameters differ by at most {r['max_policy_param_difference']:.2e}")  # fmt: skip
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "jax": jax.__version__, "machine": platform.processor() or platform.machine(),
            "seeds": args.seeds, "repeats": args.repeats}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
