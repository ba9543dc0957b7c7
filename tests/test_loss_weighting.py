"""uw, dwa and gls: definitions, limits, degenerate losses, jit and errors.

Parity with LibMTL is in tests/parity/test_loss_weighting_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}


def _grads(seed, k):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"w": jax.random.normal(keys[0], (k, 3, 2)), "b": jax.random.normal(keys[1], (k, 2))}


def _step(tx, state, value, seed=0):
    k = len(value)
    return jax.jit(tx.update)(_grads(seed, k), state, PARAMS, value=jnp.asarray(value))


def test_gls_is_the_gradient_of_the_geometric_mean(x64):
    """Against jax.grad of (prod L)^(1/K) for linear losses L_k = v_k + <g_k, theta>."""
    k = 4
    g = jax.tree.map(lambda x: x.astype(jnp.float64), _grads(1, k))
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], jnp.float64), g)
    v = jnp.array([0.5, 2.0, 3.0, 0.1], jnp.float64)

    def geo(theta):
        losses = v + jnp.stack([sum(jnp.vdot(g[n][i], theta[n]) for n in theta) for i in range(k)])
        return jnp.prod(losses) ** (1 / k)

    expected = jax.grad(geo)(params)
    tx = mtl_optax.gls()
    update, _ = tx.update(g, tx.init(None), params, value=v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), update, expected)


def test_gls_weights_are_invariant_to_a_common_scale_and_finite_for_tiny_losses():
    tx = mtl_optax.gls(num_tasks=40)
    value = np.linspace(1.0, 3.0, 40)
    _, a = _step(tx, tx.init(None), value)
    _, b = _step(tx, tx.init(None), 1e-30 * value)  # the product underflows in float32
    assert np.all(np.isfinite(b.weights))
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5)


def test_gls_non_positive_loss_gives_nan():
    tx = mtl_optax.gls(num_tasks=2)
    update, _ = _step(tx, tx.init(None), [1.0, 0.0])
    assert not all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(update))


def test_dwa_unit_weights_for_two_epochs_then_the_softmax_of_the_rates():
    tx = mtl_optax.dwa(temperature=2.0, steps_per_epoch=2, num_tasks=2)
    state = tx.init(None)
    losses = [[1.0, 1.0], [3.0, 1.0], [1.0, 1.0], [1.0, 0.5], [5.0, 5.0], [5.0, 5.0]]
    seen = []
    for t, value in enumerate(losses):
        _, state = _step(tx, state, value, seed=t)
        seen.append(np.asarray(state.weights))
    for w in seen[:4]:  # epochs 0 and 1
        np.testing.assert_array_equal(w, [1.0, 1.0])
    # Epoch means (2, 1) then (1, 0.75): rates (0.5, 0.75).
    r = np.array([0.5, 0.75])
    expected = 2 * np.exp(r / 2) / np.exp(r / 2).sum()
    np.testing.assert_allclose(seen[4], expected, rtol=1e-6)
    np.testing.assert_allclose(seen[5], expected, rtol=1e-6)
    assert int(state.epoch) == 3 and int(state.step) == 0


def test_dwa_zero_mean_loss_gives_finite_weights():
    tx = mtl_optax.dwa(num_tasks=3)
    state = tx.init(None)
    for value in ([0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]):
        _, state = _step(tx, state, value)
    # Rates: 1/0 -> the largest float (the whole softmax), 0/0 -> 1, 1/1 = 1.
    np.testing.assert_allclose(state.weights, [3.0, 0.0, 0.0], atol=1e-6)


def test_uw_log_variances_tend_to_log_losses():
    """At the optimum of L / (2 e^s) + s / 2, s = log L; the weights are 1 / (2 L)."""
    value = np.array([0.2, 1.0, 5.0])
    tx = mtl_optax.uw(optimizer=optax.sgd(0.5), initial_log_var=0.0, num_tasks=3)
    state = tx.init(None)
    for _ in range(200):
        _, state = _step(tx, state, value)
    np.testing.assert_allclose(state.log_var, np.log(value), atol=1e-4)
    np.testing.assert_allclose(state.weights, 1 / (2 * value), rtol=1e-3)


def test_chains_with_adam_under_jit_in_a_scan():
    for tx in (mtl_optax.uw(num_tasks=3), mtl_optax.dwa(num_tasks=3), mtl_optax.gls(num_tasks=3)):
        chain = optax.chain(tx, optax.adam(1e-2))

        def body(state, t, chain=chain):
            update, state = chain.update(
                _grads(0, 3), state, PARAMS, value=jnp.array([1.0, 2.0, 3.0]) / (1 + t)
            )
            return state, update["b"]

        _, updates = jax.lax.scan(body, chain.init(PARAMS), jnp.arange(4.0))
        assert np.all(np.isfinite(updates))


@pytest.mark.parametrize("name", ["uw", "dwa", "gls"])
def test_missing_losses_raise(name):
    tx = mtl_optax.get(name, num_tasks=2)
    with pytest.raises(ValueError, match=f"{name} needs the per-task losses"):
        tx.update(_grads(0, 2), tx.init(None), PARAMS)


def test_errors():
    with pytest.raises(ValueError, match="temperature must be positive"):
        mtl_optax.dwa(temperature=0.0, num_tasks=2)
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive int"):
        mtl_optax.dwa(steps_per_epoch=0, num_tasks=2)
    with pytest.raises(ValueError, match="pass num_tasks=K"):
        mtl_optax.dwa()
    with pytest.raises(ValueError, match="pass num_tasks=K"):
        mtl_optax.uw()
    with pytest.raises(ValueError, match=r"optimizer must be an optax\.GradientTransformation"):
        mtl_optax.uw(optimizer=0.1, num_tasks=2)
    with pytest.raises(ValueError, match="initial_log_var must be finite"):
        mtl_optax.uw(initial_log_var=float("inf"), num_tasks=2)
    tx = mtl_optax.gls(num_tasks=2)
    with pytest.raises(ValueError, match=r"gls"):
        tx.update(_grads(0, 2), tx.init(None), PARAMS, value=jnp.ones(3))
