"""Pins the rover spec (DESIGN.md, seed 000): rewards, the scripted task, contacts, the frustum sensor.

States are built by hand from a reset state with ``.replace`` so each test controls the layout.
``reset``/``step``/``observe`` are jitted once per module and shared.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lunarl
from lunarl.envs.rover import BERM, CONSTRUCTION, EXCAVATION, NUM_DETECTIONS, Rover, RoverConfig

STEP_COST = np.float32(-0.01)


@pytest.fixture(scope="module")
def env() -> Rover:
    return lunarl.envs.make("rover")


@pytest.fixture(scope="module")
def fns(env):
    return jax.jit(env.reset), jax.jit(env.step), jax.jit(env.observe)


def _place(env, fns, state, **fields):
    """``state`` with pipeline-state fields replaced (values cast to the fields' dtypes) and obs recomputed."""
    ps = state.pipeline_state
    cast = {
        k: jnp.asarray(v, dtype=getattr(ps, k).dtype).reshape(getattr(ps, k).shape) for k, v in fields.items()
    }
    ps = ps.replace(**cast)
    return state.replace(pipeline_state=ps, obs=fns[2](ps))


def _open_layout(env, fns, state, **fields):
    """A hand layout with a clear path: rocks along the bottom wall, craters along the top wall,
    orbs in a column inside the excavation zone, the rover at rest in the start zone facing +x."""
    c = env.config
    nr, nc = c.num_rocks, c.num_craters
    ox = np.concatenate([np.linspace(2.4, 4.4, nr), np.linspace(2.6, 4.2, nc)])
    oy = np.concatenate([np.full(nr, 0.35), np.full(nc, 4.6)])
    base = dict(
        x=1.0,
        y=3.75,
        vx=0.0,
        vy=0.0,
        heading=0.0,
        omega=0.0,
        obstacle_x=ox,
        obstacle_y=oy,
        rock_r=np.full(nr, 0.2),
        orb_x=np.full(c.num_orbs, 5.6),
        orb_y=np.linspace(2.6, 3.4, c.num_orbs),
        orb_alive=np.ones(c.num_orbs, bool),
    )
    base.update(fields)
    return _place(env, fns, state, **base)


@pytest.fixture(scope="module")
def start(env, fns):
    return fns[0](jax.random.PRNGKey(0))


def _ps(state):
    return jax.tree.map(np.asarray, state.pipeline_state)


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def test_standing_still_pays_exactly_the_step_cost(env, fns, start):
    state = start
    for _ in range(3):
        before = _ps(state)
        state = fns[1](state, jnp.zeros(3))
        assert state.reward == STEP_COST
        assert state.reward.dtype == jnp.float32 and state.done == 0.0
        after = _ps(state)
        assert (after.x, after.y, after.heading) == (before.x, before.y, before.heading)


def test_entering_excavation_pays_once(env, fns, start):
    x0 = env.zones.excavation.x0
    state = _open_layout(env, fns, start, x=x0 - 0.05, y=2.0)
    rewards, zones = [], []
    for _ in range(6):
        before = _ps(state)
        state = fns[1](state, jnp.array([1.0, 0.0, 0.0]))
        rewards.append(float(state.reward))
        zones.append(int(state.obs[6]))
        if zones[-1] == EXCAVATION and len([z for z in zones if z == EXCAVATION]) == 1:
            # The entry step: +10, the step cost and the last bit of progress toward the zone.
            assert rewards[-1] == pytest.approx(-0.01 + 10.0 + (x0 - before.x), abs=1e-5)
    entries = [r for r in rewards if r > 5.0]
    assert len(entries) == 1, rewards
    assert zones[-1] == EXCAVATION
    # Inside the zone there is no more shaping toward it: only the step cost.
    assert rewards[-1] == pytest.approx(-0.01, abs=1e-6)


def _scripted_action(ps, env) -> np.ndarray:
    """Drive to the nearest orb, dig it, carry it to the construction zone, dig again (reads the true state)."""
    c = env.config
    x, y, h = float(ps.x), float(ps.y), float(ps.heading)
    fx, fy = x + 0.5 * c.rover_length * math.cos(h), y + 0.5 * c.rover_length * math.sin(h)
    zone = int(env.zones.zone_id(jnp.float32(x), jnp.float32(y)))
    if not ps.holding:
        alive = np.flatnonzero(ps.orb_alive)
        d = np.hypot(ps.orb_x[alive] - fx, ps.orb_y[alive] - fy)
        i = alive[np.argmin(d)]
        tx, ty, dist = float(ps.orb_x[i]), float(ps.orb_y[i]), float(d.min())
        dig = dist < 0.8 * c.dig_reach
    else:
        con = env.zones.construction
        tx, ty = 0.5 * (con.x0 + con.x1), 0.5 * (con.y0 + con.y1)
        dist = math.hypot(tx - x, ty - y)
        inside = zone in (CONSTRUCTION, BERM)
        dig = inside
        dist = 0.0 if inside else dist
    err = (math.atan2(ty - y, tx - x) - h + math.pi) % (2 * math.pi) - math.pi
    turn = float(np.clip(3.0 * err, -1.0, 1.0))
    speed = float(np.clip(0.8 * dist, 0.0, 1.0)) * (abs(err) < 0.5)
    return np.array([speed, turn, 1.0 if dig else -1.0], np.float32)


def test_scripted_controller_collects_carries_and_deposits(env, fns, start):
    state = _open_layout(env, fns, start)
    log = []
    for _ in range(400):
        before = _ps(state)
        state = fns[1](state, jnp.asarray(_scripted_action(before, env)))
        after = _ps(state)
        log.append(
            (
                before,
                after,
                float(state.reward),
                float(state.done),
                dict(state.metrics),
                np.asarray(state.obs),
            )
        )
        if state.done:
            break
    assert log[-1][3] == 1.0, "the scripted controller should deposit (and end the episode) within 400 steps"
    rewards = np.array([r for _, _, r, _, _, _ in log])
    # Exactly one excavation bonus.
    entered = [i for i, (b, a, *_) in enumerate(log) if not b.visited_excavation and a.visited_excavation]
    assert len(entered) == 1 and rewards[entered[0]] == pytest.approx(10.0 - 0.01, abs=0.3)
    # The collect step: +50, holding flag 1 in the observation, the orb is gone.
    collect = [i for i, (b, a, *_) in enumerate(log) if not b.holding and a.holding]
    assert len(collect) == 1
    i = collect[0]
    assert rewards[i] == pytest.approx(50.0 - 0.01, abs=1e-4)  # inside the excavation zone: no shaping
    assert log[i][5][7] == 1.0
    assert log[i][1].orb_alive.sum() == env.config.num_orbs - 1
    assert log[i][4]["orbs_collected"] == 1.0
    # First entry into the construction zone while holding: +100 (plus a little progress shaping).
    con = [i for i, (b, a, *_) in enumerate(log) if not b.visited_construction and a.visited_construction]
    assert len(con) == 1 and con[0] > collect[0]
    assert rewards[con[0]] == pytest.approx(100.0 - 0.01, abs=0.3)
    # The deposit: +200, success, the episode terminates.
    last = log[-1]
    assert rewards[-1] == pytest.approx(200.0 - 0.01, abs=1e-4)
    assert last[4]["success"] == 1.0 and last[4]["deposits"] == 1.0 and not last[1].holding
    assert last[4]["rock_hits"] == 0.0 and last[4]["wall_hits"] == 0.0
    # Nothing else paid a bonus.
    others = np.delete(rewards, [entered[0], collect[0], con[0], len(rewards) - 1])
    assert np.all(np.abs(others) < 1.0)


def test_driving_into_a_wall_pays_minus_five_and_stays_inside(env, fns, start):
    c = env.config
    state = _open_layout(env, fns, start, x=c.arena_width - 0.6, y=2.5, heading=0.0, visited_excavation=True)
    hits = []
    for _ in range(20):
        state = fns[1](state, jnp.array([1.0, 0.0, 0.0]))
        ps = _ps(state)
        # The rotated rectangle (heading 0: half length along x) stays inside the arena.
        assert ps.x + 0.5 * c.rover_length <= c.arena_width + 1e-5
        assert 0.0 <= ps.y <= c.arena_height
        hits.append(float(state.reward))
    wall_steps = [r for r in hits if r < -1.0]
    assert wall_steps, hits
    # In the excavation zone (already visited): only the step cost and the wall penalty.
    assert wall_steps[0] == pytest.approx(-5.0 - 0.01, abs=1e-5)
    assert float(state.metrics["wall_hits"]) == len(wall_steps)


def test_hitting_a_rock_pays_minus_ten_and_does_not_pass_through(env, fns, start):
    c = env.config
    nr = c.num_rocks
    rock_y, r = 3.0, 0.25
    state = _open_layout(env, fns, start, x=3.0, y=2.0, heading=math.pi / 2)
    ox = np.asarray(state.pipeline_state.obstacle_x).copy()
    oy = np.asarray(state.pipeline_state.obstacle_y).copy()
    ox[0], oy[0] = 3.0, rock_y
    state = _place(env, fns, state, obstacle_x=ox, obstacle_y=oy, rock_r=np.r_[r, np.full(nr - 1, 0.2)])
    rewards = []
    for _ in range(20):
        state = fns[1](state, jnp.array([1.0, 0.0, 0.0]))
        rewards.append(float(state.reward))
        ps = _ps(state)
        # Front edge of the body (heading +y) never goes deeper than one step's travel into the rock.
        assert ps.y + 0.5 * c.rover_length <= rock_y - r + 1e-3
    hit = [x for x in rewards if x < -1.0]
    assert hit, rewards
    # Driving along +y leaves the distance to the excavation zone unchanged: no shaping.
    assert hit[0] == pytest.approx(-10.0 - 0.01, abs=1e-4)
    assert float(state.metrics["rock_hits"]) == len(hit)


def test_progress_shaping(env, fns, start):
    c = env.config
    exc, con = env.zones.excavation, env.zones.construction
    # Empty: progress toward the excavation zone, weight shaping_excavation.
    state = _open_layout(env, fns, start, x=3.0, y=2.5, heading=0.3)
    for _ in range(3):
        b = _ps(state)
        state = fns[1](state, jnp.array([0.7, 0.2, 0.0]))
        a = _ps(state)
        expected = -0.01 + c.shaping_excavation * ((exc.x0 - b.x) - (exc.x0 - a.x))
        assert float(state.reward) == pytest.approx(expected, abs=1e-5)
    # Holding: progress toward the construction zone (distance to its rectangle), weight shaping_construction.
    state = _open_layout(env, fns, start, x=3.0, y=3.0, heading=math.pi + 0.5, holding=True)
    for _ in range(3):
        b = _ps(state)
        state = fns[1](state, jnp.array([0.8, 0.0, 0.0]))
        a = _ps(state)
        d = lambda p: math.hypot(max(p.x - con.x1, 0.0), max(p.y - con.y1, 0.0))  # noqa: E731
        expected = -0.01 + c.shaping_construction * (d(b) - d(a))
        assert d(a) < d(b)
        assert float(state.reward) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Sensor
# ---------------------------------------------------------------------------------------------


def _detections(obs, which):
    block = np.asarray(obs[8:18] if which == "obstacles" else obs[18:28]).reshape(NUM_DETECTIONS, 2)
    return block[:, 0], block[:, 1]


def test_frustum_keeps_only_objects_ahead_in_range_and_fov(env, fns, start):
    c = env.config  # fov 90 deg, range 3 m
    nr, nc = c.num_rocks, c.num_craters
    x, y = 3.0, 2.5
    # (distance, bearing) of the obstacles, heading 0 (+x), bearing positive to the left.
    placed = {
        "ahead": (1.0, 0.0),
        "left_30": (2.0, math.radians(30)),
        "right_40": (1.5, math.radians(-40)),
        "behind": (1.0, math.pi),
        "out_of_range": (3.2, 0.0),
        "outside_fov": (1.2, math.radians(60)),
    }
    ox = np.full(nr + nc, -50.0)  # the rest far behind
    oy = np.full(nr + nc, y)
    for i, (d, b) in enumerate(placed.values()):
        ox[i], oy[i] = x + d * math.cos(b), y + d * math.sin(b)
    orb_x = np.full(c.num_orbs, -50.0)
    orb_y = np.full(c.num_orbs, y)
    orb_x[:3], orb_y[:3] = x + 0.5, y + 0.1  # three orbs in view, the first two already dug up
    orb_x[2] = x + 0.6
    alive = np.ones(c.num_orbs, bool)
    alive[:2] = False
    state = _place(
        env,
        fns,
        start,
        x=x,
        y=y,
        heading=0.0,
        obstacle_x=ox,
        obstacle_y=oy,
        orb_x=orb_x,
        orb_y=orb_y,
        orb_alive=alive,
    )
    dist, bearing = _detections(state.obs, "obstacles")
    expected = sorted([placed["ahead"], placed["right_40"], placed["left_30"]])
    np.testing.assert_allclose(dist[:3], [d for d, _ in expected], atol=1e-5)
    np.testing.assert_allclose(bearing[:3], [b for _, b in expected], atol=1e-4)
    np.testing.assert_array_equal(dist[3:], c.sentinel)
    np.testing.assert_array_equal(bearing[3:], 0.0)
    odist, obear = _detections(state.obs, "orbs")
    assert odist[0] == pytest.approx(math.hypot(0.6, 0.1), abs=1e-5)
    assert obear[0] == pytest.approx(math.atan2(0.1, 0.6), abs=1e-4)
    np.testing.assert_array_equal(odist[1:], c.sentinel)
    # Turn around: now only what was behind is visible.
    state = _place(env, fns, state, heading=math.pi - 1e-3)
    dist, bearing = _detections(state.obs, "obstacles")
    assert dist[0] == pytest.approx(1.0, abs=1e-5) and abs(bearing[0]) < 1e-2
    np.testing.assert_array_equal(dist[1:], c.sentinel)


def test_detections_sorted_in_frustum_and_padded(env):
    c = env.config

    @jax.jit
    def rollout(key):
        keys = jax.random.split(key, 128)
        state = jax.vmap(env.reset)(keys)

        def body(s, k):
            a = jax.random.uniform(k, (128, 3), minval=-1.0, maxval=1.0)
            s = jax.vmap(env.step)(s, a)
            return s, s.obs

        return jax.lax.scan(body, state, jax.random.split(key, 30))[1]

    obs = np.asarray(rollout(jax.random.PRNGKey(3))).reshape(-1, env.observation_size)
    seen = 0
    for block in (obs[:, 8:18], obs[:, 18:28]):
        pairs = block.reshape(-1, NUM_DETECTIONS, 2)
        dist, bearing = pairs[..., 0], pairs[..., 1]
        found = dist != c.sentinel
        seen += found.sum()
        # Found slots come first, nearest first; the rest read (sentinel, 0).
        assert np.all(found[:, 1:] <= found[:, :-1])
        assert np.all(np.where(found[:, 1:], np.diff(dist, axis=1) >= 0.0, True))
        assert np.all(np.where(found, (dist >= 0.0) & (dist <= c.sensor_range + 1e-5), bearing == 0.0))
        assert np.all(np.abs(bearing[found]) <= math.radians(c.fov_deg) / 2 + 1e-4)
    assert seen > 1000, "random layouts should put plenty of objects in view"


# ---------------------------------------------------------------------------------------------
# Layout, config, render
# ---------------------------------------------------------------------------------------------


def test_random_layouts_respect_the_zone_map(env):
    c, z = env.config, env.zones
    ps = jax.tree.map(
        np.asarray, jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(7), 512)).pipeline_state
    )
    assert np.all((ps.x > z.start.x0) & (ps.x < z.start.x1) & (ps.y > z.start.y0) & (ps.y < z.start.y1))
    f = z.obstacle_field
    assert np.all(
        (ps.obstacle_x > f.x0) & (ps.obstacle_x < f.x1) & (ps.obstacle_y > f.y0) & (ps.obstacle_y < f.y1)
    )
    e = z.excavation
    assert np.all((ps.orb_x > e.x0) & (ps.orb_x < e.x1) & (ps.orb_y > e.y0) & (ps.orb_y < e.y1))
    assert np.all((ps.rock_r >= c.rock_radius_min) & (ps.rock_r <= c.rock_radius_max))
    # Rocks never overlap one another, and layouts differ between keys.
    nr = c.num_rocks
    dx = ps.obstacle_x[:, :nr, None] - ps.obstacle_x[:, None, :nr]
    dy = ps.obstacle_y[:, :nr, None] - ps.obstacle_y[:, None, :nr]
    gap = np.hypot(dx, dy) - (ps.rock_r[:, :, None] + ps.rock_r[:, None, :])
    gap[:, np.arange(nr), np.arange(nr)] = np.inf
    assert gap.min() > 0.0
    assert len(np.unique(ps.orb_x[:, 0])) > 500 and len(np.unique(ps.heading)) > 500


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_rocks": -1}, "num_rocks"),
        ({"fov_deg": 200.0}, "fov_deg"),
        ({"max_speed": 0.0}, "max_speed"),
        ({"substeps": 2.5}, "substeps"),
        ({"excavation_width": 5.0}, "excavation_width"),
        ({"rock_radius_min": 0.5, "rock_radius_max": 0.3}, "rock_radius_min"),
        ({"not_a_field": 1}, "not_a_field"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        lunarl.envs.make("rover", **overrides)


def test_config_overrides_apply():
    env = lunarl.envs.make("rover", num_rocks=3, num_orbs=4, terminate_on_deposit=False)
    assert isinstance(env.config, RoverConfig)
    state = jax.jit(env.reset)(jax.random.PRNGKey(0))
    assert state.pipeline_state.rock_r.shape == (3,) and state.pipeline_state.orb_x.shape == (4,)
    assert state.obs.shape == (28,)


def test_render_returns_uint8_frame(env, start):
    frame = env.render(start)
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert frame.shape[0] > 100 and frame.shape[1] > 100
    assert len(np.unique(frame.reshape(-1, 3), axis=0)) > 5
