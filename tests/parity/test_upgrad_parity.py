"""Parity of ``upgrad`` and ``dualproj`` with TorchJD, live, in float64.

TorchJD 0.18 ``UPGrad`` / ``DualProj`` (and their weightings) project with
``QuadprogProjector(norm_eps, reg_eps)``: the Gramian divided by its trace (0
below ``norm_eps``) plus ``reg_eps * I``, then one ``quadprog`` QP per vector,
in float64 on the host. mtl_optax with the same ``norm_eps`` and ``reg_eps``
solves the same QPs with its jitted active-set solver. Both are exact
(active-set) methods on a positive definite matrix whose condition number is
at most about ``K / reg_eps``: the weights agree to 1e-9 of their largest
entry, the updates to 1e-9 of ``sum_k |w_k| |J_kj|`` (observed: 6e-14 and 3e-15).

Where the defaults differ (mtl_optax: ``norm_eps = reg_eps = 0``, the exact
projections), the tests show how: TorchJD returns the plain mean for every
Jacobian with ``||J||_F < 1e-2`` and leaves conflicts of the order of
``reg_eps``; the default here does neither.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mtl_optax
from mtl_optax._upgrad import dualproj_weights, upgrad_weights

from .conftest import (
    EDGE_CASE_NAMES,
    assert_combination_close,
    edge_jacobian,
    jacobian_to_tree,
    random_jacobian,
    reference,
    require_reference,
    to_numpy,
    tree_to_vector,
)

TORCHJD_EPS = {"norm_eps": 1e-4, "reg_eps": 1e-4}  # TorchJD's QuadprogProjector defaults

torch = reference("torch")
aggregation = reference("torchjd.aggregation")
linalg = reference("torchjd.linalg")


def _torchjd(name, jac, *, pref=None, norm_eps=1e-4, reg_eps=1e-4):
    """TorchJD's update and weights on ``jac`` (float64 tensors)."""
    require_reference("quadprog")  # the solver of TorchJD's QuadprogProjector
    jac_t = torch.from_numpy(jac)
    pref_t = None if pref is None else torch.tensor(pref, dtype=torch.float64)
    projector = linalg.QuadprogProjector(norm_eps=norm_eps, reg_eps=reg_eps)
    agg_cls, weighting_cls = {
        "upgrad": (aggregation.UPGrad, aggregation.UPGradWeighting),
        "dualproj": (aggregation.DualProj, aggregation.DualProjWeighting),
    }[name]
    update = to_numpy(agg_cls(pref_vector=pref_t, projector=projector)(jac_t))
    weights = to_numpy(weighting_cls(pref_vector=pref_t, projector=projector)(jac_t @ jac_t.T))
    return update, weights


_STEPS: dict = {}


def _mtl(name, jac, **hparams):
    """mtl_optax's update (as a vector) and weights on ``jac``, jitted.

    The state logs the weights in float32; the float64 weights come from the
    same rule on the same Gramian (``upgrad_weights`` / ``dualproj_weights``).
    """
    key = (name, tuple(sorted((k, str(v)) for k, v in hparams.items())))
    if key not in _STEPS:
        tx = mtl_optax.get(name, **hparams)
        rule = {"upgrad": upgrad_weights, "dualproj": dualproj_weights}[name]

        def step(tree, tx=tx, rule=rule):
            update, state = tx.update(tree, tx.init(None))
            return update, state.weights, rule(mtl_optax.gramian(tree), **hparams)

        _STEPS[key] = jax.jit(step)
    tree = jacobian_to_tree(jac)
    update, logged, weights = _STEPS[key](tree)
    weights = np.asarray(weights, np.float64)
    np.testing.assert_allclose(logged, weights, rtol=1e-6, atol=1e-6 * np.abs(weights).max())
    return tree_to_vector(update).astype(np.float64), weights


def _assert_weights_close(actual, expected, rtol=1e-9):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def _conflicting(seed, k, p):
    """Rows sharing a component, with random signs: many conflicting pairs."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(p)
    signs = rng.choice([-1.0, 1.0], size=(k, 1))
    return signs * (shared + 0.7 * rng.standard_normal((k, p)))


# (K, P): K > P (a singular Gramian) included.
CASES = [(2, 300), (3, 2000), (5, 1000), (10, 700), (10, 6), (25, 400)]


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize(("k", "p"), CASES, ids=[f"K{k}-P{p}" for k, p in CASES])
def test_random_jacobians_match_torchjd(x64, name, k, p):
    for seed in range(3):
        jac = random_jacobian(7 * k + seed, k, p) if seed < 2 else _conflicting(seed, k, p)
        update, weights = _mtl(name, jac, **TORCHJD_EPS)
        ref_update, ref_weights = _torchjd(name, jac)
        _assert_weights_close(weights, ref_weights)
        assert_combination_close(update, ref_update, weights, jac, rtol=1e-9)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_preference_vector_and_other_epsilons_match_torchjd(x64, name):
    k, p = 6, 500
    pref = [0.5, 1.0, 2.0, 0.1, 0.0, 1.5]
    for seed, eps in enumerate(
        [TORCHJD_EPS, {"norm_eps": 0.0, "reg_eps": 1e-6}, {"norm_eps": 1e-2, "reg_eps": 1e-2}]
    ):
        jac = _conflicting(50 + seed, k, p)
        update, weights = _mtl(name, jac, pref_vector=pref, **eps)
        ref_update, ref_weights = _torchjd(name, jac, pref=pref, **eps)
        _assert_weights_close(weights, ref_weights)
        assert_combination_close(update, ref_update, weights, jac, rtol=1e-9)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("case", EDGE_CASE_NAMES)
def test_edge_cases_match_torchjd(x64, name, case):
    """The issue's edge cases, TorchJD's epsilons: every case is finite on both sides.

    The Gramian is regularised (``reg_eps = 1e-4`` after the trace
    normalisation), so even identical, collinear and zero tasks give unique
    weights, and both sides agree. Magnitudes 1e-8 against 1e4: the small task
    is a 1e-24 fraction of the trace, and its weight is what the regularised
    problem gives it on both sides.
    """
    jac = edge_jacobian(case, seed=31)
    update, weights = _mtl(name, jac, **TORCHJD_EPS)
    ref_update, ref_weights = _torchjd(name, jac)
    assert np.all(np.isfinite(update)) and np.all(np.isfinite(ref_update))
    _assert_weights_close(weights, ref_weights)
    assert_combination_close(update, ref_update, weights, jac, rtol=1e-9)


def test_k40_p1e5_matches_torchjd(x64):
    jac = _conflicting(400, 40, 100_000)
    for name in ("upgrad", "dualproj"):
        update, weights = _mtl(name, jac, **TORCHJD_EPS)
        ref_update, ref_weights = _torchjd(name, jac)
        _assert_weights_close(weights, ref_weights)
        assert_combination_close(update, ref_update, weights, jac, rtol=1e-9)


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_where_torchjd_defaults_differ_small_jacobians_get_the_mean(x64, name):
    """||J||_F < 1e-2: TorchJD's norm_eps = 1e-4 drops the projection (the mean comes back).

    The same Jacobian scaled by 1e-3 (||J||_F about 0.5e-1 * 1e-3): TorchJD's update
    is the plain mean, conflicts included; mtl_optax with TorchJD's epsilons
    reproduces it, and its default (``norm_eps = 0``) still projects: the
    direction is that of the unscaled problem and conflicts with no task.
    """
    jac = _conflicting(5, 4, 50)
    small = jac * 1e-3 / np.linalg.norm(jac)
    mean = small.mean(axis=0)
    assert np.min(small @ mean) < 0  # the mean conflicts with a task
    ref_update, ref_weights = _torchjd(name, small)
    np.testing.assert_allclose(ref_weights, np.full(4, 0.25), rtol=1e-12)
    update, weights = _mtl(name, small, **TORCHJD_EPS)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-12)
    assert_combination_close(update, ref_update, weights, small, rtol=1e-9)
    exact, _ = _mtl(name, small)
    unscaled, _ = _mtl(name, jac)
    np.testing.assert_allclose(exact, unscaled * 1e-3 / np.linalg.norm(jac), rtol=1e-9)
    assert np.min(small @ exact) >= -1e-12 * np.abs(small).sum() * np.abs(exact).max()


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_where_torchjd_defaults_differ_its_regularisation_leaves_small_conflicts(x64, name):
    """reg_eps = 1e-4 projects for G / tr(G) + 1e-4 I, not for G: conflicts of order 1e-4 remain.

    With a Jacobian of rank 2 in 3 tasks the exact projection is forced onto a
    face of the cone; TorchJD's regularised one misses it by a conflict of
    order ``reg_eps * tr(G) * w``, which mtl_optax with the same epsilons
    reproduces and its default removes.
    """
    rng = np.random.default_rng(8)
    basis = rng.standard_normal((2, 40))
    jac = np.array([[1.0, 0.0], [-0.9, 0.5], [0.2, -1.0]]) @ basis
    ref_update, ref_weights = _torchjd(name, jac)
    update, weights = _mtl(name, jac, **TORCHJD_EPS)
    assert_combination_close(update, ref_update, weights, jac, rtol=1e-9)
    trace = np.trace(jac @ jac.T)
    ref_worst = np.min(jac @ ref_update)
    assert ref_worst < -1e-7 * trace  # TorchJD's update conflicts with a task
    assert ref_worst >= -1e-4 * trace * np.abs(ref_weights).max() * 1.01
    exact, _ = _mtl(name, jac)
    assert np.min(jac @ exact) >= -1e-12 * trace
