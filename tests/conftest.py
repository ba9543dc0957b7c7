"""Shared fixtures and settings of the test processes."""

import gc
import os
import shutil
import tempfile

# LLVM's optimisations and XLA's MLIR fusion emitters off in the test processes
# (and in the subprocesses they start, which inherit the environment), as
# tests/sharding_check.py does: most of the suite's time is XLA compiling small
# programs. Compiling 20 programs (10 methods at K = 3 and 5, chained with
# Adam) took 18.6 s with XLA's defaults, 10.3 s with LLVM's optimisations off
# and 5.9-6.6 s with the fusions also emitted by XLA's older elemental
# emitter; the suite went from 17-18 to about 10 minutes on 2 cores. Only how
# the machine code is generated changes, not XLA's HLO passes or float
# semantics (no fast math either way), though rounding can differ in the last
# bits (see the CAGrad tolerance of tests/test_all_methods.py's vmap test).
# Benchmarks and users get XLA's defaults. Set by the user, the flags are
# left as they are (subprocesses that set flags of their own add these:
# FAST_COMPILE_XLA_FLAGS). They must be in the environment before JAX creates
# its CPU backend, which importing jax does not do.
from .xla_flags import FAST_COMPILE_XLA_FLAGS

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_XLA_FLAGS
    ).strip()

import jax
import pytest

# Many tests compile the same programs (one method on the same shapes, through
# different transformation objects): JAX's persistent compilation cache lets
# the later ones load the executable instead of compiling it again. Only
# compilations of 0.5 s or more are written: writing every one made
# tests/test_all_methods.py slower (164 against 139 s with 2 workers; 207 s
# without the cache). The directory is made for the run by the controlling
# process, shared with pytest-xdist's workers through the environment, and
# removed at the end. A cache the user set (JAX_COMPILATION_CACHE_DIR) is used
# as it is.
_CACHE_ENV = "MTL_OPTAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
    # The tests' own models and reference computations multiply float32 in full
    # on every backend (JAX's default lets a GPU use TensorFloat-32, which put
    # an H100's jacrev of a small MLP 1e-4 away from its vmapped grad).
    # mtl_optax's own products are at full precision whatever this setting:
    # tests/test_precision.py checks that with the default at bfloat16.
    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mtl_optax-test-jax-cache-")
        config._mtl_optax_cache_owner = True
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    if getattr(config, "_mtl_optax_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


# The longest test (every method in an 8-device subprocess, about 140 s on 2
# cores) runs first: pytest-xdist deals the first quarter of the tests to the
# workers in turn and the rest to whichever is free, so a long test met late
# leaves the other worker idle at the end of the run.
_RUN_FIRST = ("tests/test_sharding.py::test_every_method_sharded_step_equals_single_device_step",)


def pytest_collection_modifyitems(config, items):
    first = [item for item in items if item.nodeid in _RUN_FIRST]
    if first:
        items[:] = first + [item for item in items if item.nodeid not in _RUN_FIRST]


# A worker's resident memory above which JAX's in-memory caches are dropped;
# after each drop it moves to 1 GiB above what the worker still holds (freed
# memory is not all returned to the system, and dropping the caches after
# every test made the suite 1.5x slower).
_GIB = 1 << 30
_rss_limit = [3 * _GIB]


def _rss_bytes() -> int:
    """This process's resident memory (Linux), or 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@pytest.fixture(autouse=True)
def _bounded_worker_memory():
    """Drops JAX's in-memory caches of compiled programs when a worker grows past 3 GiB, then 1 GiB more.

    A pytest-xdist worker runs about half of the suite in one process, and JAX
    keeps every program it compiled (and the tracing caches of every jitted
    function) for the life of the process. Three CI runs lost a worker late
    in the run (about 90 % through), each time while XLA compiled or
    serialised an executable (a segmentation fault twice, an abort once, in
    different tests): a worker's memory growing with every test is the likely
    cause. Reading the resident size after each test costs microseconds.
    """
    yield
    if _rss_bytes() > _rss_limit[0]:
        jax.clear_caches()
        gc.collect()
        _rss_limit[0] = max(3 * _GIB, _rss_bytes() + _GIB)


@pytest.fixture
def x64():
    """Runs a test with float64 enabled in JAX, restoring the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
