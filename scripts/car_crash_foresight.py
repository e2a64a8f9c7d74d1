"""How a Dreamer car_track policy ends its episodes, and whether its world model sees the obstacle coming.

    python scripts/car_crash_foresight.py RUN_DIR [--checkpoint best|latest|ITER] [--episodes 64]
        [--first-track-seed 1000000] [--lookahead 0,3,6,10,15] [--out FILE.json]

Each held-out track (``eval_unseen_tracks.track_keys``) is driven once by the evaluated policy,
deterministically, as ``eval_unseen_tracks`` drives it. Per training seed this prints:

* how the episodes end: a lap, off the track, on an obstacle, or at the time limit; their mean
  length, speed (share of ``max_speed``) and |steering|;
* the world model's foresight of the obstacle hits: for every episode that ends on an obstacle at
  step ``c``, the posterior is filtered over the real observations up to step ``c - k``, the real
  actions ``c - k .. c`` are imagined forward open-loop through the prior, and the continue head
  gives P(terminal) at ``c`` (the reward head, the predicted reward there: the real one is
  ``-crash_penalty`` plus that step's progress). The control is the same read at a mid-episode
  step that did not end the episode.
* the escape the model sees: the lower P(terminal) of the same window with the steering set to
  full left or full right throughout (the real throttle). Where it is no lower than the real
  actions', imagination gives the actor no gradient away from the hit. At the default car's top
  speed (turning radius 50) a sideways move of obstacle plus car radius (12) takes ~7 steps of
  full steering, so ``k`` of about 6-10 is where an escape exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lunarl
from lunarl.agents.dreamer import agent as dreamer
from lunarl.agents.dreamer.world_model import WorldModelNet, observe, rollout_prior
from lunarl.run.restore import checkpoint_dir_of, restore_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_unseen_tracks import track_keys  # noqa: E402

OUTCOMES = ("lap", "off_track", "obstacle", "time_limit")
READS = ("p_terminal_at_hit", "p_terminal_swerve", "p_terminal_control", "reward_at_hit", "reward_control")


def drive_and_read(env, cfg, params, keys: jax.Array, lookahead: tuple[int, ...]) -> dict[str, jax.Array]:
    """One seed's held-out episodes ([E] each, [K, E] for the P(terminal) reads)."""
    policy = dreamer.make_policy(env, cfg)
    nets = dreamer.nets(env, cfg)
    net = nets.world_model
    wp = params["world_model"]
    n, length = keys.shape[0], cfg.episode_length
    state = jax.vmap(env.reset)(keys)

    def step(carry, key):
        state, policy_carry, is_first, alive = carry
        action, next_carry = policy.act(params, state.obs, policy_carry, is_first, key, True)
        nxt = jax.vmap(env.step)(state, action)
        m = nxt.metrics
        out = (alive, state.obs, action, nxt.obs, nxt.pipeline_state.speed, m["success"], m["off_track"], m["collision"])
        # Freeze finished episodes (no auto-reset: one episode per track).
        keep = lambda new, old: jnp.where(alive.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
        carry = (jax.tree.map(keep, nxt, state), jax.tree.map(keep, next_carry, policy_carry),
                 jnp.zeros_like(is_first), alive & (nxt.done < 0.5))  # fmt: skip
        return carry, out

    start = (state, policy.initial_carry(n), jnp.ones(n, bool), jnp.ones(n, bool))
    _, (alive, obs, action, next_obs, speed, lap, off, hit) = jax.lax.scan(
        step, start, jax.random.split(jax.random.PRNGKey(0), length)
    )
    live = alive.astype(jnp.float32)
    ended = lambda flag: (flag * live).sum(0) > 0  # noqa: E731
    steps = live.sum(0).astype(jnp.int32)
    last = steps - 1
    control = jnp.maximum(last // 2, 1)

    rows = dreamer.Step(
        obs=obs, is_first=jnp.zeros((length, n)).at[0].set(1.0), action=action, reward=jnp.zeros((length, n)),
        next_obs=next_obs, terminated=jnp.zeros((length, n)),
    )  # fmt: skip
    latent = observe(net, wp, rows, jax.random.PRNGKey(1), cfg.unimix).latent  # [T, E]: of next_obs[t]
    episodes = jnp.arange(n)

    def imagined_outcome(at: jax.Array, k: int, steering: float | None = None) -> tuple[jax.Array, jax.Array]:
        begin = jnp.maximum(at - k, 1)
        first = jax.tree.map(lambda x: x[begin - 1, episodes], latent)  # the latent of obs[begin]
        window = jax.vmap(lambda e, b: jax.lax.dynamic_slice(action[:, e], (b, 0), (k + 1, action.shape[-1])))(
            episodes, jnp.minimum(begin, length - k - 1)
        )
        if steering is not None:  # the real throttle, full steering from the window's start
            window = window.at[..., 0].set(steering)
        imagined = rollout_prior(net, wp, first, jnp.swapaxes(window, 0, 1), jax.random.PRNGKey(2), cfg.unimix)
        reward, cont = net.apply(wp, imagined.feat[-1], method=WorldModelNet.reward_and_cont)
        return 1.0 - jax.nn.sigmoid(cont), nets.twohot.decode(reward)

    lap_end, off_end, hit_end = ended(lap), ended(off), ended(hit)
    at_hit = jax.tree.map(lambda *x: jnp.stack(x), *[imagined_outcome(last, k) for k in lookahead])
    at_control = jax.tree.map(lambda *x: jnp.stack(x), *[imagined_outcome(control, k) for k in lookahead])
    # The escape the model sees: the lower P(terminal) of swerving left or right instead.
    swerve = jnp.stack([jnp.minimum(imagined_outcome(last, k, -1.0)[0], imagined_outcome(last, k, 1.0)[0])
                        for k in lookahead])  # fmt: skip
    return {
        "lap": lap_end,
        "off_track": off_end & ~lap_end,
        "obstacle": hit_end & ~off_end & ~lap_end,
        "time_limit": ~(lap_end | off_end | hit_end),
        "length": steps,
        "speed": (speed * live).sum(0) / steps / env.config.max_speed,
        "abs_steering": (jnp.abs(action[..., 0]) * live).sum(0) / steps,
        # Only reads whose window lies inside the episode count (see ``readable`` below).
        "readable": jnp.stack([last >= k + 1 for k in lookahead]),
        **dict(zip(("p_terminal_at_hit", "reward_at_hit"), at_hit, strict=True)),
        **dict(zip(("p_terminal_control", "reward_control"), at_control, strict=True)),
        "p_terminal_swerve": swerve,
    }


def _mean_where(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(np.mean(values[mask])) if mask.any() else None


def summarise(read: dict[str, np.ndarray], lookahead: tuple[int, ...]) -> dict:
    row = {f"share_{o}": float(np.mean(read[o])) for o in OUTCOMES}
    row |= {name: float(np.mean(read[name])) for name in ("length", "speed", "abs_steering")}
    foresight = []
    for i, k in enumerate(lookahead):
        hits = read["obstacle"] & read["readable"][i]
        foresight.append({"lookahead": k, "obstacle_hits": int(hits.sum()),
                          **{key: _mean_where(read[key][i], hits) for key in READS}})  # fmt: skip
    return row | {"foresight": foresight}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="best", help="best | latest | an iteration number")
    parser.add_argument("--episodes", type=int, default=64, help="held-out tracks (one episode each)")
    parser.add_argument("--first-track-seed", type=int, default=1_000_000)
    parser.add_argument("--lookahead", default="0,3,6,10,15", help="steps before the hit the imagination starts")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: RUN_DIR/crash-foresight-*.json)")
    args = parser.parse_args(argv)
    try:
        lookahead = tuple(int(k) for k in args.lookahead.split(","))
    except ValueError:
        lookahead = (-1,)
    if min(lookahead) < 0:
        print(f"car_crash_foresight: --lookahead={args.lookahead!r} must be non-negative integers", file=sys.stderr)
        return 1

    saved = restore_run(checkpoint_dir_of(args.run_dir), args.checkpoint)
    plan, env, meta = saved.plan, saved.env, saved.meta
    if plan.env_name != "car_track" or plan.agent_name != "dreamer":
        print(f"car_crash_foresight: needs a Dreamer car_track run ({args.run_dir} is {plan.agent_name} on "
              f"{plan.env_name})", file=sys.stderr)  # fmt: skip
        return 1
    cfg = plan.agent_config
    if max(lookahead) + 2 > cfg.episode_length:
        print(f"car_crash_foresight: --lookahead={args.lookahead!r} needs episodes longer than {max(lookahead) + 1} "
              f"steps (agent.episode_length={cfg.episode_length})", file=sys.stderr)  # fmt: skip
        return 1

    keys = track_keys(args.first_track_seed, args.episodes)
    params = jax.vmap(saved.agent.policy_params)(saved.state)  # leading seed axis
    read = jax.jit(jax.vmap(lambda p: drive_and_read(env, cfg, p, keys, lookahead)),
                   compiler_options=lunarl.compile_options(env))(params)  # fmt: skip
    read = jax.tree.map(np.asarray, jax.device_get(read))
    per_seed = [summarise(jax.tree.map(lambda x, i=i: x[i], read), lookahead) for i in range(plan.cfg.num_seeds)]
    report = {
        "run_dir": str(args.run_dir),
        "checkpoint": args.checkpoint,
        "iteration": meta["iteration"],
        "global_step": meta["global_step"],
        "track_seeds": [args.first_track_seed, args.first_track_seed + args.episodes - 1],
        "per_seed": per_seed,
    }
    out = args.out or args.run_dir / f"crash-foresight-{args.checkpoint}-{meta['iteration']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    fmt = lambda v: "  -" if v is None else f"{v:.2f}"  # noqa: E731
    for i, row in enumerate(per_seed):
        ends = ", ".join(f"{o} {row['share_' + o]:.0%}" for o in OUTCOMES)
        print(f"seed {i} @ {meta['global_step']:,} env steps, {args.episodes} tracks: {ends}; length "
              f"{row['length']:.0f}, speed {row['speed']:.2f}, |steering| {row['abs_steering']:.2f}")  # fmt: skip
        hits = row["foresight"][0]["obstacle_hits"]
        print(f"    at its {hits} obstacle hits, imagined from k steps before: P(terminal) [swerving] (control "
              "steps), reward (control steps)")  # fmt: skip
        for f in row["foresight"]:
            print(f"      k = {f['lookahead']:2d}: {fmt(f['p_terminal_at_hit'])} [{fmt(f['p_terminal_swerve'])}] "
                  f"({fmt(f['p_terminal_control'])}), {fmt(f['reward_at_hit'])} ({fmt(f['reward_control'])})")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
