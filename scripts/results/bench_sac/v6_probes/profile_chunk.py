"""Probe (issue 14, v6): ``jax.profiler`` trace of a 4-iteration ``train_step`` chunk with a
``_learn`` variant, XLA:CPU thunks traced (``--xla_cpu_enable_xprof_traceme``); writes the HLO text
and the trace under /tmp/sac6. Summarise with ``profile_summary.py``.

    .venv/bin/python scripts/results/bench_sac/v6_probes/profile_chunk.py car head
"""
# ruff: noqa: E402  (flags and sys.path are set before these imports)

import collections
import glob
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
import lunarl
from lunarl._platform import set_process_fusion_emitters

set_process_fusion_emitters(True)
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import brax_order as variants

from lunarl.agents import sac
from lunarl.envs import make

setting, name = sys.argv[1], sys.argv[2]
env = make("car_track")
if setting == "default":
    cfg = sac.SACConfig.build(num_envs=64, episode_length=1000, unroll_length=8, warmup_steps=4096)
else:
    cfg = sac.SACConfig.build(
        num_envs=32,
        episode_length=1000,
        unroll_length=8,
        warmup_steps=5120,
        utd_ratio=4,
        actor_hidden=(128, 128),
        critic_hidden=(128, 128),
        buffer_size=300000,
    )
iters = 4
VAR = {
    "head": sac._learn,
    "share": variants.make_learn(True),
    "share_bf16": variants.make_learn(True, jnp.bfloat16),
}
sac._learn = VAR[name]
opts = lunarl.compile_options(env)
init = jax.jit(lambda k: sac.init(k, env, cfg), compiler_options=opts)
warm = jax.jit(sac.train_step, donate_argnums=0, compiler_options=opts)
chunk = jax.jit(
    lambda ts: jax.lax.scan(lambda s, _: sac.train_step(s), ts, None, length=iters),
    donate_argnums=0,
    compiler_options=opts,
)
ts = init(jax.random.PRNGKey(0))
for _ in range(-(-cfg.warmup_steps // cfg.env_steps_per_iteration) + 2):
    ts, _ = warm(ts)
comp = chunk.lower(ts).compile()
os.makedirs("/tmp/sac6", exist_ok=True)
open(f"/tmp/sac6/hlo_{setting}_{name}.txt", "w").write(comp.as_text())
ts, m = comp(ts)
jax.block_until_ready(m)
d = f"/tmp/sac6/trace_{setting}_{name}"
with jax.profiler.trace(d):
    for _ in range(2):
        ts, m = comp(ts)
        jax.block_until_ready(m)
f = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
pd = jax.profiler.ProfileData.from_file(f)
tot = collections.Counter()
cnt = collections.Counter()
for plane in pd.planes:
    for line in plane.lines:
        for ev in line.events:
            tot[(plane.name, line.name, ev.name)] += ev.duration_ns
            cnt[(plane.name, line.name, ev.name)] += 1
planes = collections.Counter()
for (p, ln, _), t in tot.items():
    planes[(p, ln)] += t
for k, v in planes.most_common(10):
    print(k, v / 1e6, "ms")
n_iter = 2 * iters
print("top events per iteration (ms), count per iteration")
for (p, ln, n), t in tot.most_common(60):
    print(f"{t / 1e6 / n_iter:8.3f} {cnt[(p, ln, n)] / n_iter:6.1f}  {p[:20]} | {ln[:20]} | {n[:80]}")
