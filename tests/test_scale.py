"""Scale-out: the env batch sharded over a ``data`` mesh axis, and one run over two processes.

Each check runs in a subprocess, because the number of (forced) CPU devices is an XLA flag that
must be set before JAX starts. The default tests are the data-parallel equivalence (one PPO
iteration on 4 devices equals the 1-device iteration, env leaves really sharded), the one-line
mesh error and the "no JAX backend before ``jax.distributed.initialize``" guard; the two-process
run through the real CLI, and SAC and Dreamer on a data mesh, are slow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_app


def _flags(app_env: dict, devices: int) -> str:
    return f"{app_env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def _python(app_env: dict, code: str, devices: int, timeout: float = 600) -> dict:
    """Run ``code`` with ``devices`` forced CPU devices; it prints one JSON object last."""
    env = {**app_env, "XLA_FLAGS": _flags(app_env, devices)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Data parallel on one process
# --------------------------------------------------------------------------------------------

# Shared by the scripts below: the largest all-reduce result of a compiled program (a tuple of
# arrays counts whole), in elements, read from its HLO text.
LARGEST_ALL_REDUCE = """
import re
import numpy as np

def largest_all_reduce_size(compiled) -> int:
    sizes = [
        sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in re.findall(r"\\[([0-9,]*)\\]", line.split("all-reduce(")[0]))
        for line in compiled.as_text().splitlines() if " all-reduce(" in line
    ]
    return max(sizes, default=0)
"""

EQUIVALENCE = LARGEST_ALL_REDUCE + """
import json
import jax, numpy as np
import lunarl
from lunarl.agents import ppo
from lunarl.agents.base import DATA_AXIS_NAME
from lunarl.run.placement import MeshTooWide, Placement
from lunarl.run.programs import init_state, make_chunk, seed_keys

env = lunarl.envs.make("rover")
cfg = ppo.PPOConfig.build(num_envs=8, episode_length=6, unroll_length=4, num_minibatches=2, num_epochs=1,
                          policy_hidden=(8,), value_hidden=(8,), total_iterations=1)
assert len(jax.devices()) == 4
out = {}
for n in (1, 4):
    placement = Placement.for_run(1, cfg.num_envs, jax.devices()[:n])
    ts = init_state(ppo.AGENT, env, cfg, seed_keys(3, 1), placement)
    compiled = make_chunk(ppo.AGENT, env, 1, placement).lower(ts).compile()
    ts, metrics, finite = compiled(ts)
    assert bool(finite)
    out[n] = (jax.tree_util.tree_leaves_with_path(ts), metrics)
    if n == 4:
        env_leaves = [x for x in jax.tree.leaves(ts.env_state) if x.ndim >= 2]
        sharded = [(DATA_AXIS_NAME in x.sharding.spec, len(x.addressable_shards), x.addressable_shards[0].data.shape[1], x.shape[1])
                   for x in env_leaves]
        replicated = [x.sharding.is_fully_replicated for x in jax.tree.leaves((ts.params, ts.opt_state, ts.obs_stats))]
        metric_replicated = all(m.sharding.is_fully_replicated for m in metrics.values())
        describe = placement.describe()
        largest_all_reduce = largest_all_reduce_size(compiled)
        largest_param = max(x.size for x in jax.tree.leaves(ts.params))
diffs = {}
for (path, a), (_, b) in zip(out[1][0], out[4][0], strict=True):
    a, b = np.asarray(a), np.asarray(b)
    key = "state" + jax.tree_util.keystr(path)
    diffs[key] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
for k in out[1][1]:
    diffs["metric/" + k] = float(np.max(np.abs(np.asarray(out[1][1][k], np.float64) - np.asarray(out[4][1][k], np.float64))))
try:
    Placement.for_run(1, 6, jax.devices())
    too_wide = None
except MeshTooWide as e:
    too_wide = str(e)
print(json.dumps(dict(diffs=diffs, sharded=sharded, replicated=replicated, metric_replicated=metric_replicated,
                      describe=describe, too_wide=too_wide, largest_all_reduce=largest_all_reduce,
                      largest_param=int(largest_param), seeds_mesh=Placement.for_run(2, 6, jax.devices()).describe())))
"""


@pytest.fixture(scope="module")
def equivalence(app_env) -> dict:
    return _python(app_env, EQUIVALENCE, devices=4)


def test_ppo_iteration_on_four_data_devices_equals_one_device(equivalence):
    diffs = equivalence["diffs"]
    assert any(k.startswith("state.params") for k in diffs) and any(k.startswith("state.obs_stats") for k in diffs)
    assert any(k.startswith("state.env_state") for k in diffs) and "metric/losses/policy_loss" in diffs
    # Float tolerance: the sharded program sums the same numbers in another order.
    worse = {k: v for k, v in diffs.items() if v > 1e-5}
    assert not worse, worse


def test_env_state_is_sharded_and_the_rest_replicated(equivalence):
    assert equivalence["describe"] == "mesh seed=1 x data=4 over 4 cpu device(s)"
    sharded = equivalence["sharded"]
    assert sharded, "no batched env-state leaves"
    # Every [seed, env, ...] leaf: spec names the data axis, 4 shards of 2 of the 8 envs each.
    assert all(on_data and shards == 4 and local == 2 and total == 8 for on_data, shards, local, total in sharded), sharded
    assert all(equivalence["replicated"])
    assert equivalence["metric_replicated"]


def test_each_device_learns_on_its_share_and_the_gradients_are_all_reduced(equivalence):
    """PPO's minibatches are split over ``data`` (``base.split_on_data``): the compiled program
    all-reduces the gradient (at least a weight matrix's worth of numbers), it does not run the
    whole update on every device."""
    assert equivalence["largest_all_reduce"] >= equivalence["largest_param"] > 1, equivalence


def test_seeds_take_their_share_of_the_mesh_and_a_batch_that_does_not_split_is_refused(equivalence):
    assert equivalence["seeds_mesh"] == "mesh seed=2 x data=2 over 4 cpu device(s)"
    assert "6 envs per seed do not split over a data axis of 4 devices" in equivalence["too_wide"]


def test_the_app_names_the_keys_when_envs_do_not_split_over_the_devices(app_env, tmp_path):
    env = {**app_env, "XLA_FLAGS": _flags(app_env, 4)}
    proc = run_app(env, "lunarl.train", "+experiment=rover_smoke", "env.num_envs=6", "run.devices=4",
                   f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("lunarl.train: error: env.num_envs=6 (agent.num_envs) must be a multiple of the data axis")
    assert "run.devices=4" in lines[-1]
    assert not (tmp_path / "run").exists()


NO_BACKEND_BEFORE_INIT = """
import json
from jax._src import xla_bridge
from omegaconf import OmegaConf
from lunarl.run.cli import known_keys
from lunarl.run.schema import TrainSchema, validate_train
known_keys(TrainSchema)  # imports every registered agent and env module
for agent in ("ppo", "sac", "dreamer"):
    cfg = OmegaConf.structured(TrainSchema)
    cfg.env, cfg.agent, cfg.run.dir = {"name": "rover", "num_envs": 8}, {"name": agent}, "/nonexistent"
    validate_train(cfg)
print(json.dumps({"initialised": xla_bridge.backends_are_initialized()}))
"""


def test_nothing_starts_a_jax_backend_before_distributed_initialize(app_env):
    """``jax.distributed.initialize`` must come before any JAX computation: importing the agents
    and envs and validating a config must not compute anything."""
    assert _python(app_env, NO_BACKEND_BEFORE_INIT, devices=1, timeout=120) == {"initialised": False}


def test_distributed_settings_go_together():
    from lunarl.run import distributed
    from lunarl.run.schema import ConfigError, RunSchema

    with pytest.raises(ConfigError, match="missing run.num_processes, run.process_id"):
        distributed.initialize(RunSchema(coordinator_address="127.0.0.1:1234"))
    with pytest.raises(ConfigError, match="run.process_id=2 must be in"):
        distributed.initialize(RunSchema(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2))
    assert distributed.initialize(RunSchema()) is False or "SLURM_NTASKS" in os.environ
    with pytest.raises(ConfigError, match="run.devices=7 must be between 1 and"):
        distributed.select_devices(7)
    with pytest.raises(ConfigError, match=r"run.devices=\[5\]: give distinct ids"):
        distributed.select_devices([5])


# --------------------------------------------------------------------------------------------
# SAC and Dreamer through the contract (slow: two more compiles each)
# --------------------------------------------------------------------------------------------

OTHER_AGENTS = LARGEST_ALL_REDUCE + """
import json
import jax, numpy as np
import lunarl
from lunarl.agents.base import DATA_AXIS_NAME
from lunarl.run.placement import Placement
from lunarl.run.programs import init_state, make_chunk, seed_keys
from lunarl.run.schema import validate_train, TrainSchema
from omegaconf import OmegaConf

result = {}
for name, overrides in {
    "sac": dict(unroll_length=2, batch_size=16, buffer_size=256, warmup_steps=8, actor_hidden=[16], critic_hidden=[16]),
    "dreamer": dict(unroll_length=4, batch_size=2, seq_len=4, buffer_size=64, prefill=8, horizon=3, train_ratio=4.0),
}.items():
    cfg = OmegaConf.structured(TrainSchema)
    cfg.env, cfg.run.dir = {"name": "rover", "num_envs": 4, "episode_length": 8}, "/nonexistent"
    cfg.agent = {"name": name, **overrides}
    plan = validate_train(cfg)
    env, agent = plan.env_and_agent()
    states = {}
    for n in (1, 2):
        placement = Placement.for_run(1, 4, jax.devices()[:n])
        ts = init_state(agent, env, plan.agent_config, seed_keys(0, 1), placement)
        compiled = make_chunk(agent, env, 2, placement).lower(ts).compile()
        ts, metrics, finite = compiled(ts)
        states[n] = jax.tree.map(np.asarray, agent.policy_params(jax.tree.map(lambda x: x[0], ts)))
        if n == 2:
            on_data = [DATA_AXIS_NAME in x.sharding.spec for x in jax.tree.leaves(ts.replay)]
            largest_all_reduce = largest_all_reduce_size(compiled)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(states[1]), jax.tree.leaves(states[2])) if a.size)
    largest_param = max(x.size for x in jax.tree.leaves(states[2]))
    result[name] = dict(finite=bool(finite), replay_on_data=on_data, diff=diff,
                        largest_all_reduce=largest_all_reduce, largest_param=int(largest_param))
print(json.dumps(result))
"""


@pytest.mark.slow
def test_sac_and_dreamer_train_on_a_two_device_data_mesh(app_env):
    result = _python(app_env, OTHER_AGENTS, devices=2)
    for name in ("sac", "dreamer"):
        r = result[name]
        assert r["finite"], name
        assert r["replay_on_data"] and any(r["replay_on_data"]), name  # the replay's env columns
        assert r["diff"] < 1e-4, (name, r["diff"])
        # The sampled batches are split over ``data``: the gradients are all-reduced (at least a
        # weight matrix's worth), rather than every device running the whole update.
        assert r["largest_all_reduce"] >= r["largest_param"] > 1, (name, r)


# --------------------------------------------------------------------------------------------
# Two processes (jax.distributed over 127.0.0.1), through the real CLI
# --------------------------------------------------------------------------------------------

RUN = [
    "+experiment=rover_smoke",
    "agent.unroll_length=8",
    "agent.num_epochs=1",
    "agent.policy_hidden=[16]",
    "agent.value_hidden=[16]",
    "run.log_every=2",
    "run.eval_every=2",
    "run.checkpoint_every=2",
    "run.eval_episodes=4",
    "logger.console=false",
    "logger.tensorboard=true",
]
STEPS_PER_ITERATION = 16 * 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(app_env: dict, run_dir: Path, iterations: int) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = {**app_env, "WANDB_MODE": "offline", "XLA_FLAGS": _flags(app_env, 2)}
    env.pop("SLURM_NTASKS", None)
    args = [*RUN, f"run.total_env_steps={iterations * STEPS_PER_ITERATION}", f"run.dir={run_dir}",
            f"run.coordinator_address=127.0.0.1:{port}", "run.num_processes=2"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "lunarl.train", *args, f"run.process_id={i}"], cwd=run_dir.parent,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def _one_process(app_env: dict, run_dir: Path, iterations: int, devices: int = 1) -> subprocess.CompletedProcess:
    env = {**app_env, "XLA_FLAGS": _flags(app_env, devices)}
    proc = run_app(env, "lunarl.train", *RUN, f"run.total_env_steps={iterations * STEPS_PER_ITERATION}",
                   f"run.dir={run_dir}", cwd=run_dir.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_processes_train_as_one_run_and_one_process_resumes_it(app_env, tmp_path):
    from lunarl.run.restore import restore_run

    run_dir = tmp_path / "two_processes"
    procs = _two_processes(app_env, run_dir, iterations=4)
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}: " + p.stdout[-1500:] + p.stderr[-3000:]
    assert "mesh seed=1 x data=4 over 4 cpu device(s) in 2 processes" in procs[0].stdout
    assert "finished 4 iterations" in procs[0].stdout
    # Process 1 computes and says nothing of its own.
    assert "eval @" not in procs[1].stdout and "finished" not in procs[1].stdout and "lunarl.train on" not in procs[1].stdout

    # Only process 0 logged: one row per chunk and evaluation, one wandb run, one event file.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "losses/policy_loss" in r] == [2, 4]
    assert [r["iteration"] for r in rows if "eval/episode_return" in r] == [2, 4]
    assert (run_dir / "config.yaml").exists()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # The checkpoint is complete (restore checks its digest) and the processes agreed: it
    # equals, to float rounding, the same run trained by one process on one device.
    reference = tmp_path / "one_process"
    _one_process(app_env, reference, iterations=4)
    a, b = restore_run(str(run_dir / "checkpoints")), restore_run(str(reference / "checkpoints"))
    assert a.meta["iteration"] == b.meta["iteration"] == 4
    import jax

    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))

    # One process (one device) resumes the two-process run and finishes it.
    proc = _one_process(app_env, run_dir, iterations=6)
    assert "resuming from checkpoint at iteration 4" in proc.stdout
    assert "finished 6 iterations" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "losses/policy_loss" in r] == [2, 4, 6]
    assert sorted(os.listdir(run_dir / "checkpoints" / "latest")) >= ["2", "4", "6"]
