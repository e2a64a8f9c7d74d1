"""Process-level XLA settings, applied on ``import lunarl`` before JAX starts its backend.

MJX on XLA's CPU backend is orders of magnitude slower with the CPU fusion emitters on
(measured on a 2-core CPU with mujoco-mjx 3.17 / jax 0.10.2: tens of steps/s, against about
12k steps/s with them off). The flag is read only when the CPU backend compiles, so it is
harmless on GPU runs. A user who sets the flag themselves keeps their value.
"""

import os

_FLAG = "--xla_cpu_use_fusion_emitters"


def configure_xla() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}=false".strip()
