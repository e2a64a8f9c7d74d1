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
same deterministic ``lunarl.run.evaluation.evaluate`` on the final parameters of each. Then lunarl
alone with 1, 8, 64 seeds vmapped in one program.

    python scripts/bench_ppo.py                       # rover, ~1-2 min on a 2-core CPU
    python scripts/bench_ppo.py --env car_track --num-envs 256 --total-steps 500000
    python scripts/bench_ppo.py --set num_epochs=10 --set policy_hidden=256,256
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
from lunarl.agents import ppo
from lunarl.envs import LunarEnv, make, wrap_for_training
from lunarl.run.evaluation import evaluate, summarize


def _parse_override(cfg_cls: type, text: str) -> tuple[str, typing.Any]:
    key, _, value = text.partition("=")
    hints = typing.get_type_hints(cfg_cls)
    if key not in hints:
        raise SystemExit(f"--set {text}: unknown PPOConfig field {key!r}")
    hint = hints[key]
    if hint is bool:
        return key, value.lower() in ("1", "true", "yes")
    if typing.get_origin(hint) is tuple:
        return key, tuple(int(v) for v in value.split(",") if v)
    return key, hint(value) if hint in (int, float, str) else value


def _chunk_stats(times: list[float], steps_per_chunk: int) -> tuple[float, float]:
    """(steps/s from the median of chunks 2.., compile = first chunk - that median)."""
    steady = statistics.median(times[1:])
    return steps_per_chunk / steady, max(times[0] - steady, 0.0)


def run_lunarl(env: LunarEnv, cfg: ppo.PPOConfig, seeds: int, chunks: int, chunk_iters: int, seed: int):
    """(state, steps/s over all seeds, compile seconds, chunk wall times, chunk CPU times)."""

    def run_chunk(ts):
        return jax.lax.scan(lambda s, _: ppo.train_step(s), ts, None, length=chunk_iters)

    # No buffer donation: interleaved A/B runs showed no difference on CPU, and a run with a
    # donated vmapped state hung (all threads idle in futex waits; cause not isolated).
    if seeds == 1:
        init = jax.jit(lambda k: ppo.init(k, env, cfg))
        chunk_fn = jax.jit(run_chunk)
    else:
        init = jax.jit(jax.vmap(lambda k: ppo.init(k, env, cfg)))
        chunk_fn = jax.jit(jax.vmap(run_chunk))
    key = jax.random.PRNGKey(seed)
    ts = jax.block_until_ready(init(key if seeds == 1 else jax.random.split(key, seeds)))
    times, cpu_times = [], []
    for _ in range(chunks):
        start, cpu_start = time.perf_counter(), time.process_time()
        ts, metrics = chunk_fn(ts)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    sps, compile_s = _chunk_stats(times, seeds * chunk_iters * cfg.num_envs * cfg.unroll_length)
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

    return policy, params, sps, compile_s, times, cpu_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="rover")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--total-steps", type=int, default=196_608, help="env steps per run (rounded to whole chunks)")
    parser.add_argument("--seeds", default="1,8,64", help="seed counts for the vmapped-seeds scan ('' to skip)")
    parser.add_argument("--seed-iters", type=int, default=2, help="iterations per timed chunk in the seeds scan")
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks per run; the first one compiles")
    parser.add_argument("--eval-episodes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-brax", action="store_true")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="PPOConfig override (repeatable)"
    )
    parser.add_argument("--out", default="bench_results/bench_ppo.json")
    args = parser.parse_args()

    env = make(args.env)
    overrides = dict(
        num_envs=args.num_envs,
        episode_length=env.default_episode_length,
        unroll_length=32,
        num_minibatches=8,
        num_epochs=4,
        policy_hidden=(64, 64),
        value_hidden=(64, 64),
    )
    overrides.update(_parse_override(ppo.PPOConfig, s) for s in args.set)
    cfg = ppo.PPOConfig.build(**overrides)
    per_iter = cfg.num_envs * cfg.unroll_length
    chunk_iters = max(1, round(args.total_steps / (args.chunks * per_iter)))
    total_steps = args.chunks * chunk_iters * per_iter
    print(f"env={args.env} total_steps={total_steps} ({args.chunks} chunks x {chunk_iters} iterations)")
    print(f"config: {cfg}")

    ev = jax.jit(
        lambda policy, params, key: evaluate(
            env, policy, params, key, args.eval_episodes, cfg.episode_length, deterministic=True
        ),
        static_argnums=0,
    )
    eval_key = jax.random.PRNGKey(10_000 + args.seed)
    policy = ppo.make_policy(env, cfg)

    ts, l_sps, l_compile, l_times, l_cpu = run_lunarl(env, cfg, 1, args.chunks, chunk_iters, args.seed)
    l_eval = summarize(ev(policy, ppo.policy_params(ts), eval_key))
    print(f"lunarl: {l_sps:,.0f} steps/s, compile {l_compile:.1f}s, chunks {[round(t, 2) for t in l_times]}, eval {l_eval}", flush=True)

    result: dict[str, typing.Any] = {
        "env": args.env,
        "total_steps": total_steps,
        "chunks": args.chunks,
        "chunk_iterations": chunk_iters,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "lunarl_sps": l_sps,
        "lunarl_compile_s": l_compile,
        "lunarl_chunk_s": l_times,
        "lunarl_chunk_cpu_s": l_cpu,
        # Everything above steady state: compile plus any recompilation (Brax recompiles its
        # epoch function on the second call here) plus noise.
        "lunarl_overhead_s": sum(l_times) - len(l_times) * statistics.median(l_times[1:]),
        "lunarl_sps_cpu": chunk_iters * per_iter / statistics.median(l_cpu[1:]),
        "lunarl_return": l_eval["return_mean"],
        "lunarl_success": l_eval["success_rate"],
        "eval_episodes": args.eval_episodes,
        "device": str(jax.devices()[0]),
        "host": platform.node(),
        "jax": jax.__version__,
        "lunarl": lunarl.__version__,
    }
    if not args.skip_brax:
        b_policy, b_params, b_sps, b_compile, b_times, b_cpu = run_brax(env, cfg, args.chunks, chunk_iters, args.seed)
        b_eval = summarize(ev(b_policy, b_params, eval_key))
        print(f"brax:   {b_sps:,.0f} steps/s, compile {b_compile:.1f}s, chunks {[round(t, 2) for t in b_times]}, eval {b_eval}", flush=True)
        result.update(
            brax_sps=b_sps,
            brax_compile_s=b_compile,
            brax_chunk_s=b_times,
            brax_chunk_cpu_s=b_cpu,
            brax_overhead_s=sum(b_times) - len(b_times) * statistics.median(b_times[1:]),
            brax_sps_cpu=chunk_iters * per_iter / statistics.median(b_cpu[1:]),
            brax_return=b_eval["return_mean"],
            brax_success=b_eval["success_rate"],
            ratio=l_sps / b_sps,
        )
        result["ratio_cpu"] = result["lunarl_sps_cpu"] / result["brax_sps_cpu"]

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))  # written again as the seeds scan goes

    result["lunarl_seeds_sps"] = seed_sps = {}
    for n in [int(s) for s in args.seeds.split(",") if s]:
        _, sps, compile_s, _, _ = run_lunarl(env, cfg, n, 3, args.seed_iters, args.seed)
        seed_sps[str(n)] = {"sps": sps, "compile_s": compile_s}
        print(f"lunarl x{n} seeds: {sps:,.0f} steps/s (all seeds), compile {compile_s:.1f}s", flush=True)
        out.write_text(json.dumps(result, indent=2))

    print()
    print(f"{'':10s}{'steps/s':>12s}{'compile s':>11s}{'return':>10s}{'success':>9s}")
    print(f"{'lunarl':10s}{l_sps:12,.0f}{l_compile:11.1f}{l_eval['return_mean']:10.2f}{l_eval['success_rate']:9.2f}")
    if "brax_sps" in result:
        print(f"{'brax':10s}{b_sps:12,.0f}{b_compile:11.1f}{b_eval['return_mean']:10.2f}{b_eval['success_rate']:9.2f}")
        print(f"ratio lunarl/brax: {result['ratio']:.2f} (wall), {result['ratio_cpu']:.2f} (process CPU time)")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
