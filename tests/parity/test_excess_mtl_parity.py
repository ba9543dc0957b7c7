"""Parity of ``excess_mtl`` with TorchJD, live, over several steps with the state carried.

TorchJD 0.18 ``ExcessMTL(robust_step_size, n_warmup_steps)`` is a stateful
aggregator of the ``K x P`` Jacobian: it accumulates the squared task
gradients, estimates each task's excess risk, keeps the weights uniform during
the warmup, sets the baseline at the first call after it, and moves the
weights by a log-space softmax step; it returns ``w @ J``.
``ExcessMTLWeighting`` (the same rule) returns the weights. Both sides do the
same float64 operations in different orders (the squared terms are written
``|g| (|g| / h)`` here, ``g^2 / h`` there), so they agree to rounding: the
weights to 1e-12 relative, entry by entry, and the update to 1e-12 of
``sum_k |w_k| |J_kj|`` (:func:`assert_combination_close`), over 6 steps
(each step's error is carried into the next through the weights and the
state). In float32 (and with bfloat16 leaves, whose values are computed in
float32 here and given to TorchJD as float32), 1e-5 relative.
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
    params_like,
    random_jacobian,
    reference,
    to_numpy,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")


@functools.cache
def _method(k, eta, n_warmup):
    """``excess_mtl`` and its jitted update; ``n_warmup=None``: the factory's default."""
    warmup = {} if n_warmup is None else {"n_warmup_steps": n_warmup}
    tx = mtl_optax.excess_mtl(robust_step_size=eta, num_tasks=k, **warmup)
    return tx, jax.jit(tx.update)


def _run(jacs, eta, n_warmup, torch_warmup=None):
    """Both sides over the steps: ours (weights, update) and TorchJD's (weights, update).

    TorchJD gets ``torch_warmup`` warmup steps, by default ``n_warmup``.
    """
    k = jacs[0].shape[0]
    tx, step = _method(k, eta, n_warmup)
    torch_warmup = n_warmup if torch_warmup is None else torch_warmup
    weighting = aggregation.ExcessMTLWeighting(robust_step_size=eta, n_warmup_steps=torch_warmup)
    aggregator = aggregation.ExcessMTL(robust_step_size=eta, n_warmup_steps=torch_warmup)
    tree = jacobian_to_tree(jacs[0])
    params = params_like(tree)
    state = tx.init(params)
    ours, theirs = [], []
    for jac in jacs:
        update, state = step(jacobian_to_tree(jac), state, params)
        ours.append((np.asarray(state.alpha, np.float64), tree_to_vector(update)))
        jt = torch.from_numpy(jac)
        theirs.append((to_numpy(weighting(jt)), to_numpy(aggregator(jt))))
    return ours, theirs


def _assert_steps_close(ours, theirs, jacs, rtol=1e-12):
    for t, ((w, u), (w_ref, u_ref), jac) in enumerate(zip(ours, theirs, jacs, strict=True)):
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(u)), t
        np.testing.assert_allclose(w, w_ref, rtol=rtol, atol=0, err_msg=f"step {t}")
        assert_combination_close(u, u_ref, w_ref, jac, rtol=rtol)


# (K, P, n_warmup_steps, robust_step_size): each of n_warmup_steps in {0 (TorchJD's
# default), 1 (mtl_optax's), 2} with each of robust_step_size in {1.0, 0.3}, at
# several K and P.
CASES = [
    (2, 30, 0, 1.0),
    (3, 301, 2, 0.3),
    (5, 120, 0, 0.3),
    (10, 400, 2, 1.0),
    (4, 77, 2, 1.0),
    (3, 50, 1, 1.0),
    (6, 200, 1, 0.3),
]


@pytest.mark.parametrize(
    ("k", "p", "n_warmup", "eta"),
    CASES,
    ids=[f"K{c[0]}-P{c[1]}-warmup{c[2]}-eta{c[3]}" for c in CASES],
)
def test_matches_torchjd_over_steps(x64, k, p, n_warmup, eta):
    """Six steps, rows of scales 0.1 to 3, entries of order 1/P (excess risks of order 1).

    Weights 1e-12 relative per entry, update 1e-12 of sum_k |w_k| |J_kj|.
    """
    rng = np.random.default_rng(k * p)
    scales = 10.0 ** rng.uniform(-1, 0.5, k) * (3.0 / p)
    jacs = [random_jacobian(100 * k + s, k, p, scales=scales) for s in range(6)]
    ours, theirs = _run(jacs, eta, n_warmup)
    _assert_steps_close(ours, theirs, jacs)
    # The weights moved (the test would not see a rule that keeps 1/K).
    assert np.abs(ours[-1][0] - 1.0 / k).max() > 1e-3


def _zero_then_nonzero(rng, p):
    jac = rng.standard_normal((3, p))
    jac[1] = 0.0
    return jac


@pytest.mark.parametrize("n_warmup", [0, 1])
@pytest.mark.parametrize("case", [*EDGE_CASE_NAMES, "zero_then_nonzero"])
def test_edge_cases_match_torchjd(x64, case, n_warmup):
    """Four steps of the edge case scaled by 1, 0.5, 2, 1 (entries of order 1/P).

    With TorchJD's default (no warmup) and mtl_optax's (one warmup step, on
    both sides). Without warmup, ``magnitudes`` and ``tiny_vs_huge`` (rows of
    1e-8 and 1e4) saturate the first step on the large task; ``zero_task``
    keeps a zero baseline; ``zero_then_nonzero``: task 1 is zero at the first step only, so its
    later excess risks are divided by 1e-7 and take all the weight. Weights
    1e-12 relative per entry, update 1e-12 of sum_k |w_k| |J_kj|.
    """
    p = 301
    jac = edge_jacobian(case, seed=3, num_params=p, extra={"zero_then_nonzero": _zero_then_nonzero})
    jac = jac / p
    jacs = [c * jac for c in (1.0, 0.5, 2.0, 1.0)]
    if case == "zero_then_nonzero":
        jacs[0] = jacs[0].copy()
        jacs[1:] = [j.copy() for j in jacs[1:]]
        for j in jacs[1:]:
            j[1] = jac[0] * 0.5
    ours, theirs = _run(jacs, 1.0, n_warmup)
    _assert_steps_close(ours, theirs, jacs)
    if case == "zero_then_nonzero":
        np.testing.assert_array_equal(ours[-1][0], [0.0, 1.0, 0.0])


def test_k40_p1e5_matches_torchjd(x64):
    """K = 40, P = 1e5, three steps with a warmup of one: 1e-12 as above."""
    k, p = 40, 100_000
    scales = np.linspace(0.5, 2.0, k) / p
    jacs = [random_jacobian(500 + s, k, p, scales=scales) for s in range(3)]
    ours, theirs = _run(jacs, 1.0, 1)
    _assert_steps_close(ours, theirs, jacs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_and_bfloat16_leaves_match_torchjd_in_float32(dtype):
    """Float32 on both sides (bfloat16 leaves: their float32 values to TorchJD), 1e-5 relative."""
    k, p = 3, 120
    jacs = [
        random_jacobian(40 + s, k, p, scales=np.array([0.3, 1.0, 3.0]) * 3 / p) for s in range(4)
    ]
    # np.array: a writable copy, which torch.from_numpy wants.
    jacs = [np.array(jnp.asarray(j, dtype).astype(jnp.float32), np.float32) for j in jacs]
    tx, step = _method(k, 1.0, 1)  # mtl_optax's default warmup, given to TorchJD
    weighting = aggregation.ExcessMTLWeighting(n_warmup_steps=1)
    params = {"w": jnp.zeros((p,), dtype)}
    state = tx.init(params)
    for t, jac in enumerate(jacs):
        update, state = step({"w": jnp.asarray(jac, dtype)}, state, params)
        assert update["w"].dtype == jnp.dtype(dtype) and state.alpha.dtype == jnp.float32
        w_ref = to_numpy(weighting(torch.from_numpy(jac)))
        np.testing.assert_allclose(np.asarray(state.alpha), w_ref, rtol=1e-5, err_msg=f"step {t}")


def test_default_is_torchjd_with_one_warmup_step_and_not_torchjds_default(x64):
    """mtl_optax's default is TorchJD's ``ExcessMTL(n_warmup_steps=1)``: 6 steps, 1e-12 as above.

    TorchJD's own default (``n_warmup_steps=0``) differs from the first step
    on: with tasks of scales 0.01, 1 and 10, its first step on the unscaled
    excess risks gives the task of scale 10 a weight above 0.99, which it
    keeps; mtl_optax's first step sets the baseline and keeps 1/K, as the
    official code's first call does (tests/test_excess_mtl.py checks the
    official rule).
    """
    k, p = 3, 90
    scales = np.array([0.01, 1.0, 10.0]) * 3 / p
    jacs = [random_jacobian(700 + s, k, p, scales=scales) for s in range(6)]
    ours, theirs = _run(jacs, 1.0, None, torch_warmup=1)  # the factory's defaults
    _assert_steps_close(ours, theirs, jacs)
    explicit, _ = _run(jacs, 1.0, 1)  # n_warmup_steps=1 given: the same program, the same bits
    for (w, u), (w_1, u_1) in zip(ours, explicit, strict=True):
        np.testing.assert_array_equal(w, w_1)
        np.testing.assert_array_equal(u, u_1)
    np.testing.assert_array_equal(ours[0][0], np.full(k, 1 / k))
    assert ours[-1][0][2] < 0.5
    torchjd_default = aggregation.ExcessMTLWeighting()
    defaults = [to_numpy(torchjd_default(torch.from_numpy(jac))) for jac in jacs]
    assert defaults[0][2] > 0.99 and defaults[-1][2] > 0.99
