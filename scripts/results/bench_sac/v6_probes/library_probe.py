"""Probe (issue 14, v6, lead 4): one 256x256x256 matmul + ReLU in a 200-step ``lax.scan``, compiled
with each XLA:CPU dot library option (YNNPACK is the default here; the empty YNN fusion type leaves
the dots to Eigen; the oneDNN and XNNPACK fusion types made no library fusions in this jaxlib).

    flock /tmp/lunarl-bench.lock .venv/bin/python scripts/results/bench_sac/v6_probes/library_probe.py ynn
"""

import sys
import time

import jax
import jax.numpy as jnp

import lunarl  # noqa

name = sys.argv[1]
opts = {
    "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    },
    "xnn": {
        "xla_cpu_experimental_ynn_fusion_type": "",
        "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
    },
    "ynn": {},
}[name]
w = jnp.ones((256, 256)) * 0.001
f = jax.jit(
    lambda x: jax.lax.scan(lambda c, _: (jax.nn.relu(c @ w) + 0.1, None), x, None, length=200)[0],
    compiler_options={"xla_cpu_use_fusion_emitters": True, **opts},
)
x = jnp.ones((256, 256))
c = f.lower(x).compile()
t = c.as_text()
print(
    name,
    "fusion kinds:",
    {k: t.count(k) for k in ["ynn_fusion", "xnn_fusion", "onednn", "__onednn", "dot("]},
    flush=True,
)
jax.block_until_ready(c(x))
best = min(
    (lambda t0: (jax.block_until_ready(c(x)), time.perf_counter() - t0)[1])(time.perf_counter())
    for _ in range(5)
)
print(name, f"{best / 200 * 1e6:.1f} us per 256x256x256 matmul+relu", flush=True)
