"""Probe (issue 14, v6, lead 4): which XLA:CPU library runs the SAC ``train_step`` chunk's dots
fastest, as per-program compile options (YNNPACK is XLA's default here; oneDNN, XNNPACK, Eigen).
Interleaved rounds; median wall and process-CPU ms per iteration; a flag that fails to compile is
reported and skipped.

    flock /tmp/lunarl-bench.lock .venv/bin/python scripts/results/bench_sac/v6_probes/flag_probe.py default 5 [sched]
"""

import statistics
import sys
import time

import jax

import lunarl
from lunarl._platform import set_process_fusion_emitters

set_process_fusion_emitters(True)
from lunarl.agents import sac  # noqa: E402
from lunarl.envs import make  # noqa: E402

LIBRARIES = {
    "ynn (default)": {},
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn dot": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    },
    "xnn dot": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    },
}
SCHEDULERS = {
    "default": {},
    "no concurrency sched": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "memory sched": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}

setting, rounds = sys.argv[1], int(sys.argv[2])
VARIANTS = SCHEDULERS if sys.argv[3:] == ["sched"] else LIBRARIES
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
iters = 8
base = lunarl.compile_options(env)
fns, states = {}, {}
for name, extra in VARIANTS.items():
    opts = {**base, **extra}
    try:
        init = jax.jit(lambda k: sac.init(k, env, cfg), compiler_options=base)
        warm = jax.jit(sac.train_step, donate_argnums=0, compiler_options=base)
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
        print(
            f"{name}: custom-calls {txt.count('custom-call(')}, fusions kCustom {txt.count('kind=kCustom')}",
            flush=True,
        )
        ts, m = comp(ts)
        jax.block_until_ready(m)
        fns[name], states[name] = comp, ts
    except Exception as e:  # noqa: BLE001  (a probe: report and go on)
        print(f"{name}: failed: {str(e).splitlines()[0][:200]}", flush=True)
names = list(fns)
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
        f"{setting} {n:20s} median wall {w:7.2f} ms/iter  cpu {c:7.2f} ms/iter  walls {[round(x[0], 1) for x in res[n]]}"
    )
