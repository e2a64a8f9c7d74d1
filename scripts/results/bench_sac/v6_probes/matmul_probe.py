"""Probe (issue 14, v6): XLA:CPU matmul speed on this CPU, float32 vs bfloat16 inputs (float32
accumulation), and whether independent matmuls in one ``lax.scan`` body run concurrently.

    flock /tmp/lunarl-bench.lock .venv/bin/python scripts/results/bench_sac/v6_probes/matmul_probe.py
"""

import time

import jax
import jax.numpy as jnp

import lunarl  # noqa: F401  (process XLA defaults)

OPTS = {"xla_cpu_use_fusion_emitters": True}


def best_of(f, x, repeats=5):
    jax.block_until_ready(f(x))
    runs = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(x))
        runs.append((time.perf_counter() - t, time.process_time() - c))
    return min(runs)


def dtype_row(n, h, dtype, reps=200):
    w = jnp.ones((h, h), dtype) * 0.001

    def body(c, _):
        return jnp.tanh(jnp.dot(c, w, preferred_element_type=jnp.float32)).astype(dtype), None

    f = jax.jit(lambda x: jax.lax.scan(body, x, None, length=reps)[0], compiler_options=OPTS)
    wall, _ = best_of(f, jnp.ones((n, h), dtype))
    print(
        f"rows={n} width={h} {jnp.dtype(dtype).name}: {wall / reps * 1e6:.1f} us/matmul, "
        f"{2 * n * h * h * reps / wall / 1e9:.0f} GFLOP/s",
        flush=True,
    )


def chains_row(n, h, chains, reps=200):
    w = jnp.ones((h, h)) * 0.001

    def body(c, _):
        return [jax.nn.relu(jnp.dot(x, w)) for x in c], None

    f = jax.jit(lambda xs: jax.lax.scan(body, xs, None, length=reps)[0], compiler_options=OPTS)
    wall, cpu = best_of(f, [jnp.ones((n, h)) * (i + 1) for i in range(chains)])
    print(
        f"rows={n} width={h} independent chains={chains}: {wall / reps / chains * 1e6:.1f} us/matmul, "
        f"process CPU / wall {cpu / wall:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    for h in (128, 256):
        for n in (256, 512):
            for d in (jnp.float32, jnp.bfloat16):
                dtype_row(n, h, d)
    for ch in (1, 2, 4, 8):
        chains_row(256, 256, ch)
