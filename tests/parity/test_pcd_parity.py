"""Parity of ``pcd`` with TorchJD, live, in float64, over several steps with the EMA carried.

TorchJD 0.18 ``PCDWeighting(tau, beta, eps)`` (a stateful weighting of the
Gramian) and ``PCD(tau, beta, eps)`` (the aggregator of the Jacobian): the
EMA of the squared gradient norms is updated at every call, the QP on the
normalized Gramian is solved by Goldfarb and Idnani's dual active-set method
(on the CPU, in float64, in Python), and the weights are rescaled to the
primary gradient's norm. mtl_optax runs the same algorithm in a jitted
``lax.while_loop`` in float64 with the same tolerances, so both are exact up
to rounding. Each run feeds the same Jacobians to a fresh instance of each
side and carries both states over the steps.

Tolerances (float64): the update against ``PCD(J)`` and against
``w_ref @ J`` at 1e-10 of ``sum_k |w_k| |J_kj|`` (``assert_combination_close``);
the weights task by task through their contributions, ``|w_k - w_ref_k|
||g_k|| <= 1e-10 sum_k |w_ref_k| ||g_k||`` (a weight of a tiny or zero
gradient is otherwise unconstrained); observed below 1e-12 for the weights
and 4e-14 for the updates. A NaN step gives NaN on both sides and leaves
both EMAs unchanged.

The hyperparameters are arguments of the jitted step (the factory takes traced
values, as under ``inject_hyperparams``), so each ``(K, P)`` compiles once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax

from .conftest import (
    EDGE_CASE_NAMES,
    assert_combination_close,
    edge_jacobian,
    jacobian_to_tree,
    reference,
    to_numpy,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")
RTOL = 1e-10


@functools.cache
def _step(k):
    """Jitted: (update, float64 weights, new state) of ``pcd`` for ``k`` tasks."""

    def step(tree, state, tau, beta, eps):
        tx = mtl_optax.pcd(tau=tau, beta=beta, eps=eps, num_tasks=k)
        update, new_state = tx.update(tree, state)
        weights, _ = tx.weighting.weights(
            mtl_optax.gramian(tree), state, None, num_tasks=k, dtype=jnp.float64
        )
        return update, weights, new_state

    return jax.jit(step)


def _compare(jacs, tau=0.02, beta=0.999, eps=1e-8):
    """Both sides over the steps; returns our weights per step."""
    k = jacs[0].shape[0]
    tau_t = torch.tensor(tau, dtype=torch.float64) if np.ndim(tau) else tau
    weighting = aggregation.PCDWeighting(tau=tau_t, beta=beta, eps=eps)
    aggregator = aggregation.PCD(tau=tau_t, beta=beta, eps=eps)
    state = mtl_optax.pcd(num_tasks=k).init(None)
    out = []
    for t, jac in enumerate(jacs):
        tree = jacobian_to_tree(np.nan_to_num(jac, nan=0.0))
        if not np.all(np.isfinite(jac)):  # NaN in the last column only: the leaf c_scale
            assert np.all(np.isfinite(jac[:, :-1]))
            tree["c_scale"] = jnp.asarray(jac[:, -1])
        # tau as a vector on our side: one compilation per (K, P) for scalar and vector taus.
        taus = jnp.broadcast_to(jnp.asarray(tau, jnp.float64), (k - 1,))
        update, w, state = _step(k)(tree, state, taus, beta, eps)
        update, w = tree_to_vector(update), np.asarray(w)
        jt = torch.from_numpy(jac)
        w_ref = to_numpy(weighting(jt @ jt.T))
        u_ref = to_numpy(aggregator(jt))
        msg = f"step {t}: ours {w}, torchjd {w_ref}"
        if not np.all(np.isfinite(jac)):
            assert np.all(np.isnan(w)) and np.all(np.isnan(w_ref)), msg
            assert np.all(np.isnan(update)) and np.all(np.isnan(u_ref)), msg
            out.append(w)
            continue
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(update)), msg
        norms = np.linalg.norm(jac, axis=1)
        bound = RTOL * max(np.abs(w_ref) @ norms, np.finfo(float).tiny)
        assert np.all(np.abs(w - w_ref) * norms <= bound), msg
        assert_combination_close(update, w_ref @ jac, w_ref, jac, rtol=RTOL)
        assert_combination_close(update, u_ref, w_ref, jac, rtol=RTOL)
        out.append(w)
    # Same EMA (1e-13: the squared norms are summed in different orders) and step count.
    np.testing.assert_allclose(
        np.asarray(state.sq_norm_ema), to_numpy(weighting._sq_norm_ema), rtol=1e-13, atol=0
    )
    assert int(state.count) == int(weighting._n_steps)
    return out


def _conflicting(seed, k, p, n_steps, k_over_p=False):
    """``n_steps`` Jacobians: secondary rows pulled against the primary one, task scales
    from 1e-2 to 1e2 that drift from step to step (so the EMA is not the current norm)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((k, p))
    pull = rng.uniform(0.0, 2.0, (k, 1))
    pull[0] = 0.0
    base -= pull * base[0] * np.linalg.norm(base, axis=1, keepdims=True) / np.linalg.norm(base[0])
    scales = 10.0 ** rng.uniform(-2, 2, (k, 1))
    return [
        (base + 0.3 * rng.standard_normal((k, p))) * scales * 10.0 ** rng.uniform(-0.5, 0.5, (k, 1))
        for _ in range(n_steps)
    ]


# (K, P, tau, beta): K > P (K = 8, P = 5) gives dependent and infeasible constraint sets.
CASES = [
    (2, 301, 0.02, 0.999),
    (2, 301, 0.6, 0.5),
    (3, 301, 0.02, 0.9),
    (3, 301, 1.0, 0.0),
    (5, 40, 0.3, 0.9),
    (8, 5, 0.1, 0.999),
    (8, 5, 0.0, 0.5),
]


@pytest.mark.parametrize(
    ("k", "p", "tau", "beta"), CASES, ids=[f"K{c[0]}-P{c[1]}-tau{c[2]}-beta{c[3]}" for c in CASES]
)
def test_random_conflicting_jacobians_match_torchjd_over_steps(x64, k, p, tau, beta):
    """Six seeds of four steps each, the EMA carried; at least one constraint binds."""
    active = 0
    for seed in range(6):
        weights = _compare(_conflicting(100 * k + seed, k, p, 4), tau=tau, beta=beta)
        active += sum(np.count_nonzero(w[1:]) for w in weights)
    if tau > 0:
        assert active > 0  # the test sees the solver, not only w = (1, 0, ...)


def test_vector_tau_matches_torchjd(x64):
    """One tau per secondary task (K = 5), six seeds of four steps."""
    taus = np.array([0.0, 0.05, 0.4, 0.9])
    for seed in range(6):
        _compare(_conflicting(7 + seed, 5, 40, 4), tau=taus, beta=0.9)


def test_infeasible_and_non_finite_steps_match_torchjd(x64):
    """Two opposite secondary tasks (infeasible: w = e_1 on both sides) and a NaN step in the
    middle of a run (NaN on both sides, both EMAs unchanged: the next steps still agree)."""
    jacs = _conflicting(3, 3, 301, 5)
    jacs[1] = jacs[1].copy()
    jacs[1][2] = -2.0 * jacs[1][1]
    jacs[2] = jacs[2].copy()
    jacs[2][1, -1] = np.nan
    weights = _compare(jacs, tau=0.3, beta=0.9)
    np.testing.assert_array_equal(weights[1], [1.0, 0.0, 0.0])


@pytest.mark.parametrize("case", EDGE_CASE_NAMES)
def test_edge_cases_match_torchjd(x64, case):
    """The edge cases of the issue, three steps each, tau = 0.02 and tau = 0.5."""
    jac = edge_jacobian(case, seed=5)
    for tau in (0.02, 0.5):
        _compare([jac, 0.5 * jac, jac], tau=tau, beta=0.9)


def test_k40_p1e5_matches_torchjd(x64):
    """K = 40, P = 1e5: two steps; most constraints bind."""
    jacs = _conflicting(40, 40, 100_000, 2)
    weights = _compare(jacs, tau=0.05)
    assert np.count_nonzero(weights[-1][1:]) > 10
