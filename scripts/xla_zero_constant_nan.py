"""How often XLA:CPU compiles a small critic head into code that returns NaN when its all-zero
parameters are closed over (embedded as constants) instead of passed as arguments.

Pure JAX, no lunarl: an MLP whose output layer is all zeros (as Dreamer's critic and reward
heads start), then a softmax expectation over 255 bins. Each try clears JAX's caches and
compiles again; a compile is "bad" when its output holds a non-finite value (the exact output is
finite: uniform softmax weights over symmetric bins). Found through a flaky probe test
(scripts/results/xla_cpu_notes.md). Prints a table and writes JSON.

    python scripts/xla_zero_constant_nan.py --tries 200 --out scripts/results/xla_zero_constant_nan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def head_params(rng: np.random.Generator) -> dict[str, jax.Array]:
    return {
        "w1": jnp.asarray(rng.normal(size=(192, 64)).astype(np.float32) / 14),
        "b1": jnp.zeros(64, jnp.float32),
        "scale": jnp.ones(64, jnp.float32),
        "w2": jnp.zeros((64, 255), jnp.float32),
        "b2": jnp.zeros(255, jnp.float32),
    }


def head(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Dense, RMS norm, SiLU, dense to 255 logits, symexp of the expected bin."""
    h = x @ params["w1"] + params["b1"]
    h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * params["scale"]
    logits = jax.nn.silu(h) @ params["w2"] + params["b2"]
    v = jnp.sum(jax.nn.softmax(logits, -1) * jnp.linspace(-20.0, 20.0, 255), -1)
    return jnp.sign(v) * jnp.expm1(jnp.abs(v))


def bad_compiles(mode: str, tries: int) -> int:
    rng = np.random.default_rng(0)
    params = head_params(rng)
    x = jnp.asarray(rng.normal(size=(7, 5, 64, 192)).astype(np.float32))
    bad = 0
    for _ in range(tries):
        jax.clear_caches()
        if mode == "closure":
            out = jax.jit(lambda x: head(params, x))(x)
        else:
            out = jax.jit(head)(params, x)
        bad += bool(np.any(~np.isfinite(np.asarray(out))))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=100, help="compiles per mode")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    rows = []
    for mode in ("closure", "arguments"):
        t0 = time.perf_counter()
        bad = bad_compiles(mode, args.tries)
        rows.append({"mode": mode, "tries": args.tries, "bad": bad, "seconds": round(time.perf_counter() - t0, 1)})
    print(f"{'parameters':<12}{'compiles':>10}{'non-finite':>12}")
    for r in rows:
        print(f"{r['mode']:<12}{r['tries']:>10}{r['bad']:>12}")
    report = {
        "what": "compiles of a zero-output critic head that return non-finite values",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
