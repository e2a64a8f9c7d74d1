"""Probe (issue 14, v6): interleaved A/B of ``train_step`` chunks (8 iterations, donated) with
``sac._learn`` swapped for the variants of ``brax_order.py``; prints HLO fusion/dot counts and median
wall and process-CPU ms per iteration.

    flock /tmp/lunarl-bench.lock .venv/bin/python scripts/results/bench_sac/v6_probes/ab_learn.py \
        default head,brax,share,share_bf16 7      # or: car head,share,split 7
"""
# ruff: noqa: E402  (flags and sys.path are set before these imports)

import pathlib
import re
import statistics
import sys
import time

import lunarl
from lunarl._platform import set_process_fusion_emitters

set_process_fusion_emitters(True)
import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import brax_order as variants

from lunarl.agents import sac
from lunarl.envs import make

setting = sys.argv[1]
names = sys.argv[2].split(",")
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
env = make("car_track")
if setting == "default":
    cfg = sac.SACConfig.build(num_envs=64, episode_length=1000, unroll_length=8, warmup_steps=4096)
    iters = 8
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
    iters = 8
HEAD = sac._learn
VAR = {
    "head": HEAD,
    "brax": variants.make_learn(False),
    "share": variants.make_learn(True),
    "share_bf16": variants.make_learn(True, jnp.bfloat16),
    "brax_bf16": variants.make_learn(False, jnp.bfloat16),
    "split": variants.make_learn_split(),
}
opts = lunarl.compile_options(env)
fns, states = {}, {}
import optax

ADAM = sac._adam
for n in names:
    sac._learn = VAR.get(n, HEAD)
    sac._adam = (
        (lambda cfg, lr=None: optax.sgd(cfg.learning_rate if lr is None else lr)) if n == "head_sgd" else ADAM
    )
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
    txt = comp.as_text()
    nfus = len(re.findall(r"^\s*\S+ = \S+ fusion\(", txt, re.M))
    ndot = len(re.findall(r" dot\(", txt))
    ncc = len(re.findall(r"custom-call\(", txt))
    print(
        f"{n}: HLO lines {txt.count(chr(10))}, fusion instrs {nfus}, dots {ndot}, custom-calls {ncc}",
        flush=True,
    )
    ts, m = comp(ts)
    jax.block_until_ready(m)
    fns[n], states[n] = comp, ts
sac._learn = HEAD
res = {n: [] for n in names}
for r in range(rounds):
    for n in names if r % 2 == 0 else names[::-1]:
        t, c = time.perf_counter(), time.process_time()
        states[n], m = fns[n](states[n])
        jax.block_until_ready(m)
        res[n].append(((time.perf_counter() - t) / iters * 1e3, (time.process_time() - c) / iters * 1e3))
for n in names:
    w = statistics.median(x[0] for x in res[n])
    c = statistics.median(x[1] for x in res[n])
    print(
        f"{setting} {n:12s} median wall {w:7.2f} ms/iter  cpu {c:7.2f} ms/iter  walls {[round(x[0], 1) for x in res[n]]}"
    )
