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
SWERVE_STEPS, ESCAPE_SAMPLES = 8, 16
READS = ("p_terminal_at_hit", "p_terminal_swerve", "p_terminal_control", "reward_at_hit", "reward_control")


def drive_and_read(
    env, cfg, params, critic_params, keys: jax.Array, lookahead: tuple[int, ...], escape_k: int
) -> dict[str, jax.Array]:
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

    def imagined_return(at: jax.Array, steering: float | None) -> jax.Array:
        """The actor's objective from the latent ``escape_k`` steps before ``at``: the lambda-return
        of ``cfg.horizon`` imagined steps (model rewards and continues, the critic's bootstrap),
        acting with the actor, or with its throttle and full ``steering`` for the first
        ``SWERVE_STEPS``; the mean over ``ESCAPE_SAMPLES`` rollouts [E]."""
        begin = jnp.maximum(at - escape_k, 1)
        start = jax.tree.map(lambda x: jnp.repeat(x[begin - 1, episodes], ESCAPE_SAMPLES, axis=0), latent)

        def act(latent_now, xs):
            t, key = xs
            k_action, k_stoch = jax.random.split(key)
            mean, std = nets.actor.apply(params["actor"], latent_now.feat)
            chosen, _ = behavior.sample_action(k_action, mean, std)
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

    def swerve_scores_higher(at: jax.Array) -> jax.Array:
        best = jnp.maximum(imagined_return(at, -1.0), imagined_return(at, 1.0))
        return best > imagined_return(at, None)

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
        "escape_readable": last >= escape_k + 1,
        "swerve_better_at_hit": swerve_scores_higher(last),
        "swerve_better_control": swerve_scores_higher(control),
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
    hits = read["obstacle"] & read["escape_readable"]
    escape = {"obstacle_hits": int(hits.sum())}
    escape |= {key: _mean_where(read[key].astype(np.float32), hits) for key in ESCAPE_READS}
    return row | {"foresight": foresight, "escape": escape}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(parser, episodes=64)
    parser.add_argument("--lookahead", default="0,3,6,10,15", help="steps before the hit the imagination starts")
    parser.add_argument("--escape-lookahead", type=int, default=10, help="steps before the hit the escape read starts")
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
    read = jax.jit(jax.vmap(lambda p, c: drive_and_read(env, cfg, p, c, keys, lookahead, args.escape_lookahead)),
                   compiler_options=lunarl.compile_options(env))(params, critic)  # fmt: skip
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
        e = row["escape"]
        print(f"    a swerve scores above the actor's own plan in its imagined objective, from "
              f"{args.escape_lookahead} steps before: at {fmt(e['swerve_better_at_hit'])} of {e['obstacle_hits']} hits "
              f"({fmt(e['swerve_better_control'])} at the control steps)")  # fmt: skip
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
