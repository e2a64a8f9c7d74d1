"""Shared test set-up.

XLA flag: MJX on the CPU backend is orders of magnitude slower with XLA's CPU fusion emitters
(measured: tens of steps/s versus ~12k). It has to be set before JAX initialises its backend,
hence here and in ``lunarl/_platform.py`` for the entry points.
"""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
if "--xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()


# --------------------------------------------------------------------------------------------
# The apps as subprocesses (tests/test_train_app.py, tests/test_agent_contract.py)
# --------------------------------------------------------------------------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# XLA:CPU's backend optimisations cost more compile time than the tests' small programs run for
# (a tiny PPO chunk: 13-14 s to compile at the default level, about 4 s at level 0, the same run
# time). No assertion depends on them: a comparison of two programs compiles both with the same
# options. The app subprocesses get them as flags (``app_env``); in-process modules opt in with the
# ``fast_compile`` fixture or ``fast_jit``. Not for bit-for-bit comparisons of values that two
# different computations produce (an observation and its copy in ``final_obs`` can round
# differently at level 0), nor for MJX programs whose run time matters.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# A Dreamer lever that no experiment uses (measured and not adopted: scripts/results/dreamer.md):
# its behaviour tests compile more than their share of the default suite, so they run with
# `make test-all` (its config checks stay in the default suite).
unadopted_lever = pytest.mark.slow


def fast_jit(fun, **kw):
    """``jax.jit`` with ``FAST_COMPILE``."""
    import jax

    return jax.jit(fun, compiler_options=FAST_COMPILE, **kw)


@pytest.fixture(scope="module")
def fast_compile():
    """lunarl's own jitted programs (training chunks, evaluation rollouts, video rollouts) are
    compiled with ``FAST_COMPILE`` added to their options while the module runs."""
    from lunarl.run import evaluation, programs, video

    patch = pytest.MonkeyPatch()
    for module in (programs, evaluation, video):
        base = module.compile_options
        patch.setattr(module, "compile_options", lambda env, base=base: {**base(env), **FAST_COMPILE})
    yield
    patch.undo()


def shared_tmp(tmp_path_factory) -> Path:
    """A directory of this test session that every pytest-xdist worker sees (``make test`` runs
    two): the session's base temp dir, or under xdist its parent, which the workers' share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def exact_app_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the app subprocesses at XLA's default optimisation level: wandb off, one
    persistent JAX compilation cache for all of them (across xdist workers too), and the repo
    root importable (the toy agent is ``tests.counter_agent``). For runs compared bit for bit
    with runs of another program (another device count)."""
    cache = os.environ.get("LUNARL_TEST_JAX_CACHE")
    if not cache:
        cache = str(shared_tmp(tmp_path_factory) / "jax_cache")
        os.makedirs(cache, exist_ok=True)
    return {
        **os.environ,
        "WANDB_MODE": "disabled",
        "WANDB_SILENT": "true",
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }


@pytest.fixture(scope="session")
def app_env(exact_app_env) -> dict[str, str]:
    """``exact_app_env`` with ``FAST_COMPILE_FLAGS``: what the app tests run with."""
    return {**exact_app_env, "XLA_FLAGS": f"{exact_app_env.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()}


def run_app(app_env, module: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=app_env, capture_output=True, text=True, timeout=timeout
    )


def final_state(run_dir: Path):
    """(iteration, seed-stacked TrainState) of a run's latest checkpoint under ``RUN_DIR/checkpoints``."""
    from lunarl.run.restore import restore_run

    saved = restore_run(str(run_dir / "checkpoints"), "latest")
    return saved.meta["iteration"], saved.state


def adam_counts(opt_state) -> dict[str, int]:
    """Adam's step count per optimiser of a state dict (key: the optimiser's path, e.g.
    ``"['critic']"``): how many updates each has applied."""
    import jax

    return {
        jax.tree_util.keystr(path[:1]): int(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
        if "count" in jax.tree_util.keystr(path)
    }


def assert_same_state(a, b, float_rtol: float = 0.0) -> None:
    """Every leaf of two TrainStates equal bit for bit (the failing leaf's path in the message);
    with ``float_rtol`` > 0, float leaves within it (integers, keys and counters still exact)."""
    import jax
    import numpy as np

    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y, where = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
        if float_rtol > 0 and np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=float_rtol, atol=1e-9, err_msg=where)
        else:
            np.testing.assert_array_equal(x, y, err_msg=where)


# --------------------------------------------------------------------------------------------
# Order of the files (``make test``: whole files to two xdist workers, in collection order)
# --------------------------------------------------------------------------------------------

# The costliest files first, so that the last to finish are short ones and neither worker idles
# long at the end; the shared video run's first user early, its other users late (they find it
# trained). A file not named here runs in between, in collection order. Measured per-file times
# are in the commit that last changed this list.
FIRST_FILES = (
    "test_faults.py",
    "test_dreamer.py",
    "test_videos.py",
    "test_train_app.py",
    "test_agent_contract.py",
    "test_population.py",
    "test_kuka.py",
    "test_env_contract.py",
    "test_sac.py",
    "test_config.py",
    "test_brax_compat.py",
    "test_ppo_reference.py",
    "test_notebooks.py",
    "test_s3.py",
    "test_mjx_linalg.py",
    "test_optuna.py",
)
LAST_FILES = ("test_report.py", "test_play.py")


def pytest_collection_modifyitems(config, items) -> None:
    def rank(item) -> int:
        name = item.path.name
        if name in FIRST_FILES:
            return FIRST_FILES.index(name)
        if name in LAST_FILES:
            return len(FIRST_FILES) + 1 + LAST_FILES.index(name)
        return len(FIRST_FILES)

    items.sort(key=rank)  # stable: a file's tests keep their order
