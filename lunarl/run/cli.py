"""What the command-line apps share: one-line errors and a quiet console."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

__all__ = ["fail", "quiet_libraries"]


def fail(app: str, message: str, code: int = 1) -> NoReturn:
    """Print ``app: error: message`` on stderr (one line, no traceback) and exit with ``code``."""
    print(f"{app}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def quiet_libraries() -> None:
    """Orbax and absl log every save at INFO, and JAX reports the TPU backend it did not find on
    every CPU/GPU machine; the console belongs to lunarl's own progress output."""
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
