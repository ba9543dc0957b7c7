"""The fused Threefry-2x32 of ``mtl_optax._random`` against Random123's vectors and JAX's kernel."""

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np
import pytest

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
