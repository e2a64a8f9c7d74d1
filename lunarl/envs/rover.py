"""Lunabotics arena: a differential-drive rover collects regolith orbs and builds a berm.

The task (seed 000): drive from the start zone across an obstacle field of rocks and craters
to the excavation zone, dig up an orb, carry it back to the construction zone and dig again to
deposit it. Everything is a pure function of arrays, so ``jit``/``vmap`` run thousands of arenas
at once.

Zone map (ids as in the observation; default geometry, metres, y up)::

    y=5.0 +-------------+---------------------------+--------------+
          |             |                           |              |
          |   0 start   |                           |              |
          |             |                           |              |
    y=2.5 +-------------+     1 obstacle field      | 2 excavation |
          |  5 (none)   |    rocks and craters      |     orbs     |
    y=2.0 +-------------+                           |              |
          |3 construction                           |              |
          |  +-------+  |                           |              |
          |  |4 berm |  |                           |              |
          |  +-------+  |                           |              |
    y=0.0 +-------------+---------------------------+--------------+
         x=0           2.0                         4.8            6.8

The left column (``left_column_width``) holds the start zone at the top and the construction
zone at the bottom with the berm target centred inside it; the strip between them is zone 5
(in no zone). The right column (``excavation_width``) is the excavation zone; everything in
between is the obstacle field. The berm target is part of the construction zone: depositing
there counts as depositing in the construction zone.

Physics, per action (``substeps`` Euler steps of ``dt``):

* Differential drive: ``action[0]`` is the forward speed and ``action[1]`` the turn rate, scaled
  by ``max_speed`` and ``max_turn_rate``; the wheel speeds ``v -+ w * width / 2`` are clipped to
  ``max_speed`` (so full speed and full turn cannot both be had). Inside a crater both are scaled
  by ``crater_slowdown`` (0 traps the rover). Terrain is read once per action, at its start.
* Ground friction pulls the velocity toward the commanded wheel velocity at rate ``friction``
  (1/s), which also damps sideways sliding after a bounce.
* The rover is a ``rover_length x rover_width`` rectangle. Walls (every substep) clamp the
  rotated rectangle inside the arena and reflect the velocity with ``wall_restitution`` (-5).
  Rocks are circles; rect-circle contacts are resolved once per action at the end pose (the
  rover moves at most 0.13 m per action by default, less than the smallest rock radius, so it
  cannot pass through one): an overlapping rock pushes the rover out along the contact normal
  and removes the velocity into it (-10). The walls are applied once more after the rocks, so
  the rover always stays in the arena.

Sensor: a camera frustum (``fov_deg`` wide, ``sensor_range`` deep) at the rover centre, facing
its heading. It reports (distance, bearing) of the 5 nearest visible rocks/craters and the 5
nearest visible orbs, nearest first, to their centres; bearing is positive to the rover's left.
Empty slots read (``sentinel``, 0).

Observation (28 floats): x, y, vx, vy, heading, angular velocity, zone id, holding flag,
5 x (distance, bearing) of obstacles, 5 x (distance, bearing) of orbs.
Action (3 floats in [-1, 1]): forward speed, turn rate, dig (dig when ``action[2] > 0.5``).

Reward (``rover_reward``; weights in ``RoverConfig``): ``reward_step`` every step;
``reward_enter_excavation`` on the first entry into the excavation zone; ``reward_collect`` for
collecting an orb (dig with nothing held and an alive orb within ``dig_reach`` of the rover's
front; the nearest such orb disappears); ``reward_enter_construction`` on the first entry into
the construction zone while holding an orb; ``reward_deposit`` for digging while holding inside
the construction zone; ``reward_rock_hit`` / ``reward_wall_hit`` for each action during which the
rover touched a rock / wall; progress shaping ``shaping_excavation * (d_before - d_after)`` toward
the excavation zone while empty and ``shaping_construction * (...)`` toward the construction
zone while holding (distance from the rover centre to the zone's rectangle, target chosen by
what was held at the start of the step, so collecting does not cause a jump).

The episode terminates on a deposit when ``terminate_on_deposit`` (the default: one deposit is
the success the task asks for); otherwise the rover can keep collecting until the time limit.

Layouts are randomised per reset: the start pose anywhere in the start zone, rocks and craters
jittered inside the cells of a grid over the obstacle field (one object per cell, the cell
assignment rotated at random, so objects never overlap each other and stay spread out) and orbs
uniform in the excavation zone. The random numbers of a layout come from a counter hash of the
reset key (see ``_layout_uniforms``), because the auto-reset wrapper runs ``reset`` on every step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lunarl.envs.base import EnvConfig, LunarEnv, State, bounded
from lunarl.envs.render import Canvas

__all__ = ["Rover", "RoverConfig", "RoverState", "rover_reward", "ZONE_NAMES"]

#: Zone ids of the observation, in order.
ZONE_NAMES = ("start", "obstacle_field", "excavation", "construction", "berm_target", "none")
START, OBSTACLE_FIELD, EXCAVATION, CONSTRUCTION, BERM, NO_ZONE = range(6)

#: Detections per object class in the observation (fixed by the 28-float layout).
NUM_DETECTIONS = 5
OBSERVATION_SIZE = 8 + 4 * NUM_DETECTIONS


@dataclasses.dataclass(frozen=True)
class RoverConfig(EnvConfig):
    """Parameters of the Lunabotics arena (lengths in metres, times in seconds, angles in radians unless named _deg)."""

    # Arena and zones.
    arena_width: float = bounded(6.8, 2.0, 50.0, "arena extent along x")
    arena_height: float = bounded(5.0, 2.0, 50.0, "arena extent along y")
    left_column_width: float = bounded(2.0, 0.5, 40.0, "width of the start / construction column at x=0")
    excavation_width: float = bounded(2.0, 0.5, 40.0, "width of the excavation column at x=arena_width")
    start_zone_height: float = bounded(2.5, 0.5, 40.0, "height of the start zone, from the top wall")
    construction_zone_height: float = bounded(
        2.0, 0.5, 40.0, "height of the construction zone, from the bottom wall"
    )
    berm_width: float = bounded(1.2, 0.1, 40.0, "berm target size along x, centred in the construction zone")
    berm_height: float = bounded(0.8, 0.1, 40.0, "berm target size along y, centred in the construction zone")

    # Objects.
    num_rocks: int = bounded(7, 0, 64)
    rock_radius_min: float = bounded(0.15, 0.02, 1.0)
    rock_radius_max: float = bounded(0.3, 0.02, 1.0)
    num_craters: int = bounded(3, 0, 64)
    crater_radius: float = bounded(0.35, 0.05, 2.0)
    crater_slowdown: float = bounded(0.3, 0.0, 1.0, "speed factor inside a crater; 0 traps the rover")
    obstacle_margin: float = bounded(
        0.1, 0.0, 1.0, "least clearance between an obstacle and its grid cell's edge"
    )
    num_orbs: int = bounded(15, 1, 256)
    dig_reach: float = bounded(0.3, 0.01, 2.0, "orb pick-up radius around the rover's front centre")

    # Rover.
    rover_length: float = bounded(0.6, 0.05, 3.0)
    rover_width: float = bounded(0.4, 0.05, 3.0, "also the wheel track of the differential drive")
    max_speed: float = bounded(2.0, 0.01, 20.0, "forward speed limit and wheel speed limit (m/s)")
    max_turn_rate: float = bounded(3.0, 0.01, 20.0, "turn-rate limit (rad/s)")
    friction: float = bounded(
        15.0, 0.0, 1000.0, "rate (1/s) at which ground friction pulls the velocity to the wheels'"
    )
    wall_restitution: float = bounded(0.5, 0.0, 1.0)

    # Time.
    dt: float = bounded(1.0 / 60.0, 1e-4, 0.1, "physics time step")
    substeps: int = bounded(4, 1, 64, "physics steps per action")
    terminate_on_deposit: bool = True

    # Sensor.
    fov_deg: float = bounded(90.0, 1.0, 179.0, "camera field of view, degrees")
    sensor_range: float = bounded(3.0, 0.1, 100.0)
    sentinel: float = bounded(
        -1.0, -100.0, 0.0, "distance reported in empty detection slots (bearing reads 0)"
    )

    # Reward weights (defaults from seed 000).
    reward_step: float = bounded(-0.01, -1e3, 1e3)
    reward_enter_excavation: float = bounded(10.0, -1e4, 1e4)
    reward_collect: float = bounded(50.0, -1e4, 1e4)
    reward_enter_construction: float = bounded(100.0, -1e4, 1e4)
    reward_deposit: float = bounded(200.0, -1e4, 1e4)
    reward_rock_hit: float = bounded(-10.0, -1e4, 1e4)
    reward_wall_hit: float = bounded(-5.0, -1e4, 1e4)
    shaping_excavation: float = bounded(1.0, -1e3, 1e3, "per metre of progress toward excavation while empty")
    shaping_construction: float = bounded(
        2.0, -1e3, 1e3, "per metre of progress toward construction while holding"
    )

    def check(self) -> None:
        def fail(field: str, msg: str) -> None:
            raise ValueError(f"RoverConfig.{field}={getattr(self, field)!r}: {msg}")

        if self.left_column_width + self.excavation_width >= self.arena_width:
            fail(
                "excavation_width",
                f"left_column_width + excavation_width must be < arena_width ({self.arena_width})",
            )
        if self.start_zone_height + self.construction_zone_height > self.arena_height:
            fail(
                "construction_zone_height",
                f"start_zone_height + construction_zone_height must be <= arena_height ({self.arena_height})",
            )
        if self.berm_width > self.left_column_width:
            fail("berm_width", f"must be <= left_column_width ({self.left_column_width})")
        if self.berm_height > self.construction_zone_height:
            fail("berm_height", f"must be <= construction_zone_height ({self.construction_zone_height})")
        if self.rock_radius_min > self.rock_radius_max:
            fail("rock_radius_min", f"must be <= rock_radius_max ({self.rock_radius_max})")
        if self.rover_length < self.rover_width:
            fail(
                "rover_length",
                f"must be >= rover_width ({self.rover_width}); the rover drives along its long side",
            )
        diag = math.hypot(self.rover_length, self.rover_width)
        if diag >= min(self.left_column_width, self.start_zone_height):
            fail(
                "rover_length", f"the rover (diagonal {diag:.2f} m) must fit in the start zone in any heading"
            )


@struct.dataclass
class RoverState:
    """Physical state of one arena (struct of arrays: one field per quantity)."""

    x: jax.Array
    y: jax.Array
    vx: jax.Array
    vy: jax.Array
    heading: jax.Array  # radians in [-pi, pi), 0 = +x
    omega: jax.Array  # turn rate of the last action, rad/s
    obstacle_x: jax.Array  # [num_rocks + num_craters]: the rocks, then the craters
    obstacle_y: jax.Array
    rock_r: jax.Array  # [num_rocks]
    orb_x: jax.Array  # [num_orbs]
    orb_y: jax.Array
    orb_alive: jax.Array  # bool [num_orbs]
    holding: jax.Array  # bool
    visited_excavation: jax.Array  # bool: the excavation bonus has been paid
    visited_construction: jax.Array  # bool: the construction bonus has been paid
    orbs_collected: jax.Array  # int32 counters for metrics
    deposits: jax.Array
    rock_hits: jax.Array
    wall_hits: jax.Array


# --------------------------------------------------------------------------------------------
# Reward: the one place the task's incentives are written down
# --------------------------------------------------------------------------------------------


def rover_reward(
    cfg: RoverConfig,
    *,
    entered_excavation: jax.Array,
    collected: jax.Array,
    entered_construction: jax.Array,
    deposited: jax.Array,
    rock_hit: jax.Array,
    wall_hit: jax.Array,
    progress_excavation: jax.Array,
    progress_construction: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total reward of one step and its named terms. Events are bools; progress is metres gained."""
    f32 = lambda b: jnp.asarray(b, jnp.float32)  # noqa: E731
    terms = {
        "step": jnp.float32(cfg.reward_step),
        "enter_excavation": cfg.reward_enter_excavation * f32(entered_excavation),
        "collect": cfg.reward_collect * f32(collected),
        "enter_construction": cfg.reward_enter_construction * f32(entered_construction),
        "deposit": cfg.reward_deposit * f32(deposited),
        "rock_hit": cfg.reward_rock_hit * f32(rock_hit),
        "wall_hit": cfg.reward_wall_hit * f32(wall_hit),
        "progress_excavation": cfg.shaping_excavation * f32(progress_excavation),
        "progress_construction": cfg.shaping_construction * f32(progress_construction),
    }
    total = sum(terms.values(), jnp.float32(0.0))
    return total, terms


# --------------------------------------------------------------------------------------------
# Geometry helpers (scalars per arena; vmap adds the batch)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rect:
    x0: float
    y0: float
    x1: float
    y1: float

    def contains(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return (x >= self.x0) & (x <= self.x1) & (y >= self.y0) & (y <= self.y1)

    def distance(self, x: jax.Array, y: jax.Array) -> jax.Array:
        dx = jnp.maximum(jnp.maximum(self.x0 - x, x - self.x1), 0.0)
        dy = jnp.maximum(jnp.maximum(self.y0 - y, y - self.y1), 0.0)
        return jnp.sqrt(dx * dx + dy * dy)


@dataclasses.dataclass(frozen=True)
class _Zones:
    start: _Rect
    obstacle_field: _Rect
    excavation: _Rect
    construction: _Rect
    berm: _Rect

    @classmethod
    def from_config(cls, c: RoverConfig) -> _Zones:
        w, h = c.arena_width, c.arena_height
        cx = c.left_column_width / 2
        cy = c.construction_zone_height / 2
        return cls(
            start=_Rect(0.0, h - c.start_zone_height, c.left_column_width, h),
            obstacle_field=_Rect(c.left_column_width, 0.0, w - c.excavation_width, h),
            excavation=_Rect(w - c.excavation_width, 0.0, w, h),
            construction=_Rect(0.0, 0.0, c.left_column_width, c.construction_zone_height),
            berm=_Rect(
                cx - c.berm_width / 2, cy - c.berm_height / 2, cx + c.berm_width / 2, cy + c.berm_height / 2
            ),
        )

    def zone_id(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """Zone id (see ``ZONE_NAMES``) of a point; the berm wins over construction."""
        zone = jnp.full(jnp.shape(x), NO_ZONE, jnp.int32)
        zone = jnp.where(self.start.contains(x, y), START, zone)
        zone = jnp.where(self.obstacle_field.contains(x, y), OBSTACLE_FIELD, zone)
        zone = jnp.where(self.excavation.contains(x, y), EXCAVATION, zone)
        zone = jnp.where(self.construction.contains(x, y), CONSTRUCTION, zone)
        return jnp.where(self.berm.contains(x, y), BERM, zone)


def _wrap_angle(a: jax.Array) -> jax.Array:
    """``a`` wrapped to [-pi, pi) (floor, not ``jnp.mod``: XLA:CPU lowers fmod to a scalar call)."""
    turns = jnp.floor((a + jnp.pi) * (0.5 / jnp.pi))
    return a - (2.0 * jnp.pi) * turns


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (lowbias32): every input bit affects every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _layout_uniforms(key: jax.Array, n: int) -> jax.Array:
    """``n`` uniforms in [0, 1) from a PRNG key, by a counter hash (SplitMix-style) of the key's bits.

    The auto-reset wrapper evaluates ``reset`` for every env on every step, and a layout needs
    ~70 numbers, so drawing them with threefry would dominate the step. The key itself comes from
    threefry splits, so hashing its two words with a counter gives well-mixed, reproducible,
    per-key independent numbers at a few integer ops each.
    """
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    words = words.astype(jnp.uint32)
    seed = _mix32(words[0] ^ _mix32(words[1] + jnp.uint32(0x9E3779B9)))
    counter = jnp.arange(1, n + 1, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    bits = _mix32(seed + counter)
    # 24 high bits -> exact float32 in [0, 1).
    return (bits >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))


# XLA:CPU notes (numbers in scripts/results/xla_cpu_notes.md): ``lax.top_k`` lowers to a per-row
# TopK library call, a reduce over a short minor axis goes through a library fusion, and
# ``atan2`` is a scalar libm call, while elementwise ops fuse and vectorise across the batch. So
# the sensor selects with unique integer keys and reductions over the short object axis are
# unrolled chains of elementwise ops (``_fold``), and bearings use a polynomial ``atan2``.
# XLA:CPU also duplicates cheap elementwise producers into every consumer fusion; the rolled
# loops (substeps, detection slots) are where values get computed once.


def _fold(x: jax.Array, op) -> jax.Array:
    """Reduce the last (short, static) axis with an unrolled chain of ``op``."""
    out = x[..., 0]
    for i in range(1, x.shape[-1]):
        out = op(out, x[..., i])
    return out


def _unique_keys(d2: jax.Array, valid: jax.Array) -> jax.Array:
    """Int32 sort keys of squared distances: same order as ``d2`` (invalid last), unique per object.

    Non-negative float32s order like their bit patterns; the low bits are replaced by the object
    index, so ties (and near-ties closer than ~1e-6 relative) break toward the lower index.
    """
    n = d2.shape[-1]
    bits = max(1, (n - 1).bit_length())
    raw = jax.lax.bitcast_convert_type(jnp.where(valid, d2, jnp.inf), jnp.int32)
    return ((raw >> bits) << bits) | jnp.arange(n, dtype=jnp.int32)


def _atan2(y: jax.Array, x: jax.Array) -> jax.Array:
    """``arctan2`` via a degree-9 odd polynomial for atan on [0, 1] (Abramowitz & Stegun 4.4.49, error < 1e-5 rad)."""
    ax, ay = jnp.abs(x), jnp.abs(y)
    hi, lo = jnp.maximum(ax, ay), jnp.minimum(ax, ay)
    t = lo / jnp.maximum(hi, jnp.finfo(jnp.float32).tiny)
    s = t * t
    r = t * (0.9998660 + s * (-0.3302995 + s * (0.1801410 + s * (-0.0851330 + s * 0.0208351))))
    r = jnp.where(ay > ax, 0.5 * jnp.pi - r, r)
    r = jnp.where(x < 0.0, jnp.pi - r, r)
    return jnp.where(y < 0.0, -r, r)


def _nearest_detections(
    fwd: jax.Array, left: jax.Array, visible: jax.Array, k: int, sentinel: float
) -> jax.Array:
    """(distance, bearing) of the ``k`` nearest visible objects, nearest first, flattened to [2k].

    ``fwd``/``left`` are object offsets in the rover frame. Slot j is the object with the
    smallest unique key above slot j-1's (a partial selection, no sort); distances and bearings
    are computed for the selected objects only. The slots are a rolled ``scan`` so that its
    operands are computed once: XLA:CPU would otherwise re-derive them inside every slot's fusion.
    """
    n = fwd.shape[-1]
    kk = min(k, n)
    pad = jnp.tile(jnp.array([sentinel, 0.0], jnp.float32), k - kk)
    if kk == 0:
        return pad
    key = _unique_keys(fwd * fwd + left * left, visible)
    no_key = jnp.iinfo(jnp.int32).max  # above every key

    def next_nearest(last: jax.Array, _) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
        m = _fold(jnp.where(key > last[..., None], key, no_key), jnp.minimum)
        slot = key == m[..., None]  # exactly one object: keys are unique
        return m, (m, _fold(jnp.where(slot, fwd, 0.0), jnp.add), _fold(jnp.where(slot, left, 0.0), jnp.add))

    _, (m, f, lt) = jax.lax.scan(next_nearest, jnp.full(key.shape[:-1], -1, jnp.int32), None, length=kk)
    found = _key_is_finite(m, n)
    dist = jnp.where(found, jnp.sqrt(f * f + lt * lt), sentinel)
    bearing = jnp.where(found, _atan2(lt, f), 0.0)
    return jnp.concatenate([jnp.stack([dist, bearing], axis=-1).reshape(-1), pad])


def _key_is_finite(key: jax.Array, n: int) -> jax.Array:
    """Whether a ``_unique_keys`` key (of an ``n``-object axis) belongs to a valid object."""
    bits = max(1, (n - 1).bit_length())
    inf_bits = jax.lax.bitcast_convert_type(jnp.float32(jnp.inf), jnp.int32)
    return (key >> bits) < (inf_bits >> bits)


# --------------------------------------------------------------------------------------------
# The env
# --------------------------------------------------------------------------------------------


class Rover(LunarEnv):
    """The Lunabotics arena (see the module docstring for the map, physics, sensor and reward)."""

    config_cls: ClassVar[type[RoverConfig]] = RoverConfig
    #: 500 actions = 33 s of arena time at the default 4 x 1/60 s per action; a scripted round
    #: trip start -> excavation -> construction takes about 120.
    default_episode_length: ClassVar[int] = 500
    #: The heading (observation entry 4) wraps at +-pi, i.e. facing west: the way home.
    angle_observations: ClassVar[tuple[int, ...]] = (4,)

    def __init__(self, config: RoverConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        c: RoverConfig = self.config
        self.zones = _Zones.from_config(c)
        self._half_len = c.rover_length / 2
        self._half_wid = c.rover_width / 2
        self._traction = 1.0 - math.exp(-c.friction * c.dt)
        self._tan_half_fov = math.tan(math.radians(c.fov_deg) / 2)
        # Obstacle grid over the obstacle field: one rock or crater per cell.
        n_obs = c.num_rocks + c.num_craters
        field = self.zones.obstacle_field
        fw, fh = field.x1 - field.x0, field.y1 - field.y0
        cols = max(1, math.ceil(math.sqrt(max(n_obs, 1) * fw / fh)))
        rows = max(1, math.ceil(max(n_obs, 1) / cols))
        self._grid = (cols, rows)

    # -- sizes ---------------------------------------------------------------------------------

    @property
    def observation_size(self) -> int:
        return OBSERVATION_SIZE

    @property
    def action_size(self) -> int:
        return 3

    # -- reset ---------------------------------------------------------------------------------

    def reset(self, rng: jax.Array) -> State:
        c: RoverConfig = self.config
        layout_key, rng = jax.random.split(rng)
        nr, nc, no = c.num_rocks, c.num_craters, c.num_orbs
        n_obs = nr + nc
        u = _layout_uniforms(layout_key, 4 + 3 * n_obs + 2 * no)
        pose, u_obs, u_orb = u[:4], u[4 : 4 + 3 * n_obs], u[4 + 3 * n_obs :]

        # Start pose: anywhere in the start zone with room to turn in place.
        s = self.zones.start
        margin = 0.5 * math.hypot(c.rover_length, c.rover_width) + 0.01
        x = s.x0 + margin + pose[0] * (s.x1 - s.x0 - 2 * margin)
        y = s.y0 + margin + pose[1] * (s.y1 - s.y0 - 2 * margin)
        heading = (2.0 * pose[2] - 1.0) * jnp.pi

        # Obstacles: object i sits in grid cell (i + offset) mod num_cells, jittered within it.
        cols, rows = self._grid
        num_cells = cols * rows
        cell = (jnp.arange(n_obs) + jnp.floor(pose[3] * num_cells).astype(jnp.int32)) % num_cells
        f = self.zones.obstacle_field
        cw, ch = (f.x1 - f.x0) / cols, (f.y1 - f.y0) / rows
        radius = jnp.concatenate(
            [
                c.rock_radius_min
                + u_obs[2 * n_obs : 2 * n_obs + nr] * (c.rock_radius_max - c.rock_radius_min),
                jnp.full((nc,), c.crater_radius),
            ]
        )
        slack_x = jnp.maximum(cw - 2 * (radius + c.obstacle_margin), 0.0)
        slack_y = jnp.maximum(ch - 2 * (radius + c.obstacle_margin), 0.0)
        ox = f.x0 + (cell % cols) * cw + 0.5 * cw + (u_obs[:n_obs] - 0.5) * slack_x
        oy = f.y0 + (cell // cols) * ch + 0.5 * ch + (u_obs[n_obs : 2 * n_obs] - 0.5) * slack_y

        e = self.zones.excavation
        orb_margin = 0.1
        orb_x = e.x0 + orb_margin + u_orb[:no] * (e.x1 - e.x0 - 2 * orb_margin)
        orb_y = e.y0 + orb_margin + u_orb[no:] * (e.y1 - e.y0 - 2 * orb_margin)

        zero_f = jnp.float32(0.0)
        zero_i = jnp.int32(0)
        ps = RoverState(
            x=x,
            y=y,
            vx=zero_f,
            vy=zero_f,
            heading=heading,
            omega=zero_f,
            obstacle_x=ox,
            obstacle_y=oy,
            rock_r=radius[:nr],
            orb_x=orb_x,
            orb_y=orb_y,
            orb_alive=jnp.ones((no,), bool),
            holding=jnp.bool_(False),
            visited_excavation=jnp.bool_(False),
            visited_construction=jnp.bool_(False),
            orbs_collected=zero_i,
            deposits=zero_i,
            rock_hits=zero_i,
            wall_hits=zero_i,
        )
        return State(
            pipeline_state=ps,
            obs=self.observe(ps),
            reward=zero_f,
            done=zero_f,
            metrics=self._metrics(ps),
            info={"rng": rng},
        )

    # -- step ----------------------------------------------------------------------------------

    def step(self, state: State, action: jax.Array) -> State:
        c: RoverConfig = self.config
        ps: RoverState = state.pipeline_state
        action = jnp.clip(action, -1.0, 1.0)
        moved, (hx, hy), rock_hit, wall_hit = self._drive(ps, action[0], action[1])

        # Digging happens at the end pose.
        zones = self.zones
        zone = zones.zone_id(moved.x, moved.y)
        in_construction = (zone == CONSTRUCTION) | (zone == BERM)
        in_excavation = zone == EXCAVATION
        dig = action[2] > 0.5
        holding = ps.holding
        front_x = moved.x + self._half_len * hx
        front_y = moved.y + self._half_len * hy
        orb_d2 = jnp.where(ps.orb_alive, (ps.orb_x - front_x) ** 2 + (ps.orb_y - front_y) ** 2, jnp.inf)
        in_reach = _fold(orb_d2 <= c.dig_reach**2, jnp.logical_or)  # dead orbs have inf
        key = _unique_keys(orb_d2, ps.orb_alive)
        nearest = key == _fold(key, jnp.minimum)[..., None]  # exactly one orb
        collected = dig & ~holding & in_reach
        deposited = dig & holding & in_construction
        orb_alive = ps.orb_alive & ~(collected & nearest)  # the nearest orb disappears

        entered_excavation = in_excavation & ~ps.visited_excavation
        entered_construction = in_construction & holding & ~ps.visited_construction

        # Progress toward the goal of what was held at the start of the step.
        progress_exc = jnp.where(
            holding, 0.0, zones.excavation.distance(ps.x, ps.y) - zones.excavation.distance(moved.x, moved.y)
        )
        progress_con = jnp.where(
            holding,
            zones.construction.distance(ps.x, ps.y) - zones.construction.distance(moved.x, moved.y),
            0.0,
        )
        reward, _ = rover_reward(
            c,
            entered_excavation=entered_excavation,
            collected=collected,
            entered_construction=entered_construction,
            deposited=deposited,
            rock_hit=rock_hit,
            wall_hit=wall_hit,
            progress_excavation=progress_exc,
            progress_construction=progress_con,
        )

        ps = moved.replace(
            orb_alive=orb_alive,
            holding=(holding & ~deposited) | collected,
            visited_excavation=ps.visited_excavation | in_excavation,
            visited_construction=ps.visited_construction | entered_construction,
            orbs_collected=ps.orbs_collected + collected,
            deposits=ps.deposits + deposited,
            rock_hits=ps.rock_hits + rock_hit,
            wall_hits=ps.wall_hits + wall_hit,
        )
        done = deposited & c.terminate_on_deposit
        return state.replace(
            pipeline_state=ps,
            obs=self.observe(ps, zone, (hx, hy)),
            reward=reward,
            done=done.astype(jnp.float32),
            # Keep keys that wrappers added (Brax's trainers add e.g. "reward").
            metrics={**state.metrics, **self._metrics(ps)},
        )

    def _drive(self, ps: RoverState, speed: jax.Array, turn: jax.Array):
        """One action of driving; returns (state, heading unit vector, rock_hit, wall_hit).

        ``substeps`` Euler steps of the drive with friction and wall bounces, then one rock
        contact resolution at the end pose (see ``_resolve_rocks``), then the walls once more.
        """
        c: RoverConfig = self.config
        # Differential drive: wheel speeds limited to max_speed; craters scale both wheels.
        nr = c.num_rocks
        in_crater = (ps.obstacle_x[nr:] - ps.x) ** 2 + (ps.obstacle_y[nr:] - ps.y) ** 2 <= c.crater_radius**2
        in_crater = _fold(in_crater, jnp.logical_or) if c.num_craters else jnp.bool_(False)
        terrain = jnp.where(in_crater, c.crater_slowdown, 1.0)
        v_cmd, w_cmd = speed * c.max_speed, turn * c.max_turn_rate
        half_track_w = w_cmd * self._half_wid
        left = jnp.clip(v_cmd - half_track_w, -c.max_speed, c.max_speed) * terrain
        right = jnp.clip(v_cmd + half_track_w, -c.max_speed, c.max_speed) * terrain
        v = 0.5 * (left + right)
        w = (right - left) / c.rover_width

        # The turn per substep is constant within an action: rotate the heading vector instead of
        # calling cos/sin every substep.
        dh = w * c.dt
        rot_c, rot_s, hx, hy = jnp.cos(dh), jnp.sin(dh), jnp.cos(ps.heading), jnp.sin(ps.heading)

        def substep(carry, _):
            x, y, vx, vy, hx, hy, wall_hit = carry
            # Friction pulls the velocity toward the wheels' velocity.
            vx = vx + self._traction * (v * hx - vx)
            vy = vy + self._traction * (v * hy - vy)
            x, y = x + vx * c.dt, y + vy * c.dt
            hx, hy = hx * rot_c - hy * rot_s, hx * rot_s + hy * rot_c
            x, y, vx, vy, hit = self._walls(x, y, vx, vy, hx, hy)
            return (x, y, vx, vy, hx, hy, wall_hit | hit), None

        init = (ps.x, ps.y, ps.vx, ps.vy, hx, hy, jnp.bool_(False))
        # A rolled loop, not unrolled: XLA:CPU duplicates cheap elementwise producers into every
        # consumer fusion, so an unrolled chain of substeps recomputes the whole history (and the
        # caller's action) in each later fusion; loop carries are materialised once per substep.
        (x, y, vx, vy, hx, hy, wall_hit), _ = jax.lax.scan(substep, init, None, length=c.substeps)
        x, y, vx, vy, rock_hit = self._resolve_rocks(ps, x, y, vx, vy, hx, hy)
        x, y, vx, vy, hit = self._walls(x, y, vx, vy, hx, hy)
        heading = _wrap_angle(ps.heading + c.substeps * dh)
        moved = ps.replace(x=x, y=y, vx=vx, vy=vy, heading=heading, omega=w)
        return moved, (hx, hy), rock_hit, wall_hit | hit

    def _walls(self, x, y, vx, vy, hx, hy):
        """Clamp the rotated rectangle into the arena and reflect the velocity off the walls it hit."""
        c: RoverConfig = self.config
        hl, hw = self._half_len, self._half_wid
        ext_x = hl * jnp.abs(hx) + hw * jnp.abs(hy)
        ext_y = hl * jnp.abs(hy) + hw * jnp.abs(hx)
        cx = jnp.clip(x, ext_x, c.arena_width - ext_x)
        cy = jnp.clip(y, ext_y, c.arena_height - ext_y)
        hit_x, hit_y = cx != x, cy != y
        vx = jnp.where(hit_x, -c.wall_restitution * vx, vx)
        vy = jnp.where(hit_y, -c.wall_restitution * vy, vy)
        return cx, cy, vx, vy, hit_x | hit_y

    def _resolve_rocks(self, ps: RoverState, x, y, vx, vy, hx, hy):
        """Rect-circle contacts: push the rover out of every rock it overlaps and stop its velocity into them.

        Run once per action, at the end pose: with the defaults the rover moves at most
        ``max_speed * dt * substeps`` = 0.13 m per action, less than the smallest rock radius,
        so a rock cannot pass through the body between checks.
        """
        if self.config.num_rocks == 0:
            return x, y, vx, vy, jnp.bool_(False)
        hl, hw = self._half_len, self._half_wid
        nr = self.config.num_rocks
        # Closest point of the rectangle to each rock centre, in the rover frame (f ahead, l left).
        rx, ry = ps.obstacle_x[:nr] - x, ps.obstacle_y[:nr] - y
        fwd, lat = rx * hx + ry * hy, ry * hx - rx * hy
        df = fwd - jnp.clip(fwd, -hl, hl)
        dl = lat - jnp.clip(lat, -hw, hw)
        d2 = df * df + dl * dl
        touching = d2 < ps.rock_r * ps.rock_r
        # Unit contact normal (rover -> rock) is (df, dl) * inv. A rock centre inside the body
        # (possible only when a wall pushes the rover onto a rock) has no normal and is not pushed.
        inv = jax.lax.rsqrt(jnp.maximum(d2, 1e-12))
        push = jnp.where(touching, (ps.rock_r * inv - 1.0), 0.0)  # depth / distance
        v_f, v_l = vx * hx + vy * hy, vy * hx - vx * hy
        stop = jnp.where(touching, jnp.maximum(v_f * df + v_l * dl, 0.0) * inv * inv, 0.0)  # v_in / distance
        # Sum the corrections in the rover frame, rotate once.
        pf, pl = _fold(push * df, jnp.add), _fold(push * dl, jnp.add)
        sf, sl = _fold(stop * df, jnp.add), _fold(stop * dl, jnp.add)
        x = x - (pf * hx - pl * hy)
        y = y - (pf * hy + pl * hx)
        vx = vx - (sf * hx - sl * hy)
        vy = vy - (sf * hy + sl * hx)
        return x, y, vx, vy, _fold(touching, jnp.logical_or)

    # -- observation ---------------------------------------------------------------------------

    def observe(
        self,
        ps: RoverState,
        zone: jax.Array | None = None,
        heading_vec: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """The 28-float observation of a physical state (``zone`` and the heading's unit vector if already known)."""
        c: RoverConfig = self.config
        if zone is None:
            zone = self.zones.zone_id(ps.x, ps.y)
        hx, hy = (jnp.cos(ps.heading), jnp.sin(ps.heading)) if heading_vec is None else heading_vec

        def frame(
            ox: jax.Array, oy: jax.Array, alive: jax.Array | None = None
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
            rx, ry = ox - ps.x, oy - ps.y
            fwd, left = rx * hx + ry * hy, ry * hx - rx * hy
            # Inside the frustum: ahead, within range, and within the half-angle (tan test, no trig).
            visible = (
                (fwd > 0.0)
                & (jnp.abs(left) <= self._tan_half_fov * fwd)
                & (fwd * fwd + left * left <= c.sensor_range**2)
            )
            if alive is not None:
                visible = visible & alive
            return fwd, left, visible

        obstacles = frame(ps.obstacle_x, ps.obstacle_y)
        orbs = frame(ps.orb_x, ps.orb_y, ps.orb_alive)
        head = jnp.stack(
            [
                ps.x,
                ps.y,
                ps.vx,
                ps.vy,
                ps.heading,
                ps.omega,
                zone.astype(jnp.float32),
                ps.holding.astype(jnp.float32),
            ]
        )
        return jnp.concatenate(
            [
                head.astype(jnp.float32),
                _nearest_detections(*obstacles, NUM_DETECTIONS, c.sentinel),
                _nearest_detections(*orbs, NUM_DETECTIONS, c.sentinel),
            ]
        )

    @staticmethod
    def _metrics(ps: RoverState) -> dict[str, jax.Array]:
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return {
            "success": f32(ps.deposits > 0),
            "orbs_collected": f32(ps.orbs_collected),
            "deposits": f32(ps.deposits),
            "rock_hits": f32(ps.rock_hits),
            "wall_hits": f32(ps.wall_hits),
        }

    # -- render --------------------------------------------------------------------------------

    def render(self, state: State, width: int = 480) -> np.ndarray:
        """Top-down frame: zones, rocks, craters, orbs, the rover and its camera frustum."""
        c: RoverConfig = self.config
        ps = jax.tree.map(np.asarray, state.pipeline_state)
        if ps.x.ndim != 0:
            raise ValueError("render takes one (unbatched) state")
        canvas = Canvas((0.0, 0.0, c.arena_width, c.arena_height), width=width, background=(58, 56, 54))
        z = self.zones
        colors = {
            "start": (70, 90, 130),
            "obstacle_field": (72, 70, 66),
            "excavation": (110, 90, 60),
            "construction": (60, 110, 70),
            "berm": (90, 150, 90),
        }
        for name, color in colors.items():
            r = getattr(z, name)
            canvas.rect(r.x0, r.y0, r.x1, r.y1, fill=color, outline=(30, 30, 30))
        nr = c.num_rocks
        for cx, cy in zip(ps.obstacle_x[nr:], ps.obstacle_y[nr:], strict=True):
            canvas.circle(cx, cy, c.crater_radius, fill=(40, 38, 36), outline=(20, 20, 20))
        for rx, ry, rr in zip(ps.obstacle_x[:nr], ps.obstacle_y[:nr], ps.rock_r, strict=True):
            canvas.circle(rx, ry, rr, fill=(150, 150, 155), outline=(90, 90, 95))
        for ox, oy, alive in zip(ps.orb_x, ps.orb_y, ps.orb_alive, strict=True):
            if alive:
                canvas.circle(ox, oy, 0.05, fill=(240, 200, 60))

        x, y, h = float(ps.x), float(ps.y), float(ps.heading)
        half_fov = math.radians(c.fov_deg) / 2
        arc = [
            (x + c.sensor_range * math.cos(h + a), y + c.sensor_range * math.sin(h + a))
            for a in np.linspace(-half_fov, half_fov, 16)
        ]
        canvas.polygon([(x, y), *arc], outline=(200, 220, 255))
        fx, fy = math.cos(h), math.sin(h)
        lx, ly = -fy, fx
        hl, hw = c.rover_length / 2, c.rover_width / 2
        body = [
            (x + sf * hl * fx + sl * hw * lx, y + sf * hl * fy + sl * hw * ly)
            for sf, sl in ((1, 1), (1, -1), (-1, -1), (-1, 1))
        ]
        canvas.polygon(body, fill=(230, 230, 235) if not ps.holding else (240, 200, 60), outline=(20, 20, 20))
        canvas.line([(x, y), (x + hl * fx, y + hl * fy)], fill=(220, 40, 40), width=2)
        return canvas.to_array()
