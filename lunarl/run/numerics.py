"""What a run's floating-point results depend on besides its code, config and seed.

A resumed run ends bit-identical to an uninterrupted one only where both ran on the same
numerical stack: XLA compiles for the host CPU's instruction set (AVX-512 or not changes how
reductions are vectorised) and for the accelerator, and a newer jax, jaxlib, flax or optax may
compile or initialise differently. Training that is chaotic (the Dreamer car runs are: session
19 in ``scripts/results/dreamer.md``) then ends elsewhere, even though every part is
deterministic. Each checkpoint records this fingerprint in its ``meta``; a resume that finds
another one says so in one line and continues.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Mapping
from pathlib import Path

import jax

__all__ = ["describe_change", "numerics_fingerprint"]

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
# CPU instruction-set extensions XLA's CPU backend may target (checked in /proc/cpuinfo's flags).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def _cpu() -> str:
    """The host CPU: model name, family/model numbers and the vector extensions XLA can use."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(
        (key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in block.splitlines()) if key
    )
    flags = set(fields.get("flags", "").split())
    isa = "+".join(f for f in _ISA_FLAGS if f in flags) or "no avx2"
    return f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}; {isa})"


def numerics_fingerprint() -> dict[str, str]:
    """Versions, backend, device kind and host CPU of this process, as strings (JSON-ready)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return {
        "python": platform.python_version(),
        **versions,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": _cpu(),
    }


def describe_change(saved: Mapping[str, str] | None, now: Mapping[str, str]) -> str | None:
    """``"jaxlib 0.10.2 -> 0.11.0; cpu A -> B"`` for the entries that differ, or None when none do
    (or when ``saved`` is None: a checkpoint written before lunarl recorded the fingerprint)."""
    if saved is None:
        return None
    changed = [f"{key} {saved.get(key, 'unrecorded')} -> {value}" for key, value in now.items() if saved.get(key) != value]
    return "; ".join(changed) or None


if __name__ == "__main__":
    # `make test` prints this first, so a failure seen on one machine only can be traced to it.
    print("numerics: " + "; ".join(f"{key} {value}" for key, value in numerics_fingerprint().items()))
