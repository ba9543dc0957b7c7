"""Saving and restoring optimizer states that hold typed PRNG keys.

The states of mtl_optax methods are NamedTuples and tuples of arrays, which
``flax.serialization`` (msgpack) stores as they are, except the typed PRNG keys
of the random methods (``rlw``, ``pcgrad``, ``gradvac``, ``graddrop``): msgpack
cannot encode a key array. :func:`state_to_bytes` stores each key as its key
data (``jax.random.key_data``) and :func:`state_from_bytes` rebuilds it with the
key implementation of a template state (a fresh ``init``), so a run resumed
from a checkpoint continues exactly as the uninterrupted run, random methods
included. Needs flax (the ``flax`` extra). With orbax, apply the same
``key_data`` / ``wrap_key_data`` mapping before saving and after restoring.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["state_from_bytes", "state_to_bytes"]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_as_data(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def state_to_bytes(state: Any) -> bytes:
    """Serializes an optimizer state (any pytree of arrays), PRNG keys included.

    Args:
      state: e.g. ``opt.init(params)`` or a later state.

    Returns:
      msgpack bytes (``flax.serialization.to_bytes``), with every typed PRNG
      key stored as its key data.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_optax
      >>> from mtl_optax.checkpoint import state_from_bytes, state_to_bytes
      >>> opt = optax.chain(mtl_optax.pcgrad(key=0, num_tasks=2), optax.adam(1e-3))
      >>> state = opt.init({"w": jnp.zeros(3)})
      >>> restored = state_from_bytes(opt.init({"w": jnp.zeros(3)}), state_to_bytes(state))
      >>> bool(jnp.all(jax.random.key_data(restored[0].key) == jax.random.key_data(state[0].key)))
      True
    """
    import flax.serialization

    return flax.serialization.to_bytes(_keys_as_data(state))


def state_from_bytes(template: Any, data: bytes) -> Any:
    """Restores a state serialized by :func:`state_to_bytes`.

    Args:
      template: a state of the same structure (e.g. a fresh ``opt.init(params)``);
        its PRNG keys give the key implementation to rebuild.
      data: the bytes of :func:`state_to_bytes`.

    Returns:
      The state, with ``template``'s structure and typed PRNG keys.
    """
    import flax.serialization

    raw = flax.serialization.from_bytes(_keys_as_data(template), data)
    return jax.tree_util.tree_map(
        lambda t, r: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_key(t) else r,
        template,
        raw,
    )
