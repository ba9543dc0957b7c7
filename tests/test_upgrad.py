"""The dual-cone solver and the methods built on it: ``upgrad`` and ``dualproj``.

Independent reference: scipy's NNLS (Lawson-Hanson, compiled), on the
equivalent least-squares form of the solver's problem. With ``G = J J^T``,
``min_{v >= u} v^T G v`` is ``min_{s >= 0} ||J^T s + J^T u||^2`` for ``s = v - u``,
i.e. ``scipy.optimize.nnls(J^T, -J^T u)``. The projection ``J^T v`` is unique;
``v`` is unique when ``G`` is regular. Float64 comparisons use 1e-10 of the
largest entry (observed: about 1e-14); float32 ones 1e-4 (the condition of the
active systems amplifies float32 rounding).

Properties, each stated in its test: the KKT conditions of the projection, no
conflict with any task, the mean when nothing conflicts, scale invariance, and
TorchJD's ``norm_eps`` rule. Live parity with TorchJD is in
``tests/parity/test_upgrad_parity.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import mtl_optax
from mtl_optax import solvers
from mtl_optax._upgrad import dualproj_weights, upgrad_weights


def _nnls_projection(jac, u):
    """``v = u + s`` with ``s = argmin_{s >= 0} ||J^T (s + u)||`` (scipy NNLS), float64."""
    jac = np.asarray(jac, np.float64)
    s, _ = scipy.optimize.nnls(jac.T, -jac.T @ u, maxiter=50 * jac.shape[0])
    return u + s


def _jac(seed, k, p, *, conflicting=False):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, p))
    if conflicting:
        jac = rng.choice([-1.0, 1.0], size=(k, 1)) * (rng.standard_normal(p) + 0.7 * jac)
    return jac


PROBLEMS = [
    (0, 2, 30, False),
    (1, 3, 50, True),
    (2, 5, 500, True),
    (3, 8, 8, False),
    (4, 12, 200, True),
    (5, 25, 1000, True),
    (6, 40, 300, True),
]


@pytest.mark.parametrize(("seed", "k", "p", "conflicting"), PROBLEMS)
def test_solver_matches_scipy_nnls_on_regular_gramians(x64, seed, k, p, conflicting):
    jac = _jac(seed, k, p, conflicting=conflicting)
    gram = jac @ jac.T
    rng = np.random.default_rng(seed + 100)
    us = np.concatenate([np.eye(k) / k, rng.standard_normal((3, k))])
    res = solvers.solve_dual_cone(jnp.asarray(gram), jnp.asarray(us))
    assert res.weights.shape == us.shape and res.weights.dtype == jnp.float64
    assert bool(jnp.all(res.converged))
    assert int(jnp.max(res.num_iterations)) <= 3 * k + 10
    for u, v in zip(us, np.asarray(res.weights), strict=True):
        expected = _nnls_projection(jac, u)
        np.testing.assert_allclose(v, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(("seed", "k", "p"), [(10, 10, 4), (11, 30, 12), (12, 6, 2)])
def test_solver_on_singular_gramians_gives_the_projection(x64, dtype, seed, k, p):
    """More tasks than parameters: ``J^T v`` is the projection (unique), ``v`` a minimiser.

    KKT conditions of ``min_{v >= u} v^T G v`` checked on the result: ``v >= u``,
    ``G v >= 0`` and ``(v - u)^T G v = 0`` (to rounding), and ``J^T v`` equal to
    the projection from scipy's NNLS.
    """
    jac = _jac(seed, k, p, conflicting=True)
    gram = jnp.asarray(jac @ jac.T, dtype)
    us = np.eye(k) / k
    res = solvers.solve_dual_cone(gram, jnp.asarray(us, dtype))
    tol = 1e-10 if dtype == jnp.float64 else 1e-4
    scale = np.abs(jac).max() ** 2 * k
    for u, v in zip(us, np.asarray(res.weights, np.float64), strict=True):
        assert np.all(v >= u - tol * np.abs(u).max())
        gv = (jac @ jac.T) @ v
        assert np.all(gv >= -tol * scale * np.abs(v).max())
        assert abs((v - u) @ gv) <= tol * scale * np.abs(v).max() ** 2 * k
        expected = jac.T @ _nnls_projection(jac, u)
        np.testing.assert_allclose(
            jac.T @ v, expected, rtol=0, atol=tol * np.abs(jac).sum(0).max() * np.abs(v).max()
        )


def test_solver_does_not_depend_on_the_scale_of_the_gramian(x64):
    jac = _jac(20, 6, 40, conflicting=True)
    gram = jac @ jac.T
    u = np.eye(6) / 6
    base = np.asarray(solvers.dual_cone_weights(jnp.asarray(gram), jnp.asarray(u)))
    for scale in (1e-300, 1e-30, 1e30, 1e300):
        scaled = np.asarray(solvers.dual_cone_weights(jnp.asarray(gram * scale), jnp.asarray(u)))
        np.testing.assert_allclose(scaled, base, rtol=1e-12, atol=1e-14)


def test_solver_degenerate_inputs():
    """A zero Gramian gives ``v = u``; a non-finite one non-finite weights, not converged."""
    u = jnp.array([0.2, -0.5, 1.0])
    res = solvers.solve_dual_cone(jnp.zeros((3, 3)), u)
    np.testing.assert_array_equal(res.weights, u)
    assert bool(res.converged)
    res = solvers.solve_dual_cone(jnp.full((3, 3), jnp.nan), u)
    assert not bool(jnp.all(jnp.isfinite(res.weights)))
    assert not bool(res.converged)
    # One problem and a batch of shape (2, 2): the leading axes are kept.
    gram = jnp.eye(3)
    assert solvers.dual_cone_weights(gram, jnp.ones((2, 2, 3))).shape == (2, 2, 3)


def test_solver_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"square \[K, K\]"):
        solvers.solve_dual_cone(jnp.ones((2, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., K\] with K = 3.*\(2,\)"):
        solvers.solve_dual_cone(jnp.eye(3), jnp.ones(2))
    with pytest.raises(ValueError, match="max_iter"):
        solvers.solve_dual_cone(jnp.eye(3), jnp.ones(3), max_iter=-1)


def test_solver_is_constant_under_differentiation_and_jits(x64):
    jac = jnp.asarray(_jac(21, 4, 10, conflicting=True))
    u = jnp.eye(4) / 4

    def loss(j):
        v = solvers.dual_cone_weights(j @ j.T, u)
        return jnp.sum((v.sum(0) @ j) ** 2)

    grad = jax.jit(jax.grad(loss))(jac)
    v = solvers.dual_cone_weights(jac @ jac.T, u).sum(0)
    # d/dJ ||w^T J||^2 with w held constant: 2 w (w^T J).
    np.testing.assert_allclose(grad, 2 * jnp.outer(v, v @ jac), rtol=1e-12)


# ---------------------------------------------------------------------------
# The methods.
# ---------------------------------------------------------------------------


def _update(name, jac, **hparams):
    tx = mtl_optax.get(name, **hparams)
    tree = {"x": jnp.asarray(jac)}
    update, state = jax.jit(lambda t: tx.update(t, tx.init(None)))(tree)
    return np.asarray(update["x"], np.float64), np.asarray(state.weights, np.float64)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize(("seed", "k", "p", "conflicting"), PROBLEMS)
def test_update_conflicts_with_no_task(x64, name, seed, k, p, conflicting):
    """``<u, g_k> >= 0`` for every task (to 1e-12 of ``||u|| max_k ||g_k||``), float64."""
    jac = _jac(seed, k, p, conflicting=conflicting)
    update, _ = _update(name, jac)
    bound = 1e-12 * np.linalg.norm(update) * np.linalg.norm(jac, axis=1).max()
    assert np.min(jac @ update) >= -bound


def test_upgrad_is_the_sum_of_the_projections_and_dualproj_the_projection_of_the_mean(x64):
    """Against scipy's NNLS: UPGrad = sum_i pi(p_i g_i), DualProj = pi(sum_i p_i g_i)."""
    jac = _jac(30, 7, 90, conflicting=True)
    pref = np.array([0.3, 1.0, 0.0, 2.0, 0.5, 0.1, 1.2])
    upgrad, w_up = _update("upgrad", jac, pref_vector=pref)
    expected = sum(
        jac.T @ _nnls_projection(jac, p * e) for p, e in zip(pref, np.eye(7), strict=True)
    )
    np.testing.assert_allclose(upgrad, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    np.testing.assert_allclose(w_up, upgrad_weights(jac @ jac.T, pref_vector=pref), rtol=1e-6)
    dualproj, _ = _update("dualproj", jac, pref_vector=pref)
    expected = jac.T @ _nnls_projection(jac, pref)
    np.testing.assert_allclose(dualproj, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_dualproj_is_the_closest_point_of_the_cone_to_the_mean(x64):
    """Projection certificate: ``u`` in the cone, ``mean - u`` in its polar, orthogonal to ``u``.

    With ``u = J^T v`` and ``s = v - p >= 0``: ``mean - u = -J^T s`` lies in the
    polar cone ``{-J^T l : l >= 0}``, and ``<mean - u, u> = -s^T J u = 0``.
    """
    jac = _jac(31, 9, 60, conflicting=True)
    u, _ = _update("dualproj", jac)
    v = np.asarray(dualproj_weights(jnp.asarray(jac @ jac.T)))  # float64 (the state logs float32)
    s = v - 1 / 9
    assert np.all(s >= -1e-12)
    ju = jac @ u
    scale = np.linalg.norm(u) * np.linalg.norm(jac, axis=1).max()
    assert np.all(ju >= -1e-12 * scale)
    assert abs(s @ ju) <= 1e-12 * scale * np.abs(s).sum()
    np.testing.assert_allclose(jac.mean(0) - u, -jac.T @ s, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_without_conflict_the_update_is_the_weighted_sum(x64, name):
    rng = np.random.default_rng(40)
    jac = np.abs(rng.standard_normal((5, 30)))  # pairwise inner products > 0
    pref = np.array([0.5, 1.0, 1.5, 2.0, 0.25])
    update, weights = _update(name, jac, pref_vector=pref)
    np.testing.assert_allclose(weights, pref, rtol=1e-6)
    np.testing.assert_allclose(update, pref @ jac, rtol=1e-12)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_default_is_scale_invariant_and_torchjd_norm_eps_is_not(x64, name):
    """Default: ``u(tJ) = t u(J)`` down to tiny gradients. ``norm_eps=1e-4``: the mean below ||J||_F = 1e-2."""
    jac = _jac(41, 4, 30, conflicting=True)
    jac /= np.linalg.norm(jac)
    base, _ = _update(name, jac)
    for t in (1e-20, 1e-3, 1e3):
        scaled, _ = _update(name, jac * t)
        np.testing.assert_allclose(
            scaled, t * base, rtol=1e-10, atol=1e-12 * t * np.abs(base).max()
        )
    small, weights = _update(name, jac * 1e-3, norm_eps=1e-4)
    np.testing.assert_allclose(weights, np.full(4, 0.25))
    np.testing.assert_allclose(small, jac.mean(0) * 1e-3, rtol=1e-12)
    large, _ = _update(name, jac * 1e3, norm_eps=1e-4)
    np.testing.assert_allclose(large, 1e3 * base, rtol=1e-10, atol=1e-12 * 1e3 * np.abs(base).max())


def test_weights_functions_match_the_logged_weights():
    jac = jnp.asarray(_jac(42, 5, 20, conflicting=True), jnp.float32)
    for name, rule in (("upgrad", upgrad_weights), ("dualproj", dualproj_weights)):
        _, logged = _update(name, jac)
        np.testing.assert_allclose(logged, rule(jac @ jac.T), rtol=1e-6)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_bad_hyperparameters_raise_clear_errors(name):
    factory = getattr(mtl_optax, name)
    with pytest.raises(ValueError, match="norm_eps must be a finite number >= 0"):
        factory(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps must be a finite number >= 0"):
        factory(reg_eps=float("nan"))
    with pytest.raises(ValueError, match="pref_vector has 3 entries but num_tasks=2"):
        factory(num_tasks=2, pref_vector=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="pref_vector must be finite"):
        factory(pref_vector=[1.0, float("inf")])
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        factory(num_tasks=0)
    tx = factory(pref_vector=[1.0, 2.0])  # K = 2 from the preference
    with pytest.raises(ValueError, match=r"num_tasks=2, but leaf \['x'\] has shape \(3, 4\)"):
        tx.update({"x": jnp.ones((3, 4))}, tx.init(None))
