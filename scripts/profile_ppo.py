"""Where a PPO iteration's time goes: the whole ``train_step`` and its parts, each timed alone.

Each part is jitted as a ``lax.scan`` of ``--iterations`` repetitions (compiled the way the
train app compiles, ``lunarl.compile_options``) and timed over ``--repeats`` interleaved rounds;
the table shows medians per iteration and the cores busy (process CPU time / wall time).

* ``iteration``: ``ppo.train_step``, everything;
* ``rollout``: collecting ``unroll_length`` steps of every env (policy, sampling, env, wrappers);
* ``learn``: ``num_epochs`` shuffles and minibatch passes over a batch of the real size;
* ``shuffles``: the ``num_epochs`` permutations and gathers alone (a checksum of the gathered
  batch keeps XLA from dropping them), so the minibatch steps are ``learn`` minus these;
* the rest of the iteration (values, GAE, normaliser, metrics) is ``iteration`` minus the others.

    python scripts/profile_ppo.py                           # rover, the bench_ppo settings
    python scripts/profile_ppo.py --env car_track --num-envs 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
from bench_ppo import bench_config  # the scripts directory is on sys.path when run as a script

import lunarl
from lunarl.agents import ppo
from lunarl.envs import make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="rover")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=16, help="iterations per timed scan")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="PPOConfig override")
    parser.add_argument("--out", default="bench_results/profile_ppo.json")
    args = parser.parse_args()
    if args.iterations < 1 or args.repeats < 1:
        raise SystemExit("--iterations and --repeats must be >= 1")

    env = make(args.env)
    try:
        cfg = bench_config(env, args.num_envs, args.set)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from e
    opts = lunarl.compile_options(env)
    ts = jax.block_until_ready(jax.jit(lambda k: ppo.init(k, env, cfg), compiler_options=opts)(jax.random.PRNGKey(0)))
    net = ppo._network(env, cfg)
    batch = cfg.num_envs * cfg.unroll_length
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    data = ppo._Sample(
        obs=jax.random.normal(keys[0], (batch, ppo._feature_size(env, cfg))),
        action=jnp.zeros((batch, env.action_size)),
        log_prob=jnp.zeros(batch),
        advantage=jax.random.normal(keys[1], (batch,)),
        target=jnp.zeros(batch),
    )

    def shuffles(s: ppo.TrainState) -> ppo.TrainState:
        # What ``_learn`` does per epoch before its minibatch steps: one permutation, one gather.
        def epoch(total: jax.Array, key: jax.Array) -> tuple[jax.Array, None]:
            perm = ppo.shuffled_indices(key, batch)
            gathered = jax.tree.map(lambda x: x[perm], data)
            return total + sum(jnp.sum(x[:: cfg.num_minibatches]) for x in jax.tree.leaves(gathered)), None

        total, _ = jax.lax.scan(epoch, jnp.zeros(()), jax.random.split(s.rng, cfg.num_epochs))
        return s.replace(rng=jax.random.fold_in(s.rng, total.astype(jnp.int32)))

    parts = {
        "iteration": lambda s: ppo.train_step(s)[0],
        "rollout": lambda s: s.replace(env_state=ppo.rollout(s)[0]),
        "learn": lambda s: s.replace(params=ppo._learn(s, net, data, s.rng)[0]),
        "shuffles": shuffles,
    }
    compiled = {}
    for name, part in parts.items():
        scan = jax.jit(
            lambda s, part=part: jax.lax.scan(lambda c, _: (part(c), None), s, None, length=args.iterations)[0],
            compiler_options=opts,
        )
        jax.block_until_ready(scan(ts))
        compiled[name] = scan
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, scan in compiled.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(scan(ts))
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))

    result = {"env": args.env, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
              "device": str(jax.devices()[0]), "jax": jax.__version__, "parts": {}}
    print(f"{args.env}: {cfg.num_envs} envs x {cfg.unroll_length} steps, {cfg.num_minibatches} minibatches x "
          f"{cfg.num_epochs} epochs, medians of {args.repeats} x {args.iterations} iterations on {jax.devices()[0]}")
    print(f"{'part':18s}{'ms/iteration':>14s}{'cores':>8s}")
    for name, samples in times.items():
        wall = statistics.median(w for w, _ in samples) / args.iterations
        cores = statistics.median(c / w for w, c in samples)
        result["parts"][name] = {"ms": 1e3 * wall, "cores": cores}
        print(f"{name:18s}{1e3 * wall:14.2f}{cores:8.2f}")
    p = result["parts"]
    rest = p["iteration"]["ms"] - p["rollout"]["ms"] - p["learn"]["ms"]
    steps = p["learn"]["ms"] - p["shuffles"]["ms"]
    result.update(rest_ms=rest, minibatch_steps_ms=steps, env_steps_per_s=batch / (p["iteration"]["ms"] / 1e3))
    print(f"{'(minibatch steps)':18s}{steps:14.2f}")
    print(f"{'(rest)':18s}{rest:14.2f}   values, GAE, normaliser, metrics")
    print(f"=> {result['env_steps_per_s']:,.0f} env steps/s")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
