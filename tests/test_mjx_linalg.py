"""The pool-safe Cholesky used for MJX on CPU (lunarl/envs/mjx_linalg.py).

jaxlib's LAPACK kernels split a large batch over XLA:CPU's thread pool and block a pool thread
until it is done; two such calls at once deadlock a 2-thread pool (a 3-seed kuka run hung this
way). The fix factors in chunks below the splitting threshold, so the checks here are that the
numbers are right and that no LAPACK call in a traced program has a batch above the threshold,
whatever the vmaps; the slow test runs the 256-env kuka step that used to hang.
"""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
import pytest

import lunarl
from lunarl.envs import mjx_linalg
from lunarl.envs.mjx_linalg import cho_factor, cho_solve, max_unsplit_batch, pool_safe_cholesky


def _spd(rng: np.random.Generator, shape: tuple[int, ...], n: int) -> np.ndarray:
    m = rng.normal(size=shape + (n, n))
    return (m @ np.swapaxes(m, -1, -2) + n * np.eye(n)).astype(np.float32)


def _lapack_batches(program_text: str) -> list[int]:
    """Leading (batch) size of every LAPACK Cholesky call in a lowered StableHLO program."""
    calls = re.findall(
        r"custom_call @lapack_spotrf_ffi\(%[\w#]+\).*?: \(tensor<([\dx]+)xf32>\)", program_text
    )
    return [int(np.prod([int(d) for d in shape.split("x")[:-2]])) for shape in calls]


def test_threshold_matches_jaxlib_cost_model():
    # jaxlib splits when batch * (n**3 // 3) >= 200,000 flops.
    assert max_unsplit_batch(15) == 177
    assert 177 * (15**3 // 3) < 200_000 <= 178 * (15**3 // 3)
    assert max_unsplit_batch(1) == 199_999  # cost 0 counts as 1
    assert max_unsplit_batch(200) == 1


@pytest.mark.parametrize("n", [1, 3, 15])
@pytest.mark.parametrize("lower", [False, True])
def test_factor_and_solve_match_numpy(n, lower):
    rng = np.random.default_rng(n)
    a = _spd(rng, (), n)
    factor, flag = cho_factor(jnp.asarray(a), lower=lower)
    assert flag is lower
    reference = np.linalg.cholesky(a.astype(np.float64))
    np.testing.assert_allclose(np.asarray(factor), reference if lower else reference.T, atol=2e-5)
    # Same layout as jax.scipy's factor: the other triangle is exactly zero.
    np.testing.assert_allclose(
        np.asarray(factor), np.asarray(jax.scipy.linalg.cho_factor(a, lower=lower)[0]), atol=2e-5
    )
    other = np.triu(np.asarray(factor), 1) if lower else np.tril(np.asarray(factor), -1)
    assert not other.any()
    for b in (rng.normal(size=n), rng.normal(size=(n, 4))):
        x = cho_solve((factor, lower), jnp.asarray(b, jnp.float32))
        assert x.shape == b.shape
        np.testing.assert_allclose(
            np.asarray(x), np.linalg.solve(a.astype(np.float64), b), rtol=1e-4, atol=1e-5
        )


def test_factors_are_interchangeable_with_jax_scipy():
    a = jnp.asarray(_spd(np.random.default_rng(0), (), 6))
    b = jnp.arange(6.0)
    np.testing.assert_allclose(
        cho_solve(jax.scipy.linalg.cho_factor(a), b), jax.scipy.linalg.cho_solve(cho_factor(a), b), rtol=1e-5
    )


@pytest.mark.parametrize("lower", [False, True])
def test_derivatives_match_jax_scipy(lower):
    # MJX is differentiable; the chunked factor must stay so (custom_vmap alone has no rule).
    rng = np.random.default_rng(2)
    a = jnp.asarray(_spd(rng, (), 5))
    tangent = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)
    weights = jnp.arange(25.0).reshape(5, 5)
    ones = jnp.ones(5)

    def ours(x):
        return cho_factor(x, lower=lower)[0]

    def theirs(x):
        return jax.scipy.linalg.cho_factor(x, lower=lower)[0]

    def weighted(factor_fn):
        return lambda x: jnp.sum(weights * factor_fn(x) ** 2)

    def our_solve(x):
        return cho_solve(cho_factor(x, lower=lower), ones).sum()

    def their_solve(x):
        return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(x, lower=lower), ones).sum()

    np.testing.assert_allclose(
        jax.jvp(ours, (a,), (tangent,))[1], jax.jvp(theirs, (a,), (tangent,))[1], atol=1e-5
    )
    np.testing.assert_allclose(
        jax.grad(weighted(ours))(a), jax.grad(weighted(theirs))(a), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(jax.grad(our_solve)(a), jax.grad(their_solve)(a), rtol=1e-4, atol=1e-6)
    assert jax.vmap(jax.grad(our_solve))(jnp.stack([a] * 300)).shape == (300, 5, 5)


def test_nested_vmap_factors_in_unsplit_chunks():
    # 3 seeds x 130 envs = 390 matrices of 15x15: more than twice the threshold of 177.
    a = _spd(np.random.default_rng(1), (3, 130), 15)
    batched = jax.vmap(jax.vmap(lambda x: cho_factor(x)[0]))
    np.testing.assert_allclose(
        np.asarray(jax.jit(batched)(a)), np.swapaxes(np.linalg.cholesky(a), -1, -2), atol=2e-5
    )
    batches = _lapack_batches(jax.jit(batched).lower(a).as_text())
    assert batches and max(batches) <= max_unsplit_batch(15)
    # The plain LAPACK path sends all 390 in one call, which jaxlib would split over the pool.
    plain = jax.vmap(jax.vmap(lambda x: jax.scipy.linalg.cho_factor(x)[0]))
    assert _lapack_batches(jax.jit(plain).lower(a).as_text()) == [390]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="square"):
        cho_factor(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="right-hand side"):
        cho_solve((jnp.eye(3), False), jnp.ones(4))


def test_swap_lasts_only_for_the_block():
    original = jax.scipy.linalg.cho_factor, jax.scipy.linalg.cho_solve
    with pool_safe_cholesky():
        assert jax.scipy.linalg.cho_factor is mjx_linalg.cho_factor
        assert jax.scipy.linalg.cho_solve is mjx_linalg.cho_solve
    assert (jax.scipy.linalg.cho_factor, jax.scipy.linalg.cho_solve) == original
    with pytest.raises(RuntimeError), pool_safe_cholesky():
        raise RuntimeError
    assert (jax.scipy.linalg.cho_factor, jax.scipy.linalg.cho_solve) == original
    with pool_safe_cholesky(enabled=False):
        assert jax.scipy.linalg.cho_factor is original[0]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunked path is CPU-only")
def test_batched_kuka_step_has_only_unsplit_lapack_calls():
    env = lunarl.envs.make("kuka")
    states = jax.eval_shape(jax.vmap(env.reset), jax.random.split(jax.random.key(0), 256))
    actions = jax.ShapeDtypeStruct((256, env.action_size), jnp.float32)
    text = jax.jit(jax.vmap(env.step)).lower(states, actions).as_text()
    batches = _lapack_batches(text)
    assert batches, "expected MJX's Cholesky calls in the kuka step"
    assert max(batches) <= max_unsplit_batch(env.mjx_model.nv)
    assert "lapack_strsm" not in text  # the solves are plain jnp


HANG_CHILD = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    import lunarl
    env = lunarl.envs.make("kuka")
    n = 256
    opts = lunarl.compile_options(env)
    states = jax.jit(jax.vmap(env.reset), compiler_options=opts)(jax.random.split(jax.random.key(0), n))
    def roll(s, key):
        def body(s, k):
            s = jax.vmap(env.step)(s, jax.random.uniform(k, (n, env.action_size), minval=-1, maxval=1))
            return s, s.reward
        return jax.lax.scan(body, s, jax.random.split(key, 10))
    roll = jax.jit(roll, compiler_options=opts)
    for i in range(10):
        states, rewards = roll(states, jax.random.key(i))
        jax.block_until_ready(rewards)
    print("finished", rewards.shape)
    """
)


@pytest.mark.slow
def test_256_env_kuka_rollout_finishes_on_cpu():
    """The 256-env rollout that hung with MJX's plain LAPACK calls (100 steps after compiling)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        done = subprocess.run(
            [sys.executable, "-c", HANG_CHILD], env=env, capture_output=True, text=True, timeout=420
        )
    except subprocess.TimeoutExpired:
        done = None
    if done is None:
        pytest.fail("the 256-env kuka rollout did not finish in 420 s (thread-pool deadlock?)")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished (10, 256)" in done.stdout
