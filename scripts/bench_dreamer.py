"""Dreamer throughput per size preset: env steps/s, gradient updates/s, and where the time goes.

For each ``--sizes`` preset the script builds the agent on ``--env`` with the agent's defaults, or
on an experiment's env with its agent settings (``--experiment NAME``), without a prefill
(``--set FIELD=VALUE`` overrides ``DreamerConfig``), fills the replay with whole sequences, then times

* ``iteration``: the whole ``train_step`` (collect ``unroll_length`` steps of the vmapped envs,
  append to the replay, ``updates_per_iteration`` updates), compiled once, median of
  ``--repeats`` calls after a warm-up call;
* ``acting``: the collection alone (``dreamer.collect``: the envs plus the filtered RSSM and the
  actor at every step);
* ``world_model``: ``updates_per_iteration`` world-model updates alone (sample, then
  ``dreamer.world_model_update``: observe, losses, gradient, optimiser);
* ``imagination``: ``updates_per_iteration`` behaviour updates alone (``dreamer.behavior_update``:
  imagine from the posterior latents, returns, actor and critic gradients, optimisers, slow
  critic), on the posterior of one fixed replayed batch.

Each part is its own compiled program, with the iteration's compiler options, timed the same way; shares are part / iteration, and
``other`` is what the parts do not explain (replay writes, sampling, the parts' fusion across
program boundaries), which can be negative when the whole program fuses better than its parts.

    python scripts/bench_dreamer.py                              # car_track, tiny and 1m
    python scripts/bench_dreamer.py --experiment car_track_dreamer   # that experiment's agent settings
    python scripts/bench_dreamer.py --sizes tiny 1m 12m --repeats 5 --out scripts/results/bench_dreamer/cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

import lunarl
from lunarl._platform import compile_options
from lunarl.agents import replay as replay_lib
from lunarl.agents.dreamer import agent as dreamer

CONF = pathlib.Path(__file__).resolve().parent.parent / "conf"


def experiment_setting(experiment: str) -> tuple[str, Any, dict[str, Any]]:
    """The env (name, env) and the agent fields of ``+experiment=NAME``, composed as
    ``lunarl.train`` does."""
    from hydra import compose, initialize_config_dir

    from lunarl.run.schema import register_schemas, validate_train

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plan = validate_train(compose("config", overrides=[f"+experiment={experiment}"]))
    if plan.agent_name != "dreamer":
        raise SystemExit(f"bench_dreamer: experiment {experiment} trains {plan.agent_name}, not dreamer")
    env, _ = plan.env_and_agent()
    return plan.env_name, env, {f.name: getattr(plan.agent_config, f.name) for f in dataclasses.fields(plan.agent_config)}


def bench_config(env: Any, size: str, num_envs: int, sets: list[str],
                 base: dict[str, Any] | None = None) -> dreamer.DreamerConfig:  # fmt: skip
    """``base`` (an experiment's agent fields, or the defaults) at ``size`` and ``num_envs``,
    without a prefill (every timed call learns), then the ``--set`` overrides."""
    overrides: dict[str, Any] = dict(base or {})
    overrides.update(num_envs=num_envs, size=size, prefill=0)
    overrides.setdefault("episode_length", env.default_episode_length)
    overrides.update(dreamer.DreamerConfig.parse_overrides(sets))
    return dreamer.DreamerConfig.build(**overrides)


def _time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn()`` (blocked until ready) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _param_count(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def bench_size(env: Any, cfg: dreamer.DreamerConfig, repeats: int) -> dict[str, Any]:
    opts = compile_options(env)
    ts = dreamer.init(jax.random.PRNGKey(0), env, cfg)
    n = dreamer.nets(env, cfg)
    updates = cfg.updates_per_iteration
    t0 = time.perf_counter()
    step = jax.jit(dreamer.train_step, compiler_options=opts).lower(ts).compile()
    compile_s = time.perf_counter() - t0
    # Fill the replay with whole sequences before timing (prefill=0: every call learns).
    for _ in range(max(1, -(-cfg.seq_len // cfg.unroll_length))):
        ts, _ = step(ts)
    state = {"ts": ts}

    def iteration():
        state["ts"], metrics = step(state["ts"])
        return metrics

    iteration_s = _time(iteration, repeats)
    ts = state["ts"]

    collect = jax.jit(dreamer.collect, compiler_options=opts)
    acting_s = _time(lambda: collect(ts, jax.random.PRNGKey(1)), repeats)

    # The agent's own two halves of ``dreamer.update``, so the parts time what training runs.
    @functools.partial(jax.jit, compiler_options=opts)
    def world_model_updates(params, opt_state, replay, rng):
        def body(carry, key):
            params, opt_state = carry
            k_s, k_u = jax.random.split(key)
            seq = dreamer.time_major(replay_lib.sample_sequences(replay, k_s, cfg.batch_size, cfg.seq_len))
            wm_params, wm_opt, _, _ = dreamer.world_model_update(n, cfg, params, opt_state, seq, k_u)
            return ({**params, "world_model": wm_params}, {**opt_state, "world_model": wm_opt}), None

        return jax.lax.scan(body, (params, opt_state), jax.random.split(rng, updates))[0]

    wm_args = (ts.params, ts.opt_state, ts.replay, jax.random.PRNGKey(2))
    world_model_s = _time(lambda: world_model_updates(*wm_args), repeats)

    seq = dreamer.time_major(replay_lib.sample_sequences(ts.replay, jax.random.PRNGKey(3), cfg.batch_size, cfg.seq_len))
    observed = jax.jit(lambda p, o, s: dreamer.world_model_update(n, cfg, p, o, s, jax.random.PRNGKey(4))[2])(
        ts.params, ts.opt_state, seq)

    @functools.partial(jax.jit, compiler_options=opts)
    def behavior_updates(params, opt_state, norm, seq, observed, rng):
        def body(carry, key):
            params, opt_state, norm = carry
            new, new_opt, norm, _ = dreamer.behavior_update(n, cfg, params, opt_state, norm, seq, observed, key)
            return ({**params, **new}, {**opt_state, **new_opt}, norm), None

        return jax.lax.scan(body, (params, opt_state, norm), jax.random.split(rng, updates))[0]

    b_args = (ts.params, ts.opt_state, ts.return_norm, seq, observed, jax.random.PRNGKey(5))
    imagination_s = _time(lambda: behavior_updates(*b_args), repeats)

    parts = {"acting": acting_s, "world_model": world_model_s, "imagination": imagination_s}
    return {
        "size": cfg.size,
        "dims": dict(vars(cfg.dims)),
        "params": {k: _param_count(v) for k, v in ts.params.items()},
        "updates_per_iteration": updates,
        "env_steps_per_iteration": cfg.env_steps_per_iteration,
        "compile_s": compile_s,
        "iteration_s": iteration_s,
        "env_steps_per_s": cfg.env_steps_per_iteration / iteration_s,
        "updates_per_s": updates / iteration_s,
        "part_s": parts,
        "share": {**{k: v / iteration_s for k, v in parts.items()},
                  "other": 1.0 - sum(parts.values()) / iteration_s},  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="car_track")
    parser.add_argument("--experiment", default=None,
                        help="take the env and the agent settings from +experiment=NAME (then --set)")
    parser.add_argument("--num-envs", type=int, default=None, help="default: the experiment's, or 16")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "1m"], choices=sorted(dreamer.SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="DreamerConfig override")
    parser.add_argument("--out", default="bench_results/bench_dreamer.json")
    args = parser.parse_args()

    if args.experiment:
        args.env, env, base = experiment_setting(args.experiment)
        args.num_envs = args.num_envs or base["num_envs"]
    else:
        env, base = lunarl.envs.make(args.env), None
        args.num_envs = args.num_envs or 16
    rows = []
    for size in args.sizes:
        cfg = bench_config(env, size, args.num_envs, args.set, base)
        row = bench_size(env, cfg, args.repeats)
        rows.append(row)
        share = "  ".join(f"{k} {v:5.1%}" for k, v in row["share"].items())
        print(f"{size:>5}: {row['env_steps_per_s']:8.1f} env steps/s  {row['updates_per_s']:7.2f} updates/s  "
              f"(iteration {row['iteration_s']:.3f}s, compile {row['compile_s']:.0f}s)  {share}", flush=True)  # fmt: skip
    cfg = bench_config(env, args.sizes[0], args.num_envs, args.set, base)
    result = {
        "experiment": args.experiment,
        "env": args.env,
        "num_envs": args.num_envs,
        "settings": {k: getattr(cfg, k) for k in ("unroll_length", "train_ratio", "batch_size", "seq_len", "horizon",
                                                  "imagine_starts")},
        "overrides": args.set,
        "repeats": args.repeats,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "host": platform.node(),
        "lunarl": getattr(lunarl, "__version__", "dev"),
        "results": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
