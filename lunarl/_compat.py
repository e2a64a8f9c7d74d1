"""Compatibility shims between the pinned libraries.

brax 0.14.2 (the newest release) calls ``jax.device_put_replicated``, which JAX 0.10 removed.
We want the newest JAX (0.10.x here, 0.11.x on the CUDA image), so instead of pinning an old
JAX for the sake of one call we give brax an equivalent built on ``jax.device_put`` with a
sharding. Installed once, on ``import lunarl``; a no-op where JAX still has the function.

MJX (imported by brax) prints "Failed to import warp: ..." and "Failed to import mujoco_warp:
..." on every import where its optional Warp backend is not installed, which lunarl never uses
and which reads like an error to a newcomer. ``quiet_mjx_import`` imports it once with exactly
those two lines held back; anything else it prints still reaches stdout.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _device_put_replicated(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Stack ``len(devices)`` copies of every leaf and place copy i on device i."""
    mesh = jax.sharding.Mesh(np.asarray(devices), ("replica",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica"))

    def put(leaf: Any) -> jax.Array:
        leaf = jnp.asarray(leaf)
        stacked = jnp.broadcast_to(leaf, (len(devices),) + leaf.shape)
        return jax.device_put(stacked, sharding)

    return jax.tree.map(put, tree)


_MJX_OPTIONAL_BACKEND = ("Failed to import warp:", "Failed to import mujoco_warp:")


def quiet_mjx_import() -> None:
    """Import ``mujoco.mjx`` (if installed) without its optional-backend messages."""
    if "mujoco.mjx" in sys.modules:
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            import mujoco.mjx  # noqa: F401
    except ImportError:
        pass  # MJX is optional for everything but the kuka env, which imports it itself
    finally:
        kept = [line for line in captured.getvalue().splitlines() if not line.startswith(_MJX_OPTIONAL_BACKEND)]
        if kept:
            print("\n".join(kept))


def install() -> None:
    quiet_mjx_import()
    if not hasattr(jax, "device_put_replicated"):
        jax.device_put_replicated = _device_put_replicated  # type: ignore[attr-defined]
