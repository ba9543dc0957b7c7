"""Shared fixtures and settings of the test processes."""

import jax
import pytest

# No persistent compilation cache: with JAX's cache shared by the xdist
# workers (jax 0.10.2, CPU), serialising an executable in
# `compilation_cache.put_executable_and_time` crashed a worker with a
# segmentation fault in three CI runs (twice with every compilation cached,
# once with only those of 0.5 s or more), each time in a different test. The
# cache saved about a third of tests/test_all_methods.py's compile time.


def pytest_configure(config):
    # The tests' own models and reference computations multiply float32 in full
    # on every backend (JAX's default lets a GPU use TensorFloat-32, which put
    # an H100's jacrev of a small MLP 1e-4 away from its vmapped grad).
    # mtl_optax's own products are at full precision whatever this setting:
    # tests/test_precision.py checks that with the default at bfloat16.
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled in JAX, restoring the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
