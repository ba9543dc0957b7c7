"""cr_mogm: the moving average of another method's weights, its schedule, state and errors.

Parity with TorchJD is in tests/parity/test_modo_cr_mogm_parity.py. Here the
wrapper is checked against the same average computed from the wrapped
method's own weights (MGDA, whose solver TorchJD's stops elsewhere), with a
schedule for ``alpha``, for the limits ``alpha = 0`` (the wrapped method) and
``alpha = 1`` (the initial weights), and for its errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

PARAMS = {"w": jnp.zeros((3, 4)), "b": jnp.zeros((2,))}


def _grads(seed, k):
    keys = jax.random.split(jax.random.key(seed), 2)
    scales = jnp.linspace(0.5, 3.0, k)
    return {
        "w": scales[:, None, None] * jax.random.normal(keys[0], (k, 3, 4)),
        "b": scales[:, None] * jax.random.normal(keys[1], (k, 2)),
    }


def _run(tx, k, steps=5):
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    out = []
    for t in range(steps):
        update, state = step(_grads(t, k), state, PARAMS)
        out.append((update, state))
    return out


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "schedule"])
def test_average_of_the_wrapped_methods_own_weights(schedule):
    k = 4
    alpha = (lambda count: 0.2 + 0.1 * count) if schedule else 0.7
    inner = mtl_optax.mgda(num_tasks=k)
    runs = _run(mtl_optax.cr_mogm(inner, alpha=alpha, num_tasks=k), k)
    inner_runs = _run(inner, k)
    lam = None
    for t, ((update, state), (_, inner_state)) in enumerate(zip(runs, inner_runs, strict=True)):
        hat = np.asarray(inner_state.weights, np.float64)
        a = alpha(t) if callable(alpha) else alpha
        lam = hat if lam is None else a * lam + (1 - a) * hat
        np.testing.assert_allclose(state.weights, lam, rtol=1e-5, atol=1e-6)
        expected = mtl_optax.combine(_grads(t, k), jnp.asarray(lam, jnp.float32))
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), update, expected
        )
        assert int(state.count) == t + 1
    # The average is not the last weights: the test would see a wrapper that
    # ignores its state.
    assert (
        np.abs(np.asarray(runs[-1][1].weights) - np.asarray(inner_runs[-1][1].weights)).max() > 1e-3
    )


def test_alpha_zero_is_the_wrapped_method_and_alpha_one_keeps_the_initial_weights():
    k = 3
    plain = _run(mtl_optax.upgrad(num_tasks=k), k, 3)
    zero = _run(mtl_optax.cr_mogm("upgrad", alpha=0.0, num_tasks=k), k, 3)
    for (u, _), (v, _) in zip(plain, zero, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), u, v)
    init = np.array([0.2, 0.3, 0.5])
    one = _run(mtl_optax.cr_mogm("upgrad", alpha=1.0, initial_weights=init), k, 3)
    for t, (u, state) in enumerate(one):
        np.testing.assert_allclose(state.weights, init, rtol=1e-6)
        expected = mtl_optax.combine(_grads(t, k), jnp.asarray(init, jnp.float32))
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), u, expected)


def test_value_based_inner_weighting_receives_the_losses():
    """nsgd reads the losses when given: the wrapper passes them on."""
    k = 3
    tx = mtl_optax.cr_mogm("nsgd", alpha=0.5, num_tasks=k)
    inner = mtl_optax.nsgd(num_tasks=k)
    value = jnp.array([1.0, 2.0, 4.0])
    _, state = tx.update(_grads(0, k), tx.init(PARAMS), PARAMS, value=value)
    _, inner_state = inner.update(_grads(0, k), inner.init(PARAMS), PARAMS, value=value)
    np.testing.assert_allclose(state.weights, inner_state.weights, rtol=1e-6)


def test_chains_with_adam_under_jit_and_a_nested_wrapper():
    k = 3
    tx = optax.chain(
        mtl_optax.cr_mogm(mtl_optax.cr_mogm("imtl_g", num_tasks=k), alpha=0.5), optax.adam(1e-2)
    )
    state = tx.init(PARAMS)
    for t in range(3):
        update, state = jax.jit(tx.update)(_grads(t, k), state, PARAMS)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(update))


def test_errors():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        mtl_optax.cr_mogm(alpha=1.5, num_tasks=2)
    with pytest.raises(ValueError, match="pass num_tasks=K"):
        mtl_optax.cr_mogm("mgda")
    with pytest.raises(ValueError, match="'graddrop' has no `weighting`"):
        mtl_optax.cr_mogm("graddrop", num_tasks=2)
    with pytest.raises(ValueError, match="built for 3 tasks, but K=4"):
        mtl_optax.cr_mogm(mtl_optax.sdmgrad(num_tasks=3), num_tasks=4)
    with pytest.raises(ValueError, match="initial_weights has 2 entries but num_tasks=3"):
        mtl_optax.cr_mogm(initial_weights=[0.5, 0.5], num_tasks=3)
