"""Threefry-2x32 random bits written with ``jax.numpy`` integer operations.

``jax.extend.random.threefry_2x32`` and ``jax.random.bits`` give the same bits
but, on XLA's CPU backend, do not fuse with their consumer and slow down
sharply on long arrays (2 x 1e6 words: 2.8 ms; 1e7 words: 76 ms on 2 cores).
The rounds below are plain ``uint32`` adds, rotations and xors, which XLA fuses
into one vectorised elementwise loop together with whatever reads the bits
(1.3 ms and 22 ms alone; GradDrop's whole update at K = 2, P = 1e7 went from
2.2x to 0.8x the engine floor). The bits are *identical* to
``jax.extend.random.threefry_2x32(key_data, jnp.arange(n, dtype=jnp.uint32))``
(Salmon et al. 2011, 20 rounds, JAX's counter layout), which
``tests/test_random.py`` checks, together with Random123's known-answer vectors.

The same rounds also stand behind :func:`fused` and :func:`split`, which give
every ``jax.random`` function *the same draws* as a Threefry key, without the
loop that JAX's Threefry kernel compiles to on CPU (five iterations of four
rounds, a ``while`` that XLA runs as tens of tiny steps: about 50 µs of a
method's step, whatever the size of the gradients).

References:
  Salmon, Moraes, Dror and Shaw, `Parallel random numbers: as easy as 1, 2, 3
  <https://doi.org/10.1145/2063384.2063405>`_, SC 2011.
"""

from __future__ import annotations

import math

import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
from jax import lax

__all__ = ["fused", "split", "threefry_2x32", "threefry_2x32_bits"]

# Threefry-2x32 rotation constants (two groups of four rounds, alternating) and
# the key-schedule parity constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA


def _rotl(x: jax.Array, d: int) -> jax.Array:
    return (x << jnp.uint32(d)) | (x >> jnp.uint32(32 - d))


def threefry_2x32(
    key: tuple[jax.Array, jax.Array], x: tuple[jax.Array, jax.Array], rounds: int = 20
) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block function: 2 key words and 2 counter words to 2 words.

    Args:
      key: two ``uint32`` key words (scalars).
      x: two ``uint32`` counter arrays of one shape.
      rounds: number of rounds, a multiple of 4 (20, Random123's and JAX's
        default).

    Returns:
      The two ``uint32`` output words, each of the counters' shape.
    """
    if rounds % 4:
        raise ValueError(f"threefry_2x32: rounds must be a multiple of 4; found {rounds}.")
    k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
    schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(_PARITY))
    x0, x1 = (jnp.asarray(v, jnp.uint32) for v in x)
    x0, x1 = x0 + k0, x1 + k1
    for r in range(rounds):
        x0 = x0 + x1
        x1 = _rotl(x1, _ROTATIONS[(r // 4) % 2][r % 4]) ^ x0
        if r % 4 == 3:
            i = r // 4 + 1
            x0 = x0 + schedule[i % 3]
            x1 = x1 + schedule[(i + 1) % 3] + jnp.uint32(i)
    return x0, x1


def threefry_2x32_bits(key_data: jax.Array, n: int) -> jax.Array:
    """``n`` random ``uint32`` words: Threefry-2x32 on the counters ``0 .. n-1``.

    JAX's layout: the counters are padded with one zero to an even length,
    split into halves, and word ``i`` of the first (second) half of the output
    is the first (second) output word of the block function on the counter pair
    ``(i, i + ceil(n / 2))``. Bit for bit equal to
    ``jax.extend.random.threefry_2x32(key_data, jnp.arange(n, dtype=jnp.uint32))``.

    Args:
      key_data: ``uint32[2]``, e.g. ``jax.random.key_data`` of a Threefry key.
      n: the number of words, ``0 < n < 2**32``.

    Returns:
      ``uint32[n]``.
    """
    if not 0 < n < 2**32:
        raise ValueError(f"threefry_2x32_bits: n must lie in [1, 2**32); found {n}.")
    half = (n + 1) // 2
    first = lax.iota(jnp.uint32, half)
    second = first + jnp.uint32(half)
    if n % 2:  # the padding counter of the last pair is 0, not n
        second = jnp.where(second < jnp.uint32(n), second, jnp.uint32(0))
    y0, y1 = threefry_2x32((key_data[0], key_data[1]), (first, second))
    return jnp.concatenate([y0, y1])[:n]


# ---------------------------------------------------------------------------
# jax.random's Threefry, bit for bit, without the rolled loop.
# ---------------------------------------------------------------------------

_THREEFRY = jax_random_ext.threefry_prng_impl
_THREEFRY_NAME = "threefry2x32"


def _unrolled_applies(shape: tuple[int, ...]) -> bool:
    # JAX's partitionable Threefry (its default) numbers the draws of a shape
    # with a 64-bit counter: below 2**32 draws its high word is 0. The original
    # layout (jax_threefry_partitionable=False) is left to JAX's kernel.
    return bool(jax.config.jax_threefry_partitionable) and math.prod(shape) < 2**32


def _counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    n = math.prod(shape)
    return jnp.zeros(shape, jnp.uint32), lax.iota(jnp.uint32, n).reshape(shape)


def _split(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    shape = tuple(shape)
    if not _unrolled_applies(shape):
        return _THREEFRY.split(key_data, shape)
    y0, y1 = threefry_2x32((key_data[0], key_data[1]), _counters(shape))
    return jnp.stack([y0, y1], axis=len(shape))


def _random_bits(key_data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    shape = tuple(shape)
    if bit_width not in (8, 16, 32, 64) or not _unrolled_applies(shape):
        return _THREEFRY.random_bits(key_data, bit_width, shape)
    y0, y1 = threefry_2x32((key_data[0], key_data[1]), _counters(shape))
    if bit_width == 64:  # only asked for with jax_enable_x64
        wide = jnp.uint64
        return (y0.astype(wide) << jnp.asarray(32, wide)) | y1.astype(wide)
    bits = y0 ^ y1
    return bits if bit_width == 32 else bits.astype(jnp.dtype(f"uint{bit_width}"))


_FUSED_IMPL = jax_random_ext.define_prng_impl(
    key_shape=(2,),
    seed=_THREEFRY.seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_THREEFRY.fold_in,
    name="mtl_optax_threefry2x32_unrolled",
    tag="mfry",
)


def _is_threefry(key: jax.Array) -> bool:
    return str(jax.random.key_impl(key)) == _THREEFRY_NAME


def fused(key: jax.Array) -> jax.Array:
    """The same key, drawn from with the unrolled rounds: identical ``jax.random`` draws.

    For a typed Threefry-2x32 key, a key of an equivalent implementation whose
    ``split`` and ``random_bits`` are JAX's partitionable Threefry (its default)
    computed by :func:`threefry_2x32`'s unrolled rounds, so that
    ``jax.random.normal(fused(key), ...)`` equals ``jax.random.normal(key, ...)``
    bit for bit (as do ``bits``, ``uniform``, ``permutation`` and the rest,
    which ``tests/test_random.py`` checks), without JAX's CPU kernel, whose
    rolled loop costs about 50 µs per draw on CPU whatever its size. Other
    key implementations, or ``jax_threefry_partitionable=False``, are
    returned (or served) as they are.

    Args:
      key: a typed PRNG key (``jax.random.key``).

    Returns:
      A typed key of the same data.
    """
    if not _is_threefry(key):
        return key
    return jax.random.wrap_key_data(jax.random.key_data(key), impl=_FUSED_IMPL)


def split(key: jax.Array, num: int = 2) -> jax.Array:
    """``jax.random.split(key, num)``, bit for bit, in the key's own implementation.

    For a Threefry key the new keys come from :func:`fused` (no rolled loop)
    and are returned as Threefry keys again.

    Args:
      key: a typed PRNG key.
      num: how many keys.

    Returns:
      ``num`` typed keys of ``key``'s implementation.
    """
    if not _is_threefry(key):
        return jax.random.split(key, num)
    keys = jax.random.split(fused(key), num)
    return jax.random.wrap_key_data(jax.random.key_data(keys), impl=_THREEFRY_NAME)
