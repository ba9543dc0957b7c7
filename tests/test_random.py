"""The fused Threefry-2x32 of ``mtl_optax._random`` against Random123's vectors and JAX's kernel."""

import math
import re

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_optax import _random
from mtl_optax._graddrop import _uniform
from mtl_optax._random import threefry_2x32, threefry_2x32_bits

# Random123's known-answer vectors for Threefry-2x32, 20 rounds (kat_vectors):
# (counter words, key words, expected output words).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_block_function_matches_random123_known_answers(counter, key, expected):
    out = jax.jit(threefry_2x32)(
        tuple(jnp.uint32(k) for k in key), tuple(jnp.uint32(c) for c in counter)
    )
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 1000, 4097, 100_001])
@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5])
def test_bits_equal_jax_threefry_2x32_on_the_counters(n, seed):
    key_data = jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
    ours = jax.jit(threefry_2x32_bits, static_argnums=1)(key_data, n)
    theirs = jax_random_ext.threefry_2x32(key_data, jnp.arange(n, dtype=jnp.uint32))
    assert ours.dtype == jnp.uint32 and ours.shape == (n,)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_graddrop_uniforms_are_the_24_high_bits_of_jax_threefry():
    key = jax.random.key(11)
    shape = (37, 29)  # odd size: exercises the padding counter
    bits = jax_random_ext.threefry_2x32(
        jax.random.key_data(key), jnp.arange(37 * 29, dtype=jnp.uint32)
    ).reshape(shape)
    expected = np.asarray(bits >> 8, np.float64) * 2.0**-24
    np.testing.assert_array_equal(np.asarray(_uniform(key, shape, jnp.float32)), expected)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        threefry_2x32((jnp.uint32(0), jnp.uint32(0)), (jnp.uint32(0), jnp.uint32(0)), rounds=13)
    with pytest.raises(ValueError, match=r"\[1, 2\*\*32\)"):
        threefry_2x32_bits(jnp.zeros(2, jnp.uint32), 0)


SEEDS = [0, 7, 2**31 + 5, 123_456_789]


def _data(keys):
    return np.asarray(jax.random.key_data(keys))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num", [1, 2, 3, 17])
def test_split_equals_jax_random_split(seed, num):
    key = jax.random.key(seed)
    ours = jax.jit(_random.split, static_argnums=1)(key, num)
    assert str(jax.random.key_impl(ours)) == "threefry2x32" and ours.shape == (num,)
    np.testing.assert_array_equal(_data(ours), _data(jax.random.split(key, num)))
    # Under vmap over keys too (e.g. a vmapped optimizer state).
    keys = jax.random.split(key, 3)
    np.testing.assert_array_equal(
        _data(jax.vmap(lambda k: _random.split(k, num))(keys)),
        _data(jax.vmap(lambda k: jax.random.split(k, num))(keys)),
    )


DRAWS = {
    "bits": lambda k, shape, dtype: jax.random.bits(k, shape, jnp.uint32),
    "bits8": lambda k, shape, dtype: jax.random.bits(k, shape, jnp.uint8),
    "bits16": lambda k, shape, dtype: jax.random.bits(k, shape, jnp.uint16),
    "uniform": lambda k, shape, dtype: jax.random.uniform(k, shape, dtype),
    "normal": lambda k, shape, dtype: jax.random.normal(k, shape, dtype),
    "randint": lambda k, shape, dtype: jax.random.randint(k, shape, -5, 1000),
    "permutation": lambda k, shape, dtype: jax.random.permutation(k, math.prod(shape)),
    "split_then_normal": lambda k, shape, dtype: jax.random.normal(
        jax.random.split(k)[1], shape, dtype
    ),
}


@pytest.mark.parametrize("draw", list(DRAWS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (40,), (3, 5), (2, 3, 1001)])
def test_fused_key_draws_equal_threefry_draws(draw, dtype, shape):
    """Every jax.random function draws the same values from ``fused(key)`` as from ``key``."""
    fn = DRAWS[draw]
    theirs_fn = jax.jit(lambda k: fn(k, shape, dtype))
    ours_fn = jax.jit(lambda k: fn(_random.fused(k), shape, dtype))
    for seed in SEEDS:
        key = jax.random.key(seed)
        theirs, ours = theirs_fn(key), ours_fn(key)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("draw", ["bits", "uniform", "normal"])
def test_fused_key_draws_equal_threefry_draws_in_float64(draw, x64):
    """64-bit draws (x64 enabled) combine the two output words, as JAX does."""
    fn = DRAWS[draw]
    dtype = jnp.float64
    if draw == "bits":
        fn = lambda k, shape, dtype: jax.random.bits(k, shape, jnp.uint64)
    ours_fn = jax.jit(lambda k: fn(_random.fused(k), (7, 3), dtype))
    for seed in SEEDS:
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(ours_fn(key)), np.asarray(fn(key, (7, 3), dtype)))


def test_original_threefry_layout_is_left_to_jax():
    """With jax_threefry_partitionable=False the draws still equal JAX's (its own kernel)."""
    with jax.threefry_partitionable(False):
        key = jax.random.key(5)
        np.testing.assert_array_equal(
            _data(jax.jit(_random.split, static_argnums=1)(key, 3)),
            _data(jax.random.split(key, 3)),
        )
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lambda k: jax.random.normal(_random.fused(k), (9,)))(key)),
            np.asarray(jax.random.normal(key, (9,))),
        )


def test_other_key_implementations_pass_through():
    key = jax.random.key(3, impl="rbg")
    assert _random.fused(key) is key
    np.testing.assert_array_equal(_data(_random.split(key, 4)), _data(jax.random.split(key, 4)))


def test_split_and_draws_compile_without_a_loop():
    """The point of :func:`_random.fused`: no rolled Threefry loop in the compiled step.

    JAX's Threefry kernel compiles to a ``while`` of five iterations on CPU,
    which XLA runs as tens of tiny steps (about 50 µs); the unrolled rounds
    compile to straight-line fusions.
    """

    def step(key):
        next_key, draw_key = _random.split(key)
        return next_key, jax.random.normal(_random.fused(draw_key), (10,))

    hlo = jax.jit(step).lower(jax.random.key(0)).compile().as_text()
    assert not re.search(r"\bwhile\(", hlo)
