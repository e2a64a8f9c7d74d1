"""lunarl: JAX-native reinforcement learning for robots.

Importing lunarl installs the small JAX/brax compatibility shim (see ``lunarl._compat``) and
registers the Gymnasium ids ``lunarl/Rover-v0``, ``lunarl/CarTrack-v0`` and ``lunarl/Kuka-v0``.
"""

from lunarl import _platform

_platform.configure_xla()

from lunarl import _compat  # noqa: E402

_compat.install()

from lunarl import envs  # noqa: E402
from lunarl.envs.gym import register_gymnasium_envs  # noqa: E402

register_gymnasium_envs()

__version__ = "0.1.0"
__all__ = ["envs", "__version__"]
