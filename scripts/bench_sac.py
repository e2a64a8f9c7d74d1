"""lunarl SAC vs Brax's SAC trainer on the same lunarl env, side by side in one process.

Both train for the same number of env steps with matched settings: num_envs, batch size, gradient
steps per vectorised env step (lunarl ``utd_ratio`` = Brax ``grad_updates_per_step``), network
sizes and activation (one size for actor and critics, as Brax has one), learning rate, discount,
tau, reward scaling, observation normalisation, replay capacity, and the warm-up (lunarl
``warmup_steps`` = Brax ``min_replay_size``, rounded to whole lunarl iterations). Both use
lunarl's training wrappers (fresh randomised resets). What remains different is each trainer's
own: Brax prefills with its initial policy and lunarl with uniform actions; Brax drops truncated
steps from the critic loss while lunarl bootstraps from the final observation; Brax updates the
actor against the critics before their update, lunarl after it.

Each run is split into ``--chunks`` equal chunks; the first one also holds the warm-up (prefill)
and the compilation, so for both

* steps/s = env steps of one chunk / median wall time of chunks 2.. (compile excluded),
* updates/s = gradient steps of one chunk / the same time, and
* compile time = first chunk's wall time - median chunk time (so it includes the warm-up steps),

for Brax from its own ``training/walltime`` (which starts before its prefill) reported through
``progress_fn``. Brax evaluates after every chunk with one env, outside its timed region and
outside its CPU-time window (process CPU time from one ``progress_fn`` call to the start of the
next evaluation, marked by wrapping Brax's ``Evaluator.run_evaluation``). Returns
are of the deterministic policy of each (tanh of the mean) on the same ``--eval-episodes`` reset
keys, one episode each, by this script's own rollout. The pair runs ``--repeats`` times,
alternating, and the headline numbers are medians (the ratio is the median of per-pair ratios).
Both trainers compile with the same XLA flags (``lunarl._platform.set_process_fusion_emitters``).

With ``--full-replay`` the warm-up fills the whole replay (warm-up = capacity, rounded up to
whole iterations), so every timed chunk runs with a full buffer: the steady state of any run
longer than its replay. That is where the two buffers differ: lunarl's ring buffer writes each
row in place, while Brax's ``UniformSamplingQueue`` makes room for every insert into a full
buffer by rolling all of it (``jnp.roll`` of the whole ``[max_replay_size, ...]`` array). The
"compile" figure then includes the fill.

    python scripts/bench_sac.py                        # car_track, 64 envs, [256, 256]
    python scripts/bench_sac.py --full-replay          # the same with the 1 M replay full
    python scripts/bench_sac.py --env rover --num-envs 128 --set utd_ratio=0.5
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
import jax.numpy as jnp
from bench_ppo import _chunk_stats  # noqa: E402  (the scripts directory is on sys.path)

import lunarl
from lunarl._platform import set_process_fusion_emitters
from lunarl.agents import sac
from lunarl.agents.base import stateless
from lunarl.envs import LunarEnv, config_class, env_class, make, wrap_for_training
from lunarl.run.evaluation import rollout, summarize


def bench_config(env: LunarEnv, num_envs: int, sets: list[str]) -> sac.SACConfig:
    """The benchmark's SAC settings with ``--set FIELD=VALUE`` overrides; the warm-up is rounded
    up to whole iterations. Raises ``ValueError`` naming a bad field."""
    overrides: dict[str, typing.Any] = dict(
        num_envs=num_envs, episode_length=env.default_episode_length, unroll_length=8, warmup_steps=4096
    )
    overrides.update(sac.SACConfig.parse_overrides(sets))
    cfg = sac.SACConfig.build(**overrides)
    if cfg.actor_hidden != cfg.critic_hidden:
        raise ValueError("actor_hidden and critic_hidden must be equal (Brax's SAC has one hidden_layer_sizes)")
    if cfg.utd_ratio != int(cfg.utd_ratio) or cfg.utd_ratio < 1:
        raise ValueError(f"utd_ratio={cfg.utd_ratio} must be a whole number >= 1 (Brax's grad_updates_per_step)")
    per_iter = cfg.env_steps_per_iteration
    return cfg.replace(warmup_steps=-(-cfg.warmup_steps // per_iter) * per_iter)


def run_lunarl(env: LunarEnv, cfg: sac.SACConfig, chunks: int, chunk_iters: int, seed: int):
    """(state, steps/s, compile s, chunk wall times, chunk CPU times); the warm-up iterations run
    inside the first chunk's timing."""
    opts = lunarl.compile_options(env)

    def run_chunk(ts):
        return jax.lax.scan(lambda s, _: sac.train_step(s), ts, None, length=chunk_iters)

    init = jax.jit(lambda k: sac.init(k, env, cfg), compiler_options=opts)
    warm_fn = jax.jit(sac.train_step, donate_argnums=0, compiler_options=opts)
    chunk_fn = jax.jit(run_chunk, donate_argnums=0, compiler_options=opts)
    ts = jax.block_until_ready(init(jax.random.PRNGKey(seed)))
    warm_iters = cfg.warmup_steps // cfg.env_steps_per_iteration
    times, cpu_times = [], []
    for chunk in range(chunks):
        start, cpu_start = time.perf_counter(), time.process_time()
        if chunk == 0:
            for _ in range(warm_iters):
                ts, _ = warm_fn(ts)
        ts, metrics = chunk_fn(ts)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    sps, compile_s = _chunk_stats(times, chunk_iters * cfg.env_steps_per_iteration)
    return ts, sps, compile_s, times, cpu_times


def run_brax(env: LunarEnv, cfg: sac.SACConfig, chunks: int, chunk_iters: int, seed: int):
    """(policy fn for ``greedy_eval``, its params, steps/s, compile s, chunk wall and CPU times)."""
    from brax.training import acting
    from brax.training.agents.sac import networks as brax_networks
    from brax.training.agents.sac import train as brax_sac

    from lunarl.agents.networks import ACTIVATIONS

    walltimes: list[float] = []
    cpu_times: list[float] = []
    # CPU time of each training epoch alone: from the end of the previous progress call (or the
    # start) to the start of the next evaluation, which Brax runs between epoch and progress call
    # and leaves out of its ``training/walltime`` too.
    cpu_marks = {"epoch_start": time.process_time(), "eval_start": 0.0}
    run_evaluation = acting.Evaluator.run_evaluation

    def timed_evaluation(self, *args, **kwargs):
        cpu_marks["eval_start"] = time.process_time()
        return run_evaluation(self, *args, **kwargs)

    def progress(step: int, metrics: dict) -> None:
        if "training/walltime" in metrics:
            walltimes.append(float(metrics["training/walltime"]))
            cpu_times.append(cpu_marks["eval_start"] - cpu_marks["epoch_start"])
        cpu_marks["epoch_start"] = time.process_time()

    chunk_steps = chunk_iters * cfg.env_steps_per_iteration
    acting.Evaluator.run_evaluation = timed_evaluation
    try:
        make_inference, params, _ = brax_sac.train(
            environment=env,
            num_timesteps=cfg.warmup_steps + chunks * chunk_steps,
            episode_length=cfg.episode_length,
            wrap_env_fn=lambda e, episode_length, action_repeat, randomization_fn=None: wrap_for_training(
                e, episode_length, action_repeat
            ),
            num_envs=cfg.num_envs,
            num_eval_envs=1,
            learning_rate=cfg.learning_rate,
            discounting=cfg.gamma,
            seed=seed,
            batch_size=cfg.batch_size,
            num_evals=chunks + 1,
            normalize_observations=cfg.normalize_observations,
            reward_scaling=cfg.reward_scaling,
            tau=cfg.tau,
            min_replay_size=cfg.warmup_steps,
            max_replay_size=cfg.buffer_size,
            grad_updates_per_step=int(cfg.utd_ratio),
            network_factory=functools.partial(
                brax_networks.make_sac_networks,
                hidden_layer_sizes=cfg.actor_hidden,
                activation=ACTIVATIONS[cfg.activation],
            ),
            progress_fn=progress,
        )
    finally:
        acting.Evaluator.run_evaluation = run_evaluation
    times = [walltimes[0]] + [b - a for a, b in itertools.pairwise(walltimes)]
    sps, compile_s = _chunk_stats(times, chunk_steps)

    def policy(p, obs):
        return make_inference(p, deterministic=True)(obs, jax.random.PRNGKey(0))[0]

    return policy, params, sps, compile_s, times, cpu_times


def greedy_eval(env: LunarEnv, policy: typing.Callable, params: typing.Any, key: jax.Array, episodes: int, length: int):
    """Mean return and success rate of one deterministic episode per env, through lunarl's one
    evaluation rollout (``lunarl.run.evaluation``), for both trainers' policies."""
    act = stateless(lambda p, obs, rng, deterministic: policy(p, obs))
    out = jax.jit(lambda p: rollout(env, act, p, key, episodes, length))(params)
    summary = summarize(out)
    return {"return_mean": float(summary["episode_return"]), "success_rate": float(summary["success_rate"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="car_track")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--total-steps", type=int, default=131_072, help="env steps after the warm-up (whole chunks)")
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side lunarl/Brax pairs; medians are reported")
    parser.add_argument("--chunks", type=int, default=4, help="timed chunks per run; the first one compiles")
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-brax", action="store_true")
    parser.add_argument("--full-replay", action="store_true", help="warm up until the replay is full (see above)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="SACConfig override (repeatable)")
    parser.add_argument(
        "--env-set", action="append", default=[], metavar="FIELD=VALUE", help="env config override (repeatable)"
    )
    parser.add_argument("--out", default="bench_results/bench_sac.json")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} is out of range: allowed >= 1")
    if args.chunks < 2:
        raise SystemExit(f"--chunks={args.chunks} is out of range: allowed >= 2 (the first one compiles)")
    emitters = set_process_fusion_emitters(getattr(env_class(args.env), "cpu_fusion_emitters", False))
    try:
        env_overrides = config_class(args.env).parse_overrides(args.env_set)
        env = make(args.env, **env_overrides)
    except ValueError as e:
        raise SystemExit(f"--env-set: {e}") from e
    try:
        cfg = bench_config(env, args.num_envs, args.set)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from e
    per_iter = cfg.env_steps_per_iteration
    if args.full_replay:
        # Brax asserts max_replay_size >= min_replay_size, so both become the rounded-up fill.
        fill = -(-cfg.buffer_size // per_iter) * per_iter
        cfg = cfg.replace(buffer_size=fill, warmup_steps=fill)
    chunk_iters = max(1, round(args.total_steps / (args.chunks * per_iter)))
    total_steps = cfg.warmup_steps + args.chunks * chunk_iters * per_iter
    chunk_updates = chunk_iters * cfg.updates_per_iteration
    print(
        f"env={args.env} total_steps={total_steps} (warm-up {cfg.warmup_steps} + {args.chunks} chunks x "
        f"{chunk_iters} iterations of {per_iter}), {args.repeats} repeats, XLA:CPU fusion emitters "
        f"{'on' if emitters else 'off'} for both trainers"
    )
    print(f"config: {cfg}")
    # Spelled out because ``--set actor_hidden=128`` means one layer of 128 (a v5 run was that by mistake).
    print(f"networks: actor {list(cfg.actor_hidden)}, critics {list(cfg.critic_hidden)} (hidden layer widths)")
    eval_key = jax.random.PRNGKey(10_000 + args.seed)
    lunarl_policy = sac.make_policy(env, cfg)

    def lunarl_greedy(params, obs):
        return lunarl_policy.act(params, obs, (), jnp.zeros(obs.shape[:1], bool), jax.random.PRNGKey(0), True)[0]

    result: dict[str, typing.Any] = {
        "env": args.env,
        "total_steps": total_steps,
        "chunks": args.chunks,
        "chunk_iterations": chunk_iters,
        "chunk_env_steps": chunk_iters * per_iter,
        "chunk_gradient_steps": chunk_updates,
        "repeats": args.repeats,
        "xla_cpu_fusion_emitters": emitters,
        "full_replay": args.full_replay,
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

    for repeat in range(args.repeats):
        run: dict[str, typing.Any] = {}
        ts, sps, compile_s, times, cpu = run_lunarl(env, cfg, args.chunks, chunk_iters, args.seed)
        ev = greedy_eval(env, lunarl_greedy, sac.policy_params(ts), eval_key, args.eval_episodes, cfg.episode_length)
        run.update(
            lunarl_sps=sps,
            lunarl_ups=sps / per_iter * cfg.updates_per_iteration,
            lunarl_compile_s=compile_s,
            lunarl_chunk_s=times,
            lunarl_sps_cpu=chunk_iters * per_iter / statistics.median(cpu[1:]),
            lunarl_return=ev["return_mean"],
            lunarl_success=ev["success_rate"],
        )
        print(f"[{repeat}] lunarl: {sps:,.0f} steps/s, compile {compile_s:.1f}s, chunks {[round(t, 2) for t in times]}, eval {ev}", flush=True)
        if not args.skip_brax:
            b_policy, b_params, sps, compile_s, times, cpu = run_brax(env, cfg, args.chunks, chunk_iters, args.seed)
            ev = greedy_eval(env, b_policy, b_params, eval_key, args.eval_episodes, cfg.episode_length)
            run.update(
                brax_sps=sps,
                brax_ups=sps / per_iter * cfg.updates_per_iteration,
                brax_compile_s=compile_s,
                brax_chunk_s=times,
                brax_sps_cpu=chunk_iters * per_iter / statistics.median(cpu[1:]),
                brax_return=ev["return_mean"],
                brax_success=ev["success_rate"],
            )
            run.update(ratio=run["lunarl_sps"] / run["brax_sps"], ratio_cpu=run["lunarl_sps_cpu"] / run["brax_sps_cpu"])
            print(f"[{repeat}] brax:   {sps:,.0f} steps/s, compile {compile_s:.1f}s, chunks {[round(t, 2) for t in times]}, eval {ev}", flush=True)
            print(f"[{repeat}] ratio lunarl/brax {run['ratio']:.2f} (wall), {run['ratio_cpu']:.2f} (CPU time)", flush=True)
        result["runs"].append(run)
        for key in run:
            if not key.endswith("_chunk_s"):
                result[key] = statistics.median(r[key] for r in result["runs"])
        out.write_text(json.dumps(result, indent=2))

    print(f"\nmedians of {args.repeats} side-by-side repeats, {total_steps} env steps each")
    print(f"{'':10s}{'steps/s':>12s}{'updates/s':>11s}{'compile s':>11s}{'return':>10s}{'success':>9s}")
    for name in ("lunarl", "brax"):
        if f"{name}_sps" in result:
            print(
                f"{name:10s}{result[f'{name}_sps']:12,.0f}{result[f'{name}_ups']:11,.0f}{result[f'{name}_compile_s']:11.1f}"
                f"{result[f'{name}_return']:10.2f}{result[f'{name}_success']:9.2f}"
            )
    if "ratio" in result:
        print(f"ratio lunarl/brax: {result['ratio']:.2f} (wall), {result['ratio_cpu']:.2f} (process CPU time)")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
