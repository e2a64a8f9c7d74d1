"""Cholesky factor and solve for MJX on XLA:CPU that cannot deadlock the thread pool.

Why: MJX factors the mass matrix and the Newton solver's Hessian with
``jax.scipy.linalg.cho_factor`` and solves with ``cho_solve``; XLA:CPU runs both as LAPACK
custom calls. jaxlib 0.10.2 splits such a call over the intra-op thread pool once the batch is
big enough (``batch * n**3 / 3 >= 200,000`` flops: 178 of kuka's 15x15 matrices) and blocks the
calling pool thread until the pieces finish. Each MJX physics step has two independent
Cholesky calls (the implicit integrator's and the constraint solver's), XLA runs them at the
same time, and on a 2-core machine both pool threads then wait for pieces that no thread is
left to run: the program hangs for good. It was seen as a kuka run with 3 seeds x 64 envs that
stopped at its first evaluation, and as 256-env kuka runs that never finished.

So, while MJX is traced inside ``pool_safe_cholesky``:

* ``cho_factor`` stays LAPACK's ``potrf`` (the fastest option measured on CPU), but however the
  matrices are batched by ``vmap`` (envs, seeds, nested), the batch is merged into one stack and
  factored in chunks that stay under jaxlib's splitting threshold, one chunk after another: a
  call never waits on the pool.
* ``cho_solve`` is forward and back substitution in jnp, unrolled (faster than LAPACK's batched
  ``trsm`` for these sizes, and no custom call at all; the unrolled code grows with ``n``, which
  suits small robots like kuka, nv = 15).
* Both keep jax's derivatives (the factor gets ``jax.lax.linalg.cholesky``'s JVP rule).

The factor has LAPACK's layout (upper-triangular ``U`` with ``A = U^T U`` and zeros below the
diagonal for ``lower=False``), so factors from either path solve with either ``cho_solve``.
MJX calls the functions through ``jax.scipy.linalg`` with no way to pass others in, hence the
swap, which lasts only while tracing (under a lock), never while a program runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
from jax.custom_batching import custom_vmap

__all__ = ["cho_factor", "cho_solve", "pool_safe_cholesky", "max_unsplit_batch"]

_PATCH_LOCK = threading.RLock()
# jaxlib's LAPACK kernels split a batch over the thread pool from this much work (flops) on.
_LAPACK_SPLIT_FLOPS = 200_000


def max_unsplit_batch(n: int) -> int:
    """Largest batch of [n, n] Cholesky factorisations that jaxlib's LAPACK kernel runs on the
    calling thread (its cost estimate is ``n**3 // 3`` flops per matrix)."""
    return max(1, (_LAPACK_SPLIT_FLOPS - 1) // max(1, n**3 // 3))


@custom_vmap
def _factor_stack(x: jax.Array) -> jax.Array:
    """Lower Cholesky factors of a stack [k, n, n], in chunks LAPACK does not split."""
    k, n = x.shape[0], x.shape[-1]
    chunk = max_unsplit_batch(n)
    if k <= chunk:
        return jax.lax.linalg.cholesky(x, symmetrize_input=False)
    num_chunks = -(-k // chunk)
    # Pad with identities to whole chunks; lax.map runs the chunks one after another.
    pad = jnp.broadcast_to(jnp.eye(n, dtype=x.dtype), (num_chunks * chunk - k, n, n))
    chunks = jnp.concatenate([x, pad]).reshape(num_chunks, chunk, n, n)
    out = jax.lax.map(lambda c: jax.lax.linalg.cholesky(c, symmetrize_input=False), chunks)
    return out.reshape(num_chunks * chunk, n, n)[:k]


@_factor_stack.def_vmap
def _factor_stack_vmap(axis_size: int, in_batched: list[bool], x: jax.Array):
    # Fold the vmapped axis into the stack, so nested vmaps (seeds x envs) end in one stack.
    (batched,) = in_batched
    if not batched:
        return _factor_stack(x), False
    return _factor_stack(x.reshape((-1,) + x.shape[2:])).reshape(x.shape), True


def _forward_substitution(low: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``low @ x = b`` for lower-triangular ``low``; ``b`` is [n] or [n, k]."""
    x: list[jax.Array] = []
    for i in range(low.shape[-1]):
        r = b[i] - (low[i, :i] @ jnp.stack(x) if i else 0.0)
        x.append(r / low[i, i])
    return jnp.stack(x)


def _back_substitution(up: jax.Array, b: jax.Array) -> jax.Array:
    """``x`` with ``up @ x = b`` for upper-triangular ``up``; ``b`` is [n] or [n, k]."""
    # Written out rather than as the forward substitution on reversed rows and columns: the
    # reversals measured slower on a kuka step (scripts/results/xla_cpu_notes.md).
    x: list[jax.Array] = []  # rows n-1, n-2, ...
    for i in reversed(range(up.shape[-1])):
        r = b[i] - (up[i, i + 1 :] @ jnp.stack(x[::-1]) if x else 0.0)
        x.append(r / up[i, i])
    return jnp.stack(x[::-1])


@jax.custom_jvp
def _lower_factor(a: jax.Array) -> jax.Array:
    return _factor_stack(a[None])[0]


@_lower_factor.defjvp
def _lower_factor_jvp(primals, tangents):
    # custom_vmap has no differentiation rule, so the factor gets jax.lax.linalg.cholesky's:
    # dL = L phi(L^-1 dA L^-T), phi = lower triangle with the diagonal halved.
    (a,), (da,) = primals, tangents
    low = _lower_factor(a)
    inner = _forward_substitution(low, _forward_substitution(low, da).T).T
    phi = jnp.tril(inner, -1) + 0.5 * jnp.diag(jnp.diag(inner))
    return low, low @ phi


def cho_factor(a: jax.Array, lower: bool = False, **_: Any) -> tuple[jax.Array, bool]:
    """Like ``jax.scipy.linalg.cho_factor`` for one symmetric positive-definite [n, n] matrix
    (batch it with ``vmap``; differentiable). Returns ``(factor, lower)``; the other triangle is
    zero. Like jax.scipy's, it reads one triangle of ``a`` (the upper one for ``lower=False``)."""
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"cho_factor expects one square matrix, got shape {a.shape}")
    # As jax.scipy does: the upper factor is the transposed lower factor of a^T.
    low = _lower_factor(a if lower else a.T)
    return (low if lower else low.T), lower


def cho_solve(c_and_lower: tuple[jax.Array, bool], b: jax.Array, **_: Any) -> jax.Array:
    """Like ``jax.scipy.linalg.cho_solve``: solves ``A x = b`` from ``cho_factor(A)``."""
    c, lower = c_and_lower
    if c.ndim != 2 or c.shape[0] != c.shape[1] or b.shape[0] != c.shape[0]:
        raise ValueError(f"cho_solve: factor {c.shape} does not match right-hand side {b.shape}")
    low = c if lower else c.T
    return _back_substitution(low.T, _forward_substitution(low, b))


@contextlib.contextmanager
def pool_safe_cholesky(enabled: bool = True) -> Iterator[None]:
    """While tracing inside this block, ``jax.scipy.linalg.cho_factor``/``cho_solve`` are the
    versions above (see the module doc). ``enabled=False`` leaves them alone."""
    if not enabled:
        yield
        return
    with _PATCH_LOCK:
        saved = jax.scipy.linalg.cho_factor, jax.scipy.linalg.cho_solve
        jax.scipy.linalg.cho_factor, jax.scipy.linalg.cho_solve = cho_factor, cho_solve
        try:
            yield
        finally:
            jax.scipy.linalg.cho_factor, jax.scipy.linalg.cho_solve = saved
