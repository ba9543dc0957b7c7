"""Every method's state survives a checkpoint, and training resumes exactly.

``flax.serialization`` (msgpack) stores the states, which are NamedTuples and
tuples of arrays, as they are, except typed PRNG keys (rlw, pcgrad, gradvac,
graddrop): msgpack cannot encode them ("JAX array with PRNGKey dtype cannot be
converted to a NumPy array"). The recipe (README, "Checkpoints"): store
``jax.random.key_data(key)`` and rebuild the key with
``jax.random.wrap_key_data(data, impl=jax.random.key_impl(template_key))``,
where the template is a freshly initialised state.
"""

from __future__ import annotations

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax.checkpoint import state_from_bytes, state_to_bytes

from .methods import hparams, raw

K = 3
PARAMS = {"w": jnp.zeros((4, 2)), "b": jnp.zeros((2,))}
GRADS = [
    jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), (K, *p.shape)), PARAMS)
    for i in range(4)
]
VALUES = [jnp.array([1.0, 2.0, 3.0]) * (i + 1) for i in range(4)]


@functools.cache
def _setup(name: str):
    opt = optax.chain(mtl_optax.get(name, **hparams(name, K)), optax.adam(1e-2))

    @jax.jit
    def step(params, state, grads, value):
        updates, state = opt.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    return opt, step


def test_typed_keys_need_the_recipe():
    # Why state_to_bytes exists: msgpack cannot store typed PRNG keys.
    state = mtl_optax.rlw(num_tasks=K).init(PARAMS)
    with pytest.raises(TypeError, match="PRNGKey"):
        flax.serialization.to_bytes(state)


@pytest.mark.parametrize("name", mtl_optax.available(aliases=False))
def test_training_resumed_from_a_checkpoint_continues_exactly(name):
    opt, step = _setup(name)
    params, state = PARAMS, opt.init(PARAMS)
    for i in range(4):  # the uninterrupted run
        params, state = step(params, state, GRADS[i], VALUES[i])

    p2, s2 = PARAMS, opt.init(PARAMS)
    for i in range(2):
        p2, s2 = step(p2, s2, GRADS[i], VALUES[i])
    blob_params, blob_state = flax.serialization.to_bytes(p2), state_to_bytes(s2)
    # A fresh process would rebuild the templates from init.
    p3 = flax.serialization.from_bytes(PARAMS, blob_params)
    s3 = state_from_bytes(opt.init(PARAMS), blob_state)
    assert jax.tree.structure(s3) == jax.tree.structure(s2)
    jax.tree.map(np.testing.assert_array_equal, raw(s3), raw(s2))
    for x, y in zip(jax.tree.leaves(s3), jax.tree.leaves(s2), strict=True):
        assert jnp.result_type(x) == jnp.result_type(y)
    for i in range(2, 4):
        p3, s3 = step(p3, s3, GRADS[i], VALUES[i])
    jax.tree.map(np.testing.assert_array_equal, raw(p3), raw(params))
    jax.tree.map(np.testing.assert_array_equal, raw(s3), raw(state))
