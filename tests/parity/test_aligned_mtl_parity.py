"""Parity of ``aligned_mtl`` with TorchJD's ``AlignedMTL``, live, in float64.

TorchJD 0.18 ``AlignedMTL(pref_vector, scale_mode)`` / ``AlignedMTLWeighting``:
``B = sqrt(lambda_s) V diag(lambda)^(-1/2) V^T`` from ``torch.linalg.eigh`` of
the Gramian, restricted to the eigenvalues above ``max(lambda) K eps``, and
the weights ``B p``. mtl_optax decomposes ``G / max_k G_kk`` (the same ``B``).
Both are direct eigendecompositions: the weights agree to 1e-9 of the largest
(observed: 2e-13 at worst, on a square K = P = 10 Jacobian whose smallest
eigenvalue is small), the updates to 1e-9 of ``sum_k |w_k| |J_kj|``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mtl_optax
from mtl_optax._aligned_mtl import aligned_mtl_weights

from .conftest import (
    EDGE_CASE_NAMES,
    assert_combination_close,
    edge_jacobian,
    jacobian_to_tree,
    random_jacobian,
    reference,
    to_numpy,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")


def _torchjd(jac, *, pref=None, scale_mode="min"):
    jac_t = torch.from_numpy(jac)
    pref_t = None if pref is None else torch.tensor(pref, dtype=torch.float64)
    update = aggregation.AlignedMTL(pref_vector=pref_t, scale_mode=scale_mode)(jac_t)
    weighting = aggregation.AlignedMTLWeighting(pref_vector=pref_t, scale_mode=scale_mode)
    return to_numpy(update), to_numpy(weighting(jac_t @ jac_t.T))


_STEPS: dict = {}


def _mtl(jac, **hparams):
    """mtl_optax's update (as a vector) and float64 weights on ``jac``, jitted."""
    key = tuple(sorted((k, str(v)) for k, v in hparams.items()))
    if key not in _STEPS:
        tx = mtl_optax.aligned_mtl(**hparams)

        def step(tree, tx=tx):
            update, state = tx.update(tree, tx.init(None))
            return update, state.weights, aligned_mtl_weights(mtl_optax.gramian(tree), **hparams)

        _STEPS[key] = jax.jit(step)
    update, logged, weights = _STEPS[key](jacobian_to_tree(jac))
    weights = np.asarray(weights, np.float64)
    np.testing.assert_allclose(logged, weights, rtol=1e-6, atol=1e-6 * np.abs(weights).max())
    return tree_to_vector(update).astype(np.float64), weights


def _check(jac, **hparams):
    update, weights = _mtl(jac, **hparams)
    ref_update, ref_weights = _torchjd(
        jac, pref=hparams.get("pref_vector"), scale_mode=hparams.get("scale_mode", "min")
    )
    np.testing.assert_allclose(weights, ref_weights, rtol=0, atol=1e-9 * np.abs(ref_weights).max())
    assert_combination_close(update, ref_update, weights, jac, rtol=1e-9)


# (K, P): K > P (rank-deficient Gramian) and K = P included.
CASES = [(2, 300), (3, 2000), (5, 1000), (10, 700), (10, 10), (10, 6), (25, 400)]


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize(("k", "p"), CASES, ids=[f"K{k}-P{p}" for k, p in CASES])
def test_random_jacobians_match_torchjd(x64, scale_mode, k, p):
    for seed in range(2):
        _check(random_jacobian(11 * k + seed, k, p), scale_mode=scale_mode)


def test_preference_vector_matches_torchjd(x64):
    pref = [0.5, 1.0, 2.0, 0.1, 0.0, 1.5]
    for scale_mode in ("min", "median", "rmse"):
        _check(random_jacobian(60, 6, 500), pref_vector=pref, scale_mode=scale_mode)


@pytest.mark.parametrize("case", EDGE_CASE_NAMES)
def test_edge_cases_match_torchjd(x64, case):
    """The issue's edge cases: finite on both sides and equal (all-zero: B = I, the mean, 0)."""
    jac = edge_jacobian(case, seed=37)
    _check(jac)
    update, _ = _mtl(jac)
    assert np.all(np.isfinite(update))


def test_k40_p1e5_matches_torchjd(x64):
    _check(random_jacobian(401, 40, 100_000))
