"""PPO's numbers did not change with the agent contract (lunarl issue 12).

``tests/data/ppo_reference.npz`` was written by main @ 02743e0, before the contract existed, with
its ``loop.init_state`` / ``loop.make_chunk`` / ``evaluation.evaluate`` on this exact setting, under
the test suite's XLA flags (``tests/conftest.py``):
the rover, 8 envs x 8 steps, (16, 16) networks, 3 iterations, seed 7, 1 and 2 seeds vmapped;
then a stochastic 6-episode evaluation of seed 0's final policy. The same work through today's
host builders (placement mesh, donated chunk, carry-aware rollout) matched it bit for bit on the
machine that wrote it. XLA:CPU compiles for the host's instruction set (AVX2 or AVX-512, FMA), so
another CPU rounds differently: after 3 iterations the parameters differ there in the last few
ulps (relative 2e-5 at most, Adam's first moments, which are near zero, up to 4e-7 absolute). So
the comparison allows that much and no more: a change to the algorithm moves these numbers by
orders of magnitude more. Same-machine bit-identity is what the determinism and resume tests check.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

import lunarl
from lunarl.agents import ppo
from lunarl.agents.base import ENV_METRICS_PREFIX
from lunarl.run.evaluation import rollout
from lunarl.run.placement import Placement
from lunarl.run.programs import init_state, make_chunk, seed_keys

REFERENCE = Path(__file__).parent / "data" / "ppo_reference.npz"
# Cross-CPU rounding only (see the module doc): far below what any change to PPO's maths gives.
RTOL, ATOL = 1e-4, 1e-6
CFG = dict(num_envs=8, episode_length=10, unroll_length=8, num_minibatches=2, num_epochs=2,
           policy_hidden=(16, 16), value_hidden=(16, 16), total_iterations=3, entropy_coef=0.01)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return dict(data)


@pytest.fixture(scope="module")
def setting():
    return lunarl.envs.make("rover"), ppo.PPOConfig.build(**CFG)


# Two vmapped seeds is slow: test_ppo's vmapped-seeds test shows they equal single-seed runs.
@pytest.mark.parametrize("num_seeds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ppo_matches_the_reference_to_rounding(reference, setting, num_seeds):
    env, cfg = setting
    placement = Placement.for_seeds(num_seeds)
    ts = init_state(ppo.AGENT, env, cfg, seed_keys(7, num_seeds), placement)
    ts, metrics, finite = make_chunk(ppo.AGENT, env, 3)(ts)
    assert bool(finite)
    prefix = f"seeds{num_seeds}/"
    leaves = {f"{prefix}state/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(ts)}
    expected_leaves = {k: v for k, v in reference.items() if k.startswith(prefix + "state/")}
    assert leaves.keys() == expected_leaves.keys()
    for key, want in expected_leaves.items():
        np.testing.assert_allclose(leaves[key], want, rtol=RTOL, atol=ATOL, err_msg=key)
    # The old PPO also reported "env_steps" as a metric; the contract's host counts steps itself.
    expected_metrics = {k[len(prefix + "metrics/"):]: v for k, v in reference.items() if k.startswith(prefix + "metrics/")}
    expected_metrics.pop("env_steps")
    env_metrics = {k for k in metrics if k.startswith(ENV_METRICS_PREFIX)}
    assert env_metrics == {ENV_METRICS_PREFIX + k for k in ts.env_state.metrics}
    assert set(metrics) - env_metrics == set(expected_metrics) == set(ppo.METRIC_NAMES)
    for key, want in expected_metrics.items():
        np.testing.assert_allclose(np.asarray(metrics[key]), want, rtol=RTOL, atol=ATOL, err_msg=key)

    if num_seeds == 1:
        params = jax.tree.map(lambda x: x[0], jax.vmap(ppo.policy_params)(ts))
        policy = ppo.make_policy(env, cfg)
        result = jax.jit(lambda p, k: rollout(env, policy, p, k, 6, cfg.episode_length, False))(params, jax.random.PRNGKey(3))
        for key in ("episode_length", "success"):
            np.testing.assert_array_equal(np.asarray(result[key]), reference[f"eval/{key}"], err_msg=key)
        np.testing.assert_allclose(np.asarray(result["episode_return"]), reference["eval/episode_return"], rtol=RTOL, atol=ATOL)
