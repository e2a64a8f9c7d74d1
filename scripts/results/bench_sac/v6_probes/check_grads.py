"""Probe (issue 14, v6): the shared-pass variants give the same update as separate passes in
Brax's order (max |param difference| ~4e-9), and differ from lunarl's order as expected.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import brax_order as variants
import jax
import jax.numpy as jnp

from lunarl.agents import sac
from lunarl.envs import make

env = make("car_track")
cfg = sac.SACConfig.build(
    num_envs=8,
    episode_length=100,
    unroll_length=4,
    warmup_steps=64,
    batch_size=32,
    actor_hidden=(16, 16),
    critic_hidden=(16, 16),
    buffer_size=4000,
)
ts = jax.jit(lambda k: sac.init(k, env, cfg))(jax.random.PRNGKey(0))
step = jax.jit(sac.train_step)
for _ in range(4):
    ts, _ = step(ts)
batches = sac._sample_batches(ts, jax.random.PRNGKey(1), ts.obs_stats)
outs = {}
for name, fn in [
    ("brax", variants.make_learn(False)),
    ("share", variants.make_learn(True)),
    ("split", variants.make_learn_split()),
    ("head", sac._learn),
]:
    outs[name] = jax.jit(lambda p, o, b, fn=fn: fn(env, cfg, p, o, b, jax.random.PRNGKey(2)))(
        ts.params, ts.opt_state, batches
    )
for a, b in [("brax", "share"), ("brax", "split"), ("brax", "head")]:
    d = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), outs[a][0], outs[b][0])
    print(
        a,
        b,
        max(jax.tree.leaves(d)),
        {k: outs[a][2][k] - outs[b][2][k] for k in ["losses/qf_loss", "losses/actor_loss"]},
    )
