"""sdmgrad and cross_gramian: definitions, limits, state, jit and errors.

Parity with TorchJD is in tests/parity/test_sdmgrad_parity.py. Here the rule
is checked against its definition (an independent numpy loop with a bisection
projection), against its documented limits (lambda_ -> infinity gives the
preference weights, lambda_ = 0 with a convergent inner step gives MGDA's
min-norm point), and for its invariances, state handling and validation.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optax
from mtl_optax._sdmgrad import SDMGradState, cross_gramian, sdmgrad, sdmgrad_weights

K = 3
PARAMS = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))}


def _grads(seed=0, k=K, scale=1.0):
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


def _vec(update):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(update)]
    )


# ---------------------------------------------------------------------------
# An independent float64 implementation of the definition.
# ---------------------------------------------------------------------------


def _project_bisection(y):
    """Euclidean projection onto the simplex: max(y - tau, 0) with sum 1, tau by bisection."""
    lo, hi = y.min() - 1.0, y.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        if np.maximum(y - tau, 0).sum() > 1:
            lo = tau
        else:
            hi = tau
    return np.maximum(y - (lo + hi) / 2, 0)


def _definition(matrix, w, *, lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref=None):
    k = len(w)
    pref = np.full(k, 1 / k) if pref is None else np.asarray(pref, np.float64)
    scale = np.mean(np.sqrt(np.maximum(np.diag(matrix), 0)))
    a = matrix / (scale**2 + 1e-8)
    v = np.zeros(k)
    for _ in range(n_iter):
        v = momentum * v + a @ (w + lambda_ * pref)
        w = _project_bisection(w - lr * v)
    return (w + lambda_ * pref) / (1 + lambda_), w


@pytest.mark.parametrize(
    "hp",
    [
        dict(lr=0.5),
        dict(lr=0.5, momentum=0.0, n_iter=7, lambda_=0.0),
        dict(lr=1.0, momentum=0.8, n_iter=30, lambda_=2.0, pref=[0.5, 0.2, 0.2, 0.1]),
        dict(n_iter=1),  # the default lr=10: one and two long steps.
        dict(n_iter=2),
    ],
    ids=["lr0.5", "no_momentum", "pref", "one_step", "two_steps"],
)
def test_weights_follow_the_definition(x64, hp):
    """Three warm-started calls against a numpy loop with a bisection projection (1e-9)."""
    rng = np.random.default_rng(0)
    w_ours = w_def = np.full(4, 0.25)
    kwargs = {("pref_vector" if key == "pref" else key): v for key, v in hp.items()}
    for t in range(3):
        j = rng.standard_normal((4, 30))
        matrix = j @ (j if t != 1 else rng.standard_normal((4, 30))).T
        expected, w_def = _definition(matrix, w_def, **hp)
        weights, w_ours = sdmgrad_weights(jnp.asarray(matrix), jnp.asarray(w_ours), **kwargs)
        np.testing.assert_allclose(np.asarray(weights), expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(w_ours), w_def, rtol=0, atol=1e-9)


def test_one_long_step_lands_on_the_vertex_of_the_smallest_gradient(x64):
    """G = diag(1, 4): w - 10 * a (w + 0.15) = (-2.39, -11.06) projects onto (1, 0)."""
    weights, w = sdmgrad_weights(jnp.diag(jnp.array([1.0, 4.0])), jnp.full(2, 0.5), n_iter=1)
    np.testing.assert_allclose(np.asarray(w), [1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(np.asarray(weights), [1.15 / 1.3, 0.15 / 1.3], rtol=1e-15)


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    k=st.sampled_from([1, 2, 3, 5]),
    seed=st.integers(0, 2**31 - 1),
    lambda_=st.sampled_from([0.0, 0.3, 4.0]),
    lr=st.sampled_from([0.5, 10.0]),
    cross=st.booleans(),
    log_scale=st.integers(-3, 3),
)
def test_weights_lie_on_the_simplex(k, seed, lambda_, lr, cross, log_scale):
    """Inner weights on the simplex; weights = (w + lambda/K) / (1 + lambda) >= lambda / (K (1 + lambda))."""
    rng = np.random.default_rng(seed)
    j1 = rng.standard_normal((k, 20)) * 10.0**log_scale
    j2 = rng.standard_normal((k, 20)) * 10.0**log_scale if cross else j1
    inner = rng.dirichlet(np.ones(k)).astype(np.float32)
    weights, w = sdmgrad_weights(jnp.asarray(j1 @ j2.T, jnp.float32), inner, lr=lr, lambda_=lambda_)
    w, weights = np.asarray(w, np.float64), np.asarray(weights, np.float64)
    assert np.all(np.isfinite(weights))
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    assert abs(weights.sum() - 1) < 1e-5
    assert np.all(weights >= lambda_ / (k * (1 + lambda_)) - 1e-6)


@pytest.mark.parametrize("lambda_", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("pref", [None, [0.6, 0.3, 0.1]], ids=["uniform", "pref"])
def test_large_lambda_gives_the_preferred_direction(lambda_, pref):
    """lambda_ -> inf: ||weights - pref||_1 <= 2 / (1 + lambda_), update -> sum_k pref_k g_k."""
    target = np.full(K, 1 / K) if pref is None else np.asarray(pref)
    tx = sdmgrad(lambda_=lambda_, pref_vector=pref, num_tasks=K)
    grads = _grads(1)
    update, state = tx.update(grads, tx.init(PARAMS), PARAMS)
    bound = 2 / (1 + lambda_)
    assert np.abs(np.asarray(state.weights, np.float64) - target).sum() <= bound + 1e-6
    jac = _jac(grads)
    err = np.abs(_vec(update) - target @ jac)
    assert np.all(err <= bound * np.abs(jac).max(0) + 1e-5 * np.abs(jac).sum(0))


def _min_norm_k2(g1, g2):
    """MGDA's min-norm weights for two gradients (closed form)."""
    diff = g1 - g2
    t = np.clip((g2 - g1) @ g2 / (diff @ diff), 0.0, 1.0)
    return np.array([t, 1 - t])


@pytest.mark.parametrize("seed", range(4))
def test_lambda_zero_with_a_convergent_inner_step_is_mgda(x64, seed):
    """lambda_=0, lr=0.2, 2000 steps: the min-norm point of the convex hull (MGDA).

    Also the property the paper inherits from MGDA there: the update d does not
    conflict with any task, <g_k, d> >= ||d||^2 >= 0.
    """
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((2, 40)) * [[1.0], [0.3 + seed]]
    tx = sdmgrad(lr=0.2, n_iter=2000, lambda_=0.0, num_tasks=2)
    params = {"x": jnp.zeros(40)}
    update, state = tx.update({"x": jnp.asarray(jac)}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(state.inner_weights), _min_norm_k2(*jac), atol=1e-8)
    d = np.asarray(update["x"])
    assert np.all(jac @ d >= d @ d - 1e-8)


def test_lambda_zero_k3_satisfies_the_min_norm_optimality_conditions(x64):
    """KKT of min ||J^T w|| on the simplex: <g_k, d> >= ||d||^2, with equality where w_k > 0."""
    jac = np.random.default_rng(5).standard_normal((3, 50))
    tx = sdmgrad(lr=0.1, n_iter=3000, lambda_=0.0, num_tasks=3)
    params = {"x": jnp.zeros(50)}
    update, state = tx.update({"x": jnp.asarray(jac)}, tx.init(params), params)
    d, w = np.asarray(update["x"]), np.asarray(state.inner_weights)
    gaps = jac @ d - d @ d
    assert np.all(gaps >= -1e-8 * (d @ d))
    np.testing.assert_allclose(gaps[w > 1e-6], 0.0, atol=1e-7 * (d @ d))


def test_scaling_the_gradients_by_powers_of_two_changes_nothing():
    """The normalisation makes the rule scale invariant: bitwise so for scales 2^n.

    Scaling by a power of two is exact in floating point, and the 1e-8 added to
    the squared scale (~13 here) is below half an ulp of it in float32.
    """
    tx = sdmgrad(num_tasks=K)
    grads = _grads(2)
    base, base_state = tx.update(grads, tx.init(PARAMS), PARAMS)
    for c in (2.0**3, 2.0**10):
        scaled = jax.tree.map(lambda x, c=c: c * x, grads)
        update, state = tx.update(scaled, tx.init(PARAMS), PARAMS)
        np.testing.assert_array_equal(np.asarray(state.weights), np.asarray(base_state.weights))
        np.testing.assert_allclose(_vec(update), c * _vec(base), rtol=1e-6, atol=0)


def test_scale_invariance_for_any_scale_with_a_contractive_step():
    tx = sdmgrad(lr=0.5, num_tasks=K)
    grads = _grads(3)
    _, base = tx.update(grads, tx.init(PARAMS), PARAMS)
    _, scaled = tx.update(jax.tree.map(lambda x: 37.3 * x, grads), tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.asarray(scaled.weights), np.asarray(base.weights), atol=1e-6)


def test_gramians_below_the_normalisation_floor_barely_move_the_weights():
    """Documented: with G ~ 1e-12 << 1e-8 the inner steps shrink ~1e4-fold."""
    tx = sdmgrad(num_tasks=K)
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(4, scale=1e-7), state, PARAMS)
    assert np.max(np.abs(np.asarray(state.inner_weights) - 1 / K)) < 1e-2
    _, moved = tx.update(_grads(4), tx.init(PARAMS), PARAMS)
    assert np.max(np.abs(np.asarray(moved.inner_weights) - 1 / K)) > 0.1


def test_permuting_the_tasks_permutes_the_weights():
    tx = sdmgrad(lr=0.5, pref_vector=[0.5, 0.3, 0.2])
    perm = np.array([2, 0, 1])
    grads = _grads(5)
    _, state = tx.update(grads, tx.init(PARAMS), PARAMS)
    tx_perm = sdmgrad(lr=0.5, pref_vector=np.array([0.5, 0.3, 0.2])[perm])
    _, state_perm = tx_perm.update(
        jax.tree.map(lambda x: x[perm], grads), tx_perm.init(PARAMS), PARAMS
    )
    np.testing.assert_allclose(
        np.asarray(state_perm.weights), np.asarray(state.weights)[perm], atol=1e-6
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("jit", [False, True])
def test_opposite_gradients_keep_uniform_weights_and_a_zero_update(dtype, jit, request):
    """g and -g: the exact inner gradient is 0, so w stays at 1/2 and the update is 0.

    With lr=10 this is an unstable fixed point: a fused multiply-add in the
    inner matrix-vector product would leave a 1e-17 asymmetry that 20 steps
    amplify to a vertex (update -0.77 g). The implementation rounds every
    product first, so the symmetry is exact, as in TorchJD.
    """
    if dtype == jnp.float64:
        request.getfixturevalue("x64")
    g = jax.random.normal(jax.random.key(0), (301,), dtype)
    params = {"x": jnp.zeros(301, dtype)}
    tx = sdmgrad(num_tasks=2)
    update_fn = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for _ in range(3):
        update, state = update_fn({"x": jnp.stack([g, -g])}, state, params)
        np.testing.assert_array_equal(np.asarray(state.inner_weights), [0.5, 0.5])
        np.testing.assert_array_equal(np.asarray(update["x"]), 0.0)


def test_equal_norm_gradients_keep_the_symmetric_weights():
    """g1 = (3, 4, 0), g2 = (-4, 0, 3): equal norms (exactly), min-norm point (1/2, 1/2).

    The antisymmetric mode is unstable at lr=10 (normalised curvature 1.48), so
    this holds only because both rows of the inner product round identically.
    """
    jac = jnp.array([[3.0, 4.0, 0.0], [-4.0, 0.0, 3.0]])
    tx = sdmgrad(num_tasks=2)
    params = {"x": jnp.zeros(3)}
    update, state = jax.jit(tx.update)({"x": jac}, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(state.inner_weights), [0.5, 0.5])
    np.testing.assert_allclose(np.asarray(update["x"]), [-0.5, 2.0, 1.5], rtol=1e-6)


def test_k_equals_one_returns_the_gradient():
    tx = sdmgrad(num_tasks=1)
    g = {"a": jnp.ones((1, 4, 2)), "b": 2 * jnp.ones((1, 5))}
    u, state = tx.update(g, tx.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: x[0], g), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.inner_weights), [1.0])


def test_zero_gradients_give_finite_updates_and_finite_derivatives():
    """A zero task (zero diagonal: the double-where square root) and all-zero gradients."""
    tx = sdmgrad(num_tasks=K)
    grads = jax.tree.map(lambda x: x.at[1].set(0.0), _grads(6))
    zero = jax.tree.map(jnp.zeros_like, grads)
    for g in (grads, zero):
        update, state = tx.update(g, tx.init(PARAMS), PARAMS)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(update))
        derivative = jax.grad(
            lambda g: sum(
                jnp.sum(x)
                for x in jax.tree_util.tree_leaves(tx.update(g, tx.init(PARAMS), PARAMS)[0])
            )
        )(g)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(derivative))
    # All zero: A = 0, so the inner weights stay uniform.
    np.testing.assert_allclose(np.asarray(state.inner_weights), 1 / K, rtol=1e-7)


# ---------------------------------------------------------------------------
# The matrix: fallback and cross_gramian.
# ---------------------------------------------------------------------------


def test_without_cross_gramian_the_matrix_is_the_gramian():
    tx = sdmgrad(num_tasks=K)
    grads = _grads(7)
    u1, s1 = tx.update(grads, tx.init(PARAMS), PARAMS)
    u2, s2 = tx.update(grads, tx.init(PARAMS), PARAMS, cross_gramian=mtl_optax.gramian(grads))
    chex.assert_trees_all_equal(u1, u2)
    chex.assert_trees_all_equal(s1, s2)


def test_cross_gramian_sets_the_weights_and_the_given_gradients_are_combined():
    tx = sdmgrad(num_tasks=K)
    g1, g2, g3 = _grads(8), _grads(9), _grads(10)
    matrix = cross_gramian(g1, g2)
    update, state = tx.update(g3, tx.init(PARAMS), PARAMS, cross_gramian=matrix)
    weights, inner = sdmgrad_weights(matrix, jnp.full(K, 1 / K))
    np.testing.assert_allclose(np.asarray(state.weights), np.asarray(weights), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.inner_weights), np.asarray(inner), rtol=1e-6)
    np.testing.assert_allclose(_vec(update), np.asarray(weights) @ _jac(g3), rtol=1e-5, atol=1e-6)
    # Not the weights of the Gramian of g3.
    _, other = tx.update(g3, tx.init(PARAMS), PARAMS)
    assert not np.allclose(np.asarray(other.weights), np.asarray(state.weights), atol=1e-3)


def test_cross_gramian_is_the_product_of_the_two_jacobians():
    a, b = _grads(11), _grads(12)
    out = cross_gramian(a, b)
    assert out.dtype == jnp.float32 and out.shape == (K, K)
    np.testing.assert_allclose(np.asarray(out), _jac(a) @ _jac(b).T, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(cross_gramian(a, a), mtl_optax.gramian(a), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cross_gramian(b, a)), np.asarray(out).T, rtol=1e-6)


def test_cross_gramian_accumulates_bfloat16_in_float32():
    a, b = _grads(13), _grads(14)
    a16, b16 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), t) for t in (a, b))
    out = jax.jit(cross_gramian)(a16, b16)
    assert out.dtype == jnp.float32
    exact = _jac(a16) @ _jac(b16).T  # products of bfloat16 values are exact in float32
    np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-5, atol=1e-5)


def test_cross_gramian_blocked_path_for_long_leaves():
    """Leaves longer than 2^18 columns are reduced over blocks on CPU: same product."""
    n = (1 << 18) + 1234
    keys = jax.random.split(jax.random.key(15), 2)
    a = {"x": jax.random.normal(keys[0], (2, n))}
    b = {"x": jax.random.normal(keys[1], (2, n))}
    exact = np.asarray(a["x"], np.float64) @ np.asarray(b["x"], np.float64).T
    np.testing.assert_allclose(np.asarray(jax.jit(cross_gramian)(a, b)), exact, rtol=0, atol=0.05)


def test_cross_gramian_errors_name_the_problem():
    a = _grads(16)
    with pytest.raises(ValueError, match="different tree structures"):
        cross_gramian(a, {"a": a["a"]})
    with pytest.raises(
        ValueError, match=r"\['b'\] has shape \(3, 5\) in task_grads_a but \(3, 6\)"
    ):
        cross_gramian(a, {"a": a["a"], "b": jnp.zeros((K, 6))})
    with pytest.raises(ValueError, match=r"\(3, 4, 2\) in task_grads_a but \(2, 4, 2\).*same K"):
        cross_gramian(a, _grads(17, k=2))
    with pytest.raises(ValueError, match="dtype int32"):
        cross_gramian(a, {"a": a["a"], "b": jnp.zeros((K, 5), jnp.int32)})


# ---------------------------------------------------------------------------
# State, per-task form, jit.
# ---------------------------------------------------------------------------


def test_state_starts_uniform_and_keeps_its_shape():
    tx = sdmgrad(num_tasks=K)
    s0 = tx.init(PARAMS)
    assert isinstance(s0, SDMGradState)
    assert s0.weights.shape == (K,) and s0.weights.dtype == jnp.float32
    assert np.all(np.isnan(np.asarray(s0.weights)))  # nothing logged before the first step
    np.testing.assert_allclose(np.asarray(s0.inner_weights), 1 / K)
    _, s1 = tx.update(_grads(), s0, PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)


def test_state_is_float64_under_x64(x64):
    tx = sdmgrad(num_tasks=K)
    grads = jax.tree.map(lambda x: x.astype(jnp.float64), _grads())
    s0 = tx.init(PARAMS)
    assert s0.inner_weights.dtype == jnp.float64
    _, s1 = tx.update(grads, s0, PARAMS)
    assert s1.inner_weights.dtype == jnp.float64 and s1.weights.dtype == jnp.float32


def test_inner_weights_warm_start_the_next_call_and_the_momentum_restarts(x64):
    """Two calls of 2 inner steps: the definition run twice, w carried, v restarted.

    (TorchJD and the official code create the inner optimiser anew at every
    call.) With lr=0.5, momentum=0.9 a carried momentum would give other
    weights, as would a fresh start of the second call.
    """
    hp = dict(lr=0.5, momentum=0.9, n_iter=2)
    grads = jax.tree.map(lambda x: x.astype(jnp.float64), _grads(18))
    gram = _jac(grads) @ _jac(grads).T
    tx = sdmgrad(num_tasks=K, **hp)
    state = tx.init(PARAMS)
    for _ in range(2):
        _, state = tx.update(grads, state, PARAMS)
    _, w1 = _definition(gram, np.full(K, 1 / K), **hp)
    _, w2 = _definition(gram, w1, **hp)
    np.testing.assert_allclose(np.asarray(state.inner_weights), w2, rtol=0, atol=1e-12)
    _, carried = _definition(gram, np.full(K, 1 / K), **{**hp, "n_iter": 4})
    assert np.max(np.abs(w2 - carried)) > 1e-3
    assert np.max(np.abs(w2 - w1)) > 1e-3


def test_per_task_form_sums_to_the_update():
    tx = sdmgrad(num_tasks=K)
    grads, matrix = _grads(19), cross_gramian(_grads(20), _grads(21))
    update, state = tx.update(grads, tx.init(PARAMS), PARAMS, cross_gramian=matrix)
    rows, state2 = tx.per_task.update(grads, tx.init(PARAMS), PARAMS, cross_gramian=matrix)
    chex.assert_trees_all_equal(state, state2)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.sum(0), rows), update, rtol=1e-5, atol=1e-6
    )
    w = np.asarray(state.weights)
    np.testing.assert_allclose(_jac(rows), w[:, None] * _jac(grads), rtol=1e-6, atol=1e-7)


def test_weighting_is_the_gramian_rule():
    tx = sdmgrad(num_tasks=K)
    assert tx.weighting.name == "sdmgrad" and tx.weighting.needs_gramian
    from_rule = mtl_optax.from_weighting(tx.weighting)
    grads = _grads(22)
    u1, s1 = from_rule.update(grads, from_rule.init(PARAMS), PARAMS)
    u2, s2 = tx.update(grads, tx.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal(u1, u2)
    chex.assert_trees_all_equal(s1, s2)


def test_jits_in_a_chain_with_adam_and_passes_cross_gramian_through():
    opt = optax.chain(sdmgrad(num_tasks=K), optax.adam(1e-2))

    def run(update_fn):
        params, state = PARAMS, opt.init(PARAMS)
        for i in range(3):
            matrix = cross_gramian(_grads(30 + i), _grads(40 + i))
            u, state = update_fn(_grads(i), state, params, value=jnp.ones(K), cross_gramian=matrix)
            params = optax.apply_updates(params, u)
        return params, state

    jitted, jstate = run(jax.jit(opt.update))
    eager, estate = run(opt.update)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jstate[0].weights, estate[0].weights, atol=1e-5)
    assert not np.allclose(np.asarray(jitted["a"]), 0.0)


def test_scans_over_steps():
    opt = optax.chain(sdmgrad(num_tasks=K), optax.sgd(0.1))

    def step(carry, i):
        params, state = carry
        u, state = opt.update(_grads(0), state, params)
        return (optax.apply_updates(params, u), state), state[0].weights

    (params, _), weights = jax.lax.scan(step, (PARAMS, opt.init(PARAMS)), jnp.arange(4))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
    assert weights.shape == (4, K) and np.all(np.isfinite(np.asarray(weights)))


def test_bfloat16_leaves_keep_their_dtype():
    g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads())
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    tx = sdmgrad(num_tasks=K)
    u, state = jax.jit(tx.update)(g, tx.init(p), p)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, p)
    assert state.inner_weights.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(), "pass num_tasks=K"),
        (dict(num_tasks=3, lr=0.0), "lr must be positive"),
        (dict(num_tasks=3, lr=float("nan")), "lr must be positive"),
        (dict(num_tasks=3, momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(num_tasks=3, momentum=-0.1), r"momentum must be in \[0, 1\)"),
        (dict(num_tasks=3, n_iter=0), "n_iter must be a positive int"),
        (dict(num_tasks=3, n_iter=2.5), "n_iter must be a positive int"),
        (dict(num_tasks=3, lambda_=-1.0), "lambda_ must be non-negative"),
        (dict(num_tasks=2, pref_vector=[0.5, 0.3, 0.2]), "3 entries but num_tasks=2"),
        (dict(pref_vector=[[0.5, 0.5]]), "non-empty vector"),
        (dict(pref_vector=[0.5, float("inf")]), "finite"),
        (dict(num_tasks=0), "positive int"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdmgrad(**kwargs)


def test_pref_vector_gives_the_number_of_tasks():
    tx = sdmgrad(pref_vector=[0.2, 0.8])
    assert tx.init(PARAMS).inner_weights.shape == (2,)
    with pytest.raises(ValueError, match="configured for num_tasks=2"):
        tx.update(_grads(k=3), tx.init(PARAMS), PARAMS)


def test_bad_cross_gramian_raises():
    tx = sdmgrad(num_tasks=K)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"cross_gramian must have shape \(3, 3\).*\(2, 2\)"):
        tx.update(_grads(), state, PARAMS, cross_gramian=jnp.eye(2))
    with pytest.raises(ValueError, match="cross_gramian must be floating point"):
        tx.update(_grads(), state, PARAMS, cross_gramian=jnp.eye(3, dtype=jnp.int32))
    with pytest.raises(ValueError, match="value= must hold the 3 per-task losses"):
        tx.update(_grads(), state, PARAMS, value=jnp.ones(2))


def test_sdmgrad_weights_validates_shapes():
    with pytest.raises(ValueError, match=r"matrix must be \[K, K\]"):
        sdmgrad_weights(jnp.ones((2, 3)), jnp.ones(2) / 2)
    with pytest.raises(ValueError, match=r"inner_weights must have shape \(2,\)"):
        sdmgrad_weights(jnp.eye(2), jnp.ones(3) / 3)
    with pytest.raises(ValueError, match=r"pref_vector must have shape \(2,\)"):
        sdmgrad_weights(jnp.eye(2), jnp.ones(2) / 2, pref_vector=[1.0])


def test_registered_under_its_name():
    assert "sdmgrad" in mtl_optax.available()
    tx = mtl_optax.get("sdmgrad", num_tasks=2, lambda_=0.5)
    assert tx.init(None).inner_weights.shape == (2,)
