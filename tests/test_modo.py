"""modo: its step against an independent definition, its scale law, state, jit and errors.

Parity with TorchJD is in tests/parity/test_modo_cr_mogm_parity.py. Here the
step is checked against a numpy loop with a bisection projection onto the
simplex (an algorithm independent of the sort-based one used), the
documented law that scaling the gradients by ``c`` acts as ``gamma -> c^2
gamma``, the weights staying on the simplex and finite for any finite input,
the cross matrix taken from the extra argument, and the errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax._modo import modo_weights

PARAMS = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))}


def _grads(seed, k, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {
        "a": scale * jax.random.normal(keys[0], (k, 4, 2)),
        "b": scale * jax.random.normal(keys[1], (k, 5)),
    }


def _jac(tree):
    return np.concatenate(
        [
            np.asarray(x, np.float64).reshape(x.shape[0], -1)
            for x in jax.tree_util.tree_leaves(tree)
        ],
        1,
    )


def _bisection_projection(y):
    """Euclidean projection onto the simplex by bisection on the threshold tau."""
    lo, hi = y.min() - 1.0, y.max()
    for _ in range(200):
        tau = 0.5 * (lo + hi)
        if np.maximum(y - tau, 0.0).sum() > 1.0:
            lo = tau
        else:
            hi = tau
    return np.maximum(y - 0.5 * (lo + hi), 0.0)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_steps_follow_the_definition(x64, k):
    gamma, rho = 0.3, 0.2
    tx = mtl_optax.modo(gamma=gamma, rho=rho, num_tasks=k)
    state = tx.init(PARAMS)
    lam = np.full(k, 1.0 / k)
    for t in range(6):
        g1, g2 = _grads(2 * t, k), _grads(2 * t + 1, k)
        a = _jac(g1) @ _jac(g2).T
        update, state = jax.jit(tx.update)(g1, state, PARAMS, cross_gramian=a)
        lam = _bisection_projection(lam - gamma * (a @ lam + rho * lam))
        np.testing.assert_allclose(np.asarray(state.lambda_), lam, atol=1e-12)
        np.testing.assert_allclose(state.weights, lam.astype(np.float32), rtol=1e-6)
        flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(update)])
        np.testing.assert_allclose(flat, lam @ _jac(g1), rtol=1e-10, atol=1e-12)


def test_without_cross_gramian_the_matrix_is_the_gramian():
    tx = mtl_optax.modo(num_tasks=3)
    g = _grads(0, 3)
    state = tx.init(PARAMS)
    _, s1 = tx.update(g, state, PARAMS)
    _, s2 = tx.update(g, state, PARAMS, cross_gramian=mtl_optax.gramian(g))
    np.testing.assert_array_equal(s1.lambda_, s2.lambda_)
    assert not np.allclose(s1.lambda_, 1.0 / 3)


def test_scaling_the_gradients_by_c_acts_as_gamma_times_c_squared(x64):
    """The documented scale law (why the generic homogeneity test exempts modo)."""
    g = _grads(4, 4)
    c = 7.0
    big = jax.tree.map(lambda x: c * x, g)
    state_a = mtl_optax.modo(gamma=0.01 * c**2, rho=0.0, num_tasks=4).init(PARAMS)
    _, a = mtl_optax.modo(gamma=0.01 * c**2, rho=0.0, num_tasks=4).update(g, state_a, PARAMS)
    tx = mtl_optax.modo(gamma=0.01, rho=0.0, num_tasks=4)
    _, b = tx.update(big, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(a.lambda_, b.lambda_, atol=1e-12)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1.0, 1e15, 1e19])
def test_weights_stay_on_the_simplex_and_finite_for_any_finite_matrix(scale):
    """Float32, K = 40: optax's projection alone gave inf or zeros for entries of -1e37."""
    rng = np.random.default_rng(0)
    j = rng.standard_normal((40, 30)).astype(np.float32)
    a = jnp.asarray(j @ j.T * scale, jnp.float32)
    w = jnp.full(40, 1 / 40, jnp.float32)
    for _ in range(3):
        w = jax.jit(modo_weights, static_argnames=("gamma", "rho"))(a, w, gamma=1.0, rho=0.1)
        assert np.all(np.isfinite(w)) and np.all(np.asarray(w) >= 0)
        np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-5)
    if scale >= 1e15:  # a huge step: the vertex of the smallest (A w)_k
        assert float(jnp.max(w)) == 1.0


def test_non_finite_matrix_gives_nan_weights():
    a = jnp.array([[jnp.nan, 0.0], [0.0, 1.0]])
    assert np.all(np.isnan(modo_weights(a, jnp.array([0.5, 0.5]), gamma=0.1)))


def test_jits_in_a_chain_with_adam_and_scans():
    k = 3
    tx = optax.chain(mtl_optax.modo(num_tasks=k), optax.adam(1e-2))
    state = tx.init(PARAMS)

    def body(state, seed):
        g1, g2 = _grads(seed, k), _grads(seed + 100, k)
        a = mtl_optax.cross_gramian(g1, g2)
        update, state = tx.update(g1, state, PARAMS, cross_gramian=a)
        return state, update["b"]

    state, updates = jax.lax.scan(body, state, jnp.arange(4))
    assert np.all(np.isfinite(updates))
    np.testing.assert_allclose(float(jnp.sum(state[0].lambda_)), 1.0, rtol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="gamma must be positive"):
        mtl_optax.modo(gamma=0.0, num_tasks=2)
    with pytest.raises(ValueError, match="rho must be non-negative"):
        mtl_optax.modo(rho=-1.0, num_tasks=2)
    with pytest.raises(ValueError, match="pass num_tasks=K"):
        mtl_optax.modo()
    tx = mtl_optax.modo(num_tasks=3)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"modo: cross_gramian must have shape \(3, 3\).*\(2, 2\)"):
        tx.update(_grads(0, 3), state, PARAMS, cross_gramian=jnp.eye(2))
    with pytest.raises(ValueError, match="modo: cross_gramian must be floating point"):
        tx.update(_grads(0, 3), state, PARAMS, cross_gramian=jnp.eye(3, dtype=jnp.int32))
    with pytest.raises(ValueError, match="modo"):
        tx.update(_grads(0, 2), state, PARAMS)
