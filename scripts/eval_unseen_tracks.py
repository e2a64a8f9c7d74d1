"""Evaluate a trained car_track run on held-out tracks: explicit track seeds training never used.

    python scripts/eval_unseen_tracks.py RUN_DIR [--checkpoint best|latest|ITER]
        [--episodes 1000] [--first-track-seed 1000000] [--out FILE.json] [--live-actor]
    python scripts/eval_unseen_tracks.py RUN_DIR --checkpoints 24,32,40 [--episodes 256] [--out ...]

What "unseen" means here. With ``env.track_seed=None`` (how car_track trains) ``CarTrack.reset(rng)``
draws the track from ``rng`` itself, so ``reset(PRNGKey(s))`` drives exactly the track that
``env.track_seed=s`` fixes (checked below for the first few seeds). This script drives track seeds
``first_track_seed, first_track_seed + 1, ...``: keys ``PRNGKey(s) = [0, s]``. Training's reset
keys are all split from ``PRNGKey(seed)`` by Threefry, i.e. uniformly spread 64-bit keys, so the
chance that any of a run's ~10^5 training resets equals one of these 1,000 keys is ~10^-11; and the
in-loop evaluation (keys salted with ``0x5EED``) draws from its own split stream, so the
checkpoint chosen as "best" was not selected on these tracks either.

Each track is driven once, deterministically (policy mean), for at most the agent's
``episode_length`` steps with no auto-reset (``lunarl.run.evaluation.rollout`` with these reset
keys); success = a lap completed. Prints and writes the summary
(``lunarl.run.evaluation.summarize``) per training seed.

``--live-actor``: a Dreamer run with ``agent.actor_ema_rate > 0`` is evaluated with the average of
its actor (what ``policy_params`` returns); this drives the live actor of the same checkpoint
instead, with the same world model, so the two can be compared on the same training.

``--checkpoints ITER,ITER,...``: a learning curve. Every listed checkpoint is driven by both
actors (``evaluated`` and ``live``; the same actor where the run keeps no average) on the same
tracks, through one compiled program, and the JSON holds one row per checkpoint with each
actor's success rate and mean return per training seed (the
``bench_dreamer/car_track_unseen_*_pair_*.json`` files of ``scripts/results/dreamer.md``).
``--checkpoint`` and ``--live-actor`` do not apply there.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lunarl
from lunarl.envs.base import LunarEnv
from lunarl.run.checkpoint import CheckpointError
from lunarl.run.evaluation import rollout, summarize
from lunarl.run.restore import SavedRun, checkpoint_dir_of, restore_run


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


def add_run_arguments(parser: argparse.ArgumentParser, episodes: int) -> None:
    """The arguments every held-out-track script takes: the run, its checkpoint and the tracks."""
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="best", help="best | latest | an iteration number")
    parser.add_argument("--episodes", type=int, default=episodes, help="held-out tracks (one episode each)")
    parser.add_argument("--first-track-seed", type=int, default=1_000_000)


def restore_car_run(args: argparse.Namespace, script: str) -> SavedRun | None:
    """The run's checkpoint, if it is a car_track run trained on drawn tracks whose reset keys are
    the held-out track seeds; otherwise ``None`` after a one-line error naming the script."""
    try:
        saved = restore_run(checkpoint_dir_of(args.run_dir), args.checkpoint)
    except CheckpointError as e:
        print(f"{script}: {e}", file=sys.stderr)
        return None
    if saved.plan.env_name != "car_track" or saved.plan.env_config.track_seed is not None:
        print(f"{script}: needs a car_track run trained with env.track_seed=null ({args.run_dir})", file=sys.stderr)
        return None
    check_keys_are_track_seeds(saved.env, args.first_track_seed)
    return saved


def parse_iterations(text: str) -> list[int]:
    """``"24,32,40"`` -> ``[24, 32, 40]``; ``ValueError`` naming the flag otherwise."""
    try:
        iterations = [int(part) for part in text.split(",")]
    except ValueError:
        iterations = []
    if not iterations or min(iterations) < 0:
        raise ValueError(f"--checkpoints={text!r}: expected checkpoint iterations such as 24,32,40")
    return iterations


def live_actor_params(saved: SavedRun, evaluated: dict[str, Any]) -> dict[str, Any] | None:
    """``evaluated`` (``policy_params`` per seed) with the live actor in place of its average;
    ``None`` for a run that keeps no average (PPO, SAC, Dreamer with ``actor_ema_rate`` 0)."""
    if "actor_ema" not in saved.state.params:
        return None
    return {**evaluated, "actor": saved.state.params["actor"]}


def held_out_driver(saved: SavedRun, keys: jax.Array) -> Callable[[Any], dict[str, jax.Array]]:
    """A compiled ``params (leading seed axis) -> rollout results`` on the tracks of ``keys``:
    each track once, deterministically, for at most the agent's ``episode_length`` steps."""
    plan, env = saved.plan, saved.env
    policy = saved.agent.make_policy(env, plan.agent_config)
    # The act key is unused by the deterministic policy; the reset keys pick the tracks.
    drive = lambda p: rollout(  # noqa: E731
        env, policy, p, jax.random.PRNGKey(0), keys.shape[0], plan.agent_config.episode_length, True, reset_keys=keys
    )
    return jax.jit(jax.vmap(drive), compiler_options=lunarl.compile_options(env))


def score_both_actors(saved: SavedRun, drive: Callable[[Any], dict[str, jax.Array]]) -> dict[str, Any]:
    """One checkpoint's row: the success rate and mean return of every seed, by the evaluated
    actor (``policy_params``) and by the live one, each driven by ``drive(params)``; both names
    drive one actor where the run keeps no average. Printed as one line."""
    evaluated = jax.vmap(saved.agent.policy_params)(saved.state)
    live = live_actor_params(saved, evaluated) or evaluated
    row: dict[str, Any] = {"iteration": saved.meta["iteration"], "global_step": saved.meta["global_step"]}
    for name, params in (("evaluated", evaluated), ("live", live)):
        summary = summarize(jax.device_get(drive(params)))
        row[name] = [round(float(x), 4) for x in np.ravel(summary["success_rate"])]
        row[f"{name}_return"] = [round(float(x), 4) for x in np.ravel(summary["episode_return"])]
    print(
        f"{row['global_step']:,} env steps: success per seed, evaluated "
        + " ".join(f"{x:.1%}" for x in row["evaluated"]) + ", live " + " ".join(f"{x:.1%}" for x in row["live"]),
        flush=True,
    )
    return row


def evaluate_checkpoints(args: argparse.Namespace, iterations: list[int]) -> int:
    """``--checkpoints``: each listed checkpoint, by the evaluated and the live actor."""
    keys = track_keys(args.first_track_seed, args.episodes)
    rows, drive = [], None
    for iteration in iterations:
        saved = restore_car_run(argparse.Namespace(**{**vars(args), "checkpoint": str(iteration)}), "eval_unseen_tracks")
        if saved is None:
            return 1
        drive = drive or held_out_driver(saved, keys)  # one program for every checkpoint and both actors
        rows.append({**score_both_actors(saved, drive), "episodes": args.episodes})
    report = {
        "run_dir": str(args.run_dir),
        "track_seeds": [args.first_track_seed, args.first_track_seed + args.episodes - 1],
        "deterministic": True,
        "rows": rows,
    }
    out = args.out or args.run_dir / f"eval-unseen-checkpoints-{iterations[0]}-{iterations[-1]}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"saved {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, episodes=1000)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: RUN_DIR/eval-unseen-*.json)")
    parser.add_argument("--live-actor", action="store_true", help="Dreamer with an actor EMA: drive the live actor")
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="ITER,ITER,...: each of these checkpoints by the evaluated and the live actor (instead of --checkpoint)",
    )
    args = parser.parse_args(argv)
    if args.checkpoints is not None:
        try:
            iterations = parse_iterations(args.checkpoints)
        except ValueError as e:
            print(f"eval_unseen_tracks: {e}", file=sys.stderr)
            return 1
        return evaluate_checkpoints(args, iterations)

    saved = restore_car_run(args, "eval_unseen_tracks")
    if saved is None:
        return 1
    plan, agent, meta = saved.plan, saved.agent, saved.meta
    params = jax.vmap(agent.policy_params)(saved.state)  # leading seed axis
    if args.live_actor:
        params = live_actor_params(saved, params)
        if params is None:
            print(f"eval_unseen_tracks: --live-actor needs a Dreamer run with agent.actor_ema_rate > 0 ({args.run_dir})", file=sys.stderr)
            return 1
    result = jax.device_get(held_out_driver(saved, track_keys(args.first_track_seed, args.episodes))(params))
    summary = summarize(result)
    per_seed = [{k: v[i].item() for k, v in summary.items()} for i in range(plan.cfg.num_seeds)]
    report = {
        "run_dir": str(args.run_dir),
        "checkpoint": args.checkpoint,
        "iteration": meta["iteration"],
        "global_step": meta["global_step"],
        "track_seeds": [args.first_track_seed, args.first_track_seed + args.episodes - 1],
        "deterministic": True,
        "actor": "live" if args.live_actor else "evaluated",
        "per_seed": per_seed,
        "all_seeds": {k: v.item() for k, v in summarize({k: np.ravel(v) for k, v in result.items()}).items()},
    }
    out = args.out or args.run_dir / f"eval-unseen-{args.checkpoint}-{meta['iteration']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for i, row in enumerate(per_seed):
        print(
            f"seed {i} @ {meta['global_step']:,} env steps, {row['num_episodes']} unseen tracks "
            f"(track seeds {args.first_track_seed}..{args.first_track_seed + args.episodes - 1}): "
            f"success {row['success_rate']:.1%}, return {row['episode_return']:.2f} ± {row['episode_return_std']:.2f}, "
            f"length {row['episode_length']:.1f}"
        )
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
