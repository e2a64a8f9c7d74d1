"""Evaluate a trained car_track run on held-out tracks: explicit track seeds training never used.

    python scripts/eval_unseen_tracks.py RUN_DIR [--checkpoint best|latest|ITER]
        [--episodes 1000] [--first-track-seed 1000000] [--out FILE.json]

What "unseen" means here. With ``env.track_seed=None`` (how car_track trains) ``CarTrack.reset(rng)``
draws the track from ``rng`` itself, so ``reset(PRNGKey(s))`` drives exactly the track that
``env.track_seed=s`` fixes (checked below for the first few seeds). This script drives track seeds
``first_track_seed, first_track_seed + 1, ...``: keys ``PRNGKey(s) = [0, s]``. Training's reset
keys are all split from ``PRNGKey(seed)`` by Threefry, i.e. uniformly spread 64-bit keys, so the
chance that any of a run's ~10^5 training resets equals one of these 1,000 keys is ~10^-11; and the
in-loop evaluation (keys salted with ``0x5EED``) draws from its own split stream, so the
checkpoint chosen as "best" was not selected on these tracks either.

Each track is driven once, deterministically (policy mean), for at most the agent's
``episode_length`` steps with no auto-reset; success = a lap completed. Prints and writes the
summary (``lunarl.run.evaluation.summarize``) per training seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

import lunarl
from lunarl.envs.base import LunarEnv
from lunarl.run.checkpoint import Checkpoints
from lunarl.run.evaluation import summarize
from lunarl.run.loop import abstract_state
from lunarl.run.schema import validate_train


def track_keys(first_track_seed: int, num_tracks: int) -> jax.Array:
    """``PRNGKey(s)`` for the held-out track seeds ``s`` (keys [num_tracks, 2])."""
    seeds = jnp.arange(first_track_seed, first_track_seed + num_tracks, dtype=jnp.uint32)
    return jax.vmap(jax.random.PRNGKey)(seeds)


def check_keys_are_track_seeds(env: LunarEnv, first_track_seed: int, count: int = 3) -> None:
    """``reset(PRNGKey(s))`` must give the same track as an env built with ``track_seed=s``."""
    for s in range(first_track_seed, first_track_seed + count):
        fixed = type(env)(env.config.replace(track_seed=s))
        a = env.reset(jax.random.PRNGKey(s)).pipeline_state.track
        b = fixed.reset(jax.random.PRNGKey(12345)).pipeline_state.track
        same = jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
        if not same:
            raise AssertionError(f"reset(PRNGKey({s})) does not draw the track of track_seed={s}")


def drive_tracks(env: LunarEnv, policy: Any, params: Any, keys: jax.Array, episode_length: int) -> dict[str, jax.Array]:
    """One deterministic episode per reset key; finished episodes are frozen (first episode only)."""
    n = keys.shape[0]
    state = jax.vmap(env.reset)(keys)
    zeros = jnp.zeros((n,), jnp.float32)
    act_key = jax.random.PRNGKey(0)  # unused by the deterministic policy, but part of its signature

    def step(carry, _):
        state, alive, ret, length, success = carry
        nxt = jax.vmap(env.step)(state, policy(params, state.obs, act_key, True))
        live = alive.astype(jnp.float32)
        ret = ret + live * nxt.reward
        length = length + live
        success = jnp.maximum(success, live * (nxt.metrics["success"] > 0))
        state = jax.tree.map(
            lambda new, old: jnp.where(alive.reshape(alive.shape + (1,) * (new.ndim - 1)), new, old), nxt, state
        )
        return (state, alive & (nxt.done == 0), ret, length, success), None

    carry = (state, jnp.ones((n,), bool), zeros, zeros, zeros)
    (_, _, ret, length, success), _ = jax.lax.scan(step, carry, None, length=episode_length)
    return {"episode_return": ret, "episode_length": length, "success": success}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="best", help="best | latest | an iteration number")
    parser.add_argument("--episodes", type=int, default=1000, help="held-out tracks (one episode each)")
    parser.add_argument("--first-track-seed", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: RUN_DIR/eval-unseen-*.json)")
    args = parser.parse_args(argv)

    config_path = args.run_dir / "config.yaml"
    ckpt_dir = OmegaConf.load(config_path).checkpoint.dir if config_path.exists() else args.run_dir / "checkpoints"
    ckpts = Checkpoints(str(ckpt_dir), create=False)
    try:
        plan = validate_train(OmegaConf.create(ckpts.read(args.checkpoint, "config")))
        if plan.env_name != "car_track" or plan.env_config.track_seed is not None:
            print("eval_unseen_tracks: needs a car_track run trained with env.track_seed=null", file=sys.stderr)
            return 1
        env, agent = plan.env_and_agent()
        state, _, meta = ckpts.restore(args.checkpoint, abstract_state(agent, env, plan.agent_config, plan.cfg.num_seeds))
    finally:
        ckpts.close()

    check_keys_are_track_seeds(env, args.first_track_seed)
    policy = agent.make_policy(env, plan.agent_config)
    params = jax.vmap(agent.policy_params)(state)  # leading seed axis
    keys = track_keys(args.first_track_seed, args.episodes)
    run = jax.jit(
        jax.vmap(lambda p: drive_tracks(env, policy, p, keys, plan.agent_config.episode_length)),
        compiler_options=lunarl.compile_options(env),
    )
    result = jax.device_get(run(params))

    per_seed = [summarize({k: np.asarray(v)[i] for k, v in result.items()}) for i in range(plan.cfg.num_seeds)]
    report = {
        "run_dir": str(args.run_dir),
        "checkpoint": args.checkpoint,
        "iteration": meta["iteration"],
        "global_step": meta["global_step"],
        "track_seeds": [args.first_track_seed, args.first_track_seed + args.episodes - 1],
        "deterministic": True,
        "per_seed": per_seed,
        "all_seeds": summarize(result),
    }
    out = args.out or args.run_dir / f"eval-unseen-{args.checkpoint}-{meta['iteration']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for i, row in enumerate(per_seed):
        print(
            f"seed {i} @ {meta['global_step']:,} env steps, {row['num_episodes']} unseen tracks "
            f"(track seeds {args.first_track_seed}..{args.first_track_seed + args.episodes - 1}): "
            f"success {row['success_rate']:.1%}, return {row['return_mean']:.2f} ± {row['return_std']:.2f}, "
            f"length {row['length_mean']:.1f}"
        )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
