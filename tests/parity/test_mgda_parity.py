"""Parity of ``mgda`` (and its solver) with LibMTL's ``MGDA`` and TorchJD's ``MGDA``.

Every comparison runs in float64 on both sides (JAX with ``jax_enable_x64``,
torch float64) on the same ``(K, P)`` Jacobian ``J``, split into a pytree of
leaves of different shapes for mtl_optax (``conftest.jacobian_to_tree``).

References:

* LibMTL 1.1.5 ``MGDA``: ``backward(losses, mgda_gn=...)`` computes the task
  gradients, divides them by the normalizers (``none``/``l2``/``loss``/
  ``loss+``), solves for the min-norm weights ``sol`` (on the simplex: they sum
  to 1, not K) with Sener & Koltun's projected-gradient loop, and backprops
  ``sum_k sol_k g_k / n_k``: the same scale as ``mgda``'s default. It is driven
  with linear losses ``L = J theta + l`` at ``theta = 0`` (positive offsets
  ``l``, so the ``loss`` normalizations see the losses ``l``), with torch's
  default dtype set to float64 (LibMTL allocates its buffers with it). Its loop
  has no iteration cap, so each call runs under a 120 s alarm.
* TorchJD 0.18 ``MGDA`` (``epsilon=1e-3, max_iters=100``: plain Frank-Wolfe
  from the uniform weights, stopped when the step is below 1e-3) and its
  ``MGDAWeighting`` on the Gramian; no gradient normalization (``mgda("none")``).
* ``tests.test_solvers.exact_min_norm``: the exact float64 QP solution (KKT
  certificate), the arbiter where the references stop early.

Both references are iterative, so (as the testing standards ask) the objective
and the resulting update are compared at the references' solver tolerance:

* mtl_optax's cost ``lambda^T G~ lambda`` (``G~`` the normalized Gramian) equals
  the exact optimum to 1e-12 relative (+1e-14 of ``max G~_kk``) and is never
  above the reference's;
* the updates agree within the distance the costs allow: the min-norm point
  ``d*`` is unique and ``||d - d*||^2 <= c(d) - c*`` for any point of the hull,
  so ``||u - u_ref|| <= sqrt(c - c*) + sqrt(c_ref - c*)`` (+1e-7 of the scale,
  the rounding of those square roots);
* where a reference is exact (``K = 2`` in the interior; TorchJD run to
  ``epsilon=1e-12``), weights and update match to 1e-12 / 1e-9.

Where a reference differs (0.999/0.001 boundary weights, NaN for a zero
gradient, an error for ``K = 1``, early stops) the difference is asserted.
"""

from __future__ import annotations

import contextlib
import functools
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_optax._mgda import mgda

from ..test_solvers import exact_min_norm
from .conftest import (
    assert_combination_close,
    edge_jacobian,
    import_libmtl,
    jacobian_to_tree,
    params_like,
    random_jacobian,
    reference,
    to_numpy,
    torch_default_float64,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")
NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@contextlib.contextmanager
def _deadline(seconds):
    """Fails the test instead of hanging if a reference loop never ends."""

    def handler(signum, frame):
        raise TimeoutError(f"reference did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _normalizers(jac, losses, normalization):
    norms = np.linalg.norm(jac, axis=1)
    return {
        "none": np.ones(len(jac)),
        "l2": norms,
        "loss": np.asarray(losses, np.float64),
        "loss+": np.asarray(losses, np.float64) * norms,
    }[normalization]


def _mtl(jac, losses, normalization="none", dtype=None):
    """mgda on ``jac`` (a pytree, leaves cast to ``dtype``): (update, lambda, state).

    ``update`` is flattened to float64. ``lambda`` (the simplex weights, in
    float64; the state logs them in float32) is read from the per-task form,
    whose row k is ``(lambda_k / n_k) g_k``: ``lambda_k = n_k <row_k, g_k> /
    ||g_k||^2`` (0 for a zero gradient, whose weight does not change the point).
    """
    tree = jacobian_to_tree(jac)
    if dtype is not None:
        tree = jax.tree.map(lambda x: x.astype(dtype), tree)
    params = params_like(tree)
    tx = mgda(normalization)
    value = jnp.asarray(losses)
    update, state = tx.update(tree, tx.init(params), params, value=value)
    for leaf, param in zip(jax.tree.leaves(update), jax.tree.leaves(params), strict=True):
        assert leaf.dtype == param.dtype and leaf.shape == param.shape
    rows, _ = tx.per_task.update(tree, tx.init(params), params, value=value)
    rows = np.concatenate(
        [np.asarray(x, np.float64).reshape(len(jac), -1) for x in jax.tree.leaves(rows)], axis=1
    )
    grads = np.concatenate(
        [np.asarray(x, np.float64).reshape(len(jac), -1) for x in jax.tree.leaves(tree)], axis=1
    )
    sq = np.sum(grads**2, axis=1)
    weights = np.sum(rows * grads, axis=1) / np.where(sq > 0, sq, 1.0)
    lam = weights * np.asarray(state.normalizers, np.float64)
    if normalization != "none":
        n = _normalizers(grads, losses, normalization)
        lam = weights * np.where(n > 0, n, 1.0)
    return tree_to_vector(update).astype(np.float64), lam, state


def _libmtl(jac, losses, normalization):
    """LibMTL MGDA on ``L = J theta + losses`` at theta = 0: (update, sol), float64."""
    MGDA = import_libmtl().weighting.MGDA
    k, p = jac.shape
    with torch_default_float64(), _deadline(120):
        weighting = MGDA()
        weighting.task_num, weighting.device, weighting.rep_grad = k, "cpu", False
        theta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
        weighting.get_share_params = lambda: [theta]
        weighting.zero_grad_share_params = lambda: theta.grad.zero_()
        task_losses = torch.from_numpy(np.array(jac)) @ theta + torch.from_numpy(np.array(losses))
        sol = weighting.backward(task_losses, mgda_gn=normalization)
    return to_numpy(theta.grad).astype(np.float64), np.asarray(sol, np.float64)


def _torchjd(jac, **kwargs):
    """TorchJD MGDA: (aggregation of J, weights from the Gramian), float64."""
    jac_t = torch.from_numpy(jac)
    update = to_numpy(aggregation.MGDA(**kwargs)(jac_t))
    weights = to_numpy(aggregation.MGDAWeighting(**kwargs)(jac_t @ jac_t.T))
    return update, weights


def _check_at_solver_tolerance(jac, n, ours_u, ours_lam, ref_u, ref_lam):
    """Cost: ours exact and <= the reference's; updates within the costs' distance.

    Returns (ours cost, reference cost, exact cost) on the normalized Gramian.
    """
    normalized = jac / n[:, None]
    gram = normalized @ normalized.T
    scale = float(np.max(np.diag(gram)))
    _, best = exact_min_norm(gram)
    ours = float(ours_lam @ gram @ ours_lam)
    ref = float(ref_lam @ gram @ ref_lam)
    assert abs(ours - best) <= 1e-12 * best + 1e-14 * scale, (ours, best)
    assert ours <= ref * (1 + 1e-12) + 1e-14 * scale, (ours, ref)
    # The cost differences are known to ~K eps c; their square roots to ~1e-7 sqrt(c).
    bound = np.sqrt(max(ours - best, 0)) + np.sqrt(max(ref - best, 0)) + 1e-7 * np.sqrt(scale)
    assert np.linalg.norm(ours_u - ref_u) <= bound, (np.linalg.norm(ours_u - ref_u), bound)
    # The updates are the min-norm points themselves.
    np.testing.assert_allclose(ours_u, ours_lam @ normalized, rtol=0, atol=1e-12 * np.sqrt(scale))
    np.testing.assert_allclose(ref_u, ref_lam @ normalized, rtol=0, atol=1e-12 * np.sqrt(scale))
    return ours, ref, best


# ---------------------------------------------------------------------------
# LibMTL.
# ---------------------------------------------------------------------------

# (seed, K, P): K in {2, 3, 5, 8}, P from fewer than K to hundreds.
LIBMTL_CASES = [(31 * k + i, k, p) for k in (2, 3, 5, 8) for i, p in enumerate((6, 40, 500))]


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize(
    ("seed", "k", "p"), LIBMTL_CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in LIBMTL_CASES]
)
def test_random_jacobians_match_libmtl(x64, normalization, seed, k, p):
    """Random J (task scales 0.3-3, a shared component) and losses, every ``mgda_gn``.

    LibMTL's loop often stops early on these (its cost is up to 30% above the
    exact optimum with P < K, up to 2% with P = 500; mgda's is the optimum to
    1e-12); the check at solver tolerance holds everywhere. For K = 2 both
    sides use the same closed form: weights rtol 1e-12, update rtol
    1e-12 of sum_k |w_k| |J_kj| (``assert_combination_close``), except where
    one normalized gradient dominates the other: there LibMTL returns
    0.999/0.001 and mgda the exact 1/0 (a lower cost).
    """
    rng = np.random.default_rng(seed)
    jac = random_jacobian(seed, k, p, scales=rng.uniform(0.3, 3.0, k))
    jac += 0.5 * rng.standard_normal(p)
    losses = rng.uniform(0.2, 2.5, k)
    ours_u, lam, state = _mtl(jac, losses, normalization)
    ref_u, sol = _libmtl(jac, losses, normalization)
    n = _normalizers(jac, losses, normalization)
    np.testing.assert_allclose(np.asarray(state.normalizers), n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.simplex_weights), lam, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sol.sum(), 1.0, rtol=1e-12)  # LibMTL's weights sum to 1, not K
    np.testing.assert_allclose(lam.sum(), 1.0, rtol=1e-12)
    _, ref, best = _check_at_solver_tolerance(jac, n, ours_u, lam, ref_u, sol)
    if k == 2 and np.allclose(np.sort(sol), [0.001, 0.999], rtol=1e-12):
        # One normalized gradient dominates: LibMTL's boundary values, ours exact.
        np.testing.assert_allclose(lam, np.where(sol > 0.5, 1.0, 0.0), rtol=0, atol=1e-15)
        assert ref > best
    elif k == 2:
        np.testing.assert_allclose(lam, sol, rtol=1e-12)
        assert_combination_close(ours_u, ref_u, sol / n, jac, rtol=1e-12)


def _edge_jacobian(name):
    return edge_jacobian(name, seed=7, orthogonal_scale=3.0)


EDGE_CASES = (
    "identical",
    "opposite",
    "orthogonal",
    "collinear",
    "zero_task",
    "magnitudes",
    "tiny_vs_huge",
)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_against_libmtl(x64, case, normalization):
    """Edge cases: equal where LibMTL is right, and the documented difference where not.

    * opposite, orthogonal: both exact (interior closed form): weights rtol 1e-12.
    * identical: LibMTL returns 0.999/0.001, we 1/0; the update is the same
      where the normalized gradients are identical (none, l2).
    * collinear (g, 2.5g, -0.5g: 0 in the hull): our update is 0 (1e-14).
    * zero task: ours is exactly 0 (that task is stationary). LibMTL divides
      by the zero norm for ``l2``/``loss+`` (NaN; its loop then never ends, so
      only the division is run) and, for ``none``/``loss``, stops near 0 but
      not at it.
    * magnitudes 1e-8 vs 1e4: ours is the exact optimum; LibMTL's cost is not
      lower (K = 2: its 0.999/0.001 boundary puts 0.001 on the 1e4 gradient).
    Everywhere LibMTL's result is finite, the check at solver tolerance holds.
    """
    jac = _edge_jacobian(case)
    k = len(jac)
    losses = np.linspace(0.5, 1.5, k)
    ours_u, lam, _ = _mtl(jac, losses, normalization)
    assert np.all(np.isfinite(ours_u))
    if case == "zero_task" and normalization in ("l2", "loss+"):
        # LibMTL divides the zero gradient by its zero norm: NaN, after which its
        # solver loop never ends (NaN comparisons), so only the division is run.
        assert np.all(ours_u == 0.0)
        weighting = import_libmtl().weighting.MGDA()
        weighting.device = "cpu"
        with torch_default_float64():
            normalized = weighting._gradient_normalizers(
                torch.from_numpy(jac), torch.from_numpy(losses), ntype=normalization
            )
        assert np.all(np.isnan(to_numpy(normalized)[1]))
        assert np.all(np.isfinite(to_numpy(normalized)[[0, 2]]))
        return
    ref_u, sol = _libmtl(jac, losses, normalization)
    n = _normalizers(jac, losses, normalization)
    n = np.where(n > 0, n, 1.0)
    scale = np.max(np.linalg.norm(jac / n[:, None], axis=1))
    if case == "collinear":
        assert np.linalg.norm(ours_u) <= 1e-14 * scale
    if case == "identical":
        np.testing.assert_allclose(np.sort(sol), [0.001, 0.999], rtol=1e-12)
        np.testing.assert_array_equal(lam, np.where(sol > 0.5, 1.0, 0.0))
        if normalization in ("none", "l2"):  # identical normalized gradients: same point
            assert_combination_close(ours_u, ref_u, sol / n, jac, rtol=1e-12)
    if case in ("opposite", "orthogonal"):
        np.testing.assert_allclose(lam, sol, rtol=1e-12)
        assert_combination_close(ours_u, ref_u, sol / n, jac, rtol=1e-12)
    if case == "opposite":
        assert np.linalg.norm(ours_u) <= 1e-16 * scale
        assert np.linalg.norm(ref_u) <= 1e-15 * scale
    if case == "zero_task":
        assert np.all(ours_u == 0.0)
        assert np.linalg.norm(ref_u) > 0  # LibMTL stops near 0 (1e-6 of the scale), not at it
    _check_at_solver_tolerance(jac, n, ours_u, lam, ref_u, sol)


def test_single_task_libmtl_fails_and_mgda_returns_the_gradient(x64):
    """K = 1: LibMTL's pair search finds no pair and raises; mgda returns g / n."""
    jac = _edge_jacobian("K1")
    with pytest.raises(UnboundLocalError):
        _libmtl(jac, [1.5], "none")
    for normalization in NORMALIZATIONS:
        u, lam, _ = _mtl(jac, [1.5], normalization)
        np.testing.assert_allclose(lam, [1.0], rtol=1e-14)
        n = _normalizers(jac, [1.5], normalization)[0]
        np.testing.assert_allclose(u, jac[0] / n, rtol=1e-14)


@functools.lru_cache(maxsize=1)
def _k40_problem():
    """K = 40, P = 1e5, task scales over four decades; its Gramian and exact optimum."""
    rng = np.random.default_rng(3)
    jac = random_jacobian(40, 40, 100_000, scales=10.0 ** rng.uniform(-2, 2, 40))
    gram = jac @ jac.T
    return jac, gram, exact_min_norm(gram)[1]


def test_k40_p1e5_libmtl_stops_early_and_mgda_reaches_the_optimum(x64):
    """K = 40, P = 1e5, task scales over four decades (REFERENCE_QUIRKS: LibMTL MGDA).

    LibMTL's solver (``_find_min_norm_element`` on J, as its backward calls it;
    float64 and float32 input) stops when the weights move by < 1e-5 in l1:
    its point is more than 1.2 times longer than the min-norm point. mgda's
    norm equals the exact minimum to 1e-10 relative.
    """
    MGDA = import_libmtl().weighting.MGDA
    jac, gram, best = _k40_problem()
    ours_u, lam, _ = _mtl(jac, np.ones(40))
    np.testing.assert_allclose(ours_u @ ours_u, best, rtol=1e-10)
    for dtype in (np.float64, np.float32):
        with (
            torch_default_float64() if dtype == np.float64 else contextlib.nullcontext(),
            _deadline(120),
        ):
            sol = MGDA()._find_min_norm_element(torch.from_numpy(jac.astype(dtype)))
        sol = to_numpy(sol).astype(np.float64)
        np.testing.assert_allclose(sol.sum(), 1.0, rtol=1e-6)
        assert sol @ gram @ sol > 1.2**2 * best
        ref_u = sol @ jac
        _check_at_solver_tolerance(jac, np.ones(40), ours_u, lam, ref_u, sol / sol.sum())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_leaves_against_libmtl_float64(x64, dtype):
    """float32 / bfloat16 leaves against LibMTL in float64 on the same rounded J.

    The update (returned in the leaves' dtype) is within 1e-5 (float32) or
    1e-2 (bfloat16: its 8-bit mantissa rounds the output) of the float64
    reference, relative to the reference's norm; the weights within 1e-4.
    """
    rng = np.random.default_rng(5)
    jac = random_jacobian(5, 3, 400, scales=[0.5, 1.0, 2.0]) + 0.5 * rng.standard_normal(400)
    rounded = np.asarray(jnp.asarray(jac).astype(dtype).astype(jnp.float64))
    losses = np.array([0.5, 1.0, 2.0])
    for normalization in ("none", "l2"):
        ours_u, _, state = _mtl(rounded, losses, normalization, dtype=dtype)
        ref_u, sol = _libmtl(rounded, losses, normalization)
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        assert np.linalg.norm(ours_u - ref_u) <= tol * np.linalg.norm(ref_u)
        np.testing.assert_allclose(np.asarray(state.simplex_weights), sol, atol=1e-4)


# ---------------------------------------------------------------------------
# TorchJD.
# ---------------------------------------------------------------------------

TORCHJD_CASES = [(53 * k + i, k, p) for k in (2, 3, 5, 8) for i, p in enumerate((30, 500))]


@pytest.mark.parametrize(
    ("seed", "k", "p"), TORCHJD_CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in TORCHJD_CASES]
)
def test_random_jacobians_match_torchjd(x64, seed, k, p):
    """TorchJD's MGDA (defaults) at its tolerance, and run to epsilon=1e-12 exactly.

    Defaults (epsilon=1e-3): its cost is within 5e-2 relative of the optimum
    (measured up to 2.6e-2), ours is not above it, and the updates agree
    within the costs' distance. With epsilon=1e-12 (max_iters=5000) its cost
    is within 1e-3 of the optimum (measured up to 2e-4); where the optimum is
    interior (every weight > 1e-3) its Frank-Wolfe converges to the end:
    weights atol 1e-9, update rtol 1e-9 of sum |w||J|. (Where a weight must
    reach 0, plain Frank-Wolfe only shrinks it slowly: 1e-3 is left after
    5000 iterations.)
    """
    jac = random_jacobian(seed, k, p) + 0.3 * np.random.default_rng(seed).standard_normal(p)
    ours_u, lam, state = _mtl(jac, np.ones(k))
    ones = np.ones(k)
    ref_u, ref_w = _torchjd(jac)
    np.testing.assert_allclose(ref_u, ref_w @ jac, rtol=0, atol=1e-12 * np.abs(jac).max())
    _, ref, best = _check_at_solver_tolerance(jac, ones, ours_u, lam, ref_u, ref_w)
    assert ref <= best * (1 + 5e-2)
    tight_u, tight_w = _torchjd(jac, epsilon=1e-12, max_iters=5_000)
    _, tight, _ = _check_at_solver_tolerance(jac, ones, ours_u, lam, tight_u, tight_w)
    assert tight <= best * (1 + 1e-3)
    if np.all(lam > 1e-3):  # interior optimum: Frank-Wolfe converges linearly, to the end
        np.testing.assert_allclose(lam, tight_w, rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(state.weights), tight_w, atol=1e-6)
        assert_combination_close(ours_u, tight_u, tight_w, jac, rtol=1e-9)


TORCHJD_EDGE = ("K1", *EDGE_CASES)


@pytest.mark.parametrize("case", TORCHJD_EDGE)
def test_edge_cases_against_torchjd(x64, case):
    """Edge cases against TorchJD's MGDA (defaults) at its tolerance.

    Exact agreement where both are exact: K = 1 (the gradient), identical
    (the first task's gradient), opposite and a zero task (exactly 0).
    """
    jac = _edge_jacobian(case)
    k = len(jac)
    ours_u, lam, _ = _mtl(jac, np.ones(k))
    ref_u, ref_w = _torchjd(jac)
    assert np.all(np.isfinite(ours_u)) and np.all(np.isfinite(ref_u))
    if case in ("K1", "identical"):
        np.testing.assert_allclose(ours_u, jac[0], rtol=1e-14)
        np.testing.assert_allclose(ref_u, jac[0], rtol=1e-14)
        return
    if case == "opposite":
        assert np.all(ours_u == 0.0)
        np.testing.assert_array_equal(ref_w, [0.5, 0.5])
    if case in ("collinear", "zero_task"):  # 0 is in the hull
        assert np.linalg.norm(ours_u) <= 1e-14 * np.max(np.linalg.norm(jac, axis=1))
    if case == "zero_task":  # its first Frank-Wolfe step lands on the zero task
        assert np.all(ref_u == 0.0) and np.all(ours_u == 0.0)
    _check_at_solver_tolerance(jac, np.ones(k), ours_u, lam, ref_u, ref_w)


def test_k40_p1e5_against_torchjd(x64):
    """K = 40, P = 1e5 (task scales over four decades): TorchJD's cost is not below ours."""
    jac, gram, best = _k40_problem()
    ours_u, _, _ = _mtl(jac, np.ones(40))
    ref_w = to_numpy(aggregation.MGDAWeighting()(torch.from_numpy(gram)))
    np.testing.assert_allclose(ours_u @ ours_u, best, rtol=1e-10)
    assert ref_w @ gram @ ref_w >= best * (1 - 1e-12)
