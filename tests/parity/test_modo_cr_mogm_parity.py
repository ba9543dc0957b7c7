"""Parity of ``modo`` and ``cr_mogm`` with TorchJD, live, in float64, over several steps.

TorchJD 0.18 ``MoDoWeighting(gamma, rho)``: a stateful weighting of a ``K x K``
matrix ``A`` (the cross matrix ``J_1 J_2^T`` of two batches, or a Gramian):
``lambda <- project_onto_simplex(lambda - gamma * (A @ lambda + rho * lambda))``
from ``1/K``, returning the new ``lambda``. The projection is the exact
Euclidean projection on both sides (a sort-based loop there, optax's there +
a shift and clip that change nothing in exact arithmetic), so the weights
agree to rounding: 1e-12 absolute over 5 steps (each step's error is carried
into the next through ``lambda``). mtl_optax's update combines the task
gradients given to ``update`` with those weights: checked against
``weights @ J`` at 1e-12 of ``sum_k |w_k| |J_kj|``.

TorchJD ``CRMOGMWeighting(weighting, alpha, initial_weights)``: the moving
average ``alpha * lambda_prev + (1 - alpha) * lambda_hat`` of the wrapped
weighting's output, the first output ``lambda_hat`` itself when no initial
weights are given. Checked around two wrapped weightings with exact rules,
IMTL-G (closed form) and SDMGrad (a fixed number of inner steps, stateful:
its warm start must be threaded through the wrapper's state), with and
without initial weights: 1e-9 absolute over 5 steps (SDMGrad's long inner
steps amplify rounding, see tests/parity/test_sdmgrad_parity.py). MGDA is not
used here: its weights come from iterative solvers whose stopping rules
differ (up to 0.06 apart on ill-conditioned Gramians), which
``tests/test_cr_mogm.py`` replaces by the same average of mtl_optax's own MGDA
weights.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import mtl_optax

from .conftest import (
    EDGE_CASE_NAMES,
    assert_combination_close,
    edge_jacobian,
    jacobian_to_tree,
    params_like,
    random_jacobian,
    reference,
    to_numpy,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")


def _modo_run(jacs_1, jacs_2, gamma, rho):
    """Both sides over the steps: (our weights, TorchJD's weights, our updates)."""
    k = jacs_1[0].shape[0]
    tx = mtl_optax.modo(gamma=gamma, rho=rho, num_tasks=k)
    step = jax.jit(tx.update)
    ref = aggregation.MoDoWeighting(gamma=gamma, rho=rho)
    tree = jacobian_to_tree(jacs_1[0])
    state = tx.init(params_like(tree))
    ours, theirs, updates = [], [], []
    for j1, j2 in zip(jacs_1, jacs_2, strict=True):
        tree = jacobian_to_tree(j1)
        a = j1 @ j2.T
        update, state = step(tree, state, params_like(tree), cross_gramian=a)
        ours.append(np.asarray(state.lambda_, np.float64))
        theirs.append(to_numpy(ref(torch.from_numpy(a))))
        updates.append(tree_to_vector(update))
    return ours, theirs, updates


MODO_CASES = [(2, 50, 0.1, 0.1), (3, 300, 0.5, 0.0), (5, 120, 0.02, 0.3), (10, 400, 1.0, 0.1)]


@pytest.mark.parametrize(
    ("k", "p", "gamma", "rho"),
    MODO_CASES,
    ids=[f"K{c[0]}-P{c[1]}-gamma{c[2]}-rho{c[3]}" for c in MODO_CASES],
)
def test_modo_cross_matrices_match_torchjd_over_steps(x64, k, p, gamma, rho):
    """Two correlated batches per step, rows of unequal scales, five steps."""
    rng = np.random.default_rng(k * p)
    scales = 10.0 ** rng.uniform(-1, 0.5, k)
    jacs_1 = [random_jacobian(100 * k + s, k, p, scales=scales) for s in range(5)]
    jacs_2 = [j + 0.3 * rng.standard_normal(j.shape) * scales[:, None] for j in jacs_1]
    ours, theirs, updates = _modo_run(jacs_1, jacs_2, gamma, rho)
    for t, (w, w_ref, u, j1) in enumerate(zip(ours, theirs, updates, jacs_1, strict=True)):
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-12, err_msg=f"step {t}")
        assert_combination_close(u, w_ref @ j1, w_ref, j1)
    # The weights moved (the test would not see a rule that keeps 1/K).
    assert np.abs(ours[-1] - 1.0 / k).max() > 1e-3


@pytest.mark.parametrize("case", EDGE_CASE_NAMES)
def test_modo_edge_cases_match_torchjd(x64, case):
    """The edge cases as both batches (A = J J^T), three steps of gamma = 0.5."""
    jac = edge_jacobian(case, seed=3)
    ours, theirs, updates = _modo_run([jac] * 3, [jac] * 3, 0.5, 0.1)
    scale = max(1.0, float(np.abs(jac @ jac.T).max()) * 1e-12)
    for w, w_ref, u in zip(ours, theirs, updates, strict=True):
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(u))
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-12 * scale)
        assert_combination_close(u, w_ref @ jac, w_ref, jac)


def _cr_mogm_run(jacs, inner, ref_inner, alpha, initial):
    k = jacs[0].shape[0]
    tx = mtl_optax.cr_mogm(inner, alpha=alpha, initial_weights=initial, num_tasks=k)
    step = jax.jit(tx.update)
    ref = aggregation.CRMOGMWeighting(
        ref_inner, alpha=alpha, initial_weights=None if initial is None else torch.tensor(initial)
    )
    tree = jacobian_to_tree(jacs[0])
    state = tx.init(params_like(tree))
    for t, jac in enumerate(jacs):
        tree = jacobian_to_tree(jac)
        update, state = step(tree, state, params_like(tree))
        jt = torch.from_numpy(jac)
        w_ref = to_numpy(ref(jt @ jt.T))
        np.testing.assert_allclose(
            np.asarray(state.smoothed), w_ref, rtol=0, atol=1e-9, err_msg=f"step {t}"
        )
        assert_combination_close(tree_to_vector(update), w_ref @ jac, w_ref, jac, rtol=1e-9)
    return np.asarray(state.smoothed)


@pytest.mark.parametrize("initial", [False, True], ids=["first-step-start", "initial-weights"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("inner", ["imtl_g", "sdmgrad"])
def test_cr_mogm_matches_torchjd_over_steps(x64, inner, alpha, initial):
    k, p = 4, 200
    jacs = [random_jacobian(7 * s + 1, k, p, scales=[0.3, 1.0, 2.0, 5.0]) for s in range(5)]
    init = np.array([0.1, 0.2, 0.3, 0.4]) if initial else None
    ref_inner = {"imtl_g": aggregation.IMTLGWeighting, "sdmgrad": aggregation.SDMGradWeighting}
    _cr_mogm_run(jacs, inner, ref_inner[inner](), alpha, init)
