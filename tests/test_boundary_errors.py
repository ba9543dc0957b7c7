"""Wrong input at the boundary raises at trace time, for every method.

``tests/test_validation.py`` checks each message's wording with one method; here
every registered method is fed the same wrong inputs inside ``jax.jit`` (so the
error is raised while tracing, before any computation) and must raise a
``ValueError`` whose message names what is wrong and what was expected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import mtl_optax

from .methods import hparams

K = 3
PARAMS = {"dense": {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}}
METHODS = mtl_optax.available(aliases=False)


def _grads(k=K, dtype=jnp.float32):
    return jax.tree.map(lambda p: jnp.ones((k, *p.shape), dtype), PARAMS)


def _raises(name, grads, params=PARAMS, value=None, match=""):
    tx = mtl_optax.get(name, **hparams(name, K))
    state = tx.init(PARAMS)
    if value is None:
        value = jnp.ones(K)
    with pytest.raises(ValueError, match=match) as err:
        jax.jit(tx.update)(grads, state, params, value=value)
    return str(err.value)


@pytest.mark.parametrize("name", METHODS)
def test_wrong_number_of_tasks(name):
    msg = _raises(name, _grads(4), match="num_tasks=3")
    assert "(4, 2)" in msg and "(3, 2)" in msg, msg


@pytest.mark.parametrize("name", METHODS)
def test_task_axis_missing(name):
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    _raises(name, grads, match=r"task axis is missing.*jax\.jacrev")


@pytest.mark.parametrize("name", METHODS)
def test_leading_axes_disagree(name):
    grads = _grads()
    grads["dense"]["w"] = jnp.ones((2, 3, 2))
    _raises(name, grads, params=None, match=r"\['dense'\]\['w'\] has shape \(2, 3, 2\)")


@pytest.mark.parametrize("name", METHODS)
def test_value_of_wrong_shape(name):
    _raises(
        name,
        _grads(),
        value=jnp.ones(K + 1),
        match=r"value= must hold the 3 per-task losses, shape \(3,\); found shape \(4,\)",
    )


@pytest.mark.parametrize("name", METHODS)
def test_integer_gradients(name):
    _raises(name, _grads(dtype=jnp.int32), match=r"\['dense'\]\['b'\] has dtype int32")


@pytest.mark.parametrize("name", METHODS)
def test_structure_mismatch_between_grads_and_params(name):
    grads = {"dense": {"w": jnp.ones((K, 3, 2))}}
    _raises(name, grads, match="different tree structures")
