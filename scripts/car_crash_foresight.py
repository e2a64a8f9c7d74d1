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
* whether the actor's own objective prefers the escape: from the latent ``--escape-lookahead``
  steps before each hit, the imagined lambda-return (the agent's horizon, the model's rewards and
  continues, the critic's bootstrap; 16 samples) of the actor's own plan against full left or
  right steering for the first 8 steps (the actor's throttle, then the actor). The share of hits
  where a swerve scores higher, against the same share at the control steps: well above the
  control means the actor has not learned what its own imagination rewards there.
* which way the actor's own gradient pushes there: the slope of the same objective (divided by
  the run's return scale, as the actor loss is) in a steering offset added to the actor's sampled
  steering for the first 8 steps (before the clip, as training samples it), through the model,
  the critic and the actor's reaction at later steps, at offset 0. Reported: its size at hits and
  at control steps, the share of hits (where a swerve scores higher) at which it points toward
  the better swerve, and the imagined gain of moving the offset 0.25 along it. A slope that points
  the wrong way or gains nothing means the objective's local gradient does not lead to the escape
  that a full swerve finds; a slope that points to it means the actor's update is not following it.
  ``--actor live`` reads the actor training updates instead of the evaluated one (its EMA copy).
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
from lunarl.agents.dreamer import behavior
from lunarl.agents.dreamer.world_model import (
    Latent,
    WorldModelNet,
    observe,
    rollout_prior,
    sample_stoch,
    unimix_logits,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_unseen_tracks import add_run_arguments, restore_car_run, track_keys  # noqa: E402

OUTCOMES = ("lap", "off_track", "obstacle", "time_limit")
ESCAPE_READS = ("swerve_better_at_hit", "swerve_better_control")
SWERVE_STEPS, ESCAPE_SAMPLES, SMALL_OFFSET, OFFSETS = 8, 16, 0.25, (0.25, 0.5, 1.0)
READS = ("p_terminal_at_hit", "p_terminal_swerve", "p_terminal_control", "reward_at_hit", "reward_control")


def drive_and_read(
    env, cfg, params, critic_params, keys: jax.Array, lookahead: tuple[int, ...], escape_k: int,
    read_actor: dict | None = None, return_scale: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
    """One seed's held-out episodes ([E] each, [K, E] for the P(terminal) reads). ``read_actor``:
    the actor whose objective the escape and slope reads score (default: the driving one)."""
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
    read_actor = params["actor"] if read_actor is None else read_actor

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

    def imagined_return(at: jax.Array, steering: float | None, offset: jax.Array | float = 0.0) -> jax.Array:
        """The actor's objective from the latent ``escape_k`` steps before ``at``: the lambda-return
        of ``cfg.horizon`` imagined steps (model rewards and continues, the critic's bootstrap),
        acting with the actor, or with its throttle and full ``steering`` for the first
        ``SWERVE_STEPS``, or with ``offset`` ([E] or a number) added to its raw steering sample
        there; the mean over ``ESCAPE_SAMPLES`` rollouts [E]."""
        shift = jnp.repeat(jnp.broadcast_to(offset, (n,)), ESCAPE_SAMPLES)
        begin = jnp.maximum(at - escape_k, 1)
        start = jax.tree.map(lambda x: jnp.repeat(x[begin - 1, episodes], ESCAPE_SAMPLES, axis=0), latent)

        def act(latent_now, xs):
            t, key = xs
            k_action, k_stoch = jax.random.split(key)
            mean, std = nets.actor.apply(read_actor, latent_now.feat)
            noise = jax.random.normal(k_action, mean.shape)
            noise = noise.at[:, 0].add(jnp.where(t < SWERVE_STEPS, shift, 0.0) / std[:, 0])
            chosen, _ = behavior.sample_action(k_action, mean, std, noise)
            if steering is not None:
                chosen = jnp.where(t < SWERVE_STEPS, chosen.at[:, 0].set(steering), chosen)
            deter, prior = net.apply(wp, latent_now.deter, latent_now.stoch, chosen, method=WorldModelNet.img_step)
            stoch = sample_stoch(k_stoch, unimix_logits(prior, cfg.dims.classes, cfg.unimix))
            return Latent(deter, stoch), latent_now.feat

        horizon = jnp.arange(cfg.horizon)
        end, feats = jax.lax.scan(act, start, (horizon, jax.random.split(jax.random.PRNGKey(3), cfg.horizon)))
        feat = jnp.concatenate([feats, end.feat[None]], axis=0)
        reward, cont = net.apply(wp, feat[1:], method=WorldModelNet.reward_and_cont)
        value = nets.twohot.decode(nets.critic.apply(critic_params, feat))
        ret = behavior.lambda_returns(nets.twohot.decode(reward), jax.nn.sigmoid(cont), value, cfg.gamma, cfg.lam)
        return ret[0].reshape(n, ESCAPE_SAMPLES).mean(axis=1)

    def escape_and_slope(at: jax.Array) -> dict[str, jax.Array]:
        """Whether a swerve scores above the actor's plan; the normalised objective's slope in the
        steering offset, whether it points to the better swerve, and the gain of a ``SMALL_OFFSET``
        step along it; the gains of ``OFFSETS`` toward that swerve and of the swerve (all [E])."""
        base, slope = jax.jvp(lambda o: imagined_return(at, None, o), (jnp.zeros(n),), (jnp.ones(n),))
        step = SMALL_OFFSET * jnp.sign(slope)
        left, right = imagined_return(at, -1.0), imagined_return(at, 1.0)
        side = jnp.where(right > left, 1.0, -1.0)
        gains = {f"offset_{o}_gain": (imagined_return(at, None, o * side) - base) / return_scale for o in OFFSETS}
        return {"swerve_better": jnp.maximum(left, right) > base, "slope": slope / return_scale, "toward_swerve": (slope > 0) == (right > left),
                "small_step_gain": (imagined_return(at, None, step) - base) / return_scale,
                "swerve_gain": (jnp.maximum(left, right) - base) / return_scale, **gains}

    lap_end, off_end, hit_end = ended(lap), ended(off), ended(hit)
    read_hit, read_control = escape_and_slope(last), escape_and_slope(control)
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
        "escape_readable": last >= escape_k + 1,
        **{f"{k}_at_hit": v for k, v in read_hit.items()},
        **{f"{k}_control": v for k, v in read_control.items()},
    }


def _mean_where(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(np.mean(values[mask])) if mask.any() else None


def _median_where(values: np.ndarray, mask: np.ndarray) -> float | None:
    return float(np.median(values[mask])) if mask.any() else None


def summarise(read: dict[str, np.ndarray], lookahead: tuple[int, ...]) -> dict:
    row = {f"share_{o}": float(np.mean(read[o])) for o in OUTCOMES}
    row |= {name: float(np.mean(read[name])) for name in ("length", "speed", "abs_steering")}
    foresight = []
    for i, k in enumerate(lookahead):
        hits = read["obstacle"] & read["readable"][i]
        foresight.append({"lookahead": k, "obstacle_hits": int(hits.sum()),
                          **{key: _mean_where(read[key][i], hits) for key in READS}})  # fmt: skip
    hits = read["obstacle"] & read["escape_readable"]
    escape = {"obstacle_hits": int(hits.sum())}
    escape |= {key: _mean_where(read[key].astype(np.float32), hits) for key in ESCAPE_READS}
    better = hits & read["swerve_better_at_hit"]
    slope = {
        "hits_swerve_better": int(better.sum()),
        "abs_slope_at_hit": _median_where(np.abs(read["slope_at_hit"]), hits),
        "abs_slope_control": _median_where(np.abs(read["slope_control"]), read["escape_readable"]),
        "toward_swerve_at_hit": _mean_where(read["toward_swerve_at_hit"].astype(np.float32), better),
        "small_step_gain_at_hit": _mean_where(read["small_step_gain_at_hit"], better),
        "small_step_gain_control": _mean_where(read["small_step_gain_control"], read["escape_readable"]),
        # Along the better swerve's side, at those hits: the objective against the offset's size.
        "gain_by_offset_at_hit": {str(o): _mean_where(read[f"offset_{o}_gain_at_hit"], better) for o in OFFSETS},
        "swerve_gain_at_hit": _mean_where(read["swerve_gain_at_hit"], better),
    }
    return row | {"foresight": foresight, "escape": escape, "slope": slope}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, episodes=64)
    parser.add_argument("--lookahead", default="0,3,6,10,15", help="steps before the hit the imagination starts")
    parser.add_argument("--escape-lookahead", type=int, default=10, help="steps before the hit the escape read starts")
    parser.add_argument("--actor", choices=("evaluated", "live"), default="evaluated",
                        help="the actor whose objective the escape and slope reads score (driving: evaluated)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: RUN_DIR/crash-foresight-*.json)")
    args = parser.parse_args(argv)
    try:
        lookahead = tuple(int(k) for k in args.lookahead.split(","))
    except ValueError:
        lookahead = (-1,)
    if min(lookahead) < 0:
        print(f"car_crash_foresight: --lookahead={args.lookahead!r} must be non-negative integers", file=sys.stderr)
        return 1
    if args.escape_lookahead < 0:
        print(f"car_crash_foresight: --escape-lookahead={args.escape_lookahead} must be non-negative", file=sys.stderr)
        return 1

    saved = restore_car_run(args, "car_crash_foresight")
    if saved is None:
        return 1
    plan, env, meta = saved.plan, saved.env, saved.meta
    if plan.agent_name != "dreamer":
        print(f"car_crash_foresight: needs a Dreamer run ({args.run_dir} is {plan.agent_name})", file=sys.stderr)
        return 1
    cfg = plan.agent_config
    for flag, shown, steps in (("--lookahead", repr(args.lookahead), max(lookahead)),
                               ("--escape-lookahead", args.escape_lookahead, args.escape_lookahead)):  # fmt: skip
        if steps + 2 > cfg.episode_length:
            print(f"car_crash_foresight: {flag}={shown} needs episodes longer than {steps + 1} steps "
                  f"(agent.episode_length={cfg.episode_length})", file=sys.stderr)  # fmt: skip
            return 1

    keys = track_keys(args.first_track_seed, args.episodes)
    params = jax.vmap(saved.agent.policy_params)(saved.state)  # leading seed axis
    critic = saved.state.params["critic"]
    read_actor = saved.state.params["actor"] if args.actor == "live" else params["actor"]
    scale = jax.vmap(lambda norm: norm.scale(cfg.return_norm_limit))(saved.state.return_norm)

    def read_seed(p, c, a, s):
        return drive_and_read(env, cfg, p, c, keys, lookahead, args.escape_lookahead, a, s)

    read = jax.jit(jax.vmap(read_seed), compiler_options=lunarl.compile_options(env))(params, critic, read_actor, scale)
    read = jax.tree.map(np.asarray, jax.device_get(read))
    per_seed = [summarise(jax.tree.map(lambda x, i=i: x[i], read), lookahead) for i in range(plan.cfg.num_seeds)]
    report = {
        "run_dir": str(args.run_dir),
        "checkpoint": args.checkpoint,
        "iteration": meta["iteration"],
        "read_actor": args.actor,
        "escape_lookahead": args.escape_lookahead,
        "return_scale": [float(x) for x in np.asarray(scale)],
        "global_step": meta["global_step"],
        "track_seeds": [args.first_track_seed, args.first_track_seed + args.episodes - 1],
        "per_seed": per_seed,
    }
    out = args.out or args.run_dir / f"crash-foresight-{args.checkpoint}-{meta['iteration']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    fmt = lambda v: "  -" if v is None else f"{v:.3g}"  # noqa: E731
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
        e = row["escape"]
        print(f"    a swerve scores above the actor's own plan in its imagined objective, from "
              f"{args.escape_lookahead} steps before: at {fmt(e['swerve_better_at_hit'])} of {e['obstacle_hits']} hits "
              f"({fmt(e['swerve_better_control'])} at the control steps)")  # fmt: skip
        s = row["slope"]
        print(f"    its normalised objective's slope in steering there: median |slope| {fmt(s['abs_slope_at_hit'])} "
              f"({fmt(s['abs_slope_control'])} at control steps); at the {s['hits_swerve_better']} hits where a "
              f"swerve scores higher it points to that swerve at {fmt(s['toward_swerve_at_hit'])}, and a "
              f"{SMALL_OFFSET} step along it gains {fmt(s['small_step_gain_at_hit'])} "
              f"({fmt(s['small_step_gain_control'])} at control steps)")  # fmt: skip
        by_offset = ", ".join(f"{o} {fmt(g)}" for o, g in s["gain_by_offset_at_hit"].items())
        print(f"    there, offsets toward that swerve gain {by_offset}; the full swerve {fmt(s['swerve_gain_at_hit'])}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
