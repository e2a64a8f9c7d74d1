"""The car track: geometry, ray sensors, progress bookkeeping, a driveable lap, config checks.

Compiled functions are shared through module-scoped fixtures; every test uses small batches.
"""

import math

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import lunarl
from lunarl.envs.car_track import CarTrack, CarTrackConfig, centre_line, track_polylines


@pytest.fixture(scope="module")
def env():
    return CarTrack()


@pytest.fixture(scope="module")
def cfg(env):
    return env.config


@pytest.fixture(scope="module")
def batched(env):
    """Jitted batched reset / step and the whole-track polylines."""
    return {
        "reset": jax.jit(jax.vmap(env.reset)),
        "step": jax.jit(jax.vmap(env.step)),
        "polylines": jax.jit(jax.vmap(lambda track: track_polylines(env.config, track))),
    }


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# --------------------------------------------------------------------------------------------
# A scripted driver that reads the true state: pure pursuit of a point on the centre line a few
# vertices ahead (or behind, to drive the wrong way), shifted to the free side of a nearby obstacle.
# --------------------------------------------------------------------------------------------

LOOKAHEAD = 3


def pursuit(cfg, car, direction):
    ahead = jnp.where(direction > 0, LOOKAHEAD + 1, -LOOKAHEAD)
    aim, tangent = centre_line(cfg, car.track, car.segment + ahead)
    normal = jnp.stack([-tangent[1], tangent[0]])
    if cfg.num_obstacles:
        # Obstacles alongside the stretch from the car to just past the aim point: keep to the
        # other side of the nearest one.
        stretch = car.segment + jnp.arange(-LOOKAHEAD - 2, LOOKAHEAD + 3)
        points, tangents = centre_line(cfg, car.track, stretch)
        normals = jnp.stack([-tangents[:, 1], tangents[:, 0]], -1)
        gap = car.track.obstacles[:, None, :] - points[None]
        dist2 = jnp.sum(gap * gap, -1)
        closest = jnp.argmin(dist2, 1)
        lateral = jnp.sum(jnp.take_along_axis(gap, closest[:, None, None], 1)[:, 0] * normals[closest], -1)
        to_car = jnp.sum((car.track.obstacles - car.pos) ** 2, -1)
        relevant = (jnp.min(dist2, 1) < 30.0**2) & (to_car < 90.0**2)
        first = jnp.argmin(jnp.where(relevant, to_car, jnp.inf))
        lane = jnp.where(relevant.any(), -jnp.sign(lateral[first]) * 0.3 * cfg.track_width, 0.0)
        aim = aim + lane * normal
    to_aim = aim - car.pos
    facing = car.facing
    angle = jnp.arctan2(facing[0] * to_aim[1] - facing[1] * to_aim[0], jnp.dot(facing, to_aim))
    steering = jnp.clip(angle / cfg.steering_rate, -1.0, 1.0)
    # Aim behind: brake, then U-turn towards the wider side of the track (radius 5 at speed 0.5).
    u_turn = jnp.cos(angle) < 0
    towards_centre = -jnp.sign(car.lateral) * jnp.sign(jnp.dot(facing, tangent))  # + = left turn
    turn = jnp.where(jnp.abs(car.lateral) > 5.0, towards_centre, jnp.sign(angle))
    steering = jnp.where(u_turn, jnp.where(car.speed > 0.8, 0.0, turn), steering)
    target_speed = jnp.where(jnp.cos(angle) < 0.8, 0.5, 3.0)
    throttle = jnp.clip((target_speed - car.speed) / cfg.acceleration, -1.0, 1.0)
    return jnp.stack([steering, throttle])


def drive(env, keys, directions):
    """Drive each env with the pursuit controller; ``directions[t]`` is +1 (forward) or -1.

    Envs freeze once done. Returns the final state and per-step [env, time] rewards, done flags,
    successes and segments.
    """

    def episode(key):
        state = env.reset(key)

        def body(state, direction):
            action = pursuit(env.config, state.pipeline_state, direction)
            new = env.step(state, action)
            new = jax.tree.map(lambda old, fresh: jnp.where(state.done > 0, old, fresh), state, new)
            live = 1.0 - state.done
            return new, (
                new.reward * live,
                new.done * live,
                new.metrics["success"] * live,
                new.pipeline_state.segment,
            )

        return jax.lax.scan(body, state, directions)

    return jax.jit(jax.vmap(episode))(keys)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"track_width": -1.0}, "track_width"),
        ({"num_rays": 0}, "num_rays"),
        ({"num_points": 5}, "num_points"),
        ({"track_seed": -3}, "track_seed"),
        ({"steering_rate": 1.0}, "steering_rate"),
        ({"amplitude": 0.9}, "amplitude"),
        ({"obstacle_radius": 18.0}, "obstacle_radius"),  # + car_radius > track_width / 2
        ({"max_speed": 30.0}, "max_speed"),  # skips the projection window
        ({"ray_window": 200}, "ray_window"),  # more than num_points
        ({"field_height": 150.0}, "field_height"),  # no room for a loop
        ({"amplitude": 0.5, "num_harmonics": 8, "harmonic_decay": 0.0}, "amplitude"),  # edges would fold
        ({"rich_observations": 1}, "rich_observations"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        CarTrackConfig.build(**overrides)


def test_observation_sizes():
    assert CarTrack().observation_size == 6
    assert CarTrack(rich_observations=True).observation_size == 9
    assert lunarl.envs.make("car_track", num_rays=7).observation_size == 8


# --------------------------------------------------------------------------------------------
# Track generation
# --------------------------------------------------------------------------------------------


def _segment_distances(points, seg_a, seg_b):
    """Distances [P, S] from points to segments (JAX, for many tracks at once)."""
    vec = seg_b - seg_a
    rel = points[:, None, :] - seg_a[None]
    u = jnp.clip(jnp.sum(rel * vec, -1) / jnp.sum(vec * vec, -1), 0.0, 1.0)
    return jnp.linalg.norm(rel - u[..., None] * vec, axis=-1)


def test_tracks_stay_in_the_field_with_a_drivable_width(env, cfg, batched):
    num_tracks = 2048
    state = batched["reset"](_keys(0, num_tracks))
    centre, left, right = batched["polylines"](state.pipeline_state.track)
    edges = np.concatenate([np.asarray(left), np.asarray(right)], 1)
    assert np.isfinite(edges).all()
    assert (edges[..., 0] >= cfg.margin - 1e-3).all() and (
        edges[..., 0] <= cfg.field_width - cfg.margin + 1e-3
    ).all()
    assert (edges[..., 1] >= cfg.margin - 1e-3).all() and (
        edges[..., 1] <= cfg.field_height - cfg.margin + 1e-3
    ).all()

    @jax.jit
    def clearances(centre, left, right, obstacles):
        def ends(p):
            return p, jnp.roll(p, -1, axis=0)

        (la, lb), (ra, rb), (ca, cb) = ends(left), ends(right), ends(centre)
        edge_a, edge_b = jnp.concatenate([la, ra]), jnp.concatenate([lb, rb])
        # No edge (of either side, anywhere along the loop) comes closer than half the width to
        # any centre-line vertex: the corridor is drivable everywhere and the edges never fold.
        corridor = _segment_distances(centre, edge_a, edge_b).min()
        seg = cb - ca
        seg_len = jnp.linalg.norm(seg, axis=-1)

        # Consecutive edge segments turn by less than 90 degrees (no cusps or loops).
        def turn(a, b):
            d = b - a
            return jnp.min(
                jnp.sum(d * jnp.roll(d, -1, axis=0), -1)
                / (jnp.linalg.norm(d, axis=-1) * jnp.linalg.norm(jnp.roll(d, -1, axis=0), axis=-1))
            )

        obstacle_offset = _segment_distances(obstacles, ca, cb).min(-1)
        return corridor, seg_len.min(), jnp.minimum(turn(la, lb), turn(ra, rb)), obstacle_offset

    corridor, seg_len, turn, obstacle_offset = jax.lax.map(
        lambda args: clearances(*args),
        (centre, left, right, state.pipeline_state.track.obstacles),
        batch_size=64,
    )
    half = cfg.track_width / 2
    assert float(corridor.min()) >= 0.99 * half, (
        f"an edge intrudes into the corridor: {float(corridor.min()):.2f}"
    )
    assert float(seg_len.min()) >= cfg.min_segment_length
    assert float(turn.min()) > 0.0
    # Obstacles sit on the track, off-centre, so that one side keeps a lane.
    assert float(obstacle_offset.max()) <= half and float(obstacle_offset.min()) >= 0.95 * half / 2
    # The generator really varies the shape.
    radius_spread = np.ptp(
        np.linalg.norm(np.asarray(centre) - [cfg.field_width / 2, cfg.field_height / 2], axis=-1), axis=0
    )
    assert radius_spread.max() > 20.0


def test_track_seed_fixes_the_track(batched):
    keys = _keys(1, 3)
    fixed = CarTrack(track_seed=123)
    a = jax.jit(jax.vmap(fixed.reset))(keys).pipeline_state.track
    for leaf in jax.tree.leaves(a):
        assert np.array_equal(np.asarray(leaf)[0], np.asarray(leaf)[1])
        assert np.array_equal(np.asarray(leaf)[0], np.asarray(leaf)[2])
    b = batched["reset"](keys).pipeline_state.track
    assert not np.allclose(np.asarray(b.cos_coef)[0], np.asarray(b.cos_coef)[1])
    other = jax.jit(CarTrack(track_seed=124).reset)(keys[0]).pipeline_state.track
    assert not np.allclose(np.asarray(other.cos_coef), np.asarray(a.cos_coef)[0])


# --------------------------------------------------------------------------------------------
# Sensors
# --------------------------------------------------------------------------------------------


def _reference_rays(cfg, pos, heading, left, right, obstacles):
    """Brute force in float64 (NumPy) over every edge segment of the loop and every obstacle."""
    spread = math.radians(cfg.ray_spread_deg)
    angles = heading + np.linspace(-spread / 2, spread / 2, cfg.num_rays)
    d = np.stack([np.cos(angles), np.sin(angles)], -1)[:, None, :]  # [R, 1, 2]
    a = np.concatenate([left, right])  # [S, 2]
    e = np.concatenate([np.roll(left, -1, 0) - left, np.roll(right, -1, 0) - right])
    w = a - pos
    den = d[..., 0] * e[:, 1] - d[..., 1] * e[:, 0]  # [R, S]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (w[:, 0] * e[:, 1] - w[:, 1] * e[:, 0]) / den
        u = (w[:, 0] * d[..., 1] - w[:, 1] * d[..., 0]) / den
    hit = (np.abs(den) > 1e-12) & (t >= 0) & (u >= 0) & (u <= 1)
    best = np.where(hit, t, cfg.ray_range).min(-1)
    f = pos - obstacles  # [C, 2]
    b = d[:, 0] @ f.T  # [R, C]
    c = (f * f).sum(-1) - cfg.obstacle_radius**2
    disc = b * b - c
    t_circle = np.where(c <= 0, 0.0, -b - np.sqrt(np.maximum(disc, 0.0)))
    best_circle = np.where((disc >= 0) & (t_circle >= 0), t_circle, cfg.ray_range).min(-1)
    return np.minimum(best, best_circle)


def test_rays_match_a_brute_force_reference(env, cfg, batched):
    num_tracks, poses = 6, 24
    n = num_tracks * poses
    state = batched["reset"](jnp.repeat(_keys(2, num_tracks), poses, axis=0))
    rng = np.random.default_rng(0)
    segment = rng.integers(0, cfg.num_points, n)
    fraction = rng.uniform(0, 1, n)
    heading = rng.uniform(-np.pi, np.pi, n)  # any direction, including backwards
    lateral = rng.uniform(-0.95, 0.95, n) * cfg.track_width / 2
    centre, left, right = (
        np.asarray(x, np.float64) for x in batched["polylines"](state.pipeline_state.track)
    )
    rows = np.arange(n)
    a, b = centre[rows, segment], centre[rows, (segment + 1) % cfg.num_points]
    tangent = (b - a) / np.linalg.norm(b - a, axis=-1, keepdims=True)
    pos = a + fraction[:, None] * (b - a) + lateral[:, None] * np.stack([-tangent[:, 1], tangent[:, 0]], -1)
    car = state.pipeline_state.replace(
        pos=jnp.asarray(pos, jnp.float32),
        facing=jnp.asarray(np.stack([np.cos(heading), np.sin(heading)], -1), jnp.float32),
        segment=jnp.asarray(segment, jnp.int32),
        fraction=jnp.asarray(fraction, jnp.float32),
        speed=jnp.zeros(n),
    )
    # A step at rest and without steering leaves the pose unchanged and senses from it.
    stepped = batched["step"](state.replace(pipeline_state=car), jnp.zeros((n, 2)))
    rays = np.asarray(stepped.obs)[:, : cfg.num_rays] * cfg.ray_range
    obstacles = np.asarray(state.pipeline_state.track.obstacles, np.float64)
    expected = np.stack(
        [_reference_rays(cfg, pos[i], heading[i], left[i], right[i], obstacles[i]) for i in range(n)]
    )
    np.testing.assert_allclose(rays, expected, atol=0.05, rtol=1e-3)
    assert (expected < cfg.ray_range).mean() > 0.5, "most rays should hit something"


def test_first_observation_matches_the_brute_force_reference(cfg, batched):
    # Reset senses through a smaller window (the car faces along the track at the start line).
    n = 256
    state = batched["reset"](_keys(8, n))
    _, left, right = (np.asarray(x, np.float64) for x in batched["polylines"](state.pipeline_state.track))
    car = state.pipeline_state
    pos, facing = np.asarray(car.pos, np.float64), np.asarray(car.facing, np.float64)
    obstacles = np.asarray(car.track.obstacles, np.float64)
    heading = np.arctan2(facing[:, 1], facing[:, 0])
    expected = np.stack(
        [_reference_rays(cfg, pos[i], heading[i], left[i], right[i], obstacles[i]) for i in range(n)]
    )
    np.testing.assert_allclose(
        np.asarray(state.obs)[:, : cfg.num_rays] * cfg.ray_range, expected, atol=0.05, rtol=1e-3
    )


# --------------------------------------------------------------------------------------------
# Driving: laps, leaving the track, driving the wrong way
# --------------------------------------------------------------------------------------------


def test_scripted_driver_completes_a_lap_on_random_tracks(env, cfg, batched):
    num_tracks = 20
    keys = _keys(3, num_tracks)
    final, (rewards, dones, successes, _) = drive(env, keys, jnp.ones(env.default_episode_length))
    successes, dones, rewards = np.asarray(successes), np.asarray(dones), np.asarray(rewards)
    assert successes.sum(1).tolist() == [1.0] * num_tracks, "every track must be lapped"
    assert (dones.sum(1) == 1).all()
    assert (
        np.asarray(final.metrics["off_track"]).sum() == 0
        and np.asarray(final.metrics["collision"]).sum() == 0
    )
    # Return = progress over one loop + lap bonus - time cost per step.
    centre = np.asarray(batched["polylines"](batched["reset"](keys).pipeline_state.track)[0], np.float64)
    length = np.linalg.norm(np.roll(centre, -1, 1) - centre, axis=-1).sum(-1)
    steps = np.argmax(dones, 1) + 1
    expected = cfg.progress_weight * length + cfg.lap_bonus - cfg.time_cost * steps
    np.testing.assert_allclose(rewards.sum(1), expected, atol=cfg.progress_weight * cfg.max_speed + 1e-3)


def test_leaving_the_track_ends_the_episode_with_the_penalty(env, cfg):
    @jax.jit
    def run(key):
        state = env.reset(key)

        def body(state, _):
            new = env.step(state, jnp.array([0.4, 1.0]))
            new = jax.tree.map(lambda old, fresh: jnp.where(state.done > 0, old, fresh), state, new)
            return new, (new.reward * (1 - state.done), new.done * (1 - state.done))

        return jax.lax.scan(body, state, None, length=200)

    final, (rewards, dones) = run(jax.random.PRNGKey(4))
    dones, rewards = np.asarray(dones), np.asarray(rewards)
    assert dones.sum() == 1, "the car must leave the track within 200 steps"
    t = int(dones.argmax())
    assert float(final.metrics["off_track"]) == 1.0 and float(final.metrics["success"]) == 0.0
    assert rewards[t] <= -cfg.crash_penalty + cfg.progress_weight * cfg.max_speed
    assert (rewards[:t] > -cfg.crash_penalty / 2).all()


def test_driving_back_and_forth_over_the_start_earns_nothing_net(env, cfg, batched):
    # Wrong way for 150 steps (U-turn, then backwards over the start line), forwards for 300 (back
    # over the start line and on), then the wrong way and forwards again.
    directions = jnp.concatenate([-jnp.ones(150), jnp.ones(300), -jnp.ones(300), jnp.ones(250)])
    keys = _keys(5, 4)
    final, (rewards, dones, successes, segments) = drive(env, keys, directions)
    segments = np.asarray(segments)
    assert np.asarray(dones).sum() == 0, "the driver must stay on the track"
    assert np.asarray(successes).sum() == 0, "no lap may be counted"
    # The start line was crossed in both directions several times.
    crossings = np.abs(np.diff(segments, axis=1)) > cfg.num_points // 2
    assert (crossings.sum(1) >= 3).all()
    # Cumulative progress equals the net displacement from the start line, and so does the
    # progress reward: the signed arc length from the start to where the car ended up.
    car = final.pipeline_state
    position = np.asarray(car.segment) + np.asarray(car.fraction)
    net = (position + cfg.num_points / 2) % cfg.num_points - cfg.num_points / 2
    np.testing.assert_allclose(np.asarray(car.progress), net, atol=1e-2)
    centre = np.asarray(batched["polylines"](batched["reset"](keys).pipeline_state.track)[0], np.float64)
    seg_len = np.linalg.norm(np.roll(centre, -1, 1) - centre, axis=-1)
    cum = np.concatenate([np.zeros((len(keys), 1)), np.cumsum(seg_len, 1)], 1)
    rows = np.arange(len(keys))
    seg, frac = np.asarray(car.segment), np.asarray(car.fraction)
    arc = cum[rows, seg] + frac * seg_len[rows, seg]
    arc = np.where(net < 0, arc - cum[:, -1], arc)
    progress_reward = np.asarray(rewards).sum(1) + cfg.time_cost * len(directions)
    np.testing.assert_allclose(progress_reward, cfg.progress_weight * arc, atol=0.05)


# --------------------------------------------------------------------------------------------
# Observations, Gymnasium, render
# --------------------------------------------------------------------------------------------


def test_rich_observations_at_the_start():
    env = CarTrack(rich_observations=True)
    state = jax.jit(env.reset)(jax.random.PRNGKey(6))
    obs = np.asarray(state.obs)
    assert obs.shape == (9,)
    np.testing.assert_allclose(obs[5:], [0.0, 0.0, 0.0, 1.0], atol=1e-6)  # at rest, centred, aligned
    assert ((obs[:5] > 0) & (obs[:5] <= 1)).all()


def test_gymnasium_checker_passes():
    env = gymnasium.make("lunarl/CarTrack-v0").unwrapped
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (6,)


def test_render_draws_a_frame(env):
    state = jax.jit(env.reset)(jax.random.PRNGKey(7))
    frame = env.render(state)
    assert frame.shape == (360, 480, 3) and frame.dtype == np.uint8
    # Track grey, grass green and the car's white are all there.
    colours = {tuple(c) for c in frame.reshape(-1, 3)[::7]}
    assert (90, 90, 96) in colours and (34, 92, 40) in colours
    assert (frame == 250).all(-1).any()
