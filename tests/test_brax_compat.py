"""Brax's own PPO trainer runs on a lunarl env unchanged.

This proves two things at once: lunarl envs honour Brax's ``Env``/``State`` contract (Brax
wraps the env with its own training wrappers), and the JAX compatibility shim that
``import lunarl`` installs (``lunarl._compat``: brax 0.14.2 calls ``jax.device_put_replicated``,
which JAX 0.10 removed) is enough for ``brax.training.agents.ppo.train``.
"""

import functools

import jax
import numpy as np

import lunarl


def test_brax_ppo_trains_a_few_iterations_on_rover():
    from brax.training.agents.ppo import networks as ppo_networks
    from brax.training.agents.ppo import train as ppo

    assert hasattr(jax, "device_put_replicated"), "import lunarl installs the compat shim"
    env = lunarl.envs.make("rover")
    small_nets = functools.partial(
        ppo_networks.make_ppo_networks, policy_hidden_layer_sizes=(16, 16), value_hidden_layer_sizes=(16, 16)
    )
    progress = []
    # One training step = batch_size * num_minibatches * unroll_length = 80 env steps; 240 -> 3 steps.
    _, params, metrics = ppo.train(
        environment=env,
        num_timesteps=240,
        episode_length=20,
        num_envs=8,
        batch_size=8,
        num_minibatches=2,
        unroll_length=5,
        num_updates_per_batch=1,
        num_evals=2,
        num_eval_envs=4,
        network_factory=small_nets,
        seed=0,
        progress_fn=lambda step, m: progress.append((step, dict(m))),
    )
    assert progress, "brax should report evaluation metrics"
    assert "eval/episode_reward" in metrics
    for name, value in metrics.items():
        assert np.all(np.isfinite(np.asarray(value))), f"{name} is not finite: {value}"
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(params))
    assert progress[-1][0] > 0, "training must have advanced past step 0"
