"""mgda: gradient normalizers, the min-norm update and its guarantees, state, jit, errors.

The exact reference for the update is ``tests.test_solvers.exact_min_norm`` (an
exact float64 QP solution with a KKT certificate), applied to the normalized
Gramian built here in numpy from the definitions. Parity with LibMTL and
TorchJD is in ``tests/parity/test_mgda_parity.py``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax import engine
from mtl_optax._mgda import MGDAState, gradient_normalizers, mgda

from .test_solvers import FIXTURES, exact_min_norm

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _jac(seed, k, p, *, common=0.0, scales=None):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, p)) + common * rng.standard_normal(p)
    if scales is not None:
        jac = jac * np.asarray(scales, np.float64)[:, None]
    return jac


def _tree(jac, dtype=None):
    """A two-leaf pytree (``w`` of shape (K, 3, m), ``b`` the rest) from a (K, P) matrix."""
    jac = jnp.asarray(jac) if dtype is None else jnp.asarray(jac, dtype)
    k, p = jac.shape
    m = p // 3
    return {"w": jac[:, : 3 * m].reshape(k, 3, m), "b": jac[:, 3 * m :]}


def _vec(tree):
    """Flattens an update (or task gradients, with ``k``) back to the matrix columns' order."""
    return np.concatenate(
        [np.asarray(tree["w"], np.float64).ravel(), np.asarray(tree["b"]).ravel()]
    )


def _params(jac, dtype=jnp.float32):
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], dtype), _tree(jac))


def _normalizers(jac, losses, normalization):
    """The normalizers from their definitions (Sener & Koltun's ``gradient_normalizers``)."""
    norms = np.linalg.norm(jac, axis=1)
    return {
        "none": np.ones(len(jac)),
        "l2": norms,
        "loss": np.asarray(losses, np.float64),
        "loss+": np.asarray(losses, np.float64) * norms,
    }[normalization]


def _exact_update(jac, losses, normalization):
    """Exact float64 MGDA update: the min-norm point of the normalized gradients."""
    n = _normalizers(jac, losses, normalization)
    normalized = jac / n[:, None]
    lam, _ = exact_min_norm(normalized @ normalized.T)
    return lam @ normalized, lam, n


# ---------------------------------------------------------------------------
# Gradient normalizers.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gid", ["g0", "g1", "g2"])
def test_gradient_normalizers_match_vambn_fixture(x64, gid):
    """Same numbers as vambn's ``gradient_normalizers`` on a two-tensor gradient list, rtol 1e-14."""
    tree = {
        "part0": jnp.asarray(FIXTURES[f"gradient_normalizers.{gid}.part0"]),
        "part1": jnp.asarray(FIXTURES[f"gradient_normalizers.{gid}.part1"]),
    }
    losses = jnp.asarray(FIXTURES[f"gradient_normalizers.{gid}.losses"])
    gram = engine.gramian(tree)
    for normalization, key in [
        ("l2", "l2"),
        ("loss", "loss"),
        ("loss+", "lossplus"),
        ("none", "none"),
    ]:
        expected = FIXTURES[f"gradient_normalizers.{gid}.{key}"]
        got = np.asarray(gradient_normalizers(gram, losses, normalization))
        np.testing.assert_allclose(got, expected, rtol=1e-14, err_msg=normalization)
        # The state logs the normalizers that were used (float32).
        tx = mgda(normalization)
        _, state = tx.update(tree, tx.init(None), value=losses)
        np.testing.assert_allclose(np.asarray(state.normalizers), expected, rtol=1e-6)


def test_gradient_normalizers_replace_non_positive_values_by_one():
    """Zero gradients and zero, negative or non-finite losses give normalizer 1 (no 0/0)."""
    gram = jnp.diag(jnp.array([9.0, 0.0, 4.0, 1.0]))
    losses = jnp.array([2.0, 3.0, 0.0, -1.0])
    np.testing.assert_array_equal(gradient_normalizers(gram, losses, "l2"), [3.0, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(gradient_normalizers(gram, losses, "loss"), [2.0, 3.0, 1.0, 1.0])
    np.testing.assert_array_equal(gradient_normalizers(gram, losses, "loss+"), [6.0, 1.0, 1.0, 1.0])
    nan_losses = jnp.array([jnp.nan, jnp.inf, 1.0, 1.0])
    np.testing.assert_array_equal(
        gradient_normalizers(gram, nan_losses, "loss"), [1.0, 1.0, 1.0, 1.0]
    )


# ---------------------------------------------------------------------------
# The update.
# ---------------------------------------------------------------------------

CASES = [(s, k, p, c) for s, (k, p, c) in enumerate([(3, 60, 0.0), (5, 200, 0.7), (8, 5, 0.3)])]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize(("seed", "k", "p", "common"), CASES)
def test_update_is_the_exact_min_norm_point(x64, normalization, seed, k, p, common):
    """u = sum_k lambda_k g_k / n_k with lambda the exact min-norm weights (float64).

    Tolerance: 1e-10 of max_k ||g_k / n_k|| entrywise on u (the solver ends on
    the optimum up to rounding), 1e-8 on lambda where it is unique (P >= K).
    """
    jac = _jac(seed, k, p, common=common, scales=np.linspace(0.5, 3.0, k))
    losses = np.linspace(0.4, 2.2, k)
    expected, lam, n = _exact_update(jac, losses, normalization)
    tx = mgda(normalization, num_tasks=k)
    params = _params(jac, jnp.float64)
    update, state = tx.update(_tree(jac), tx.init(params), params, value=jnp.asarray(losses))
    chex.assert_trees_all_equal_shapes_and_dtypes(update, params)
    scale = np.max(np.linalg.norm(jac / n[:, None], axis=1))
    np.testing.assert_allclose(_vec(update), expected, rtol=0, atol=1e-10 * scale)
    assert isinstance(state, MGDAState)
    np.testing.assert_allclose(np.asarray(state.normalizers), n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.simplex_weights).sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(state.weights),
        np.asarray(state.simplex_weights) / n.astype(np.float32),
        rtol=1e-6,
    )
    if p >= k:
        np.testing.assert_allclose(np.asarray(state.simplex_weights), lam, atol=1e-7)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_update_does_not_conflict_with_any_task(x64, normalization):
    """<u, g_k> >= n_k (1 - tol) ||u||^2 >= 0 for every task (normalize_update=True).

    Over 20 seeded random problems (K in {2, 3, 5, 8}, P in {3, 30, 300}, with and without a
    common component); rounding slack 1e-12 of n_k max_j ||g_j/n_j||^2.
    """
    rng = np.random.default_rng(0)
    for trial in range(20):
        k, p = int(rng.choice([2, 3, 5, 8])), int(rng.choice([3, 30, 300]))
        jac = rng.standard_normal((k, p)) * rng.uniform(0.1, 10, (k, 1))
        if trial % 2:
            jac += rng.standard_normal(p)
        losses = rng.uniform(0.1, 3, k)
        tx = mgda(normalization)
        update, state = tx.update(_tree(jac), tx.init(None), value=jnp.asarray(losses))
        u = _vec(update)
        n = np.asarray(state.normalizers, np.float64)
        scale = np.max(np.sum((jac / _normalizers(jac, losses, normalization)[:, None]) ** 2, 1))
        inner = jac @ u
        assert np.all(inner >= n * ((1 - 1e-6) * (u @ u) - 1e-12 * scale)), (trial, inner, u @ u)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_update_is_zero_iff_zero_is_in_the_convex_hull(x64, normalization):
    """Pareto stationarity: u = 0 exactly when 0 is a convex combination of the g_k.

    In the hull: g_3 = -(0.3 g_1 + 1.7 g_2) (then 0 = (0.3 g_1 + 1.7 g_2 + g_3) / 3),
    and a zero task. Not in the hull: gradients within a cone around a common
    direction; there ||u||^2 equals the exact min-norm cost (rtol 1e-10), which
    is bounded away from 0. "Zero" means ||u|| <= 1e-12 max_k ||g_k / n_k||
    (positive rescaling of the tasks does not change whether 0 is in the hull).
    """
    rng = np.random.default_rng(4)
    g1, g2, v = rng.standard_normal((3, 40))
    in_hull = [np.stack([g1, g2, -(0.3 * g1 + 1.7 * g2)]), np.stack([g1, g2, 0 * g1])]
    cone = 5 * v + rng.standard_normal((5, 40))
    assert np.all(cone @ v > 0)
    losses = np.array([0.5, 1.5, 1.0, 2.0, 0.7])
    for jac, zero in [(in_hull[0], True), (in_hull[1], True), (cone, False)]:
        k = len(jac)
        tx = mgda(normalization)
        update, _ = tx.update(_tree(jac), tx.init(None), value=jnp.asarray(losses[:k]))
        u = _vec(update)
        n = _normalizers(jac, losses[:k], normalization)
        n = np.where(n > 0, n, 1.0)
        scale = np.max(np.linalg.norm(jac / n[:, None], axis=1))
        if zero:
            assert np.linalg.norm(u) <= 1e-12 * scale
        else:
            _, best = exact_min_norm((jac / n[:, None]) @ (jac / n[:, None]).T)
            assert best > 1e-2 * scale**2
            np.testing.assert_allclose(u @ u, best, rtol=1e-10)


def test_l2_normalization_is_invariant_to_positive_task_scales(x64):
    """With "l2", the update depends only on the gradients' directions: rtol 1e-10."""
    jac = _jac(3, 5, 50, common=0.5)
    tx = mgda("l2")
    base, _ = tx.update(_tree(jac), tx.init(None))
    scales = np.array([1e-3, 1.0, 30.0, 1e3, 0.1])
    scaled, _ = tx.update(_tree(jac * scales[:, None]), tx.init(None))
    np.testing.assert_allclose(_vec(scaled), _vec(base), rtol=1e-10, atol=1e-14)


def test_none_normalization_is_homogeneous(x64):
    """Without normalization, scaling every gradient by c scales the update by c."""
    jac = _jac(6, 3, 30, common=0.5)
    tx = mgda()
    base, _ = tx.update(_tree(jac), tx.init(None))
    for c in (1e-6, 7.0, 1e6):
        scaled, _ = tx.update(_tree(c * jac), tx.init(None))
        np.testing.assert_allclose(_vec(scaled), c * _vec(base), rtol=1e-10, atol=1e-14 * c)


def test_loss_normalization_equals_mgda_on_gradients_divided_by_the_losses(x64):
    jac = _jac(7, 3, 30, common=0.2)
    losses = np.array([0.2, 1.0, 5.0])
    tx = mgda("loss")
    update, state = tx.update(_tree(jac), tx.init(None), value=jnp.asarray(losses))
    plain = mgda()
    expected, plain_state = plain.update(_tree(jac / losses[:, None]), plain.init(None))
    np.testing.assert_allclose(_vec(update), _vec(expected), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(state.simplex_weights, plain_state.simplex_weights, rtol=1e-6)


@pytest.mark.parametrize("normalization", ["l2", "loss+"])
def test_normalize_update_false_applies_the_weights_to_the_raw_gradients(x64, normalization):
    """Sener & Koltun's training script: the same lambda, applied to the g_k themselves."""
    jac = _jac(8, 3, 30, common=0.3, scales=[1.0, 4.0, 0.2])
    losses = jnp.array([0.5, 1.0, 2.0])
    default = mgda(normalization)
    raw = mgda(normalization, normalize_update=False)
    u_default, s_default = default.update(_tree(jac), default.init(None), value=losses)
    u_raw, s_raw = raw.update(_tree(jac), raw.init(None), value=losses)
    lam = np.asarray(s_default.simplex_weights, np.float64)
    np.testing.assert_array_equal(s_raw.simplex_weights, s_default.simplex_weights)
    np.testing.assert_array_equal(s_raw.weights, s_raw.simplex_weights)
    np.testing.assert_allclose(_vec(u_raw), lam @ jac, rtol=1e-6, atol=1e-9)
    assert not np.allclose(_vec(u_raw), _vec(u_default), rtol=1e-3)


def test_per_task_form_sums_to_the_update():
    jac = _jac(9, 3, 30, common=0.3)
    tx = mgda("l2")
    update, state = tx.update(_tree(jac), tx.init(None))
    per_task, per_state = tx.per_task.update(_tree(jac), tx.per_task.init(None))
    chex.assert_trees_all_equal_shapes(per_task, _tree(jac))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.sum(0), per_task), update, atol=1e-6)
    # Row k is w_k g_k.
    w = np.asarray(state.weights)
    np.testing.assert_allclose(
        np.asarray(per_task["b"]), w[:, None] * np.asarray(_tree(jac, jnp.float32)["b"]), rtol=1e-6
    )
    chex.assert_trees_all_close(per_state, state)


# ---------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_single_task(normalization):
    """K = 1: the only point of the hull, g / n."""
    jac = _jac(10, 1, 30)
    tx = mgda(normalization)
    update, state = tx.update(_tree(jac), tx.init(None), value=jnp.array([2.0]))
    n = _normalizers(jac, [2.0], normalization)
    np.testing.assert_allclose(_vec(update), jac[0] / n[0], rtol=1e-6)
    np.testing.assert_array_equal(state.simplex_weights, [1.0])


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_a_zero_task_or_all_zero_tasks_give_an_exact_zero_update(normalization):
    """A zero gradient is a stationary task: u = 0 exactly and finite (references: NaN for l2)."""
    jac = _jac(11, 3, 30)
    jac[1] = 0.0
    for case in (jac, np.zeros_like(jac)):
        tx = mgda(normalization)
        update, state = tx.update(_tree(case), tx.init(None), value=jnp.ones(3))
        assert np.all(_vec(update) == 0.0)
        for field in state:
            assert np.all(np.isfinite(np.asarray(field)))


def test_opposite_gradients_cancel_exactly():
    jac = _jac(12, 1, 30)
    jac = np.concatenate([jac, -jac])
    tx = mgda()
    update, state = tx.update(_tree(jac), tx.init(None))
    assert np.all(_vec(update) == 0.0)
    np.testing.assert_array_equal(state.weights, [0.5, 0.5])


# ---------------------------------------------------------------------------
# State, jit, errors.
# ---------------------------------------------------------------------------


def test_state_shapes_with_and_without_num_tasks():
    jac = _jac(13, 3, 30)
    params = _params(jac)
    tx = mgda(num_tasks=3)
    s0 = tx.init(params)
    assert all(field.shape == (3,) and bool(jnp.all(jnp.isnan(field))) for field in s0)
    _, s1 = tx.update(_tree(jac, jnp.float32), s0, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)
    tx = mgda()
    assert all(field.shape == (0,) for field in tx.init(params))
    _, s1 = tx.update(_tree(jac, jnp.float32), tx.init(params), params)
    assert all(field.shape == (3,) and field.dtype == jnp.float32 for field in s1)


def test_jits_in_a_chain_with_adam():
    """Jitted and eager agree over three steps of optax.chain(mgda, adam) (rtol 1e-5)."""
    jac = _jac(14, 3, 30, common=0.3)
    opt = optax.chain(mgda("loss+", num_tasks=3), optax.adam(1e-2))
    params = _params(jac)

    def run(update_fn):
        state, p = opt.init(params), params
        for i in range(3):
            grads = _tree(jac * (1 + i), jnp.float32)
            u, state = update_fn(grads, state, p, value=jnp.array([1.0, 2.0, 0.5]) * (1 + i))
            p = optax.apply_updates(p, u)
        return p, state

    p_jit, s_jit = run(jax.jit(opt.update))
    p_eager, _ = run(opt.update)
    chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(s_jit[0].weights)))
    chex.assert_trees_all_equal_shapes_and_dtypes(p_jit, params)


def test_errors():
    jac = _jac(15, 3, 30)
    with pytest.raises(ValueError, match="normalization must be one of"):
        mgda("l1")
    with pytest.raises(ValueError, match="max_iter"):
        mgda(max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        mgda(tol=-1.0)
    for normalization in ("loss", "loss+"):
        tx = mgda(normalization)
        with pytest.raises(ValueError, match=r"per-task losses.*\(3,\)"):
            tx.update(_tree(jac), tx.init(None))
        with pytest.raises(ValueError, match=r"shape \(3,\); found shape \(2,\)"):
            tx.update(_tree(jac), tx.init(None), value=jnp.ones(2))
    tx = mgda(num_tasks=4)
    with pytest.raises(ValueError, match="num_tasks=4"):
        tx.update(_tree(jac), tx.init(None))
    with pytest.raises(ValueError, match="normalization must be one of"):
        gradient_normalizers(jnp.eye(2), None, "L2")
    with pytest.raises(ValueError, match="needs the per-task losses"):
        gradient_normalizers(jnp.eye(2), None, "loss")


def test_registered_and_built_by_name():
    assert "mgda" in mtl_optax.available()
    tx = mtl_optax.get("mgda", normalization="l2", num_tasks=2)
    assert tx.weighting.name == "mgda" and tx.weighting.num_tasks == 2
    assert tx.weighting.needs_gramian and not tx.weighting.needs_value
    assert mtl_optax.get("mgda", normalization="loss+").weighting.needs_value
