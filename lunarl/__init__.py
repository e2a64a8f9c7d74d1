"""lunarl: JAX-native reinforcement learning for robots.

Importing lunarl installs the small JAX/brax compatibility shim (see ``lunarl._compat``) and
registers the Gymnasium ids ``lunarl/Rover-v0``, ``lunarl/CarTrack-v0`` and ``lunarl/Kuka-v0``.
``lunarl.compile_options(env)`` gives the XLA options lunarl compiles its own programs with
(``jax.jit(f, compiler_options=lunarl.compile_options(env))``; see ``lunarl._platform``).
"""

from lunarl import _platform

_platform.configure_xla()

from lunarl import _compat  # noqa: E402

_compat.install()

from lunarl import envs  # noqa: E402
from lunarl.envs.gym import register_gymnasium_envs  # noqa: E402

register_gymnasium_envs()

from lunarl._platform import compile_options  # noqa: E402

__version__ = "0.1.0"
__all__ = ["compile_options", "envs", "__version__"]
