"""lunarl PPO vs Brax's PPO trainer on the same lunarl env, side by side in one process.

Both train for the same number of env steps with matched settings (num_envs, unroll length,
minibatches, epochs, network sizes and activation, observation normalisation, learning rate,
discount, GAE lambda, clip, grad clipping) and both use lunarl's training wrappers (fresh
randomised resets). Differences that remain are each trainer's own: Brax's tanh-squashed Gaussian
and its truncation handling (it drops truncated steps from the loss; its ``bootstrap_on_timeout``
needs an ``info["time_out"]`` that Brax-style envs do not set), lunarl's clipped Gaussian and
value bootstrap from the final observation. Each run is split into ``--chunks`` equal chunks of iterations; the first
chunk includes compilation, so

* steps/s = env steps of one chunk / median wall time of chunks 2.. (compile excluded), and
* compile time = first chunk's wall time - median chunk time,

measured the same way for both (for Brax from its own per-epoch ``training/walltime`` reported
through ``progress_fn``; its evals are off). On a shared machine wall time is noisy, so the JSON
also has steps per second of process CPU time (``*_sps_cpu``, ``ratio_cpu``). Returns are from the
same deterministic ``lunarl.run.evaluation.rollout`` on the final parameters of each. The pair
runs ``--repeats`` times, alternating, and the headline numbers are medians (the ratio is the
median of the per-pair ratios). Both trainers compile with the same XLA flags (see
``lunarl._platform.set_process_fusion_emitters``). Then lunarl alone with 1, 8, 64 seeds vmapped in one program.

    python scripts/bench_ppo.py                       # rover, ~4 min on a 2-core CPU
    python scripts/bench_ppo.py --env car_track --num-envs 256 --total-steps 500000
    python scripts/bench_ppo.py --set num_epochs=10 --set policy_hidden=256,256
    # learning side by side: the rover with experiment/rover.yaml's penalties, 2 M steps each
    python scripts/bench_ppo.py --env-set reward_rock_hit=-0.1 --env-set reward_wall_hit=-0.1 \
        --set reward_scaling=0.1 --set entropy_coef=0.001 --total-steps 2000000 --seeds ''
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import pathlib
import platform
import statistics
import time
import typing

import jax

import lunarl
from lunarl._platform import set_process_fusion_emitters
from lunarl.agents import ppo
from lunarl.agents.base import stateless
from lunarl.envs import LunarEnv, config_class, env_class, make, wrap_for_training
from lunarl.run.evaluation import rollout, summarize
from lunarl.run.placement import Placement
from lunarl.run.programs import init_state, make_chunk, seed_keys


def bench_config(env: LunarEnv, num_envs: int, sets: list[str]) -> ppo.PPOConfig:
    """The benchmark's PPO settings (also ``profile_ppo.py``'s), with ``--set FIELD=VALUE``
    overrides applied; raises ``ValueError`` naming a bad field."""
    overrides: dict[str, typing.Any] = dict(
        num_envs=num_envs,
        episode_length=env.default_episode_length,
        unroll_length=32,
        num_minibatches=8,
        num_epochs=4,
        policy_hidden=(64, 64),
        value_hidden=(64, 64),
    )
    overrides.update(ppo.PPOConfig.parse_overrides(sets))
    return ppo.PPOConfig.build(**overrides)


def _overrides(cfg_cls: type, items: list[str], flag: str) -> dict[str, typing.Any]:
    try:
        return cfg_cls.parse_overrides(items)
    except ValueError as e:
        raise SystemExit(f"{flag}: {e}") from e


def _chunk_stats(times: list[float], steps_per_chunk: int) -> tuple[float, float]:
    """(steps/s from the median of chunks 2.., compile = first chunk - that median)."""
    steady = statistics.median(times[1:])
    return steps_per_chunk / steady, max(times[0] - steady, 0.0)


def run_lunarl(env: LunarEnv, cfg: ppo.PPOConfig, seeds: int, chunks: int, chunk_iters: int, seed: int):
    """(seed-stacked state, steps/s over all seeds, compile seconds, chunk wall times, chunk CPU
    times), with the train app's own programs: its placement, seed-vmapped init and donated chunk."""
    placement = Placement.for_seeds(seeds)
    ts = jax.block_until_ready(init_state(ppo.AGENT, env, cfg, seed_keys(seed, seeds), placement))
    chunk_fn = make_chunk(ppo.AGENT, env, chunk_iters)
    times, cpu_times = [], []
    for _ in range(chunks):
        start, cpu_start = time.perf_counter(), time.process_time()
        ts, metrics, _ = chunk_fn(ts)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    sps, compile_s = _chunk_stats(times, seeds * chunk_iters * cfg.env_steps_per_iteration)
    return ts, sps, compile_s, times, cpu_times


def run_brax(env: LunarEnv, cfg: ppo.PPOConfig, chunks: int, chunk_iters: int, seed: int):
    """(brax policy fn for ``evaluate``, its params, steps/s, compile s, chunk wall and CPU times)."""
    import flax.linen as nn
    from brax.training.agents.ppo import networks as brax_networks
    from brax.training.agents.ppo import train as brax_ppo

    from lunarl.agents.networks import ACTIVATIONS

    walltimes: list[float] = []
    cpu_marks: list[float] = [time.process_time()]

    def progress(step: int, metrics: dict) -> None:
        if "training/walltime" in metrics:
            walltimes.append(float(metrics["training/walltime"]))
            cpu_marks.append(time.process_time())

    per_iter = cfg.num_envs * cfg.unroll_length
    make_inference, params, _ = brax_ppo.train(
        environment=env,
        num_timesteps=chunks * chunk_iters * per_iter,
        num_evals=chunks + 1,
        run_evals=False,
        num_envs=cfg.num_envs,
        episode_length=cfg.episode_length,
        wrap_env_fn=lambda e, episode_length, action_repeat, randomization_fn=None: wrap_for_training(
            e, episode_length, action_repeat
        ),
        learning_rate=cfg.learning_rate,
        entropy_cost=cfg.entropy_coef,
        discounting=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        unroll_length=cfg.unroll_length,
        batch_size=cfg.num_envs // cfg.num_minibatches,
        num_minibatches=cfg.num_minibatches,
        num_updates_per_batch=cfg.num_epochs,
        normalize_observations=cfg.normalize_observations,
        reward_scaling=cfg.reward_scaling,
        clipping_epsilon=cfg.clip_eps,
        max_grad_norm=cfg.max_grad_norm,
        normalize_advantage=cfg.normalize_advantages,
        vf_loss_coefficient=cfg.value_coef,
        network_factory=functools.partial(
            brax_networks.make_ppo_networks,
            policy_hidden_layer_sizes=cfg.policy_hidden,
            value_hidden_layer_sizes=cfg.value_hidden,
            activation=ACTIVATIONS.get(cfg.activation, nn.tanh),
        ),
        seed=seed,
        progress_fn=progress,
    )
    times = [walltimes[0]] + [b - a for a, b in itertools.pairwise(walltimes)]
    # CPU time between progress calls; the first also holds Brax's set-up (env reset, init).
    cpu_times = [b - a for a, b in itertools.pairwise(cpu_marks)]
    sps, compile_s = _chunk_stats(times, chunk_iters * per_iter)

    def policy(p, obs, rng, deterministic=True):
        return make_inference(p, deterministic=deterministic)(obs, rng)[0]

    return stateless(policy), params, sps, compile_s, times, cpu_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="rover")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--total-steps", type=int, default=196_608, help="env steps per run (rounded to whole chunks)")
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side lunarl/Brax pairs; medians are reported")
    parser.add_argument("--seeds", default="1,8,64", help="seed counts for the vmapped-seeds scan ('' to skip)")
    parser.add_argument("--seed-iters", type=int, default=2, help="iterations per timed chunk in the seeds scan")
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks per run; the first one compiles")
    parser.add_argument("--eval-episodes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-brax", action="store_true")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="PPOConfig override (repeatable)"
    )
    parser.add_argument(
        "--env-set", action="append", default=[], metavar="FIELD=VALUE", help="env config override (repeatable)"
    )
    parser.add_argument("--out", default="bench_results/bench_ppo.json")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} is out of range: allowed >= 1")
    if args.chunks < 2:
        raise SystemExit(f"--chunks={args.chunks} is out of range: allowed >= 2 (the first one compiles)")
    # Brax's trainer jits with the process's XLA flags: give the process the setting lunarl's own
    # programs get for this env (lunarl.compile_options), so both trainers compile alike.
    emitters = set_process_fusion_emitters(getattr(env_class(args.env), "cpu_fusion_emitters", False))

    env_overrides = _overrides(config_class(args.env), args.env_set, "--env-set")
    try:
        env = make(args.env, **env_overrides)
    except ValueError as e:
        raise SystemExit(f"--env-set: {e}") from e
    try:
        cfg = bench_config(env, args.num_envs, args.set)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from e
    per_iter = cfg.num_envs * cfg.unroll_length
    chunk_iters = max(1, round(args.total_steps / (args.chunks * per_iter)))
    total_steps = args.chunks * chunk_iters * per_iter
    print(f"env={args.env} total_steps={total_steps} ({args.chunks} chunks x {chunk_iters} iterations), "
          f"{args.repeats} repeats, XLA:CPU fusion emitters {'on' if emitters else 'off'} for both trainers")
    print(f"config: {cfg}")

    ev = jax.jit(
        lambda policy, params, key: rollout(
            env, policy, params, key, args.eval_episodes, cfg.episode_length, deterministic=True
        ),
        static_argnums=0,
        compiler_options=lunarl.compile_options(env),
    )
    eval_key = jax.random.PRNGKey(10_000 + args.seed)
    policy = ppo.make_policy(env, cfg)

    result: dict[str, typing.Any] = {
        "env": args.env,
        "total_steps": total_steps,
        "chunks": args.chunks,
        "chunk_iterations": chunk_iters,
        "repeats": args.repeats,
        "xla_cpu_fusion_emitters": emitters,
        "env_overrides": env_overrides,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "eval_episodes": args.eval_episodes,
        "device": str(jax.devices()[0]),
        "host": platform.node(),
        "jax": jax.__version__,
        "lunarl": lunarl.__version__,
        "runs": [],
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # lunarl and Brax alternate, so slow phases of a shared machine hit both alike.
    for repeat in range(args.repeats):
        run: dict[str, typing.Any] = {}
        ts, sps, compile_s, times, cpu = run_lunarl(env, cfg, 1, args.chunks, chunk_iters, args.seed)
        seed0 = jax.tree.map(lambda x: x[0], jax.vmap(ppo.policy_params)(ts))
        ev_l = summarize(ev(policy, seed0, eval_key))
        run.update(
            lunarl_sps=sps,
            lunarl_compile_s=compile_s,
            lunarl_chunk_s=times,
            lunarl_sps_cpu=chunk_iters * per_iter / statistics.median(cpu[1:]),
            lunarl_return=float(ev_l["episode_return"]),
            lunarl_success=float(ev_l["success_rate"]),
        )
        print(f"[{repeat}] lunarl: {sps:,.0f} steps/s, compile {compile_s:.1f}s, chunks {[round(t, 2) for t in times]}, eval {ev_l}", flush=True)
        if not args.skip_brax:
            b_policy, b_params, sps, compile_s, times, cpu = run_brax(env, cfg, args.chunks, chunk_iters, args.seed)
            ev_b = summarize(ev(b_policy, b_params, eval_key))
            run.update(
                brax_sps=sps,
                # Everything above steady state: compile plus Brax's recompile of its epoch
                # function on the second call, plus noise.
                brax_compile_s=compile_s,
                brax_overhead_s=sum(times) - len(times) * statistics.median(times[1:]),
                brax_chunk_s=times,
                brax_sps_cpu=chunk_iters * per_iter / statistics.median(cpu[1:]),
                brax_return=float(ev_b["episode_return"]),
                brax_success=float(ev_b["success_rate"]),
            )
            run.update(ratio=run["lunarl_sps"] / run["brax_sps"], ratio_cpu=run["lunarl_sps_cpu"] / run["brax_sps_cpu"])
            print(f"[{repeat}] brax:   {sps:,.0f} steps/s, compile {compile_s:.1f}s, chunks {[round(t, 2) for t in times]}, eval {ev_b}", flush=True)
            print(f"[{repeat}] ratio lunarl/brax {run['ratio']:.2f} (wall), {run['ratio_cpu']:.2f} (CPU time)", flush=True)
        result["runs"].append(run)
        # Headline numbers: medians over the repeats so far (ratios are medians of per-pair ratios).
        for key in run:
            if not key.endswith("_chunk_s"):
                result[key] = statistics.median(r[key] for r in result["runs"])
        out.write_text(json.dumps(result, indent=2))

    result["lunarl_seeds_sps"] = seed_sps = {}
    for n in [int(s) for s in args.seeds.split(",") if s]:
        _, sps, compile_s, _, _ = run_lunarl(env, cfg, n, 3, args.seed_iters, args.seed)
        seed_sps[str(n)] = {"sps": sps, "compile_s": compile_s}
        print(f"lunarl x{n} seeds: {sps:,.0f} steps/s (all seeds), compile {compile_s:.1f}s", flush=True)
        out.write_text(json.dumps(result, indent=2))

    print(f"\nmedians of {args.repeats} side-by-side repeats")
    print(f"{'':10s}{'steps/s':>12s}{'compile s':>11s}{'return':>10s}{'success':>9s}")
    for name in ("lunarl", "brax"):
        if f"{name}_sps" in result:
            print(
                f"{name:10s}{result[f'{name}_sps']:12,.0f}{result[f'{name}_compile_s']:11.1f}"
                f"{result[f'{name}_return']:10.2f}{result[f'{name}_success']:9.2f}"
            )
    if "ratio" in result:
        print(f"ratio lunarl/brax: {result['ratio']:.2f} (wall), {result['ratio_cpu']:.2f} (process CPU time)")
        if "brax_overhead_s" in result:
            print(f"brax time above steady state (compile + recompile): {result['brax_overhead_s']:.1f} s")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
