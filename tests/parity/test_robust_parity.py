"""Parity of ``krum`` and ``trimmed_mean`` with TorchJD, live, in float64.

TorchJD 0.18 ``Krum(n_byzantine, n_selected)`` / ``KrumWeighting``: distances
``sqrt(clamp(G_ii + G_jj - 2 G_ij, 0))`` from the Gramian, each row's score the
sum of its ``K - f - 2`` smallest distances to the other rows, the
``n_selected`` rows of smallest score averaged. mtl_optax takes the distances
on ``G / max_k G_kk`` (the same selection). The weights are exact (0 or
``1/m``), so they must be equal wherever the selection is unique: where the
``m``-th and ``(m+1)``-th smallest scores (computed here in float64 from the
Jacobian itself) differ by more than 1e-9 of the largest score. Where they tie
(identical tasks, three evenly spaced collinear tasks, an all-zero Jacobian),
torch leaves the order of ties unspecified and mtl_optax takes the lowest
indices: the test checks that the selected tasks have the ``m`` smallest
scores to within that tolerance, and that both updates are then the mean of
tied rows.

TorchJD ``TrimmedMean(trim_number)``: ``torch.sort`` along the task axis and
the mean of the middle ``K - 2t`` values. Sorting is exact, so the updates
differ only in the rounding of the mean: 1e-12 of the mean of ``|J_kj|``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mtl_optax
from mtl_optax._robust import krum_weights

from .conftest import (
    EDGE_CASE_NAMES,
    edge_jacobian,
    jacobian_to_tree,
    random_jacobian,
    reference,
    to_numpy,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")


_STEPS: dict = {}


def _krum_mtl(jac, f, m):
    """mtl_optax's Krum update (a vector) and weights on ``jac``, jitted."""
    if (f, m) not in _STEPS:
        tx = mtl_optax.krum(n_byzantine=f, n_selected=m)

        def step(tree, tx=tx):
            update, state = tx.update(tree, tx.init(None))
            return (
                update,
                state.weights,
                krum_weights(mtl_optax.gramian(tree), n_byzantine=f, n_selected=m),
            )

        _STEPS[f, m] = jax.jit(step)
    update, logged, weights = _STEPS[f, m](jacobian_to_tree(jac))
    np.testing.assert_array_equal(np.asarray(logged), np.asarray(weights, np.float32))
    return tree_to_vector(update).astype(np.float64), np.asarray(weights, np.float64)


def _exact_scores(jac, f):
    """Krum's scores in float64 from the pairwise differences of the rows."""
    distances = np.linalg.norm(jac[:, None, :] - jac[None, :, :], axis=-1)
    n_closest = jac.shape[0] - f - 2
    return np.sort(distances, axis=1)[:, 1 : n_closest + 1].sum(axis=1)


def _check_krum(jac, f, m):
    k = jac.shape[0]
    update, weights = _krum_mtl(jac, f, m)
    jac_t = torch.from_numpy(jac)
    ref_update = to_numpy(aggregation.Krum(n_byzantine=f, n_selected=m)(jac_t))
    ref_weights = to_numpy(aggregation.KrumWeighting(n_byzantine=f, n_selected=m)(jac_t @ jac_t.T))
    scores = _exact_scores(jac, f)
    order = np.sort(scores)
    tol = 1e-9 * max(order[-1], np.finfo(np.float64).tiny)
    selected = np.flatnonzero(weights)
    # Exactly m tasks at 1/m, and they have the m smallest scores.
    assert len(selected) == m and np.all(weights[selected] == 1.0 / m), weights
    assert np.all(scores[selected] <= order[m - 1] + tol), (scores, selected)
    np.testing.assert_allclose(
        update, jac[selected].mean(axis=0), rtol=1e-12, atol=1e-12 * np.abs(jac).max()
    )
    if m == k or order[m] - order[m - 1] > tol:  # a unique selection: the reference's
        np.testing.assert_array_equal(weights, ref_weights)
        np.testing.assert_allclose(update, ref_update, rtol=1e-12, atol=1e-12 * np.abs(jac).max())
    else:  # a tie: the reference chose among tasks of equal score too
        ref_selected = np.flatnonzero(ref_weights)
        assert np.all(scores[ref_selected] <= order[m - 1] + tol), (scores, ref_selected)
    return selected


# (K, P, n_byzantine, n_selected)
KRUM_CASES = [
    (3, 300, 0, 1),
    (4, 500, 1, 1),
    (5, 1000, 1, 3),
    (7, 200, 2, 2),
    (10, 700, 3, 1),
    (10, 700, 0, 10),
    (12, 8, 4, 5),  # K > P
    (25, 400, 10, 4),
]


@pytest.mark.parametrize(
    ("k", "p", "f", "m"), KRUM_CASES, ids=[f"K{c[0]}-P{c[1]}-f{c[2]}-m{c[3]}" for c in KRUM_CASES]
)
def test_krum_random_jacobians_match_torchjd(x64, k, p, f, m):
    for seed in range(3):
        _check_krum(random_jacobian(17 * k + seed, k, p), f, m)


def test_krum_with_byzantine_rows_selects_an_honest_one_as_torchjd(x64):
    """Honest rows near a common gradient, f adversarial rows far away."""
    rng = np.random.default_rng(5)
    center = rng.standard_normal(400)
    honest = center + 0.1 * rng.standard_normal((7, 400))
    byzantine = -20 * center + 5 * rng.standard_normal((3, 400))
    jac = np.concatenate([byzantine[:2], honest, byzantine[2:]])
    for m in (1, 4):
        selected = _check_krum(jac, 3, m)
        assert np.all((selected >= 2) & (selected < 9)), selected


@pytest.mark.parametrize("case", EDGE_CASE_NAMES)
def test_krum_edge_cases_match_torchjd(x64, case):
    """With K = 3 (f = 0) as TorchJD; both raise for K < n_byzantine + 3."""
    jac = edge_jacobian(case, seed=41)
    if jac.shape[0] < 3:
        with pytest.raises(ValueError, match="at least"):
            aggregation.Krum(n_byzantine=0)(torch.from_numpy(jac))
        with pytest.raises(
            ValueError, match=rf"at least n_byzantine \+ 3 = 3 tasks.*K={jac.shape[0]}"
        ):
            _krum_mtl(jac, 0, 1)
        return
    _check_krum(jac, 0, 1)
    _check_krum(jac, 0, 2)


def test_krum_k40_p1e5_matches_torchjd(x64):
    _check_krum(random_jacobian(403, 40, 100_000), 15, 5)


def _trimmed_mtl(jac, t):
    tx = mtl_optax.trimmed_mean(trim_number=t)
    # One leaf where the Jacobian has NaNs (jacobian_to_tree checks its round trip).
    tree = jacobian_to_tree(jac) if np.all(np.isfinite(jac)) else {"x": jax.numpy.asarray(jac)}
    update, _ = jax.jit(tx.update)(tree, tx.init(None))
    return tree_to_vector(update).astype(np.float64)


def _check_trimmed(jac, t):
    update = _trimmed_mtl(jac, t)
    ref = to_numpy(aggregation.TrimmedMean(trim_number=t)(torch.from_numpy(jac)))
    bound = 1e-12 * np.abs(jac).mean(axis=0) + np.finfo(np.float64).tiny
    assert np.all(np.abs(update - ref) <= bound), np.max(np.abs(update - ref) / bound)
    # Against the definition, independently: numpy's sort.
    expected = np.sort(jac, axis=0)[t : jac.shape[0] - t].mean(axis=0)
    assert np.all(np.abs(update - expected) <= bound)


TRIM_CASES = [
    (1, 50, 0),
    (3, 300, 1),
    (4, 300, 1),
    (5, 1000, 2),
    (10, 700, 3),
    (10, 700, 0),
    (25, 400, 12),
]


@pytest.mark.parametrize(
    ("k", "p", "t"), TRIM_CASES, ids=[f"K{c[0]}-P{c[1]}-t{c[2]}" for c in TRIM_CASES]
)
def test_trimmed_mean_random_jacobians_match_torchjd(x64, k, p, t):
    for seed in range(2):
        jac = random_jacobian(19 * k + seed, k, p)
        jac[:, :10] = np.round(jac[:, :10])  # ties within a coordinate
        _check_trimmed(jac, t)


@pytest.mark.parametrize("case", EDGE_CASE_NAMES)
def test_trimmed_mean_edge_cases_match_torchjd(x64, case):
    jac = edge_jacobian(case, seed=43)
    for t in range((jac.shape[0] - 1) // 2 + 1):
        _check_trimmed(jac, t)
    t = (jac.shape[0] - 1) // 2 + 1  # one too many: both raise
    with pytest.raises(ValueError, match="at least"):
        aggregation.TrimmedMean(trim_number=t)(torch.from_numpy(jac))
    with pytest.raises(ValueError, match=r"at least 2 \* trim_number \+ 1"):
        _trimmed_mtl(jac, t)


def test_trimmed_mean_k40_p1e5_matches_torchjd(x64):
    _check_trimmed(random_jacobian(405, 40, 100_000), 8)


def test_trimmed_mean_non_finite_coordinates_are_nan_where_torchjd_trims_them(x64):
    """The library's convention (a non-finite input gives a non-finite update) against
    TorchJD's sort, which puts NaN above +inf and trims both with the largest values."""
    jac = random_jacobian(77, 5, 40)
    jac[1, 0], jac[2, 1], jac[3, 2] = np.nan, np.inf, -np.inf
    update = _trimmed_mtl(jac, 1)
    ref = to_numpy(aggregation.TrimmedMean(trim_number=1)(torch.from_numpy(jac)))
    assert np.all(np.isnan(update[:3]))
    assert np.all(np.isfinite(ref[:3]))  # the reference trims them away
    # Every other coordinate: the same as TorchJD.
    np.testing.assert_allclose(update[3:], ref[3:], rtol=1e-12, atol=1e-15)
