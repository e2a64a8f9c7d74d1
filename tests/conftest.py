"""Shared test set-up.

XLA flag: MJX on the CPU backend is orders of magnitude slower with XLA's CPU fusion emitters
(measured: tens of steps/s versus ~12k). It has to be set before JAX initialises its backend,
hence here and in ``lunarl/_platform.py`` for the entry points.
"""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
if "--xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
