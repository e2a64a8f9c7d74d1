"""Several CPU devices: ``run.cpu_devices`` and the env batch stepped per device (``VmapWrapper``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lunarl.run import distributed
from lunarl.run.schema import ConfigError, RunSchema, validate_train
from tests.conftest import run_app
from tests.test_config import compose_train

REPO = Path(__file__).resolve().parents[1]

# Rover, 8 envs, 12 steps with auto-resets (a reset batch of 1 env does not split over 2 devices
# and stays vmapped), traced once as plain vmap and once under a (seed=1, data=2) mesh.
_SHARDED_VS_PLAIN = r"""
import json, sys
import jax, jax.numpy as jnp
import lunarl.envs
from lunarl.envs.base import wrap_for_training
from lunarl.run.placement import Placement
from jax.sharding import NamedSharding, PartitionSpec as P

N = 8
env = lunarl.envs.make("rover")
stack = wrap_for_training(env, episode_length=5, resets_per_step=1)

def rollout(keys):
    state = stack.reset(keys)
    def body(state, key):
        action = jax.random.uniform(key, (N, env.action_size), minval=-1.0, maxval=1.0)
        state = stack.step(state, action)
        return state, (state.reward, state.done)
    state, (rewards, dones) = jax.lax.scan(body, state, jax.random.split(jax.random.PRNGKey(1), 12))
    return rewards, state.obs, dones

keys = jax.random.split(jax.random.PRNGKey(0), N)[None]
plain = jax.jit(jax.vmap(rollout))(keys)
placement = Placement.for_run(1, N)
fn = jax.jit(jax.vmap(rollout, spmd_axis_name="seed"), in_shardings=NamedSharding(placement.mesh, P("seed", "data")))
with jax.sharding.use_abstract_mesh(placement.mesh.abstract_mesh):
    lowered = fn.trace(keys).lower()
sharded = lowered.compile()(keys)
print(json.dumps({
    "devices": len(jax.devices()),
    "mesh": dict(placement.mesh.shape),
    "per_device_programs": lowered.as_text().count("sdy.manual_computation"),
    "max_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded))),
    "episodes_ended": int(plain[2].sum()),
}))
"""


def test_env_batch_on_a_data_axis_steps_per_device_and_matches_vmap():
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_VS_PLAIN], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["mesh"] == {"seed": 1, "data": 2}
    assert out["per_device_programs"] >= 1  # the env step runs as shard_map, not GSPMD
    assert out["episodes_ended"] > 0  # auto-resets happened inside the sharded program
    assert out["max_diff"] < 1e-5  # same numbers as one device, to float rounding


def test_cpu_devices_setting_is_checked():
    with pytest.raises(ConfigError, match=r"run\.cpu_devices"):
        validate_train(compose_train("+experiment=rover_smoke", "run.cpu_devices=0"))
    # This test process started JAX's CPU backend with its default, one device.
    with pytest.raises(ConfigError, match=r"run.cpu_devices=3: JAX's CPU backend runs 1 device"):
        distributed.check_cpu_devices(RunSchema(cpu_devices=3))
    distributed.check_cpu_devices(RunSchema(cpu_devices=None))


def test_train_app_splits_the_cpu_into_the_devices_asked_for(tmp_path, app_env):
    run_dir = tmp_path / "two_cpu_devices"
    args = [
        f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]",
        "agent=counter",
        "env=rover",
        "env.num_envs=4",
        "env.episode_length=8",
        "num_seeds=1",
        "run.log_every=2",
        "run.eval_every=0",
        "run.checkpoint_every=2",
        "run.total_env_steps=64",
        "run.cpu_devices=2",
        f"run.dir={run_dir}",
    ]
    proc = run_app(app_env, "lunarl.train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed=1 x data=2 over 2 cpu device(s)" in proc.stdout


@pytest.mark.slow
def test_kuka_trains_over_several_chunks_on_two_cpu_devices(tmp_path, app_env):
    # MJX's Data has zero-size leaves, which XLA hands back replicated after a chunk on a data
    # mesh; the loop restates their sharding before the next chunk (it used to fail there).
    run_dir = tmp_path / "kuka_two_cpu_devices"
    args = [
        f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]",
        "agent=counter",
        "env=kuka",
        "env.num_envs=4",
        "env.episode_length=8",
        "num_seeds=1",
        "run.log_every=1",
        "run.eval_every=0",
        "run.checkpoint_every=1",
        "run.total_env_steps=96",
        "run.cpu_devices=2",
        f"run.dir={run_dir}",
    ]
    proc = run_app(app_env, "lunarl.train", *args, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed=1 x data=2 over 2 cpu device(s)" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "toy/loss" in r]) >= 2  # several chunk calls
