"""The alpha-fair solver and the methods built on it: ``fairgrad`` and ``nash_mtl``.

Independent reference: scipy's ``least_squares`` on the same condition
``G w - w^(-1/alpha) = 0`` with ``w >= 0``, run to tight tolerances (1e-15),
in float64. Weights agree to 1e-8 relative (observed: about 1e-14 on regular
problems). Properties, each stated in its test: the condition itself (each
task's share of the update ``<g_k, u> = w_k^(-1/alpha)``), the closed form for
orthogonal gradients, the scale law, the regularised fallback on degenerate
Gramians, Nash-MTL's norm cap and its reuse of the weights. Live parity with
TorchJD is in ``tests/parity/test_fairgrad_parity.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import mtl_optax
from mtl_optax import solvers

ALPHAS = [0.5, 1.0, 2.0, 5.0]


def _scipy(gramian, alpha):
    k = gramian.shape[0]
    return scipy.optimize.least_squares(
        lambda w: gramian @ w - w ** (-1 / alpha),
        np.ones(k) / k,
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10_000,
    ).x


def _residual(gramian, w, alpha):
    share = w ** (-1 / alpha)
    return np.max(np.abs(gramian @ w - share) / share)


def _jac(seed, k, p, *, row_scales=False):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, p)) * 10 ** rng.uniform(-3, 3)
    if row_scales:
        jac *= 10 ** rng.uniform(-2, 2, size=(k, 1))
    return jac


# (K, P): K > P (a singular Gramian with a positive solution) included.
CASES = [(1, 5), (2, 30), (5, 50), (10, 6), (20, 200)]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_solver_matches_scipy_least_squares(x64, alpha):
    for (k, p), seed, row_scales in [(c, c[0] + 100 * r, r) for c in CASES for r in (0, 1)]:
        jac = _jac(seed, k, p, row_scales=bool(row_scales))
        gram = jac @ jac.T
        res = solvers.solve_alpha_fair(gram, alpha)
        w = np.asarray(res.weights)
        assert bool(res.converged) and not bool(res.regularized)
        assert int(res.num_iterations) <= 30
        ref = _scipy(gram, alpha)
        assert _residual(gram, w, alpha) <= max(1e-10, _residual(gram, ref, alpha))
        if _residual(gram, ref, alpha) <= 1e-12:
            np.testing.assert_allclose(w, ref, rtol=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_each_task_gets_its_fair_share_of_the_update(x64, alpha):
    """<g_k, u> = w_k^(-1/alpha) for the update u of fairgrad."""
    jac = _jac(3, 6, 40, row_scales=True)
    tx = mtl_optax.fairgrad(alpha, num_tasks=6)
    u, state = jax.jit(tx.update)({"w": jnp.asarray(jac)}, tx.init(None))
    shares = jac @ np.asarray(u["w"])
    w = np.asarray(solvers.alpha_fair_weights(jac @ jac.T, alpha))
    np.testing.assert_allclose(shares, w ** (-1 / alpha), rtol=1e-9)
    np.testing.assert_allclose(state.weights, w, rtol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_orthogonal_gradients_have_the_closed_form(x64, alpha):
    norms = np.array([1e-3, 0.5, 2.0, 7e2])
    w = np.asarray(solvers.alpha_fair_weights(np.diag(norms**2), alpha))
    np.testing.assert_allclose(w, norms ** (-2 * alpha / (1 + alpha)), rtol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_scaling_the_gradients_scales_the_weights_by_the_power_law(x64, alpha):
    """G -> s G gives w -> s^(-alpha / (1 + alpha)) w, up to norms of 1e150."""
    jac = _jac(5, 4, 20)
    gram = jac @ jac.T
    w = np.asarray(solvers.alpha_fair_weights(gram, alpha))
    for s in (1e-200, 1e-6, 1e8, 1e300):
        ws = np.asarray(solvers.alpha_fair_weights(gram * s, alpha))
        np.testing.assert_allclose(ws, w * s ** (-alpha / (1 + alpha)), rtol=1e-10)


def test_alpha_zero_is_the_uniform_weighting():
    gram = jnp.asarray(_jac(0, 3, 10, row_scales=True), jnp.float32)
    w = solvers.alpha_fair_weights(gram @ gram.T, 0.0)
    np.testing.assert_array_equal(w, np.full(3, 1 / 3, np.float32))


DEGENERATE = {
    "opposite": np.array([[1.0, 2.0, 0.5], [-1.0, -2.0, -0.5]]),
    "zero_task": np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [0.3, -1.0, 2.0]]),
    "collinear": np.array([[1.0, 2.0, 0.5], [2.5, 5.0, 1.25], [-0.5, -1.0, -0.25]]),
    "all_zero": np.zeros((2, 3)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("case", DEGENERATE)
def test_gramians_without_a_solution_get_the_finite_regularised_one(x64, case, dtype):
    jac = jnp.asarray(DEGENERATE[case], dtype)
    gram = jac @ jac.T
    exact = solvers.solve_alpha_fair(gram, 1.0, reg_eps=0.0, max_iter=40)
    # No solution: the exact iterations grow without converging.
    assert not bool(exact.converged)
    res = solvers.solve_alpha_fair(gram, 1.0)
    assert bool(res.regularized)
    w = np.asarray(res.weights, np.float64)
    assert np.all(np.isfinite(w)) and np.all(w > 0)
    update = w @ np.asarray(jac, np.float64)
    assert np.all(np.isfinite(update))
    if case == "opposite":  # equal weights: the update is 0
        np.testing.assert_allclose(w[0], w[1], rtol=1e-6)
        np.testing.assert_allclose(update, 0.0, atol=1e-4 * w[0])
    if case == "zero_task":  # the other tasks get the solution without the zero one
        kept = np.asarray(DEGENERATE[case])[[0, 2]]
        ref = _scipy(kept @ kept.T, 1.0)
        np.testing.assert_allclose(w[[0, 2]], ref, rtol=1e-6 if dtype == jnp.float64 else 1e-4)


def test_regularisation_keeps_the_weight_of_a_tiny_task_beside_a_zero_one(x64):
    """The term is relative to each task's own norm: a task of norm 1e-8 keeps w = 1e8."""
    jac = np.array([[1e-8, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1e4, 0.0]])
    res = solvers.solve_alpha_fair(jac @ jac.T, 1.0)
    assert bool(res.regularized)
    np.testing.assert_allclose(np.asarray(res.weights)[[0, 2]], [1e8, 1e-4], rtol=1e-6)


def test_float32_agrees_with_float64(x64):
    for seed in range(5):
        jac = _jac(seed, 8, 30, row_scales=True)
        gram = jac @ jac.T
        w64 = np.asarray(solvers.alpha_fair_weights(gram, 2.0))
        res = solvers.solve_alpha_fair(jnp.asarray(gram, jnp.float32), 2.0)
        assert res.weights.dtype == jnp.float32
        np.testing.assert_allclose(res.weights, w64, rtol=5e-3)  # tasks 1e4 apart in G


def test_non_finite_gramian_gives_non_finite_weights():
    gram = jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]])
    res = solvers.solve_alpha_fair(gram, 1.0)
    assert not bool(res.converged)
    assert not np.any(np.isfinite(res.weights))


def test_solver_jits_vmaps_and_is_constant_under_differentiation(x64):
    grams = np.stack([(j @ j.T) for j in (_jac(s, 4, 9) for s in range(3))])
    batched = jax.jit(jax.vmap(lambda g: solvers.alpha_fair_weights(g, 2.0)))(grams)
    for g, w in zip(grams, batched, strict=True):
        np.testing.assert_allclose(w, solvers.alpha_fair_weights(g, 2.0), rtol=1e-12)
    grad = jax.grad(lambda g: jnp.sum(solvers.alpha_fair_weights(g, 1.0)))(grams[0])
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"alpha": float("inf")}, "alpha must be a finite number >= 0"),
        ({"alpha": 1.0, "reg_eps": 1.0}, r"reg_eps must be a number in \[0, 1\)"),
        ({"alpha": 1.0, "max_iter": -2}, "max_iter must be an integer >= 0"),
    ],
)
def test_bad_solver_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        solvers.solve_alpha_fair(jnp.eye(2), **kwargs)


def test_bad_gramian_shape_raises():
    with pytest.raises(ValueError, match=r"solve_alpha_fair: the Gramian must be a square"):
        solvers.solve_alpha_fair(jnp.ones((2, 3)), 1.0)


def test_fairgrad_hyperparameters_are_checked():
    with pytest.raises(ValueError, match="fairgrad: alpha must be a finite number >= 0"):
        mtl_optax.fairgrad(-0.5)
    with pytest.raises(TypeError, match="fairgrad: alpha must be a Python number"):
        optax.inject_hyperparams(mtl_optax.fairgrad)(alpha=0.5).init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="fairgrad: num_tasks must be a positive int"):
        mtl_optax.fairgrad(1.0, num_tasks=0)


# --------------------------------------------------------------------------- nash_mtl


def _nash_step(tx, jac, state):
    return jax.jit(tx.update)({"w": jnp.asarray(jac)}, state)


def test_nash_mtl_is_fairgrad_alpha_1_scaled_to_the_norm_cap(x64):
    jac = _jac(8, 4, 25, row_scales=True)
    fair = mtl_optax.fairgrad(1.0, num_tasks=4)
    u_fair, _ = jax.jit(fair.update)({"w": jnp.asarray(jac)}, fair.init(None))
    u_fair = np.asarray(u_fair["w"])
    # At the Nash solution ||J^T alpha||^2 = alpha^T G alpha = K.
    np.testing.assert_allclose(np.linalg.norm(u_fair), 2.0, rtol=1e-10)
    for cap, expected in [(0.0, u_fair), (1.0, u_fair / 2), (3.0, u_fair), (0.5, u_fair / 4)]:
        tx = mtl_optax.nash_mtl(4, max_norm=cap)
        u, state = _nash_step(tx, jac, tx.init(None))
        np.testing.assert_allclose(u["w"], expected, rtol=1e-10)
        np.testing.assert_allclose(state.weights, state.alpha * np.linalg.norm(expected) / 2)


def test_nash_mtl_reuses_its_weights_between_updates(x64):
    """update_weights_every=2: steps 0 and 2 solve; step 1 reuses alpha, re-capped on its J."""
    jacs = [_jac(s, 3, 10) for s in (1, 2, 3)]
    tx = mtl_optax.nash_mtl(3, update_weights_every=2, max_norm=0.5)
    state = tx.init(None)
    alphas = []
    for i, jac in enumerate(jacs):
        u, state = _nash_step(tx, jac, state)
        assert int(state.count) == i + 1
        alphas.append(np.asarray(state.alpha))
        norm = np.linalg.norm(alphas[-1] @ jac)
        expected = alphas[-1] @ jac * min(1.0, 0.5 / norm)
        np.testing.assert_allclose(u["w"], expected, rtol=1e-10)
    fresh = [np.asarray(solvers.alpha_fair_weights(j @ j.T, 1.0)) for j in jacs]
    np.testing.assert_allclose(alphas[0], fresh[0], rtol=1e-12)
    np.testing.assert_array_equal(alphas[1], alphas[0])
    np.testing.assert_allclose(alphas[2], fresh[2], rtol=1e-12)


def test_nash_mtl_max_norm_can_be_scheduled():
    values = [0.0, 0.3, 2.0]
    schedule = lambda count: jnp.asarray(values, jnp.float32)[jnp.minimum(count, 2)]
    static = ("num_tasks", "reg_eps", "max_iter", "update_weights_every")
    injected = optax.inject_hyperparams(mtl_optax.nash_mtl, static_args=static)(
        num_tasks=3, max_norm=schedule
    )
    grads = {"w": jnp.asarray(_jac(4, 3, 7), jnp.float32)}
    state = injected.init({"w": jnp.zeros(7)})
    for value in values:
        u, state = jax.jit(injected.update)(grads, state)
        fixed = mtl_optax.nash_mtl(3, max_norm=value)
        expected, _ = fixed.update(grads, fixed.init(None))
        np.testing.assert_allclose(u["w"], expected["w"], rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tasks": None}, "nash_mtl: num_tasks is required"),
        ({"num_tasks": 2, "max_norm": -1.0}, "nash_mtl: max_norm must be a finite number >= 0"),
        (
            {"num_tasks": 2, "update_weights_every": 0},
            "nash_mtl: update_weights_every must be a positive int",
        ),
        ({"num_tasks": 2, "reg_eps": -1e-3}, r"nash_mtl: reg_eps must be a number in \[0, 1\)"),
    ],
)
def test_nash_mtl_hyperparameters_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mtl_optax.nash_mtl(**kwargs)


def test_methods_are_registered():
    assert {"fairgrad", "nash_mtl"} <= set(mtl_optax.available())
    assert isinstance(mtl_optax.get("fairgrad", alpha=1.0), optax.GradientTransformationExtraArgs)


def test_warm_start_changes_the_iterations_not_the_solution(x64):
    jac = _jac(9, 6, 30, row_scales=True)
    gram = jac @ jac.T
    cold = solvers.solve_alpha_fair(gram, 2.0)
    rng = np.random.default_rng(0)
    for init in (cold.weights * 1.01, rng.uniform(0.1, 10, 6), [np.nan, -1.0, 0.0, 1, 2, np.inf]):
        warm = solvers.solve_alpha_fair(gram, 2.0, init=jnp.asarray(init))
        assert bool(warm.converged)
        np.testing.assert_allclose(warm.weights, cold.weights, rtol=1e-10)
    near = solvers.solve_alpha_fair(gram, 2.0, init=cold.weights * 1.01)
    assert int(near.num_iterations) <= 3 < int(cold.num_iterations)
    with pytest.raises(ValueError, match=r"init must have shape \(6,\)"):
        solvers.solve_alpha_fair(gram, 2.0, init=jnp.ones(5))


def test_fairgrad_warm_starts_from_its_last_weights(x64):
    """The second step starts from the first step's (float32) weights and gives the same update."""
    jac = _jac(4, 5, 20)
    tx = mtl_optax.fairgrad(2.0, num_tasks=5)
    step = jax.jit(tx.update)
    u1, state = step({"w": jnp.asarray(jac)}, tx.init(None))
    u2, _ = step({"w": jnp.asarray(jac)}, state)
    np.testing.assert_allclose(u2["w"], u1["w"], rtol=1e-6)  # the logged start is float32
