"""nsgd and gradnorm: their rules, states, guarantees and errors.

The rules are checked against float64 numpy computations of the formulas in
the docstrings (written here independently of the implementation); parity
with the references is in tests/parity/test_normalization_parity.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_optax._normalization import GradNormState, NSGDState, gradnorm, nsgd

PARAMS = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))}


def _grads(seed=0, k=3, scales=None):
    keys = jax.random.split(jax.random.key(seed), 2)
    g = {"a": jax.random.normal(keys[0], (k, 4, 2)), "b": jax.random.normal(keys[1], (k, 5))}
    if scales is not None:
        s = jnp.asarray(scales, jnp.float32)
        g = jax.tree.map(lambda x: x * s.reshape((k,) + (1,) * (x.ndim - 1)), g)
    return g


def _jac(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1)


def _vec(update):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(update)]
    )


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------
# nsgd
# ---------------------------------------------------------------------------


def _nsgd_expected(jac, reference):
    """The docstring's rule in float64: every non-zero row rescaled to nu."""
    n = np.linalg.norm(jac, axis=1)
    r = n / np.maximum(reference, 1e-15)
    a = r / r.sum()
    nu = a @ n
    return (nu / n) @ jac, nu


@pytest.mark.parametrize("seed", range(3))
def test_nsgd_rescales_every_task_gradient_to_the_common_norm(seed):
    g = _grads(seed, scales=[0.5, 2.0, 7.0])
    tx = nsgd(update_at=5, num_tasks=3)
    per_task, _ = tx.per_task.update(g, tx.init(PARAMS), PARAMS)
    update, state = tx.update(g, tx.init(PARAMS), PARAMS)
    jac = _jac(g)
    expected, nu = _nsgd_expected(jac, np.ones(3))
    np.testing.assert_allclose(
        _vec(update), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
    )
    np.testing.assert_allclose(np.linalg.norm(_jac(per_task), axis=1), nu, rtol=2e-6)
    np.testing.assert_allclose(_jac(per_task).sum(0), _vec(update), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(state.weights), nu / np.linalg.norm(jac, axis=1), rtol=2e-6
    )


def test_nsgd_captures_the_norms_at_update_at_and_keeps_them():
    tx = nsgd(update_at=2, num_tasks=3)
    state = tx.init(PARAMS)
    assert isinstance(state, NSGDState)
    np.testing.assert_array_equal(np.asarray(state.initial_norms), np.ones(3))
    captured = None
    for step in range(5):
        g = _grads(step, scales=[1.0 + step, 1.0, 0.5])
        update, state = jax.jit(tx.update)(g, state, PARAMS)
        n = np.linalg.norm(_jac(g), axis=1)
        assert int(state.count) == step + 1
        if step < 2:
            np.testing.assert_array_equal(np.asarray(state.initial_norms), np.ones(3))
            reference = np.ones(3)
        elif step == 2:
            np.testing.assert_allclose(np.asarray(state.initial_norms), n, rtol=1e-6)
            captured = n
            reference = n
        else:
            np.testing.assert_allclose(np.asarray(state.initial_norms), captured, rtol=1e-6)
            reference = captured
        expected, _ = _nsgd_expected(_jac(g), reference)
        np.testing.assert_allclose(
            _vec(update), expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max()
        )


def test_nsgd_at_the_capture_step_returns_the_mean_norm():
    """With r = 1 at the capture step, a = 1/K and nu = mean(n)."""
    g = _grads(1, scales=[0.1, 1.0, 30.0])
    tx = nsgd(update_at=0, num_tasks=3)
    per_task, _ = tx.per_task.update(g, tx.init(PARAMS))
    n = np.linalg.norm(_jac(g), axis=1)
    np.testing.assert_allclose(np.linalg.norm(_jac(per_task), axis=1), n.mean(), rtol=2e-6)


def test_nsgd_update_at_none_never_captures():
    tx = nsgd(update_at=None, num_tasks=3)
    state = tx.init(PARAMS)
    for step in range(3):
        _, state = tx.update(_grads(step), state)
    np.testing.assert_array_equal(np.asarray(state.initial_norms), np.ones(3))
    assert int(state.count) == 3


def test_nsgd_zero_task_stays_zero():
    g = jax.tree.map(lambda x: x.at[1].set(0.0), _grads(2))
    tx = nsgd(update_at=0, num_tasks=3)
    per_task, state = tx.per_task.update(g, tx.init(PARAMS))
    assert np.all(_jac(per_task)[1] == 0.0)
    assert float(state.weights[1]) == 0.0
    n = np.linalg.norm(_jac(g), axis=1)
    # The zero task counts in the mean: a = (1, 0, 1) / 2 at the capture step.
    np.testing.assert_allclose(
        np.linalg.norm(_jac(per_task)[[0, 2]], axis=1), n[[0, 2]].mean(), rtol=2e-6
    )


def test_nsgd_all_zero_gradients_give_a_zero_update_and_finite_state():
    """The references return NaN (0/0); the documented result is a zero update."""
    g = jax.tree.map(jnp.zeros_like, _grads())
    tx = nsgd(update_at=0, num_tasks=3)
    update, state = tx.update(g, tx.init(PARAMS), PARAMS)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(update))
    np.testing.assert_array_equal(np.asarray(state.weights), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(state.initial_norms), np.zeros(3))
    # After a capture of zero norms the next (non-zero) step stays finite.
    update, _ = tx.update(_grads(1), state, PARAMS)
    assert _finite(update)


def test_nsgd_derivative_is_finite_with_a_zero_task():
    g = jax.tree.map(lambda x: x.at[0].set(0.0), _grads(3))
    tx = nsgd(update_at=0, num_tasks=3)
    state = tx.init(PARAMS)

    def f(grads):
        update, _ = tx.update(grads, state)
        return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(update))

    assert _finite(jax.grad(f)(g))
    assert _finite(jax.grad(f)(jax.tree.map(jnp.zeros_like, g)))


def test_nsgd_is_positively_homogeneous_before_the_capture():
    """Before the capture (reference norms of ones) scaling every g_k by c scales u by c."""
    g = _grads(4)
    tx = nsgd(update_at=10, num_tasks=3)
    u1, _ = tx.update(g, tx.init(PARAMS))
    u2, _ = tx.update(jax.tree.map(lambda x: 8.0 * x, g), tx.init(PARAMS))
    np.testing.assert_allclose(_vec(u2), 8.0 * _vec(u1), rtol=1e-5, atol=1e-5)


def test_nsgd_k_equals_one_returns_the_gradient():
    g = _grads(5, k=1)
    for update_at in (0, 3):
        tx = nsgd(update_at=update_at, num_tasks=1)
        update, _ = tx.update(g, tx.init(PARAMS))
        chex.assert_trees_all_close(update, jax.tree.map(lambda x: x[0], g), rtol=1e-6)


def test_nsgd_requires_num_tasks_and_checks_it():
    with pytest.raises(ValueError, match="num_tasks is required"):
        nsgd()
    with pytest.raises(ValueError, match="positive int"):
        nsgd(num_tasks=0)
    with pytest.raises(ValueError, match="update_at"):
        nsgd(update_at=-1, num_tasks=2)
    with pytest.raises(ValueError, match="update_at"):
        nsgd(update_at=1.5, num_tasks=2)
    tx = nsgd(num_tasks=2)
    with pytest.raises(ValueError, match=r"num_tasks=2.*3 tasks"):
        tx.update(_grads(k=3), tx.init(PARAMS))


# ---------------------------------------------------------------------------
# gradnorm
# ---------------------------------------------------------------------------


def _gradnorm_expected(n, logits, values, reference, alpha):
    """Weights, GradNorm loss and its closed-form gradient (vambn notes, section 5)."""
    k = len(n)
    c = np.maximum(np.exp(logits), 1e-5)
    w = k * c / c.sum()
    ratio = values / np.maximum(reference, 1e-5)
    r = ratio / max(ratio.mean(), 1e-5)
    residual = n * w - (n * w).mean() * r**alpha
    s = np.sign(residual)
    grad = s * n * w - w / k * np.sum(s * n * w)
    return w, np.abs(residual).sum(), grad


@pytest.mark.parametrize(("variant", "alpha"), [("loss", 1.5), ("loss", 0.5), ("gradient", 1.5)])
def test_gradnorm_weights_loss_and_gradient_follow_the_rule(variant, alpha):
    k, lr = 3, 0.05
    tx = gradnorm(alpha=alpha, update_at=1, optimizer=optax.sgd(lr), variant=variant, num_tasks=k)
    state = tx.init(PARAMS)
    assert isinstance(state, GradNormState)
    np.testing.assert_array_equal(np.asarray(state.logits), np.ones(k))
    rng = np.random.default_rng(0)
    logits, reference = np.ones(k), np.ones(k)
    for step in range(4):
        g = _grads(step, scales=[1.0, 2.0 + step, 0.5])
        losses = rng.uniform(0.2, 2.0, k)
        update, state = jax.jit(tx.update)(g, state, PARAMS, value=jnp.asarray(losses, jnp.float32))
        n = np.linalg.norm(_jac(g), axis=1)
        values = losses if variant == "loss" else n
        if step == 1:
            reference = values
        w, loss, grad = _gradnorm_expected(n, logits, values, reference, alpha)
        np.testing.assert_allclose(np.asarray(state.weights), w, rtol=1e-5)
        np.testing.assert_allclose(float(state.loss), loss, rtol=1e-4)
        np.testing.assert_allclose(
            np.asarray(state.logits_grad), grad, rtol=1e-4, atol=1e-4 * np.abs(grad).max()
        )
        np.testing.assert_allclose(np.asarray(state.initial_values), reference, rtol=1e-5)
        np.testing.assert_allclose(_vec(update), w @ _jac(g), rtol=1e-4, atol=1e-5)
        logits = logits - lr * np.asarray(state.logits_grad, np.float64)
        # float32 logits of order 1 (atol: a float32 ulp at 1; an H100's reduction
        # order left one logit near 0 off by 5e-8).
        np.testing.assert_allclose(np.asarray(state.logits), logits, rtol=1e-6, atol=2e-7)
        assert int(state.count) == step + 1


def test_gradnorm_gradient_variant_alpha_one_is_degenerate_before_the_capture():
    """vambn's default (alpha=1, before update_at): every residual is 0 in exact arithmetic.

    r_k = n_k / mean(n) and w = 1, so n_k w_k - mean(n w) r_k = 0: the loss is
    rounding noise (the references' weight gradient is then the sign of noise).
    """
    g = _grads(3, scales=[0.5, 1.0, 4.0])
    tx = gradnorm(alpha=1.0, update_at=1, variant="gradient", num_tasks=3)
    _, state = tx.update(g, tx.init(PARAMS))
    n = np.linalg.norm(_jac(g), axis=1)
    assert float(state.loss) < 1e-5 * n.sum()


def test_gradnorm_weights_sum_to_num_tasks_and_the_step_lowers_the_loss():
    k = 3
    tx = gradnorm(alpha=1.5, update_at=0, optimizer=optax.sgd(1e-3), num_tasks=k)
    g = _grads(1, k=k, scales=[0.3, 1.0, 10.0])
    losses = jnp.array([1.0, 0.5, 2.0])
    state = tx.init(PARAMS)
    previous = None
    for _ in range(5):
        _, state = tx.update(g, state, value=losses)
        np.testing.assert_allclose(float(jnp.sum(state.weights)), k, rtol=1e-6)
        if previous is not None:
            assert float(state.loss) < previous  # small SGD steps on a fixed problem
        previous = float(state.loss)


def test_gradnorm_balances_the_weighted_gradient_norms():
    """With equal losses (r = 1), training theta equalises n_k w_k (the paper's goal)."""
    k = 3
    tx = gradnorm(alpha=1.5, update_at=0, optimizer=optax.sgd(1e-3), num_tasks=k)
    g = _grads(2, k=k, scales=[0.5, 1.0, 4.0])
    n = np.linalg.norm(_jac(g), axis=1)
    losses = jnp.ones(k)
    step = lambda s: tx.update(g, s, value=losses)[1]
    state = jax.lax.fori_loop(0, 3000, lambda i, s: step(s), tx.init(PARAMS))
    weighted = n * np.asarray(state.weights, np.float64)
    assert np.ptp(n) > n.mean()  # far from balanced at the start (w = 1)
    assert np.ptp(weighted) < 0.02 * weighted.mean(), weighted
    # The slow task (small gradient) got the large weight.
    assert np.argmax(np.asarray(state.weights)) == 0


def test_gradnorm_default_optimizer_is_libmtl_adam():
    """Default: Adam(lr=1e-4) with L2 weight decay 1e-5; its first step is -1e-4 sign(grad)."""
    k = 3
    tx = gradnorm(update_at=0, num_tasks=k)
    g = _grads(3, k=k, scales=[0.5, 1.0, 4.0])
    _, state = tx.update(g, tx.init(PARAMS), value=jnp.array([1.0, 2.0, 0.5]))
    grad = np.asarray(state.logits_grad, np.float64) + 1e-5 * 1.0  # + weight decay * theta
    expected = 1.0 - 1e-4 * grad / (np.abs(grad) + 1e-8)
    np.testing.assert_allclose(np.asarray(state.logits), expected, rtol=1e-7)


def test_gradnorm_frozen_logits_keep_uniform_weights():
    tx = gradnorm(update_at=0, optimizer=optax.set_to_zero(), num_tasks=3)
    g = _grads(4)
    state = tx.init(PARAMS)
    for _ in range(3):
        update, state = tx.update(g, state, value=jnp.array([1.0, 2.0, 0.5]))
        np.testing.assert_array_equal(np.asarray(state.logits), np.ones(3))
        assert np.any(np.asarray(state.logits_grad) != 0)
    np.testing.assert_allclose(_vec(update), _jac(g).sum(0), rtol=1e-5, atol=1e-6)


def test_gradnorm_gradient_variant_needs_no_value_and_loss_variant_does():
    g = _grads(5)
    tx = gradnorm(variant="gradient", num_tasks=3)
    update, _ = tx.update(g, tx.init(PARAMS))
    assert _finite(update)
    tx = gradnorm(num_tasks=3)
    with pytest.raises(ValueError, match="per-task losses"):
        tx.update(g, tx.init(PARAMS))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        tx.update(g, tx.init(PARAMS), value=jnp.ones(2))


def test_gradnorm_floors_and_negative_losses_stay_finite():
    g = _grads(6)
    tx = gradnorm(alpha=1.5, update_at=0, optimizer=optax.sgd(0.1), num_tasks=3)
    state = tx.init(PARAMS)
    # Negative losses: r^1.5 would be NaN; the ratio is clamped at 0.
    for losses in ([-1.0, 0.5, 2.0], [0.0, 0.0, 0.0], [1e-30, 1.0, 1.0]):
        update, state = tx.update(g, state, value=jnp.asarray(losses))
        assert _finite(update) and _finite(state.logits) and _finite(state.logits_grad)
    # A clamped logit (exp(theta) < 1e-5) gets the floor weight and no gradient.
    state = state._replace(logits=jnp.array([-50.0, 0.0, 0.0]))
    _, state = tx.update(g, state, value=jnp.ones(3))
    np.testing.assert_allclose(float(state.weights[0]), 3 * 1e-5 / (1e-5 + 2.0), rtol=1e-4)
    assert float(state.logits_grad[0]) == 0.0
    # Large logits do not overflow.
    state = state._replace(logits=jnp.array([1000.0, 999.0, -5.0]))
    update, state = tx.update(g, state, value=jnp.ones(3))
    assert _finite(update) and _finite(state.weights)


def test_gradnorm_k_equals_one_has_weight_one_and_zero_gradient():
    g = _grads(7, k=1)
    tx = gradnorm(update_at=0, num_tasks=1)
    update, state = tx.update(g, tx.init(PARAMS), value=jnp.array([0.7]))
    chex.assert_trees_all_close(update, jax.tree.map(lambda x: x[0], g), rtol=1e-6)
    assert float(state.logits_grad[0]) == 0.0


def test_gradnorm_zero_gradients_are_finite_including_the_derivative():
    g = jax.tree.map(lambda x: x.at[1].set(0.0), _grads(8))
    tx = gradnorm(update_at=0, num_tasks=3)
    state = tx.init(PARAMS)

    def f(grads):
        update, _ = tx.update(grads, state, value=jnp.ones(3))
        return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(update))

    assert _finite(jax.grad(f)(g))
    zeros = jax.tree.map(jnp.zeros_like, g)
    update, new_state = tx.update(zeros, state, value=jnp.ones(3))
    assert _finite(update) and _finite(new_state.logits)


def test_gradnorm_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="num_tasks is required"):
        gradnorm()
    with pytest.raises(ValueError, match="alpha"):
        gradnorm(alpha=-1.0, num_tasks=2)
    with pytest.raises(ValueError, match="alpha"):
        gradnorm(alpha=float("nan"), num_tasks=2)
    with pytest.raises(ValueError, match="variant"):
        gradnorm(variant="losses", num_tasks=2)
    with pytest.raises(ValueError, match="optimizer"):
        gradnorm(optimizer=0.1, num_tasks=2)
    with pytest.raises(ValueError, match="update_at"):
        gradnorm(update_at=-2, num_tasks=2)


# ---------------------------------------------------------------------------
# Both: optax integration.
# ---------------------------------------------------------------------------

FACTORIES = {
    "nsgd": lambda: nsgd(update_at=1, num_tasks=3),
    "gradnorm": lambda: gradnorm(update_at=1, num_tasks=3),
    "gradnorm_gradient": lambda: gradnorm(update_at=1, variant="gradient", num_tasks=3),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_jits_in_a_chain_with_adam_and_scans(name):
    opt = optax.chain(FACTORIES[name](), optax.adam(1e-2))
    losses = jnp.array([1.0, 0.5, 2.0])

    def step(carry, i):
        params, state = carry
        u, state = opt.update(_grads(0), state, params, value=losses * (1.0 + i))
        return (optax.apply_updates(params, u), state), None

    (params, state), _ = jax.lax.scan(step, (PARAMS, opt.init(PARAMS)), jnp.arange(4))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
    assert not np.allclose(np.asarray(params["a"]), 0.0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(PARAMS))
    assert int(state[0].count) == 4


@pytest.mark.parametrize("name", FACTORIES)
def test_bfloat16_leaves_keep_their_dtype_and_direction(name):
    tx = FACTORIES[name]()
    g = _grads(1)
    gb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)
    pb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    losses = jnp.array([1.0, 0.5, 2.0])
    ub, _ = jax.jit(tx.update)(gb, tx.init(pb), pb, value=losses)
    chex.assert_trees_all_equal_shapes_and_dtypes(ub, pb)
    u32, _ = tx.update(g, tx.init(PARAMS), PARAMS, value=losses)
    np.testing.assert_allclose(_vec(ub), _vec(u32), rtol=2e-2, atol=2e-2 * np.abs(_vec(u32)).max())


@pytest.mark.parametrize("name", FACTORIES)
def test_per_task_form_sums_to_the_update(name):
    tx = FACTORIES[name]()
    g, losses = _grads(2), jnp.array([1.0, 0.5, 2.0])
    per_task, s1 = tx.per_task.update(g, tx.per_task.init(PARAMS), PARAMS, value=losses)
    update, s2 = tx.update(g, tx.init(PARAMS), PARAMS, value=losses)
    np.testing.assert_allclose(_jac(per_task).sum(0), _vec(update), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s1, s2)
