"""The Kuka pick-and-place env on MuJoCo MJX.

MJX compiles slowly on a CPU (tens of seconds per function), so every test shares one env and one
pair of jitted single-env ``reset``/``step`` functions (module fixture), drives them from the host,
and the only batched program is the 4-env training-wrapper check (slow). (Large batches of MJX on
CPU used to hang in ``block_until_ready``; tests/test_mjx_linalg.py covers the fix.)
"""

import json

import gymnasium
import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import lunarl
from lunarl.envs import wrap_for_training
from lunarl.envs.kuka import (
    ASSET_PATH,
    Curriculum,
    Kuka,
    KukaConfig,
    advance_curriculum,
    curriculum_target,
    mujoco_reference_steps_per_second,
    reward_terms,
    sample_layout,
)
from lunarl.run.checkpoint import Checkpoints


@pytest.fixture(scope="module")
def env():
    return lunarl.envs.make("kuka")


@pytest.fixture(scope="module")
def fns(env):
    return jax.jit(env.reset), jax.jit(env.step)


def _leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ------------------------------------------------------------------------------------------------
# Config and reward function (no MJX compile)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"task": "stack"}, "task"),
        ({"action_scale": 0.0}, "action_scale"),
        ({"success_radius": 2.0}, "success_radius"),
        ({"ctrl_dt": 0.02, "sim_dt": 0.003}, "ctrl_dt"),
        ({"solver_iterations": 0}, "solver_iterations"),
        ({"target_xyz": (0.5, 0.0)}, "target_xyz"),
        ({"cube_x_range": (0.6, 0.4)}, "cube_x_range"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        KukaConfig.build(**overrides)


def test_physics_settings_reach_the_model_and_match_the_xml():
    """The config's step length and solver budget are what MJX runs; their defaults are the MJCF's,
    so C MuJoCo loading the file alone (the reference in bench_envs.py) steps the same physics."""
    xml = mujoco.MjModel.from_xml_path(str(ASSET_PATH))
    cfg = KukaConfig()
    assert (xml.opt.timestep, xml.opt.iterations, xml.opt.ls_iterations) == (
        cfg.sim_dt,
        cfg.solver_iterations,
        cfg.ls_iterations,
    )
    old = Kuka(sim_dt=0.005, solver_iterations=5, ls_iterations=8)  # the settings before issue 17
    assert old.n_substeps == 4
    assert (old.mjx_model.opt.timestep, old.mjx_model.opt.iterations, old.mjx_model.opt.ls_iterations) == (
        0.005,
        5,
        8,
    )
    # Only the gripper pads, the cube and the table can collide (arm links never do).
    colliding = {xml.geom(i).name for i in range(xml.ngeom) if xml.geom_contype[i] or xml.geom_conaffinity[i]}
    assert colliding == {"table", "cube", "pad_left", "pad_right"}
    # Pad-table contacts are frictionless pairs (1 row each); the arm joints have no limit rows
    # (their targets are clipped to the ranges), the finger slides keep theirs.
    pairs = {
        (frozenset((xml.geom(int(g1)).name, xml.geom(int(g2)).name)), int(dim))
        for g1, g2, dim in zip(xml.pair_geom1, xml.pair_geom2, xml.pair_dim, strict=True)
    }
    assert pairs == {(frozenset(("pad_left", "table")), 1), (frozenset(("pad_right", "table")), 1)}
    limited = {xml.joint(i).name for i in range(xml.njnt) if xml.jnt_limited[i]}
    assert limited == {"finger_left", "finger_right"}


def test_reward_terms_are_gated_on_grasp():
    cfg = KukaConfig()
    tcp, cube, target = jnp.array([0.5, 0.0, 0.1]), jnp.array([0.5, 0.0, 0.1]), jnp.array([0.5, 0.0, 0.12])
    zeros = jnp.zeros(8)
    args = dict(cube_rest_z=0.025, pads_on_table=jnp.array(False), action=zeros, prev_action=zeros)
    _, loose = reward_terms(cfg, tcp, cube, target, grasped=jnp.array(False), **args)
    reward, held = reward_terms(cfg, tcp, cube, target, grasped=jnp.array(True), **args)
    assert loose["reach"] == pytest.approx(1.0) and held["reach"] == pytest.approx(1.0)
    assert loose["lift"] == 0.0 and loose["carry"] == 0.0 and loose["grasp"] == 0.0
    assert held["grasp"] == 1.0 and held["lift"] == pytest.approx(0.75) and held["carry"] > 0.9
    assert held["success"] == 1.0 and float(reward) > cfg.success_bonus
    # The reach task ignores the cube-to-target distance: success means the TCP is at the cube.
    reach_cfg = KukaConfig(task="reach")
    far_target = jnp.array([0.0, 0.5, 0.3])
    r, terms = reward_terms(reach_cfg, tcp, cube, far_target, grasped=jnp.array(False), **args)
    assert terms["success"] == 1.0 and float(r) == pytest.approx(
        reach_cfg.reach_weight + reach_cfg.success_bonus
    )
    r, terms = reward_terms(
        reach_cfg, tcp + jnp.array([0.2, 0, 0]), cube, far_target, grasped=jnp.array(False), **args
    )
    assert terms["success"] == 0.0 and 0.0 < float(r) < reach_cfg.reach_weight


def test_carry_gated_on_lift_pays_nothing_for_a_cube_held_on_the_table():
    """carry_gate="lifted": a cube held on the table (both pads on it) earns no carry, however
    close the target; the same cube 3 cm up earns it, held or not. The grasp gate pays both."""
    zeros = jnp.zeros(8)
    args = dict(cube_rest_z=0.025, pads_on_table=jnp.array(False), action=zeros, prev_action=zeros)
    target = jnp.array([0.5, 0.0, 0.105])  # the curriculum's level-0 target, 8 cm above the rest
    on_table, up = jnp.array([0.5, 0.0, 0.025]), jnp.array([0.5, 0.0, 0.055])
    lifted_cfg, grasp_cfg = KukaConfig(carry_gate="lifted"), KukaConfig(carry_gate="grasp")
    _, held_down = reward_terms(lifted_cfg, on_table, on_table, target, grasped=jnp.array(True), **args)
    assert held_down["carry"] == 0.0 and held_down["lifted"] == 0.0 and held_down["grasp"] == 1.0
    _, old = reward_terms(grasp_cfg, on_table, on_table, target, grasped=jnp.array(True), **args)
    assert float(old["carry"]) > 0.5  # what session 3's policy collected without lifting
    for grasped in (True, False):
        r_up, held_up = reward_terms(lifted_cfg, up, up, target, grasped=jnp.array(grasped), **args)
        assert held_up["lifted"] == 1.0 and float(held_up["carry"]) == pytest.approx(
            1.0 - np.tanh(lifted_cfg.distance_sharpness * 0.05), rel=1e-5
        )
    # Just below the gate height: still nothing.
    low = on_table + jnp.array([0.0, 0.0, 0.019])
    _, below = reward_terms(lifted_cfg, low, low, target, grasped=jnp.array(True), **args)
    assert below["carry"] == 0.0 and float(below["lift"]) > 0.0
    with pytest.raises(ValueError, match="carry_gate"):
        KukaConfig(carry_gate="held")


def test_curriculum_moves_the_target_and_advances_only_on_success():
    cfg = KukaConfig(curriculum=True, curriculum_step=0.25, curriculum_near_height=0.08)
    cube, drawn = jnp.array([0.5, 0.1, 0.025]), jnp.array([0.4, -0.2, 0.3])
    np.testing.assert_allclose(curriculum_target(cfg, jnp.array(0.0), cube, drawn, 0.025), [0.5, 0.1, 0.105], atol=1e-6)
    np.testing.assert_allclose(curriculum_target(cfg, jnp.array(1.0), cube, drawn, 0.025), drawn, atol=1e-6)
    np.testing.assert_allclose(
        curriculum_target(cfg, jnp.array(0.5), cube, drawn, 0.025), [0.45, -0.05, 0.2025], atol=1e-6
    )
    cur = Curriculum(level=jnp.array(0.5, jnp.float32), active=jnp.array(False))
    same = advance_curriculum(cfg, cur, jnp.array(False))
    assert float(same.level) == 0.5 and bool(same.active)
    up = advance_curriculum(cfg, cur, jnp.array(True))
    assert float(up.level) == 0.75
    assert float(advance_curriculum(cfg, advance_curriculum(cfg, up, jnp.array(True)), jnp.array(True)).level) == 1.0


def test_curriculum_state_is_in_the_training_env_state_and_checkpoints(tmp_path):
    """The level lives in the batched env state PPO checkpoints (State.info, which the auto-reset
    wrapper keeps across episodes); a save/restore returns it unchanged. reset only: no MJX step."""
    env = Kuka(curriculum=True, curriculum_start=0.2)
    wrapped = wrap_for_training(env, episode_length=150)
    state = jax.jit(wrapped.reset)(jax.random.split(jax.random.PRNGKey(0), 4))
    np.testing.assert_allclose(state.info["curriculum"].level, 0.2)
    assert not np.asarray(state.info["curriculum"].active).any()
    assert "curriculum" not in Kuka().reset(jax.random.PRNGKey(0)).info  # off: the env state is as before
    levels = jnp.array([0.2, 0.35, 0.5, 1.0], jnp.float32)
    state = state.replace(info={**state.info, "curriculum": Curriculum(level=levels, active=jnp.ones(4, bool))})
    config = {"env": {"name": "kuka"}, "agent": {"name": "ppo"}, "seed": 0, "num_seeds": 1}
    ck = Checkpoints(str(tmp_path / "ck"))
    ck.save(1, state, config, {"iteration": 1})
    ck.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _, _ = ck.restore("latest", target, config=config)
    ck.close()
    np.testing.assert_array_equal(restored.info["curriculum"].level, levels)
    assert np.asarray(restored.info["curriculum"].active).all()


# ------------------------------------------------------------------------------------------------
# The contract, single env
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_reset_step_shapes_dtypes_and_determinism(env, fns):
    reset, step = fns
    state = reset(jax.random.PRNGKey(0))
    assert state.obs.shape == (env.observation_size,) == (56,) and state.obs.dtype == jnp.float32
    assert Kuka(task="reach").observation_size == 47
    assert state.info["rng"].shape == (2,) and state.info["rng"].dtype == jnp.uint32
    actions = jax.random.uniform(jax.random.PRNGKey(1), (10, env.action_size), minval=-1.0, maxval=1.0)
    runs = []
    for _ in range(2):
        s = reset(jax.random.PRNGKey(0))
        for a in actions:
            s = step(s, a)
        runs.append(s)
    a, b = runs
    assert a.reward.shape == () and a.reward.dtype == jnp.float32
    assert a.done.shape == () and a.done.dtype == jnp.float32
    assert {"success", "reach", "grasp", "lift", "carry"} <= set(a.metrics)
    for name, value in a.metrics.items():
        assert jnp.shape(value) == () and value.dtype == jnp.float32, name
    assert _leaves_equal(a, b), "same rng and actions must give bit-identical states"
    # The env state is pipeline_state; info carries only the rng.
    assert set(a.info) == {"rng"}
    # The previous action is observed (8 values before the gripper frame and the contact flags)
    # and kept for the action-rate term.
    np.testing.assert_array_equal(np.asarray(a.obs[-17:-9]), np.asarray(actions[-1]))
    assert set(np.unique(np.asarray(a.obs[-3:]))) <= {0.0, 1.0}
    assert int(a.pipeline_state.t) == 10


@pytest.mark.timeout(300)
def test_layout_fixed_or_randomised(env, fns):
    reset, _ = fns
    cube_body = env.mj_model.body("cube").id

    def layout(state):
        d = state.pipeline_state.data
        return np.asarray(d.xpos[cube_body]), np.asarray(d.mocap_pos[0])

    cfg = env.config
    cubes, targets = zip(*(layout(reset(jax.random.PRNGKey(i))) for i in range(6)), strict=True)
    cubes, targets = np.stack(cubes), np.stack(targets)
    assert len({tuple(c) for c in cubes}) == 6, "randomize=True must draw a new cube position per reset"
    assert np.all((cubes[:, 0] >= cfg.cube_x_range[0]) & (cubes[:, 0] <= cfg.cube_x_range[1]))
    assert np.all((targets[:, 2] >= cfg.target_z_range[0]) & (targets[:, 2] <= cfg.target_z_range[1]))
    np.testing.assert_allclose(cubes[:, 2], env.cube_rest_z)
    fixed = KukaConfig(randomize=False)
    for key in jax.random.split(jax.random.PRNGKey(3), 3):
        cube_xy, target = sample_layout(fixed, key)
        np.testing.assert_allclose(cube_xy, fixed.cube_xy, atol=1e-6)
        np.testing.assert_allclose(target, fixed.target_xyz, atol=1e-6)


@pytest.mark.timeout(300)
def test_reset_frames_match_c_mujoco_kinematics(env, fns):
    """reset shifts precomputed home-pose frames instead of running kinematics: they must be
    what C MuJoCo's mj_kinematics computes for the reset's qpos and target."""
    reset, _ = fns
    m = env.mj_model
    for seed in range(3):
        data = reset(jax.random.PRNGKey(seed)).pipeline_state.data
        d = mujoco.MjData(m)
        d.qpos[:], d.mocap_pos[:], d.mocap_quat[:] = data.qpos, data.mocap_pos, data.mocap_quat
        mujoco.mj_kinematics(m, d)
        for name in ("xpos", "xquat", "xmat", "xipos", "ximat", "geom_xpos", "geom_xmat", "site_xpos", "site_xmat"):
            got = np.asarray(getattr(data, name)).reshape(getattr(d, name).shape)
            np.testing.assert_allclose(got, getattr(d, name), atol=1e-6, err_msg=name)


@pytest.mark.timeout(300)
def test_cube_at_rest_stays_put(env, fns):
    reset, step = fns
    state = reset(jax.random.PRNGKey(0))
    start = env.mj_data(state)
    cube = env.mj_model.body("cube").id
    action = jnp.zeros(env.action_size)
    for _ in range(500):
        state = step(state, action)
    end = env.mj_data(state)
    assert float(state.done) == 0.0
    np.testing.assert_allclose(end.xpos[cube], start.xpos[cube], atol=1e-3)
    np.testing.assert_allclose(end.xquat[cube], start.xquat[cube], atol=1e-3)
    assert np.abs(end.qvel).max() < 1e-2
    # With gravity compensation the arm holds its pose on its position targets.
    np.testing.assert_allclose(end.qpos[:7], end.ctrl[:7], atol=1e-2)


@pytest.mark.timeout(300)
def test_no_nan_under_random_and_extreme_actions(env, fns):
    reset, step = fns
    rng = np.random.default_rng(0)
    state = reset(jax.random.PRNGKey(5))
    for t in range(300):
        action = (
            rng.uniform(-1, 1, env.action_size)
            if t % 100 < 70
            else np.sign(rng.uniform(-1, 1, env.action_size))
        )
        state = step(state, jnp.asarray(action, jnp.float32))
        assert np.isfinite(np.asarray(state.obs)).all() and np.isfinite(float(state.reward)), t
        if float(state.done):
            state = reset(jax.random.PRNGKey(100 + t))
    assert np.isfinite(np.asarray(state.pipeline_state.data.qpos)).all()


@pytest.mark.timeout(300)
def test_diverged_simulation_terminates_with_clean_outputs(env, fns):
    reset, step = fns
    state = reset(jax.random.PRNGKey(0))
    data = state.pipeline_state.data
    broken = state.replace(
        pipeline_state=state.pipeline_state.replace(data=data.replace(qvel=data.qvel.at[3].set(jnp.nan)))
    )
    out = step(broken, jnp.zeros(env.action_size))
    assert float(out.done) == 1.0
    assert np.isfinite(np.asarray(out.obs)).all() and np.isfinite(float(out.reward))
    assert all(np.isfinite(float(v)) for v in out.metrics.values())


# ------------------------------------------------------------------------------------------------
# Physics: a scripted pick-and-place, and MJX against C MuJoCo
# ------------------------------------------------------------------------------------------------

_TCP_DOWN = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])  # z down, fingers along y


def _ik_action(env, d, goal, gripper, gain=3.0, max_dq=0.1):
    """Damped-least-squares IK on the true state: the action that moves the TCP toward ``goal``
    with the gripper pointing down (-1 closes the gripper, +1 opens it)."""
    m, tcp = env.mj_model, env.mj_model.site("tcp").id
    jac_pos, jac_rot = np.zeros((3, m.nv)), np.zeros((3, m.nv))
    mujoco.mj_jacSite(m, d, jac_pos, jac_rot, tcp)
    rot = d.site_xmat[tcp].reshape(3, 3)
    pos_err = goal - d.site_xpos[tcp]
    rot_err = 0.5 * sum(np.cross(rot[:, i], _TCP_DOWN[:, i]) for i in range(3))
    jac = np.vstack([jac_pos[:, :7], jac_rot[:, :7]])
    err = np.concatenate([pos_err, rot_err])
    dq = jac.T @ np.linalg.solve(jac @ jac.T + 1e-3 * np.eye(6), gain * err)
    arm = (d.qpos[:7] + np.clip(dq, -max_dq, max_dq) - d.ctrl[:7]) / env.config.action_scale
    return np.append(np.clip(arm, -1.0, 1.0), gripper).astype(np.float32), float(np.linalg.norm(pos_err))


class ScriptedPick:
    """A phase machine for one env: above the cube -> descend -> close -> lift -> carry to the
    target (keeping the cube's offset in the grip), each phase an IK goal."""

    def __init__(self, env):
        self.env, self.phase, self.hold, self.closed_at = env, "above", None, 0
        self._cube, self._tcp = env.mj_model.body("cube").id, env.mj_model.site("tcp").id

    def act(self, d, t: int) -> np.ndarray:
        """The action for C ``MjData`` ``d`` (kinematics current) at control step ``t``; advances
        the phase on the distance to the current goal."""
        cube, target = d.xpos[self._cube].copy(), d.mocap_pos[0].copy()
        goal, gripper = {
            "above": lambda: (cube + [0.0, 0.0, 0.1], 1.0),
            "descend": lambda: (cube, 1.0),
            "close": lambda: (self.hold, -1.0),
            "lift": lambda: (self.hold + [0.0, 0.0, 0.1], -1.0),
            "carry": lambda: (target + d.site_xpos[self._tcp] - cube, -1.0),
        }[self.phase]()
        action, err = _ik_action(self.env, d, goal, gripper)
        if self.phase == "above" and err < 0.015:
            self.phase = "descend"
        elif self.phase == "descend" and err < 0.006:
            self.phase, self.hold, self.closed_at = "close", d.site_xpos[self._tcp].copy(), t
        elif self.phase == "close" and t - self.closed_at > 8:
            self.phase = "lift"
        elif self.phase == "lift" and err < 0.02:
            self.phase = "carry"
        return action


@pytest.mark.timeout(400)
@pytest.mark.parametrize("seed", [0, 2])
def test_scripted_pick_and_place_succeeds_and_terms_fire_in_order(env, fns, seed):
    reset, step = fns
    state = reset(jax.random.PRNGKey(seed))
    controller = ScriptedPick(env)
    first: dict[str, int] = {}
    thresholds = {"reach": 0.9, "grasp": 0.5, "lift": 0.5, "carry": 0.5, "success": 0.5}
    for t in range(env.default_episode_length):
        phase = controller.phase  # the phase that chose this step's action
        state = step(state, jnp.asarray(controller.act(env.mj_data(state), t)))
        for name, threshold in thresholds.items():
            if float(state.metrics[name]) > threshold:
                first.setdefault(name, t)
        assert float(state.metrics["table_contact"]) == 0.0 or phase in ("descend", "close")
        if float(state.done):
            break
    assert float(state.metrics["success"]) == 1.0 and float(state.done) == 1.0, (controller.phase, first)
    assert float(state.metrics["cube_to_target"]) < env.config.success_radius
    order = [first.get(name, -1) for name in thresholds]
    assert -1 not in order and order == sorted(order) and len(set(order[1:])) == 4, first
    assert float(state.reward) > env.config.success_bonus


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_curriculum_in_episodes():
    """With the curriculum on: an env's first episode is the full task (what evaluation sees); a
    success raises the level once; the next episode (the wrapper keeps ``info``, swaps in a fresh
    episode) starts with the target moved toward the cube; an episode without success leaves the
    level alone."""
    cur_env = Kuka(curriculum=True, curriculum_start=0.0, curriculum_step=0.3)
    reset, step = jax.jit(cur_env.reset), jax.jit(cur_env.step)
    state = reset(jax.random.PRNGKey(0))
    drawn = np.asarray(state.pipeline_state.data.mocap_pos[0])
    controller = ScriptedPick(cur_env)
    for t in range(cur_env.default_episode_length):
        state = step(state, jnp.asarray(controller.act(cur_env.mj_data(state), t)))
        if t == 0:
            np.testing.assert_array_equal(np.asarray(state.pipeline_state.data.mocap_pos[0]), drawn)
        if float(state.done):
            break
    assert float(state.metrics["success"]) == 1.0
    assert float(state.info["curriculum"].level) == pytest.approx(0.3)
    assert float(state.metrics["curriculum_level"]) == pytest.approx(0.3)
    # The auto-reset wrapper's swap: a fresh episode's pipeline_state and obs, this env's info.
    fresh = reset(jax.random.PRNGKey(7))
    state = fresh.replace(info=state.info)
    cube_body = cur_env.mj_model.body("cube").id
    cube = fresh.pipeline_state.data.xpos[cube_body]
    expected = curriculum_target(
        cur_env.config, jnp.array(0.3), cube, fresh.pipeline_state.data.mocap_pos[0], cur_env.cube_rest_z
    )
    for _ in range(20):  # no success: the arm does not move
        state = step(state, jnp.zeros(cur_env.action_size))
        np.testing.assert_allclose(np.asarray(state.pipeline_state.data.mocap_pos[0]), expected, atol=1e-6)
    assert float(state.info["curriculum"].level) == pytest.approx(0.3)
    obs = np.asarray(state.obs)  # target (30:33) and cube-to-target (36:39) show the moved target
    np.testing.assert_allclose(obs[30:33], expected, atol=1e-6)
    np.testing.assert_allclose(obs[36:39], obs[30:33] - obs[21:24], atol=1e-5)


def scripted_success_rate(env, num_layouts: int, seed: int = 123) -> tuple[float, list[str]]:
    """Fraction of ``num_layouts`` random layouts on which the scripted controller places the cube
    (``metrics["success"] = 1`` when the episode ends), with the phases the failures ended in.
    One vmapped MJX step for all layouts; the IK runs per env on the host."""
    m = env.mj_model
    reset, step = jax.jit(jax.vmap(env.reset)), jax.jit(jax.vmap(env.step))
    state = reset(jax.random.split(jax.random.PRNGKey(seed), num_layouts))
    controllers = [ScriptedPick(env) for _ in range(num_layouts)]
    datas = [mujoco.MjData(m) for _ in range(num_layouts)]
    ended, succeeded = np.zeros(num_layouts, bool), np.zeros(num_layouts, bool)
    for t in range(env.default_episode_length):
        data = state.pipeline_state.data
        qpos, qvel, ctrl, mocap = (np.asarray(x) for x in (data.qpos, data.qvel, data.ctrl, data.mocap_pos))
        actions = np.zeros((num_layouts, env.action_size), np.float32)
        for i, (controller, d) in enumerate(zip(controllers, datas, strict=True)):
            d.qpos[:], d.qvel[:], d.ctrl[:], d.mocap_pos[:] = qpos[i], qvel[i], ctrl[i], mocap[i]
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)  # for mj_jacSite
            actions[i] = controller.act(d, t)
        state = step(state, jnp.asarray(actions))
        done, success = np.asarray(state.done) > 0, np.asarray(state.metrics["success"]) > 0
        succeeded |= done & success & ~ended  # a finished env keeps stepping; count its first end
        ended |= done
        if ended.all():
            break
    failures = [c.phase for c, ok in zip(controllers, succeeded, strict=True) if not ok]
    return float(succeeded.mean()), failures


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scripted_pick_and_place_on_random_layouts(env):
    """The physics settings (step length, solver budget) keep the task solvable: the scripted
    controller places the cube on >= 95% of 64 random layouts (61 of 64)."""
    rate, failures = scripted_success_rate(env, 64)
    assert rate >= 0.95, (rate, failures)


@pytest.mark.timeout(300)
def test_mjx_matches_c_mujoco_on_a_short_trajectory(env, fns):
    """Same model, same controls: MJX (float32) and C MuJoCo (float64) stay close for 25 control
    steps of random joint-target deltas with the cube resting on the table."""
    reset, step = fns
    state = reset(jax.random.PRNGKey(0))
    m, d = env.mj_model, env.mj_data(state)
    rng = np.random.default_rng(1)
    for _ in range(25):
        action = rng.uniform(-1, 1, env.action_size).astype(np.float32)
        state = step(state, jnp.asarray(action))
        d.ctrl[:] = np.asarray(state.pipeline_state.data.ctrl)  # the env's clipped targets, applied to both
        for _ in range(env.n_substeps):
            mujoco.mj_step(m, d)
    mjx_qpos = np.asarray(state.pipeline_state.data.qpos)
    start_qpos = np.asarray(reset(jax.random.PRNGKey(0)).pipeline_state.data.qpos)
    assert np.abs(d.qpos[:7] - start_qpos[:7]).max() > 0.05, "the arm should have moved"
    # Measured: agreement to ~2e-7 rad (arm) and ~4e-8 m (cube); float32 round-off allows more.
    np.testing.assert_allclose(mjx_qpos[:9], d.qpos[:9], atol=1e-4)  # arm and fingers
    np.testing.assert_allclose(mjx_qpos[9:12], d.qpos[9:12], atol=1e-4)  # cube position
    tcp = env.mj_model.site("tcp").id
    mujoco.mj_kinematics(m, d)  # mj_step leaves site positions at the start of its last step
    np.testing.assert_allclose(env.mj_data(state).site_xpos[tcp], d.site_xpos[tcp], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Batched, Gymnasium, rendering, reference timing
# ------------------------------------------------------------------------------------------------


# The two tests below compile a second and third MJX program (about a minute each on a loaded
# 2-core CPU); the contract and Gymnasium suites (test_env_contract.py, test_gym.py) cover the same
# ground for kuka in the default run, so here they are slow-only.
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_training_wrapper_batches_and_auto_resets(env):
    num_envs = 4
    wrapped = wrap_for_training(env, episode_length=3)
    reset, step = jax.jit(wrapped.reset), jax.jit(wrapped.step)
    state = reset(jax.random.split(jax.random.PRNGKey(0), num_envs))
    assert state.obs.shape == (num_envs, env.observation_size)
    actions = jnp.zeros((num_envs, env.action_size))
    for _ in range(3):
        state = step(state, actions)
    assert np.all(np.asarray(state.done) == 1.0) and np.all(np.asarray(state.info["truncation"]) == 1.0)
    # Auto-reset drew fresh layouts: cubes are back at rest height and differ between envs.
    cube_body = env.mj_model.body("cube").id
    cubes = np.asarray(state.pipeline_state.data.xpos[:, cube_body])
    assert len({tuple(np.round(c, 6)) for c in cubes}) == num_envs
    assert np.isfinite(np.asarray(state.info["final_obs"])).all()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gymnasium_checker():
    gym_env = gymnasium.make("lunarl/Kuka-v0").unwrapped
    check_env(gym_env, skip_render_check=True)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_reach_task_pays_success_without_terminating():
    reach = Kuka(task="reach")
    reset, step = jax.jit(reach.reset), jax.jit(reach.step)
    state = reset(jax.random.PRNGKey(0))
    cube_body = reach.mj_model.body("cube").id
    successes = 0
    for _ in range(reach.default_episode_length):
        d = reach.mj_data(state)
        action, _ = _ik_action(reach, d, d.xpos[cube_body] + [0.0, 0.0, 0.03], gripper=1.0)
        state = step(state, jnp.asarray(action))
        successes += int(float(state.metrics["success"]))
        assert float(state.done) == 0.0
    assert successes > 20 and float(state.reward) > reach.config.success_bonus
    assert float(state.metrics["tcp_to_cube"]) < reach.config.success_radius


@pytest.mark.timeout(120)
def test_render_frame(env, fns):
    reset, _ = fns
    state = reset(jax.random.PRNGKey(0))
    try:
        frame = env.render(state)
    except RuntimeError as e:
        if "OpenGL" in str(e):
            pytest.skip(f"no offscreen OpenGL platform (EGL/OSMesa system library) on this machine: {e}")
        raise
    cfg = env.config
    assert frame.shape == (cfg.render_height, cfg.render_width, 3) and frame.dtype == np.uint8
    assert frame.std() > 10, "frame should show the scene, not a blank image"


def test_mujoco_reference_steps_per_second(env):
    sps = mujoco_reference_steps_per_second(env, 50)
    assert np.isfinite(sps) and sps > 0


# ------------------------------------------------------------------------------------------------
# The GPU experiment, cut down to one iteration on a CPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_experiment_runs_one_tiny_iteration_on_cpu(tmp_path, app_env):
    """``+experiment=kuka_gpu`` (4,096 envs, for a GPU) composes, trains and saves a checkpoint
    when its sizes are overridden small (test_config.py checks it composes as is). Evaluation is
    off: it would compile a second MJX program (minutes on a loaded 2-core CPU)."""
    from conftest import run_app

    run_dir = tmp_path / "kuka_gpu"
    small = [
        "env.num_envs=4",
        "agent.unroll_length=2",
        "agent.num_minibatches=1",
        "agent.policy_hidden=[16,16]",
        "agent.value_hidden=[16,16]",
        "run.total_env_steps=8",
        "run.log_every=1",
        "run.eval_every=0",
        "checkpoint.keep_best=false",
        "run.checkpoint_every=1",
    ]
    args = ["+experiment=kuka_gpu", "logger.wandb.mode=disabled", *small, f"run.dir={run_dir}"]
    proc = run_app(app_env, "lunarl.train", *args, cwd=tmp_path, timeout=1700)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "finished 1 iterations" in proc.stdout, proc.stdout[-2000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("losses/policy_loss", np.nan)) for r in rows), rows
    assert (run_dir / "checkpoints" / "latest").is_dir()
