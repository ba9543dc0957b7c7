"""Shared fixtures, and a compilation cache shared by the test processes of one run."""

import os
import shutil
import tempfile

import jax
import pytest

# Many tests compile the same programs (one method on the same shapes, through
# different transformation objects): JAX's persistent compilation cache lets
# the later ones load the executable instead of compiling it again
# (tests/test_all_methods.py with 2 workers: 207 s without it, 164 s with an
# empty cache). Only compilations that took 0.5 s or more are written: writing
# every one (the threshold at 0) made the same module slower, 164 against 139 s,
# and serialising one of the many tiny eager executables crashed an xdist
# worker twice in CI (a segmentation fault inside jax's
# `compilation_cache.put_executable_and_time`, while tests/test_upgrad.py ran a
# vmapped while_loop eagerly; jax 0.10.2, CPU).
# The directory is made for the run by the controlling process,
# shared with pytest-xdist's workers through the environment, and removed at
# the end. A cache the user set (JAX_COMPILATION_CACHE_DIR) is used as it is.
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


@pytest.fixture
def x64():
    """Runs a test with float64 enabled in JAX, restoring the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
