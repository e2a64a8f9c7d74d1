"""A car on a procedural closed-loop track, with ray sensors (the task of seed 002), in pure JAX.

Track. The centre line is the loop ``p(theta) = centre + s(theta) * (a cos theta, b sin theta)``
sampled at ``num_points`` equally spaced angles (vertex 0, at theta = 0, is the start line), where
``s = 1 + sum_k (A_k cos k theta + B_k sin k theta)`` sums ``num_harmonics`` random low-frequency
harmonics, each of amplitude at most its share of ``amplitude`` (so ``|s - 1| <= amplitude``).
Because ``s > 0`` the loop is star-shaped around the field centre, hence closed and never
self-intersecting, and the semi-axes ``a, b`` are chosen so that the loop, widened by half the
track width, always fits inside the field with ``margin`` to spare. The two edges are the centre
line offset by ``track_width / 2`` along its normal. ``num_obstacles`` circles sit on the track,
one per stretch, off-centre so that a lane stays free beside each and there is room to change lanes
between them. ``track_seed`` fixes one track for every episode; ``None`` draws one per reset.

A track is stored as its ``2 * num_harmonics`` coefficients plus the obstacle centres, not as
polylines: vertices are recomputed on demand, and only for the few segments near the car, from
a constant table of ``cos(k theta_i), sin(k theta_i)`` (one row per window, rotated to the other
vertices: a few multiply-adds per vertex). This keeps both ``step`` and ``reset`` (which the
auto-reset wrapper runs for the whole batch on every step) cheap; neither evaluates a
trigonometric function (XLA's CPU fusion would otherwise repeat them in every fused loop that
broadcasts their result).

Car. Position, speed in ``[0, max_speed]`` and heading (a unit vector); action
``[steering, throttle]`` in ``[-1, 1]``: the heading turns by ``steering * steering_rate`` rad per
step (positive = left), the speed changes by ``throttle * acceleration - drag * speed`` (no
reverse gear). The car starts at rest on the start line, on the centre line, facing along the track.

Sensors. ``num_rays`` rays spread evenly over ``ray_spread_deg`` around the heading return the
distance to the first track edge or obstacle, capped at ``ray_range``. The edges are tested in a
window of ``ray_window`` segments around the car that slides with the heading
(see ``_ray_window_start``);
the default covers everything a ray of length ``ray_range`` can reach on the tracks this
generator draws (checked in the tests against a brute-force reference over all segments).

Observation (``num_rays + 1`` = 6 floats by default): ray distances / ``ray_range``, then
speed / ``max_speed``. With ``rich_observations=True`` three more follow: the signed lateral
offset from the centre line / (``track_width / 2``) (positive = left of the driving direction)
and the sine and cosine of the heading relative to the centre line's direction.

Reward. ``progress_weight`` times the signed arc length gained along the centre line (the car is
projected onto the polyline each step), minus ``time_cost`` per step; ``- crash_penalty`` and
termination when the car's centre leaves the track or the car (radius ``car_radius``) touches an
obstacle; ``+ lap_bonus``, ``metrics["success"] = 1`` and termination when a lap is completed. A
lap is completed when the *cumulative signed* progress since the start reaches one full loop, so
driving backwards over the start line and forwards again earns nothing net and never a lap.
Metrics: ``success`` (1 on the step a lap completes), ``progress`` (signed laps so far),
``off_track`` and ``collision`` (1 on the step the episode ends that way).
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

__all__ = [
    "CarTrack",
    "CarTrackConfig",
    "CarTrackState",
    "Track",
    "cast_rays",
    "centre_line",
    "sample_track",
    "track_polylines",
]

# Segments either side of the car's last segment searched when projecting it onto the centre line.
_PROJECTION_REACH = 3
# Segments behind the car (relative to the way it faces) included in the ray window.
_RAY_BACK_REACH = 3
# Edge segments from vertex -1 tested by the rays at the start pose (checked against brute force
# on 4,096 tracks).
_START_RAY_WINDOW = 16
# Segments kept free of obstacles after and before the start line.
_START_CLEARANCE = 8


@dataclasses.dataclass(frozen=True)
class CarTrackConfig(EnvConfig):
    """Parameters of the car track. Lengths are in field units (pixels of the seed), angles per step."""

    # Field and track shape.
    field_width: float = bounded(800.0, 100.0, 10_000.0, "field size along x")
    field_height: float = bounded(600.0, 100.0, 10_000.0, "field size along y")
    margin: float = bounded(10.0, 0.0, 1_000.0, "min gap between the track edge and the field border")
    num_points: int = bounded(100, 16, 1_000, "centre-line vertices of the closed loop")
    track_width: float = bounded(40.0, 5.0, 500.0, "distance between the two edges")
    num_harmonics: int = bounded(4, 1, 8, "random harmonics k = 1..K varying the loop's radius")
    amplitude: float = bounded(0.25, 0.0, 0.5, "max relative radius variation |s - 1|")
    harmonic_decay: float = bounded(1.5, 0.0, 4.0, "harmonic k gets a share of the amplitude ~ k**-decay")
    track_seed: int | None = bounded(
        None, 0, 2**31 - 1, "fixed track for every episode; None draws one per reset"
    )
    # Obstacles: circles on the track, each leaving a free lane on one side.
    num_obstacles: int = bounded(5, 0, 20, "obstacles per track")
    obstacle_radius: float = bounded(8.0, 0.0, 100.0, "obstacle radius")
    car_radius: float = bounded(4.0, 0.0, 50.0, "car radius, for obstacle contact")
    # Car dynamics.
    max_speed: float = bounded(5.0, 0.1, 100.0, "speed limit (units per step)")
    acceleration: float = bounded(0.2, 0.0, 10.0, "speed change per step at full throttle")
    drag: float = bounded(0.02, 0.0, 1.0, "fraction of the speed lost per step")
    steering_rate: float = bounded(0.1, 0.0, 0.5, "heading change per step at full steering (rad)")
    # Sensors.
    num_rays: int = bounded(5, 1, 32, "distance rays")
    ray_range: float = bounded(150.0, 1.0, 2_000.0, "ray length")
    ray_spread_deg: float = bounded(120.0, 0.0, 360.0, "angle covered by the rays, centred on the heading")
    ray_window: int = bounded(24, 8, 1_000, "edge segments per side tested by the rays")
    rich_observations: bool = False
    # Reward.
    progress_weight: float = bounded(0.01, 0.0, 100.0, "reward per unit of arc length gained")
    crash_penalty: float = bounded(5.0, 0.0, 1_000.0, "penalty for leaving the track or hitting an obstacle")
    lap_bonus: float = bounded(10.0, 0.0, 10_000.0, "bonus for completing a lap")
    time_cost: float = bounded(0.01, 0.0, 10.0, "cost per step")

    def check(self) -> None:
        name = type(self).__name__
        half = self.track_width / 2
        for axis, semi_axis in zip(("field_width", "field_height"), self.semi_axes, strict=True):
            # The loop's smallest radius must leave room for the inner edge around the field centre.
            if semi_axis * (1 - self.amplitude) <= self.track_width:
                raise ValueError(
                    f"{name}.{axis}={getattr(self, axis)} leaves no room for a loop with track_width="
                    f"{self.track_width}, margin={self.margin}, amplitude={self.amplitude}"
                )
        # Curvature: |s''| <= sum_k share_k k^2; relative to the smallest radius it must stay small
        # or the inner edge folds over itself (bound calibrated on 1,024 draws per setting).
        smallest = min(self.semi_axes) * (1 - self.amplitude)
        bend = sum(share * k * k for k, share in enumerate(self.harmonic_shares(), start=1)) * half / smallest
        if bend > 0.75:
            raise ValueError(
                f"{name}.amplitude={self.amplitude} too rough with num_harmonics={self.num_harmonics} and "
                f"harmonic_decay={self.harmonic_decay}: the edges would fold (bend {bend:.2f} > 0.75); lower "
                f"amplitude or num_harmonics, or raise harmonic_decay"
            )
        if self.obstacle_radius + self.car_radius > half:
            raise ValueError(
                f"{name}.obstacle_radius={self.obstacle_radius} too large: obstacle_radius + car_radius "
                f"must be <= track_width / 2 = {half} so a lane past every obstacle stays free"
            )
        if self.num_obstacles and self.num_points < 2 * _START_CLEARANCE + self.num_obstacles:
            raise ValueError(
                f"{name}.num_obstacles={self.num_obstacles} too many for num_points={self.num_points}: "
                f"need num_points >= {2 * _START_CLEARANCE} + num_obstacles"
            )
        if self.ray_window > self.num_points:
            raise ValueError(f"{name}.ray_window={self.ray_window} must be <= num_points={self.num_points}")
        # The projection searches a few segments around the last one, so one step must not skip them.
        if self.max_speed >= (_PROJECTION_REACH - 1) * self.min_segment_length:
            raise ValueError(
                f"{name}.max_speed={self.max_speed} too high for this track resolution: must be < "
                f"{(_PROJECTION_REACH - 1) * self.min_segment_length:.3g} ({_PROJECTION_REACH - 1} of the shortest "
                f"possible segments); raise num_points or lower max_speed"
            )

    @property
    def semi_axes(self) -> tuple[float, float]:
        """Semi-axes (a, b) of the unperturbed loop: the widest loop that still fits the field."""
        room = 1.0 + self.amplitude
        half = self.track_width / 2
        return (
            (self.field_width / 2 - self.margin - half) / room,
            (self.field_height / 2 - self.margin - half) / room,
        )

    def harmonic_shares(self) -> np.ndarray:
        """Max amplitude of harmonics k = 1..K: ``amplitude`` split in proportion to ``k**-harmonic_decay``."""
        share = np.arange(1, self.num_harmonics + 1, dtype=np.float64) ** -self.harmonic_decay
        return self.amplitude * share / share.sum()

    @property
    def min_segment_length(self) -> float:
        """A lower bound on a centre-line segment's length.

        Consecutive vertices lie at radius >= min(a, b) * (1 - amplitude) from the centre and their
        polar angles differ by at least (2 pi / num_points) * min(a, b) / max(a, b).
        """
        a, b = self.semi_axes
        angle = 2 * math.pi / self.num_points * min(a, b) / max(a, b)
        return 2 * math.sin(angle / 2) * min(a, b) * (1 - self.amplitude)

    @property
    def observation_size(self) -> int:
        return self.num_rays + 1 + (3 if self.rich_observations else 0)


@struct.dataclass
class Track:
    """One track: harmonic coefficients of the radius and obstacle centres."""

    cos_coef: jax.Array  # [K] coefficient of cos(k theta), k = 1..K
    sin_coef: jax.Array  # [K] coefficient of sin(k theta)
    obstacles: jax.Array  # [num_obstacles, 2]


@struct.dataclass
class CarTrackState:
    """The physical state of one env (``State.pipeline_state``)."""

    track: Track
    pos: jax.Array  # [2]
    facing: jax.Array  # [2] unit heading vector
    speed: jax.Array  # in [0, max_speed]
    segment: jax.Array  # int32: centre-line segment the car projects onto, in [0, num_points)
    fraction: jax.Array  # position along that segment, in [0, 1]
    lateral: jax.Array  # signed distance from the centre line (positive = left)
    progress: jax.Array  # cumulative signed progress since the start, in segments (a lap = num_points)

    @property
    def heading(self) -> jax.Array:
        """Heading angle in rad, in (-pi, pi]."""
        return jnp.arctan2(self.facing[..., 1], self.facing[..., 0])


# --------------------------------------------------------------------------------------------
# Geometry: pure functions of (config, track)
# --------------------------------------------------------------------------------------------


# Small vector helpers written out per component: XLA's CPU backend hands tiny sum-reductions
# (jnp.sum over an axis of 2 or K) to a library call that costs more than the arithmetic.


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1]


def _cross(a: jax.Array, b: jax.Array) -> jax.Array:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _harmonic_table(cfg: CarTrackConfig) -> np.ndarray:
    """Constant [num_points, 2 + 2K]: ``cos t, sin t, cos(k t), sin(k t)`` (k = 1..K) at every vertex angle."""
    theta = np.arange(cfg.num_points) * (2 * np.pi / cfg.num_points)
    k = np.arange(1, cfg.num_harmonics + 1)
    kt = theta[:, None] * k
    return np.concatenate([np.cos(theta)[:, None], np.sin(theta)[:, None], np.cos(kt), np.sin(kt)], 1).astype(
        np.float32
    )


def centre_line(cfg: CarTrackConfig, track: Track, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Centre-line vertices at integer ``index`` (any shape, taken mod ``num_points``) and unit tangents.

    Returns ``(points [..., 2], tangents [..., 2])``; tangents point along the driving direction
    (increasing index, counter-clockwise).
    """
    K = cfg.num_harmonics
    row = jnp.asarray(_harmonic_table(cfg))[jnp.mod(index, cfg.num_points)]
    cos_t, sin_t = row[..., 0], row[..., 1]
    scale, dscale = 1.0, 0.0  # s(theta) and ds/dtheta, summed over the harmonics
    for k in range(K):
        a, b = track.cos_coef[k], track.sin_coef[k]
        cos_k, sin_k = row[..., 2 + k], row[..., 2 + K + k]
        scale = scale + a * cos_k + b * sin_k
        dscale = dscale + (k + 1) * (b * cos_k - a * sin_k)
    return _points_and_tangents(cfg, scale, dscale, cos_t, sin_t)


def _points_and_tangents(
    cfg: CarTrackConfig, scale: jax.Array, dscale: jax.Array, cos_t: jax.Array, sin_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Centre-line points and unit tangents from the radius factor ``scale`` (and its derivative
    ``dscale``) at angles given by ``cos_t``/``sin_t``, on the field-centred ellipse."""
    ax, ay = cfg.semi_axes
    x = cfg.field_width / 2 + scale * ax * cos_t
    y = cfg.field_height / 2 + scale * ay * sin_t
    dx = dscale * ax * cos_t - scale * ax * sin_t
    dy = dscale * ay * sin_t + scale * ay * cos_t
    inv_norm = jax.lax.rsqrt(dx * dx + dy * dy)
    return jnp.stack([x, y], -1), jnp.stack([dx * inv_norm, dy * inv_norm], -1)


def centre_window(
    cfg: CarTrackConfig, track: Track, first: jax.Array, count: int
) -> tuple[jax.Array, jax.Array]:
    """``centre_line`` at the consecutive vertices ``first .. first + count - 1``.

    One table row (at ``first``) is looked up; the other vertices' harmonics follow by rotating it
    through the constant angles ``m * 2 pi / num_points``, which is cheaper than a lookup per vertex.
    """
    K = cfg.num_harmonics
    row = jnp.asarray(_harmonic_table(cfg))[jnp.mod(first, cfg.num_points)]
    step = np.arange(count) * (2 * np.pi / cfg.num_points)
    cos_m, sin_m = np.cos(step).astype(np.float32), np.sin(step).astype(np.float32)
    cos_t = row[0] * cos_m - row[1] * sin_m
    sin_t = row[1] * cos_m + row[0] * sin_m
    scale, dscale = 1.0, 0.0
    for k in range(K):
        a, b = track.cos_coef[k], track.sin_coef[k]
        ck, sk = row[2 + k], row[2 + K + k]
        # z = (a - i b) exp(i k t0); harmonic k at vertex m is Re(z exp(i k m d)).
        z_re, z_im = a * ck + b * sk, a * sk - b * ck
        ckm = np.cos((k + 1) * step).astype(np.float32)
        skm = np.sin((k + 1) * step).astype(np.float32)
        scale = scale + z_re * ckm - z_im * skm
        dscale = dscale - (k + 1) * (z_re * skm + z_im * ckm)
    return _points_and_tangents(cfg, scale, dscale, cos_t, sin_t)


def _edges(cfg: CarTrackConfig, points: jax.Array, tangents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Left and right edge vertices of centre-line vertices (offset along the normal)."""
    normal = jnp.stack([-tangents[..., 1], tangents[..., 0]], -1)  # left of the driving direction
    half = cfg.track_width / 2
    return points + half * normal, points - half * normal


def track_polylines(cfg: CarTrackConfig, track: Track) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The whole track as closed polylines ``(centre, left, right)``, each ``[num_points, 2]`` (for render and tests)."""
    points, tangents = centre_line(cfg, track, jnp.arange(cfg.num_points))
    left, right = _edges(cfg, points, tangents)
    return points, left, right


def _rotate(facing: jax.Array, angle: jax.Array) -> jax.Array:
    """Rotate a unit vector by ``angle`` (|angle| <= 0.5) and renormalise.

    Taylor series instead of cos/sin (error < 1e-7 for |angle| <= 0.5): XLA's CPU fusion treats
    trigonometry as cheap and repeats it in every fused loop that uses the result.
    """
    a2 = angle * angle
    c = 1.0 - a2 / 2 * (1.0 - a2 / 12 * (1.0 - a2 / 30))
    s = angle * (1.0 - a2 / 6 * (1.0 - a2 / 20 * (1.0 - a2 / 42)))
    x, y = facing[0] * c - facing[1] * s, facing[0] * s + facing[1] * c
    inv_norm = jax.lax.rsqrt(x * x + y * y)
    return jnp.stack([x * inv_norm, y * inv_norm])


def _ray_directions(cfg: CarTrackConfig, facing: jax.Array) -> jax.Array:
    """Unit directions [num_rays, 2], spread evenly over ``ray_spread_deg`` around ``facing`` (a unit vector)."""
    spread = np.deg2rad(cfg.ray_spread_deg)
    offsets = np.linspace(-spread / 2, spread / 2, cfg.num_rays) if cfg.num_rays > 1 else np.zeros(1)
    co, so = np.cos(offsets).astype(np.float32), np.sin(offsets).astype(np.float32)
    ch, sh = facing[0], facing[1]
    return jnp.stack([ch * co - sh * so, sh * co + ch * so], -1)


def cast_rays(
    cfg: CarTrackConfig,
    origin: jax.Array,
    directions: jax.Array,
    seg_start: jax.Array,
    seg_vec: jax.Array,
    circles: jax.Array,
    radius: float,
) -> jax.Array:
    """Distance along each ray to the first segment or circle hit, capped at ``ray_range``.

    ``directions`` [R, 2] unit vectors; segments are ``seg_start + u * seg_vec`` for u in [0, 1]
    ([S, 2] each); ``circles`` [C, 2] centres of the given radius. Vectorised over rays x segments.
    A ray that starts inside a circle reads 0.
    """
    # Segments: solve origin + t d = a + u e with 2-D cross products.
    w = seg_start - origin  # [S, 2]
    w_cross_e = _cross(w, seg_vec)  # [S]
    dx, dy = directions[:, 0:1], directions[:, 1:2]  # [R, 1]
    denom = dx * seg_vec[:, 1] - dy * seg_vec[:, 0]  # d x e, [R, S]
    w_cross_d = w[:, 0] * dy - w[:, 1] * dx  # [R, S]
    ok = jnp.abs(denom) > 1e-9
    inv = 1.0 / jnp.where(ok, denom, 1.0)
    t = w_cross_e * inv
    u = w_cross_d * inv
    hit = ok & (t >= 0) & (u >= 0) & (u <= 1)
    candidates = [jnp.where(hit, t, cfg.ray_range)]  # [R, S]
    if circles.shape[0]:
        # Circles: |origin + t d - c|^2 = r^2, nearest root t >= 0.
        f = origin - circles  # [C, 2]
        b = dx * f[:, 0] + dy * f[:, 1]  # [R, C]
        c = _dot(f, f) - radius * radius  # [C]
        disc = b * b - c
        t_circle = jnp.where(c <= 0, 0.0, -b - jnp.sqrt(jnp.maximum(disc, 0.0)))
        hit_circle = (disc >= 0) & (t_circle >= 0)
        candidates.append(jnp.where(hit_circle, t_circle, cfg.ray_range))  # [R, C]
    # One reduction over all candidates (the nearest hit, or the range when nothing is hit).
    return jnp.min(jnp.concatenate(candidates, -1), axis=-1)


def _ray_window_start(cfg: CarTrackConfig, segment: jax.Array, cos_rel: jax.Array) -> jax.Array:
    """First vertex of the ``ray_window`` edge segments the rays are tested against.

    The window slides with ``cos_rel`` (cosine of the heading relative to the track direction):
    facing along the track it starts ``_RAY_BACK_REACH`` segments behind the car, facing across
    it is centred on the car, facing the wrong way it extends mostly behind. The default size is
    the smallest that matched a brute-force reference over all segments on 12,000 random poses
    on the track (tests/test_car_track.py checks a sample).
    """
    half = cfg.ray_window / 2
    return segment - jnp.round(half - (half - _RAY_BACK_REACH) * cos_rel).astype(jnp.int32)


def _sense(
    cfg: CarTrackConfig, track: Track, pos: jax.Array, facing: jax.Array, first: jax.Array, count: int
) -> jax.Array:
    """Ray distances from the car at ``pos`` facing the unit vector ``facing``, against all
    obstacles and the edges of the ``count`` segments that start at vertex ``first``."""
    points, tangents = centre_window(cfg, track, first, count + 1)
    left, right = _edges(cfg, points, tangents)
    seg_start = jnp.concatenate([left[:-1], right[:-1]])
    seg_vec = jnp.concatenate([left[1:] - left[:-1], right[1:] - right[:-1]])
    directions = _ray_directions(cfg, facing)
    return cast_rays(cfg, pos, directions, seg_start, seg_vec, track.obstacles, cfg.obstacle_radius)


def _project(
    cfg: CarTrackConfig, track: Track, pos: jax.Array, segment: jax.Array, fraction: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Project ``pos`` onto the centre-line segments near ``segment``.

    Returns the new (segment, fraction, signed lateral offset, unit tangent there) and the signed
    progress from the old (segment, fraction), in arc length and in segments.
    """
    reach = _PROJECTION_REACH
    points, _ = centre_window(cfg, track, segment - reach, 2 * reach + 2)
    start, vec = points[:-1], points[1:] - points[:-1]  # [2 reach + 1, 2]
    length2 = _dot(vec, vec)
    rel = pos - start
    u = jnp.clip(_dot(rel, vec) / length2, 0.0, 1.0)
    gap = rel - u[:, None] * vec
    best = jnp.argmin(_dot(gap, gap))
    length = jnp.sqrt(length2)
    # Arc length from the window start to the old and to the new position.
    arc_before = jnp.cumsum(length) - length
    arc_old = arc_before[reach] + fraction * length[reach]
    arc_new = arc_before[best] + u[best] * length[best]
    tangent = vec[best] / length[best]
    lateral = _cross(tangent, rel[best])
    offset = best.astype(jnp.int32) - reach
    new_segment = jnp.mod(segment + offset, cfg.num_points).astype(jnp.int32)
    progress_segments = offset.astype(jnp.float32) + u[best] - fraction
    return new_segment, u[best], lateral, tangent, arc_new - arc_old, progress_segments


def _uniforms(key: jax.Array, count: int) -> jax.Array:
    """``count`` uniforms in (0, 1) with 8-bit resolution, four per 32-bit word.

    Track generation runs for the whole batch on every auto-reset step and Threefry's cost is per
    word drawn, so few words matter; 256 levels per parameter is plenty for shapes and positions.
    """
    words = jax.random.bits(key, ((count + 3) // 4,), jnp.uint32)
    quarters = jnp.stack([(words >> shift) & 0xFF for shift in (0, 8, 16, 24)], -1).reshape(-1)[:count]
    # A true division (by 257, not a power of two, so it is not rewritten as a multiply) on
    # purpose: XLA's CPU fusion treats division as expensive and so materialises the result,
    # instead of repeating the bit-unpacking in every fused loop that reads these values (each
    # track parameter feeds many vertices and rays).
    return (quarters.astype(jnp.float32) + 1.0) / 257.0


def sample_track(cfg: CarTrackConfig, key: jax.Array) -> Track:
    """Draw a track: random harmonic coefficients, obstacles on stratified segments."""
    K, n = cfg.num_harmonics, cfg.num_obstacles
    u = _uniforms(key, 2 * K + 2 * n)
    # (cos, sin) coefficients of harmonic k uniform in a square of half-side share_k / sqrt 2, so
    # its amplitude is at most share_k and |s - 1| <= amplitude (the shares sum to it).
    half_side = (cfg.harmonic_shares() / np.sqrt(2)).astype(np.float32)
    coef = (2.0 * u[: 2 * K] - 1.0) * np.concatenate([half_side, half_side])
    track = Track(cos_coef=coef[:K], sin_coef=coef[K:], obstacles=jnp.zeros((n, 2), jnp.float32))
    if n == 0:
        return track
    # One obstacle per equal slot of the track away from the start line, off-centre to a random side
    # by [track_width / 4, track_width / 2 - radius / 2], so the other side keeps a free lane (see
    # CarTrackConfig.check).
    # Positions jitter within the middle half of each slot, so consecutive obstacles are at least
    # half a slot apart and the car has room to change lanes between them.
    slot = (cfg.num_points - 2 * _START_CLEARANCE) / n
    within = 0.25 + 0.5 * u[2 * K : 2 * K + n]
    index = _START_CLEARANCE + jnp.floor((np.arange(n) + within) * slot).astype(jnp.int32)
    points, tangents = centre_line(cfg, track, index)
    half = cfg.track_width / 2
    v = 2.0 * u[2 * K + n :] - 1.0  # sign: side; magnitude: position across the allowed band
    offset = jnp.where(v >= 0, 1.0, -1.0) * (half / 2 + jnp.abs(v) * (half / 2 - cfg.obstacle_radius / 2))
    normal = jnp.stack([-tangents[:, 1], tangents[:, 0]], -1)
    return track.replace(obstacles=points + offset[:, None] * normal)


# --------------------------------------------------------------------------------------------
# The env
# --------------------------------------------------------------------------------------------


class CarTrack(LunarEnv):
    """Drive laps of a procedural closed track using ray sensors (see the module docstring)."""

    config_cls: ClassVar[type[EnvConfig]] = CarTrackConfig
    default_episode_length: ClassVar[int] = 1000
    config: CarTrackConfig

    @property
    def observation_size(self) -> int:
        return self.config.observation_size

    @property
    def action_size(self) -> int:
        return 2

    def _observe(
        self, car: CarTrackState, rays: jax.Array, cos_rel: jax.Array, sin_rel: jax.Array
    ) -> jax.Array:
        cfg = self.config
        parts = [rays / cfg.ray_range, (car.speed / cfg.max_speed)[None]]
        if cfg.rich_observations:
            parts.append(jnp.stack([car.lateral / (cfg.track_width / 2), sin_rel, cos_rel]))
        return jnp.concatenate(parts).astype(jnp.float32)

    def reset(self, rng: jax.Array) -> State:
        cfg = self.config
        track_key = rng if cfg.track_seed is None else jax.random.PRNGKey(cfg.track_seed)
        track = sample_track(cfg, track_key)
        start, tangent = centre_line(cfg, track, jnp.int32(0))
        zero = jnp.zeros((), jnp.float32)
        car = CarTrackState(
            track=track,
            pos=start,
            facing=tangent,
            speed=zero,
            segment=jnp.int32(0),
            fraction=zero,
            lateral=zero,
            progress=zero,
        )
        # At the start the car faces along the track from the centre line: only the segments ahead
        # can be hit (the step's window, which allows any heading, would be larger).
        rays = _sense(cfg, track, car.pos, car.facing, jnp.int32(-1), min(_START_RAY_WINDOW, cfg.ray_window))
        metrics = {"success": zero, "progress": zero, "off_track": zero, "collision": zero}
        return State(
            pipeline_state=car,
            obs=self._observe(car, rays, jnp.ones(()), zero),
            reward=zero,
            done=zero,
            metrics=metrics,
            info={"rng": rng},
        )

    def step(self, state: State, action: jax.Array) -> State:
        cfg = self.config
        car: CarTrackState = state.pipeline_state
        action = jnp.clip(action, -1.0, 1.0)
        steering, throttle = action[0], action[1]
        facing = _rotate(car.facing, steering * cfg.steering_rate)
        speed = jnp.clip(car.speed + throttle * cfg.acceleration - cfg.drag * car.speed, 0.0, cfg.max_speed)
        pos = car.pos + speed * facing

        segment, fraction, lateral, tangent, arc_gain, segment_gain = _project(
            cfg, car.track, pos, car.segment, car.fraction
        )
        progress = car.progress + segment_gain
        off_track = jnp.abs(lateral) > cfg.track_width / 2
        if cfg.num_obstacles:
            gap = pos - car.track.obstacles
            reach = cfg.obstacle_radius + cfg.car_radius
            collision = jnp.any(_dot(gap, gap) < reach * reach)
        else:
            collision = jnp.bool_(False)
        crashed = off_track | collision
        lap = (progress >= cfg.num_points) & ~crashed

        cos_rel = facing[0] * tangent[0] + facing[1] * tangent[1]
        sin_rel = tangent[0] * facing[1] - tangent[1] * facing[0]
        rays = _sense(cfg, car.track, pos, facing, _ray_window_start(cfg, segment, cos_rel), cfg.ray_window)
        car = car.replace(
            pos=pos,
            facing=facing,
            speed=speed,
            segment=segment,
            fraction=fraction,
            lateral=lateral,
            progress=progress,
        )
        reward = (
            cfg.progress_weight * arc_gain
            - cfg.time_cost
            - cfg.crash_penalty * crashed.astype(jnp.float32)
            + cfg.lap_bonus * lap.astype(jnp.float32)
        )
        # Keep metrics that wrappers (e.g. Brax's trainers) may have added.
        metrics = {
            **state.metrics,
            "success": lap.astype(jnp.float32),
            "progress": progress / cfg.num_points,
            "off_track": off_track.astype(jnp.float32),
            "collision": collision.astype(jnp.float32),
        }
        return state.replace(
            pipeline_state=car,
            obs=self._observe(car, rays, cos_rel, sin_rel),
            reward=reward.astype(jnp.float32),
            done=(crashed | lap).astype(jnp.float32),
            metrics=metrics,
        )

    def render(self, state: State, width: int = 480) -> np.ndarray:
        """Top-down frame: grass, track, start line, obstacles, rays (hit points marked) and the car."""
        cfg = self.config
        car: CarTrackState = state.pipeline_state
        if np.ndim(car.pos) != 1:
            raise ValueError("render expects one (unbatched) state")
        centre, left, right = (np.asarray(p) for p in track_polylines(cfg, car.track))
        canvas = Canvas((0.0, 0.0, cfg.field_width, cfg.field_height), width=width, background=(34, 92, 40))
        outer, inner = (left, right) if _signed_area(left) > _signed_area(right) else (right, left)
        canvas.polygon(outer, fill=(90, 90, 96))
        canvas.polygon(inner, fill=(34, 92, 40))
        canvas.line(np.vstack([left, left[:1]]), fill=(235, 235, 235), width=2)
        canvas.line(np.vstack([right, right[:1]]), fill=(235, 235, 235), width=2)
        canvas.line(np.stack([left[0], right[0]]), fill=(240, 200, 40), width=3)
        for x, y in np.asarray(car.track.obstacles):
            canvas.circle(x, y, cfg.obstacle_radius, fill=(200, 60, 50))
        pos, forward = np.asarray(car.pos), np.asarray(car.facing)
        obs = np.asarray(state.obs)
        directions = np.asarray(_ray_directions(cfg, car.facing))
        for distance, direction in zip(obs[: cfg.num_rays] * cfg.ray_range, directions, strict=True):
            end = pos + distance * direction
            canvas.line(np.stack([pos, end]), fill=(120, 200, 255), width=2)
            canvas.circle(end[0], end[1], 4.0, fill=(255, 240, 120))
        side = np.array([-forward[1], forward[0]])
        size = max(cfg.car_radius, 6.0) * 2
        body = [
            pos + size * forward,
            pos - 0.6 * size * forward + 0.6 * size * side,
            pos - 0.6 * size * forward - 0.6 * size * side,
        ]
        canvas.polygon(np.stack(body), fill=(250, 250, 250), outline=(20, 20, 20))
        return canvas.to_array()


def _signed_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
