"""Kuka pick-and-place on MuJoCo MJX: a 7-joint arm picks a 5 cm cube and carries it to a target.

The model (``assets/kuka_pick_place.xml``) is an iiwa-14-like arm built from capsules, spheres and
boxes with a two-pad parallel gripper, a table plane, a free cube and a mocap target marker. The
env steps it with ``mujoco.mjx`` (the pure-JAX implementation), so ``reset``/``step`` jit and vmap
like every other lunarl env. A control step is 0.02 s (as in MuJoCo Playground's Panda pick-cube),
150 control steps per episode, made of 2 physics steps of 0.01 s with 3 Newton iterations of at
most 3 line-search steps each and no solver warm start: the cheapest settings measured at which
the scripted pick-and-place still succeeds on random layouts and MJX still matches C MuJoCo
(``scripts/results/kuka.md``; ``sim_dt=0.005, solver_iterations=5, ls_iterations=8`` gives the
older, dearer step budget; warm start lives in the MJCF). The MJCF also keeps the constraint
rows few: frictionless pad-table contacts and no arm joint-limit rows (see its header).

Action (8 floats in [-1, 1]): seven joint-target deltas (``action_scale`` rad per step, added to
the previous position targets and clipped to the joint limits) and the gripper opening (-1 closed,
+1 fully open; absolute, not a delta).

Observation (47 floats): arm joint positions (7) and velocities (7), finger positions (2) and
velocities (2), TCP position (3), cube position (3), cube orientation as the first two columns of
its rotation matrix (6), target position (3), TCP-to-cube (3), cube-to-target (3), previous
action (8). The pick-and-place task observes 9 more (56): the gripper's orientation (first two
columns of the TCP frame, 6) and three contact flags (left pad on the cube, right pad on the
cube, a pad on the table), which say directly whether the cube is held.

Tasks (``KukaConfig.task``):

* ``"pick_place"``: reward = reach + grasp + lift + carry - pads-on-table - action rate + a
  success bonus; lift is paid only while both pads touch the cube, carry (closeness of the cube
  to the target) only while the gate ``carry_gate`` is open. Success: cube centre within
  ``success_radius`` of the target. With ``terminate_on_success`` (default) the episode ends on
  success and the bonus is paid once; without it the bonus is paid on every step inside the
  radius (then no dense term can make ending the episode early look better than staying).

  Why the carry gate matters: gated on the grasp (``carry_gate="grasp"``, the default and the
  original shaping), carry pays for a cube held *on the table* whatever is closest to the target
  there: with the curriculum's level-0 target 8 cm above the cube and sharpness 4 that is ~70 %
  of carry's maximum for no lift at all. PPO settled there (holding the cube down with both
  pads, 0 % success; ``scripts/results/kuka.md``, session 3). Gated on the cube being lifted
  (``carry_gate="lifted"``: its centre at least ``carry_lift_height`` above its resting height),
  carry pays nothing while the cube rests on the table, so lifting is the step that unlocks the
  largest dense term. A cube that high is held (it cannot rest there), and every target of the
  ranges lies above the gate height, so the gate never shuts on the way to a target.
* ``"reach"``: reward = reach - action rate + the success bonus; success: TCP within
  ``success_radius`` of the cube centre. The episode does not end on success (the bonus is paid
  every step inside the radius), so the return rises smoothly as a learner improves: a short task
  for checking learning on a CPU.

The episode also terminates when the simulation produces a non-finite value (obs and reward are
then sanitised) or when the cube leaves the workspace.

Curriculum (``KukaConfig.curriculum``, pick-and-place): each env keeps a level in [0, 1] in
``State.info["curriculum"]``, which the auto-reset wrapper carries across episodes and
checkpoints save with the env states. On the first step of an episode the target is moved to
``near + level * (drawn - near)``, ``near`` being ``curriculum_near_height`` above the cube's
resting centre and ``drawn`` the target the reset drew from the full ranges; the level rises by
``curriculum_step`` on the first success of an episode and never otherwise. An env's first
episode after ``reset`` is always the full task (the level applies from its second episode on),
so evaluation, which runs one episode per freshly reset env, always measures the full task. The
first observation of a curriculum episode still shows the drawn target (reset cannot see the
level); from its first step on the moved one.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from flax import struct
from mujoco import mjx

from lunarl.envs.base import EnvConfig, LunarEnv, State, bounded
from lunarl.envs.mjx_linalg import pool_safe_cholesky

__all__ = [
    "ASSET_PATH",
    "Curriculum",
    "Kuka",
    "KukaConfig",
    "KukaState",
    "advance_curriculum",
    "curriculum_target",
    "mujoco_reference_steps_per_second",
    "reward_terms",
    "sample_layout",
]

ASSET_PATH = Path(__file__).parent / "assets" / "kuka_pick_place.xml"

TASKS = ("pick_place", "reach")
CARRY_GATES = ("grasp", "lifted")
NUM_ARM_JOINTS = 7
#: Fully open finger travel per pad (m); the slide joints' range in the MJCF.
FINGER_OPEN = 0.04


@dataclasses.dataclass(frozen=True)
class KukaConfig(EnvConfig):
    """Parameters of the Kuka pick-and-place env (lengths in metres, angles in radians)."""

    task: str = "pick_place"
    ctrl_dt: float = bounded(0.02, 0.005, 0.1, "seconds per control step")
    sim_dt: float = bounded(0.01, 0.001, 0.01, "physics timestep; must divide ctrl_dt")
    # Newton solver budget per physics step (MjOption iterations / ls_iterations). Under vmap every
    # line-search step runs for every env, so these bound the cost of the solve directly.
    solver_iterations: int = bounded(3, 1, 100, "Newton iterations per physics step")
    ls_iterations: int = bounded(3, 1, 100, "line-search steps per Newton iteration")
    action_scale: float = bounded(0.04, 0.001, 0.2, "joint-target change per control step at |action| = 1")
    # True: cube and target drawn per reset from the ranges below; False: the seed's fixed layout.
    randomize: bool = True
    # Fixed layout (randomize=False): cube centre (x, y) on the table, target (x, y, z).
    cube_xy: tuple[float, ...] = bounded((0.55, 0.0), -1.0, 1.0)
    target_xyz: tuple[float, ...] = bounded((0.45, 0.25, 0.2), -1.0, 1.0)
    # Randomised layout (randomize=True): uniform ranges (low, high).
    cube_x_range: tuple[float, ...] = bounded((0.45, 0.65), -1.0, 1.0)
    cube_y_range: tuple[float, ...] = bounded((-0.2, 0.2), -1.0, 1.0)
    target_x_range: tuple[float, ...] = bounded((0.4, 0.65), -1.0, 1.0)
    target_y_range: tuple[float, ...] = bounded((-0.25, 0.25), -1.0, 1.0)
    target_z_range: tuple[float, ...] = bounded((0.1, 0.3), 0.03, 1.0)
    success_radius: float = bounded(0.05, 0.005, 0.5)
    # Shaping: distance terms are 1 - tanh(distance_sharpness * distance), in [0, 1].
    distance_sharpness: float = bounded(5.0, 0.1, 100.0)
    lift_height: float = bounded(0.1, 0.01, 0.5, "cube rise that earns the full lift term")
    reach_weight: float = bounded(0.1, 0.0, 100.0)
    grasp_weight: float = bounded(0.25, 0.0, 100.0)
    lift_weight: float = bounded(0.5, 0.0, 100.0)
    carry_weight: float = bounded(1.0, 0.0, 100.0)
    # What the carry term is gated on (see the module docstring): "grasp" (both pads touch the
    # cube) or "lifted" (the cube's centre is at least carry_lift_height above its resting height).
    carry_gate: str = "grasp"
    carry_lift_height: float = bounded(0.02, 0.0, 0.5, "cube rise that opens carry_gate=lifted")
    table_contact_weight: float = bounded(0.1, 0.0, 100.0, "penalty while a pad touches the table")
    action_rate_weight: float = bounded(0.01, 0.0, 100.0, "penalty on ||a_t - a_{t-1}||^2")
    # Large against the per-step terms (at most ~2 per step) so that ending the episode on
    # success pays more than hovering just outside the radius.
    success_bonus: float = bounded(100.0, 0.0, 10_000.0)
    terminate_on_success: bool = bounded(
        True, doc="pick_place: end the episode on success (False: the bonus is paid every step in the radius)"
    )
    # Curriculum (pick_place; see the module docstring): the target starts near the cube and moves
    # out to the full ranges as the env succeeds.
    curriculum: bool = False
    curriculum_start: float = bounded(0.0, 0.0, 1.0, "level of a fresh env (0: target above the cube, 1: full task)")
    curriculum_step: float = bounded(0.05, 0.001, 1.0, "level gained on an episode's first success")
    curriculum_near_height: float = bounded(
        0.08, 0.0, 0.5, "level-0 target height above the cube's resting centre"
    )
    workspace_radius: float = bounded(
        1.0, 0.2, 5.0, "cube farther than this (xy) from the base ends the episode"
    )
    render_width: int = bounded(320, 16, 2048)
    render_height: int = bounded(240, 16, 2048)

    def check(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"KukaConfig.task={self.task!r} is not allowed: choose one of {TASKS}")
        if self.carry_gate not in CARRY_GATES:
            raise ValueError(
                f"KukaConfig.carry_gate={self.carry_gate!r} is not allowed: choose one of {CARRY_GATES}"
            )
        ratio = self.ctrl_dt / self.sim_dt
        if abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(
                f"KukaConfig.ctrl_dt={self.ctrl_dt} must be a whole multiple of sim_dt={self.sim_dt}"
            )
        lengths = {"cube_xy": 2, "target_xyz": 3}
        lengths.update({f"{n}_range": 2 for n in ("cube_x", "cube_y", "target_x", "target_y", "target_z")})
        for name, n in lengths.items():
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(f"KukaConfig.{name}={value!r} must have {n} values")
            if n == 2 and name.endswith("_range") and value[0] > value[1]:
                raise ValueError(f"KukaConfig.{name}={value!r}: low must be <= high")


@struct.dataclass
class KukaState:
    """The env's state within an episode: MJX data, the previous action (for the action-rate
    term), control steps taken and whether the episode has succeeded yet."""

    data: mjx.Data
    prev_action: jax.Array  # [8]
    t: jax.Array  # int32 scalar
    succeeded: jax.Array  # bool scalar


@struct.dataclass
class Curriculum:
    """One env's curriculum state, kept in ``State.info["curriculum"]`` across its episodes."""

    level: jax.Array  # float32 scalar in [0, 1]
    active: jax.Array  # bool scalar: past the env's first step, so new episodes use the level


def curriculum_target(
    config: KukaConfig, level: jax.Array, cube: jax.Array, drawn: jax.Array, cube_rest_z: float
) -> jax.Array:
    """The target of an episode at ``level``: from ``curriculum_near_height`` above the cube's
    resting centre (level 0) to the ``drawn`` full-range target (level 1), on a straight line."""
    near = jnp.stack([cube[0], cube[1], jnp.asarray(cube_rest_z + config.curriculum_near_height, cube.dtype)])
    return near + jnp.clip(level, 0.0, 1.0) * (drawn - near)


def advance_curriculum(config: KukaConfig, curriculum: Curriculum, first_success: jax.Array) -> Curriculum:
    """The level after a step: ``curriculum_step`` higher (at most 1) when the episode has just
    succeeded for the first time, unchanged otherwise. Marks the env active (see the docstring)."""
    gain = jnp.where(first_success, config.curriculum_step, 0.0)
    level = jnp.minimum(curriculum.level + gain, 1.0).astype(jnp.float32)
    return Curriculum(level=level, active=jnp.ones_like(curriculum.active))


def reward_terms(
    config: KukaConfig,
    tcp: jax.Array,
    cube: jax.Array,
    target: jax.Array,
    cube_rest_z: float,
    grasped: jax.Array,
    pads_on_table: jax.Array,
    action: jax.Array,
    prev_action: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reward and its named, unweighted terms (all float32 scalars).

    ``reach``: 1 - tanh(k |tcp - cube|). ``grasp``: both pads touch the cube. ``lift``: cube rise
    over ``lift_height`` (clipped to [0, 1]) while grasped. ``lifted``: the cube's rise is at least
    ``carry_lift_height``. ``carry``: 1 - tanh(k |cube - target|) while grasped or while lifted
    (``carry_gate``). ``table_contact``: a pad touches the table. ``action_rate``: squared change
    of the action. ``success``: the task's goal is met (see the module docstring).
    """
    c = config
    sharp = lambda dist: 1.0 - jnp.tanh(c.distance_sharpness * dist)  # noqa: E731
    tcp_to_cube = jnp.linalg.norm(cube - tcp)
    cube_to_target = jnp.linalg.norm(target - cube)
    grasp = grasped.astype(jnp.float32)
    rise = cube[2] - cube_rest_z
    lifted = (rise >= c.carry_lift_height).astype(jnp.float32)
    carry_gate = lifted if c.carry_gate == "lifted" else grasp
    terms = {
        "reach": sharp(tcp_to_cube),
        "grasp": grasp,
        "lift": grasp * jnp.clip(rise / c.lift_height, 0.0, 1.0),
        "lifted": lifted,
        "carry": carry_gate * sharp(cube_to_target),
        "table_contact": pads_on_table.astype(jnp.float32),
        "action_rate": jnp.sum(jnp.square(action - prev_action)),
    }
    if c.task == "reach":
        success = tcp_to_cube < c.success_radius
        reward = c.reach_weight * terms["reach"]
    else:
        success = cube_to_target < c.success_radius
        reward = (
            c.reach_weight * terms["reach"]
            + c.grasp_weight * terms["grasp"]
            + c.lift_weight * terms["lift"]
            + c.carry_weight * terms["carry"]
            - c.table_contact_weight * terms["table_contact"]
        )
    terms["success"] = success.astype(jnp.float32)
    reward = reward - c.action_rate_weight * terms["action_rate"] + c.success_bonus * terms["success"]
    return reward.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in terms.items()}


def sample_layout(config: KukaConfig, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cube centre (x, y) and target position (x, y, z): the fixed layout, or uniform draws from
    the config's ranges when ``config.randomize``."""
    c = config
    if not c.randomize:
        return jnp.asarray(c.cube_xy, jnp.float32), jnp.asarray(c.target_xyz, jnp.float32)
    ranges = jnp.asarray(
        [c.cube_x_range, c.cube_y_range, c.target_x_range, c.target_y_range, c.target_z_range], jnp.float32
    )
    values = jax.random.uniform(rng, (5,), jnp.float32, ranges[:, 0], ranges[:, 1])
    return values[:2], values[2:]


def _touching(data: mjx.Data, geom_a: int, geom_b: int) -> jax.Array:
    """Whether geoms ``a`` and ``b`` are in contact (penetrating) in ``data``'s contact list.

    MJX keeps a fixed-size contact list (every candidate pair allowed by contype/conaffinity, with
    its distance); mujoco-mjx 3.x exposes it only as ``data._impl.contact`` for the JAX impl.
    """
    contact = data._impl.contact
    g1, g2 = contact.geom[:, 0], contact.geom[:, 1]
    pair = ((g1 == geom_a) & (g2 == geom_b)) | ((g1 == geom_b) & (g2 == geom_a))
    return jnp.any(pair & (contact.dist < 0.0))


class Kuka(LunarEnv):
    """A 7-joint arm picking a cube and placing it at a target, stepped with MuJoCo MJX.

    The MjModel is loaded once per env object and kept for rendering and the C reference; the
    MJX model and a template ``mjx.Data`` are device constants closed over by ``reset``/``step``.
    """

    config_cls: ClassVar[type[EnvConfig]] = KukaConfig
    default_episode_length: ClassVar[int] = 150
    #: MJX on XLA:CPU is orders of magnitude slower with the fusion emitters on.
    cpu_fusion_emitters: ClassVar[bool] = False

    def __init__(self, config: KukaConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        c: KukaConfig = self.config
        model = mujoco.MjModel.from_xml_path(str(ASSET_PATH))
        model.opt.timestep = c.sim_dt
        model.opt.iterations, model.opt.ls_iterations = c.solver_iterations, c.ls_iterations
        self.mj_model = model
        self.mjx_model = mjx.put_model(model, impl="jax")
        self.n_substeps = int(round(c.ctrl_dt / c.sim_dt))

        self._tcp_site = model.site("tcp").id
        self._cube_body = model.body("cube").id
        self._cube_qpos = int(model.jnt_qposadr[model.joint("cube").id])
        self._target_mocap = int(model.body_mocapid[model.body("target").id])
        self._geom = {name: model.geom(name).id for name in ("pad_left", "pad_right", "cube", "table")}
        self._finger_qpos = np.array(
            [model.jnt_qposadr[model.joint(n).id] for n in ("finger_left", "finger_right")]
        )
        self._finger_dof = np.array(
            [model.jnt_dofadr[model.joint(n).id] for n in ("finger_left", "finger_right")]
        )
        self.cube_rest_z = float(model.geom_size[self._geom["cube"], 2])
        home = model.keyframe("home")
        self._home_qpos = jnp.asarray(home.qpos, dtype=jnp.float32)
        self._home_ctrl = jnp.asarray(home.ctrl, dtype=jnp.float32)
        self._ctrl_low = jnp.asarray(model.actuator_ctrlrange[:, 0], dtype=jnp.float32)
        self._ctrl_high = jnp.asarray(model.actuator_ctrlrange[:, 1], dtype=jnp.float32)
        # Which body each frame belongs to, for reset's shift of the cube's and target's frames.
        self._target_body = model.body("target").id
        self._geom_body = jnp.asarray(model.geom_bodyid)
        self._site_body = jnp.asarray(model.site_bodyid)
        self._data_template = self._home_kinematics_template(model)
        self._renderer: OffscreenRenderer | None = None

    # ----------------------------------------------------------------------------------------
    # Sizes
    # ----------------------------------------------------------------------------------------

    @property
    def observation_size(self) -> int:
        return 56 if self.config.task == "pick_place" else 47

    @property
    def action_size(self) -> int:
        return NUM_ARM_JOINTS + 1

    # ----------------------------------------------------------------------------------------
    # Reset / step
    # ----------------------------------------------------------------------------------------

    def reset(self, rng: jax.Array) -> State:
        rng, layout_key = jax.random.split(rng)
        cube_xy, target = sample_layout(self.config, layout_key)
        q = self._cube_qpos
        qpos = self._home_qpos.at[q : q + 2].set(cube_xy).at[q + 2].set(self.cube_rest_z)
        # The arm always starts at the home keyframe, whose kinematics the template holds; only the
        # cube and the target move, by pure translations, so their frames are shifted instead of
        # running mjx.kinematics (which the training wrapper's auto-reset would pay every step).
        # mjx.step recomputes everything from qpos itself.
        t = self._data_template
        shift = jnp.zeros((self.mj_model.nbody, 3), jnp.float32)
        shift = shift.at[self._cube_body].set(qpos[q : q + 3] - self._home_qpos[q : q + 3])
        shift = shift.at[self._target_body].set(target - t.mocap_pos[self._target_mocap])
        data = t.replace(
            qpos=qpos,
            ctrl=self._home_ctrl,
            mocap_pos=t.mocap_pos.at[self._target_mocap].set(target),
            xpos=t.xpos + shift,
            xipos=t.xipos + shift,
            geom_xpos=t.geom_xpos + shift[self._geom_body],
            site_xpos=t.site_xpos + shift[self._site_body],
        )
        prev_action = jnp.zeros(self.action_size, jnp.float32)
        contacts = self._contacts(data)
        obs = self._observation(data, prev_action, contacts)
        zero = jnp.zeros((), jnp.float32)
        _, terms = self._rewards(data, prev_action, prev_action, contacts)
        metrics = {name: zero for name in terms} | {"tcp_to_cube": zero, "cube_to_target": zero}
        info: dict[str, Any] = {"rng": rng}
        if self.config.curriculum:
            start = jnp.asarray(self.config.curriculum_start, jnp.float32)
            info["curriculum"] = Curriculum(level=start, active=jnp.zeros((), bool))
            metrics["curriculum_level"] = start
        pipeline_state = KukaState(
            data=data, prev_action=prev_action, t=jnp.zeros((), jnp.int32), succeeded=jnp.zeros((), bool)
        )
        return State(pipeline_state=pipeline_state, obs=obs, reward=zero, done=zero, metrics=metrics, info=info)

    def step(self, state: State, action: jax.Array) -> State:
        c = self.config
        ps: KukaState = state.pipeline_state
        action = jnp.clip(jnp.nan_to_num(action.astype(jnp.float32)), -1.0, 1.0)
        arm_target = ps.data.ctrl[:NUM_ARM_JOINTS] + c.action_scale * action[:NUM_ARM_JOINTS]
        gripper_target = 0.5 * (action[NUM_ARM_JOINTS] + 1.0) * FINGER_OPEN
        ctrl = jnp.clip(jnp.append(arm_target, gripper_target), self._ctrl_low, self._ctrl_high)
        data = ps.data.replace(ctrl=ctrl)
        if c.curriculum:
            # An episode's target is set on its first step (reset cannot see the env's level).
            curriculum: Curriculum = state.info["curriculum"]
            drawn = data.mocap_pos[self._target_mocap]
            moved = curriculum_target(c, curriculum.level, data.xpos[self._cube_body], drawn, self.cube_rest_z)
            target = jnp.where(curriculum.active & (ps.t == 0), moved, drawn)
            data = data.replace(mocap_pos=data.mocap_pos.at[self._target_mocap].set(target))
        # On XLA:CPU, MJX's batched LAPACK Cholesky calls can deadlock the thread pool at large
        # batches; trace them with lunarl's chunked versions (lunarl/envs/mjx_linalg.py).
        with pool_safe_cholesky(jax.default_backend() == "cpu"):
            data = jax.lax.fori_loop(0, self.n_substeps, lambda _, d: mjx.step(self.mjx_model, d), data)

        contacts = self._contacts(data)
        reward, terms = self._rewards(data, action, ps.prev_action, contacts)
        cube = data.xpos[self._cube_body]
        finite = jnp.all(jnp.isfinite(data.qpos)) & jnp.all(jnp.isfinite(data.qvel))
        out_of_bounds = (jnp.linalg.norm(cube[:2]) > c.workspace_radius) | (cube[2] < -0.1)
        success = (terms["success"] > 0.0) & finite
        done = (~finite) | out_of_bounds
        if c.task == "pick_place" and c.terminate_on_success:
            done = done | success
        reward = jnp.where(finite, jnp.nan_to_num(reward), 0.0)

        tcp = data.site_xpos[self._tcp_site]
        target = data.mocap_pos[self._target_mocap]
        metrics = {k: jnp.where(finite, v, 0.0) for k, v in terms.items()}
        metrics["tcp_to_cube"] = jnp.nan_to_num(jnp.linalg.norm(cube - tcp), nan=0.0, posinf=0.0)
        metrics["cube_to_target"] = jnp.nan_to_num(jnp.linalg.norm(target - cube), nan=0.0, posinf=0.0)
        info = state.info
        if c.curriculum:
            curriculum = advance_curriculum(c, state.info["curriculum"], success & ~ps.succeeded)
            info = {**state.info, "curriculum": curriculum}
            metrics["curriculum_level"] = curriculum.level
        pipeline_state = KukaState(data=data, prev_action=action, t=ps.t + 1, succeeded=ps.succeeded | success)
        return state.replace(
            pipeline_state=pipeline_state,
            obs=self._observation(data, action, contacts),
            reward=reward.astype(jnp.float32),
            done=done.astype(jnp.float32),
            metrics=metrics,
            info=info,
        )

    def _contacts(self, data: mjx.Data) -> jax.Array:
        """Contact flags [left pad on the cube, right pad on the cube, a pad on the table] (bool)."""
        g = self._geom
        return jnp.stack(
            [
                _touching(data, g["pad_left"], g["cube"]),
                _touching(data, g["pad_right"], g["cube"]),
                _touching(data, g["pad_left"], g["table"]) | _touching(data, g["pad_right"], g["table"]),
            ]
        )

    def _rewards(
        self, data: mjx.Data, action: jax.Array, prev_action: jax.Array, contacts: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        grasped = contacts[0] & contacts[1]
        pads_on_table = contacts[2]
        return reward_terms(
            self.config,
            tcp=data.site_xpos[self._tcp_site],
            cube=data.xpos[self._cube_body],
            target=data.mocap_pos[self._target_mocap],
            cube_rest_z=self.cube_rest_z,
            grasped=grasped,
            pads_on_table=pads_on_table,
            action=action,
            prev_action=prev_action,
        )

    def _observation(self, data: mjx.Data, prev_action: jax.Array, contacts: jax.Array) -> jax.Array:
        tcp = data.site_xpos[self._tcp_site]
        cube = data.xpos[self._cube_body]
        cube_rot = data.xmat[self._cube_body][:, :2].T.reshape(-1)  # columns x and y
        target = data.mocap_pos[self._target_mocap]
        extra = []
        if self.config.task == "pick_place":
            tcp_rot = data.site_xmat[self._tcp_site].reshape(3, 3)[:, :2].T.reshape(-1)
            extra = [tcp_rot, contacts.astype(jnp.float32)]
        obs = jnp.concatenate(
            [
                data.qpos[:NUM_ARM_JOINTS],
                data.qvel[:NUM_ARM_JOINTS],
                data.qpos[self._finger_qpos],
                data.qvel[self._finger_dof],
                tcp,
                cube,
                cube_rot,
                target,
                cube - tcp,
                target - cube,
                prev_action,
                *extra,
            ]
        )
        # A diverged simulation must not leak NaN/inf into the agent; the step also ends it.
        return jnp.clip(jnp.nan_to_num(obs, nan=0.0, posinf=0.0, neginf=0.0), -100.0, 100.0).astype(
            jnp.float32
        )

    # ----------------------------------------------------------------------------------------
    # Host-side helpers
    # ----------------------------------------------------------------------------------------

    def _home_kinematics_template(self, model: mujoco.MjModel) -> mjx.Data:
        """``mjx.Data`` at the home keyframe with its frames (body, geom and site positions and
        orientations) computed by C MuJoCo's ``mj_kinematics``; ``reset`` shifts the cube's and
        the target's."""
        home = mujoco.MjData(model)
        mujoco.mj_resetDataKeyframe(model, home, model.keyframe("home").id)
        mujoco.mj_kinematics(model, home)
        frames = ("xpos", "xquat", "xmat", "xipos", "ximat", "geom_xpos", "geom_xmat", "site_xpos", "site_xmat")
        template = mjx.make_data(self.mjx_model, impl="jax")
        return template.replace(
            mocap_pos=jnp.asarray(home.mocap_pos, jnp.float32),
            mocap_quat=jnp.asarray(home.mocap_quat, jnp.float32),
            **{
                name: jnp.asarray(getattr(home, name), jnp.float32).reshape(getattr(template, name).shape)
                for name in frames
            },
        )

    def mj_data(self, state: State) -> mujoco.MjData:
        """A C ``MjData`` holding one (unbatched) state's positions, velocities, controls and
        target, with kinematics recomputed (for rendering, scripted controllers, checks)."""
        ps: KukaState = state.pipeline_state
        if np.ndim(ps.data.qpos) != 1:
            raise ValueError(f"expected one unbatched state, got qpos of shape {np.shape(ps.data.qpos)}")
        d = mujoco.MjData(self.mj_model)
        d.qpos[:] = np.asarray(ps.data.qpos)
        d.qvel[:] = np.asarray(ps.data.qvel)
        d.ctrl[:] = np.asarray(ps.data.ctrl)
        d.mocap_pos[:] = np.asarray(ps.data.mocap_pos)
        d.mocap_quat[:] = np.asarray(ps.data.mocap_quat)
        mujoco.mj_forward(self.mj_model, d)
        return d

    def render(self, state: State) -> np.ndarray:
        """A uint8 [render_height, render_width, 3] frame of one (unbatched) state, rendered offscreen
        (see ``OffscreenRenderer``; raises ``RuntimeError`` when no OpenGL platform is available)."""
        if self._renderer is None:
            self._renderer = OffscreenRenderer(
                self.mj_model, self.config.render_width, self.config.render_height
            )
        return self._renderer.render(self.mj_data(state))


class OffscreenRenderer:
    """MuJoCo's OpenGL renderer on a headless context (EGL, or OSMesa with ``MUJOCO_GL=osmesa``).

    ``mujoco.Renderer`` picks its GL platform from ``MUJOCO_GL`` when mujoco is first imported
    (often by brax, before lunarl can set anything) and falls back to GLFW, which needs a display.
    Creating the EGL/OSMesa context here makes rendering independent of import order.
    """

    def __init__(self, model: mujoco.MjModel, width: int, height: int):
        backend = os.environ.get("MUJOCO_GL", "egl").lower()
        if backend not in ("egl", "osmesa"):
            backend = "egl"
        if width > model.vis.global_.offwidth or height > model.vis.global_.offheight:
            raise ValueError(
                f"render size {width}x{height} exceeds the model's offscreen buffer "
                f"{model.vis.global_.offwidth}x{model.vis.global_.offheight}"
            )
        try:
            if backend == "osmesa":
                from mujoco.osmesa import GLContext
            else:
                from mujoco.egl import GLContext
            self._gl = GLContext(width, height)
            self._gl.make_current()
            self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        except Exception as e:  # ImportError, OSError, mujoco.FatalError, EGL errors
            raise RuntimeError(
                f"Kuka.render needs an offscreen OpenGL platform and {backend!r} failed: install "
                f"libegl1 (EGL) or libosmesa6 (OSMesa, with MUJOCO_GL=osmesa). Underlying error: {e}"
            ) from e
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._model = model
        self._scene = mujoco.MjvScene(model, maxgeom=1000)
        self._option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, width, height)
        self._camera = mujoco.MjvCamera()
        self._camera.lookat[:] = (0.45, 0.0, 0.2)
        self._camera.distance, self._camera.azimuth, self._camera.elevation = 1.6, 150.0, -25.0

    def render(self, data: mujoco.MjData) -> np.ndarray:
        self._gl.make_current()
        mujoco.mjv_updateScene(
            self._model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene
        )
        mujoco.mjr_render(self._rect, self._scene, self._context)
        pixels = np.empty((self._rect.height, self._rect.width, 3), dtype=np.uint8)
        mujoco.mjr_readPixels(pixels, None, self._rect, self._context)
        return np.ascontiguousarray(np.flipud(pixels))  # OpenGL rows run bottom-up


def mujoco_reference_steps_per_second(env: Kuka, num_steps: int, seed: int = 0) -> float:
    """Control steps per second of C ``mujoco.mj_step`` on one ``MjData`` of the same model.

    One control step = ``env.n_substeps`` calls of ``mj_step`` with the same kind of control as
    the MJX env (random joint-target deltas of ``action_scale``, random gripper opening), so the
    number compares directly with the MJX env's control steps per second. Single thread, no JAX.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    m = env.mj_model
    d = mujoco.MjData(m)
    mujoco.mj_resetDataKeyframe(m, d, m.keyframe("home").id)
    mujoco.mj_forward(m, d)
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1.0, 1.0, (num_steps, env.action_size))
    low, high = m.actuator_ctrlrange[:, 0], m.actuator_ctrlrange[:, 1]
    scale = env.config.action_scale
    start = time.perf_counter()
    for a in actions:
        ctrl = np.append(
            d.ctrl[:NUM_ARM_JOINTS] + scale * a[:NUM_ARM_JOINTS], 0.5 * (a[-1] + 1.0) * FINGER_OPEN
        )
        d.ctrl[:] = np.clip(ctrl, low, high)
        for _ in range(env.n_substeps):
            mujoco.mj_step(m, d)
    return num_steps / (time.perf_counter() - start)
