"""Parity of ``sdmgrad`` with TorchJD's ``SDMGradWeighting`` (live reference).

TorchJD 0.18 ``SDMGradWeighting`` is stateful: its inner simplex weights
``_w`` warm-start the next call. Every comparison runs several consecutive
steps (5 or 6) from a fresh state on both sides and compares at every step:

* the inner weights: mtl_optax's ``state.inner_weights`` against TorchJD's
  ``_w`` after the call;
* the update: mtl_optax's update on the task gradients ``J3`` against
  ``weights @ J3`` with TorchJD's returned weights;
* the logged float32 ``state.weights`` against TorchJD's weights.

The matrix each side reads is built from the same Jacobians: in the
stochastic form TorchJD gets ``J1 @ J2.T`` (torch float64) and mtl_optax
``update(tree(J3), ..., cross_gramian=cross_gramian(tree(J1), tree(J2)))``; in
the deterministic form TorchJD gets ``J3 @ J3.T`` and mtl_optax no
``cross_gramian`` (its Gramian fallback). ``test_pure_rule_...`` also feeds the
very same matrices to both rules.

Tolerance, float64. The inner loop is a fixed number of long projected
momentum steps: with the default ``lr = 10`` (and with heavy momentum) it is
expansive between projections, so its output can be extremely sensitive to
its input. Two implementations doing the same float64 operations in different
summation orders (XLA vs torch) then differ by far more than the rounding of
one operation: over 900 calls from the same start, the worst difference of
the weights was 3.7e-8 at the defaults and 1e-3 with ``momentum = 0.9,
n_iter = 50``; through the warm start such a difference grows from step to
step (on one Gramian sequence: 1e-12, 1e-9, 0, 3e-11, 2e-8, then 1.7e-2 at
the sixth step). A fixed tolerance would be either meaningless or flaky, so
each step's tolerance is the reference's own float64 reproducibility on that
input:

    tol = 1e-10 + spread,

where ``spread`` is the largest change of TorchJD's weights (returned and
inner) when its input matrix is perturbed by 1e-14 relative (3 draws, about
45 ulps), from the same start. Observed differences are at most 0.13 times
``spread``; at most steps ``spread`` is 0 (the weights sit on a face of the
simplex, or the loop contracts) and the comparison is to 1e-10. The update
must agree to ``tol * sum_k |J_kj| + 1e-10 * sum_k |w_k| |J_kj|``.

With the defaults, each step of TorchJD starts from mtl_optax's previous inner
weights (``resync``): the comparison of those with TorchJD's ``_w`` after the
previous step checks the state, and the re-start keeps last-bit differences
from compounding across steps. With contractive hyperparameters (``lr <= 3``
with ``momentum = 0.5``: observed differences <= 3e-12 over 900 calls) the two
trajectories run fully independently, without re-starts, and every step's
spread is checked to be below 1e-9.

float32 and bfloat16 leaves are compared with the float64 reference on the
same (representable) gradients, see ``test_low_precision_leaves_...``.

TorchJD gives finite weights for every finite input tried here (a zero matrix
normalises to zero and leaves the weights unchanged), so there is no
non-finite reference result to contrast with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax._sdmgrad import cross_gramian, sdmgrad, sdmgrad_weights

from .conftest import (
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


BASE_ATOL = 1e-10  # weights (entries in [0, 1]); plus the reference's spread.
U_RTOL = 1e-10  # update rounding, relative to sum_k |w_k| |J_kj|.
PERTURBATION = 1e-14  # relative size of the input perturbations that measure the spread.


def _torchjd_weighting(hp, start=None):
    """A TorchJD ``SDMGradWeighting`` whose inner weights are ``start`` (uniform if None).

    The state is set by one call on a zero matrix (which normalises to zero and
    so leaves the uniform inner weights unchanged, but fixes TorchJD's state
    key), then by assigning its ``_w`` buffer.
    """
    hp = dict(hp)
    if hp.get("pref_vector") is not None:
        hp["pref_vector"] = torch.tensor(hp["pref_vector"], dtype=torch.float64)
    weighting = aggregation.SDMGradWeighting(**hp)
    if start is not None:
        k = len(start)
        weighting(torch.zeros((k, k), dtype=torch.float64))
        weighting._w = torch.tensor(np.asarray(start, np.float64))
    return weighting


def _reference_step(hp, start, matrix, rng):
    """TorchJD's weights and inner weights on ``matrix`` from ``start``, and their spread."""
    ref = _torchjd_weighting(hp, start)
    weights = to_numpy(ref(torch.from_numpy(matrix)))
    inner = to_numpy(ref._w)
    spread = 0.0
    for _ in range(3):
        noisy = matrix * (1 + PERTURBATION * rng.standard_normal(matrix.shape))
        other = _torchjd_weighting(hp, start)
        other_weights = to_numpy(other(torch.from_numpy(noisy)))
        spread = max(
            spread,
            float(np.max(np.abs(other_weights - weights))),
            float(np.max(np.abs(to_numpy(other._w) - inner))),
        )
    return weights, inner, spread


def _assert_update_close(update, weights, jac, w_tol, rtol):
    """``update ≈ weights @ jac``: a weight error of ``w_tol`` plus rounding."""
    bound = w_tol * np.abs(jac).sum(0) + rtol * (np.abs(weights) @ np.abs(jac)) + 1e-300
    err = np.abs(np.asarray(update, np.float64) - weights @ jac)
    assert np.all(err <= bound), f"max err/bound = {float(np.max(err / bound)):.3g}"


def _check_steps(steps, hp=None, *, resync=True, jit=False):
    """Runs ``steps`` through both libraries and compares every step.

    ``steps`` is a list of ``(J1, J2, J3)``; ``J1 = J2 = None`` means the
    deterministic form (TorchJD reads ``J3 @ J3.T``; mtl_optax gets no
    ``cross_gramian``). With ``resync`` TorchJD starts every step from
    mtl_optax's previous inner weights; without, it runs its own trajectory.
    Returns TorchJD's weights, the spread and mtl_optax's inner weights of every
    step.
    """
    hp = dict(hp or {})
    k = steps[0][2].shape[0]
    tx = sdmgrad(num_tasks=k, **hp)
    params = params_like(jacobian_to_tree(steps[0][2]))
    state = tx.init(params)
    assert state.inner_weights.dtype == jnp.float64
    update_fn = jax.jit(tx.update) if jit else tx.update
    rng = np.random.default_rng(0)
    ref_inner = np.full(k, 1.0 / k)
    history, spreads, ours = [], [], []
    for t, (j1, j2, j3) in enumerate(steps):
        if j1 is None:
            matrix, theirs = None, to_numpy(torch.from_numpy(j3) @ torch.from_numpy(j3).T)
        else:
            matrix = cross_gramian(jacobian_to_tree(j1), jacobian_to_tree(j2))
            theirs = to_numpy(torch.from_numpy(j1) @ torch.from_numpy(j2).T)
        start = np.asarray(state.inner_weights) if resync else ref_inner
        ref_weights, ref_inner, spread = _reference_step(hp, start, theirs, rng)
        tol = BASE_ATOL + spread
        update, state = update_fn(jacobian_to_tree(j3), state, params, cross_gramian=matrix)
        for leaf in jax.tree_util.tree_leaves(update):
            assert leaf.dtype == jnp.float64, "parity must run in float64"
        inner = np.asarray(state.inner_weights)
        assert inner.dtype == np.float64
        np.testing.assert_allclose(inner, ref_inner, rtol=0, atol=tol, err_msg=f"step {t}")
        _assert_update_close(tree_to_vector(update), ref_weights, j3, tol, U_RTOL)
        assert state.weights.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(state.weights), ref_weights, rtol=0, atol=1e-7 + tol, err_msg=f"step {t}"
        )
        history.append(ref_weights)
        spreads.append(spread)
        ours.append(inner)
    return np.stack(history), np.array(spreads), np.stack(ours)


def _stochastic_steps(seed, k, p, n=6, scales=None):
    return [
        tuple(random_jacobian(1000 * seed + 3 * t + i, k, p, scales=scales) for i in range(3))
        for t in range(n)
    ]


# Every K in {2, 3, 5, 10} with P in {100, 1000, 3000}.
CASES = [(10 * k + i, k, p) for k in (2, 3, 5, 10) for i, p in enumerate((100, 1000, 3000))]


@pytest.mark.parametrize(("seed", "k", "p"), CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in CASES])
def test_stochastic_form_matches_torchjd_over_six_steps(x64, seed, k, p):
    """Three independent batches per step: A = J1 J2^T, weights applied to J3."""
    history, spreads, _ = _check_steps(_stochastic_steps(seed, k, p), jit=(p == 1000))
    # The warm start matters: the weights change from step to step.
    assert np.ptp(history, axis=0).max() > 1e-3
    # Most steps are compared to 1e-10 (see the module docstring).
    assert np.mean(spreads < 1e-10) >= 0.5, spreads


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_deterministic_form_matches_torchjd_gramian_over_six_steps(x64, k):
    """Without cross_gramian: TorchJD on J J^T of the combined gradients."""
    steps = [(None, None, random_jacobian(500 + 10 * k + t, k, 400)) for t in range(6)]
    _check_steps(steps)


# Hyperparameters for which the inner loop contracts (independent trajectories).
CONTRACTIVE = {
    "one_step_no_momentum": dict(lr=0.1, momentum=0.0, n_iter=1),
    "lr_1": dict(lr=1.0),
    "short_steps": dict(lr=3.0, n_iter=5),
    "lr_1_lambda_0": dict(lr=1.0, lambda_=0.0),
    "lr_0.5_pref_off_simplex": dict(lr=0.5, pref_vector=[1.0, -0.5, 0.25, 2.0], lambda_=2.0),
}
# Other hyperparameters (TorchJD re-started from mtl_optax's state at every step).
EXPANSIVE = {
    "heavy_momentum_many_steps": dict(lr=1.0, momentum=0.9, n_iter=50),
    "lambda_0": dict(lambda_=0.0),
    "lambda_100": dict(lambda_=100.0),
    "pref_on_simplex": dict(pref_vector=[0.7, 0.1, 0.15, 0.05]),
}


@pytest.mark.parametrize("name", CONTRACTIVE)
def test_contractive_hyperparameters_follow_torchjd_trajectory(x64, name):
    """Both sides run 6 steps independently; every step agrees to 1e-10 (+ spread)."""
    for steps in (
        _stochastic_steps(7, 4, 200),
        [(None, None, j3) for _, _, j3 in _stochastic_steps(8, 4, 200)],
    ):
        _, spreads, _ = _check_steps(steps, CONTRACTIVE[name], resync=False)
        assert np.all(spreads < 1e-9), spreads  # so every step is compared to ~1e-9.


@pytest.mark.parametrize("name", EXPANSIVE)
def test_other_hyperparameters_match_torchjd(x64, name):
    _check_steps(_stochastic_steps(9, 4, 200), EXPANSIVE[name])


@pytest.mark.parametrize("name", ["defaults", *CONTRACTIVE, *EXPANSIVE])
def test_pure_rule_matches_torchjd_on_the_same_matrix(x64, name):
    """sdmgrad_weights and SDMGradWeighting fed the very same float64 matrices."""
    hp = {**CONTRACTIVE, **EXPANSIVE}.get(name, {})
    rng = np.random.default_rng(len(name))
    inner = np.full(4, 0.25)
    for t in range(6):
        j = rng.standard_normal((4, 300))
        # Alternate a cross matrix (not symmetric) and a Gramian.
        matrix = j @ (rng.standard_normal((4, 300)) if t % 2 else j).T
        expected, expected_inner, spread = _reference_step(hp, inner, matrix, rng)
        weights, inner = sdmgrad_weights(jnp.asarray(matrix), jnp.asarray(inner), **hp)
        tol = BASE_ATOL + spread
        np.testing.assert_allclose(np.asarray(weights), expected, rtol=0, atol=tol)
        np.testing.assert_allclose(np.asarray(inner), expected_inner, rtol=0, atol=tol)


def test_cross_gramian_matches_torch_product(x64):
    j1, j2 = random_jacobian(1, 5, 1234), random_jacobian(2, 5, 1234)
    ours = np.asarray(cross_gramian(jacobian_to_tree(j1), jacobian_to_tree(j2)))
    theirs = to_numpy(torch.from_numpy(j1) @ torch.from_numpy(j2).T)
    scale = np.abs(j1) @ np.abs(j2).T
    assert np.all(np.abs(ours - theirs) <= 1e-13 * scale)


# ---------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------


def _edge_jacobian(name):
    if name == "magnitudes_1e-8_1_1e4":
        name = "magnitudes"
    return edge_jacobian(
        name,
        seed=17,
        extra={
            # Gramian ~1e-13 << the 1e-8 of the normalisation.
            "all_tiny": lambda rng, p: random_jacobian(13, 3, p, scales=[1e-8, 2e-8, 3e-8]),
        },
    )


EDGE = (
    "K1",
    "identical",
    "opposite",
    "orthogonal",
    "collinear",
    "zero_task",
    "all_zero",
    "magnitudes_1e-8_1_1e4",
    "tiny_vs_huge",
    "all_tiny",
)


@pytest.mark.parametrize("case", EDGE)
def test_edge_cases_match_torchjd_deterministic(x64, case):
    """The same Jacobian five times: the warm start is exercised on a fixed problem."""
    jac = _edge_jacobian(case)
    history, spreads, ours = _check_steps([(None, None, jac)] * 5)
    assert np.all(np.isfinite(history))
    if case in ("identical", "opposite"):
        # Exactly symmetric problems: the exact inner gradient has equal entries,
        # so w stays at (1/2, 1/2) on both sides, bit for bit. For opposite
        # gradients the symmetric point is unstable at lr=10 (any asymmetry of
        # the input ends at a vertex: the spread is large), hence the exact check.
        np.testing.assert_array_equal(ours, 0.5)
        np.testing.assert_array_equal(history, 0.5)
    if case == "opposite":
        assert spreads.max() > 0.1
    if case == "K1":
        np.testing.assert_array_equal(history, 1.0)
    if case == "all_zero":  # A = 0: the inner weights never move.
        np.testing.assert_allclose(history, 1 / 3, rtol=1e-15)
    if case == "all_tiny":  # below the 1e-8 floor the inner steps shrink: w stays near 1/K.
        assert np.max(np.abs(history - 1 / 3)) < 0.05


@pytest.mark.parametrize("case", ["K1", "opposite", "zero_task", "magnitudes_1e-8_1_1e4"])
def test_edge_cases_match_torchjd_stochastic(x64, case):
    """The edge Jacobian as J3, with J1 and J2 noisy copies of it."""
    jac = _edge_jacobian(case)
    rng = np.random.default_rng(3)
    noisy = lambda: jac * (1 + 0.3 * rng.standard_normal(jac.shape))
    _check_steps([(noisy(), noisy(), jac) for _ in range(5)])


def test_cross_matrix_with_negative_diagonal_matches_torchjd(x64):
    """J2 ~ -J1: every A_kk < 0, so the clamp at 0 and the 1e-8 floor set the scale."""
    rng = np.random.default_rng(5)
    steps = []
    for _ in range(5):
        j1 = rng.standard_normal((3, 200)) * 1e-3
        j2 = -j1 + 1e-4 * rng.standard_normal((3, 200))
        steps.append((j1, j2, rng.standard_normal((3, 200))))
        assert np.all(np.diag(j1 @ j2.T) < 0)
    _check_steps(steps)


def test_cross_matrix_with_one_negative_diagonal_entry_matches_torchjd(x64):
    """A_00 < 0 < A_11, A_22: the clamp sets the scale from the two positive entries.

    Short steps (lr=0.05, 3 inner steps) keep the weights inside the simplex
    for the first calls, where they depend on the scale: the mean of
    sqrt(|A_kk|) instead of the clamp would give weights about 0.05 away.
    """
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(5):
        j1 = rng.standard_normal((3, 200))
        j2 = j1 * np.array([[-0.3], [1.0], [1.0]]) + 0.5 * rng.standard_normal((3, 200))
        steps.append((j1, j2, rng.standard_normal((3, 200))))
        diag = np.diag(j1 @ j2.T)
        assert diag[0] < 0 < diag[1:].min()
    _, spreads, ours = _check_steps(steps, dict(lr=0.05, n_iter=3), resync=False)
    assert np.all(spreads < 1e-12)
    assert np.all(ours[:3] > 0.05)  # inside the simplex, where the scale matters.


def test_large_k40_p1e5_matches_torchjd(x64):
    k, p = 40, 100_000
    j3 = random_jacobian(99, k, p)
    steps = [
        (random_jacobian(70 + 3 * t, k, p), random_jacobian(71 + 3 * t, k, p), j3) for t in range(5)
    ]
    _check_steps(steps)


# ---------------------------------------------------------------------------
# float32 and bfloat16 leaves against the float64 reference.
# ---------------------------------------------------------------------------


def _representable(jac, dtype):
    """``jac`` rounded to ``dtype`` and back to float64: both sides see these values."""
    return np.asarray(jnp.asarray(jac, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def _low_precision_run(dtype, jac_steps, hp):
    """mtl_optax (x64 off, leaves in ``dtype``) against TorchJD (float64), step by step.

    Yields mtl_optax's logged weights and flattened update, TorchJD's weights,
    and the Gramian TorchJD read.
    """
    assert not jax.config.read("jax_enable_x64")
    k = jac_steps[0].shape[0]
    tx = sdmgrad(num_tasks=k, **hp)
    update_fn = jax.jit(tx.update)
    params = jax.tree.map(lambda x: x.astype(dtype), params_like(jacobian_to_tree(jac_steps[0])))
    state = tx.init(params)
    ref = _torchjd_weighting(hp)
    for jac in jac_steps:
        tree = jax.tree.map(lambda x: x.astype(dtype), jacobian_to_tree(jac))
        update, state = update_fn(tree, state, params)
        for leaf in jax.tree_util.tree_leaves(update):
            assert leaf.dtype == dtype
        gram = jac @ jac.T
        yield (
            np.asarray(state.weights, np.float64),
            tree_to_vector(jax.tree.map(lambda x: x.astype(jnp.float32), update)),
            to_numpy(ref(torch.from_numpy(gram))),
            gram,
        )


def _float32_spread(gram, hp, seed):
    """How far TorchJD's weights move under float32-size perturbations of its input.

    Four perturbations ``A * (1 + 1e-6 eps)`` (about 8 float32 ulps, the size
    of the float32 accumulation error of a Gramian over a few hundred entries),
    from a fresh state, symmetrised like a Gramian.
    """
    rng = np.random.default_rng(seed)
    base = to_numpy(_torchjd_weighting(hp)(torch.from_numpy(gram)))
    spread = 0.0
    for _ in range(4):
        noisy = gram * (1 + 1e-6 * rng.standard_normal(gram.shape))
        noisy = (noisy + noisy.T) / 2
        other = to_numpy(_torchjd_weighting(hp)(torch.from_numpy(noisy)))
        spread = max(spread, float(np.max(np.abs(other - base))))
    return spread


# Rounding of the output leaves: 4 ulps of the output dtype.
OUT_RTOL = {jnp.float32: 4 * 2.0**-23, jnp.bfloat16: 4 * 2.0**-8}
LOW_CASES = [(seed, k) for seed, k in enumerate((2, 3, 5, 10, 4, 6))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("seed", "k"), LOW_CASES, ids=[f"s{s}-K{k}" for s, k in LOW_CASES])
def test_low_precision_leaves_match_float64_reference_contractive(dtype, seed, k):
    """lr=0.5: a contractive inner loop, so float32 weights agree to 1e-6 over 5 steps.

    The Gramian is accumulated in float32 (bfloat16 products are exact in
    float32) and the weights are computed in float32: observed worst
    difference 1.3e-7 from the float64 reference; tolerance 1e-6. The update
    is compared with ``weights @ J`` at the weights' tolerance plus the
    rounding of the output leaves.
    """
    hp = dict(lr=0.5)
    rng = np.random.default_rng(seed)
    steps = [_representable(rng.standard_normal((k, 300)), dtype) for _ in range(5)]
    for (ours_w, update, ref_w, _), jac in zip(
        _low_precision_run(dtype, steps, hp), steps, strict=True
    ):
        np.testing.assert_allclose(ours_w, ref_w, rtol=0, atol=1e-6)
        _assert_update_close(update, ref_w, jac, 1e-6, OUT_RTOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("seed", "k"), LOW_CASES, ids=[f"s{s}-K{k}" for s, k in LOW_CASES])
def test_low_precision_leaves_match_float64_reference_defaults(dtype, seed, k):
    """Default hyperparameters (lr=10): tolerance from the reference's own sensitivity.

    With lr=10 the weights can depend very strongly on the matrix (see the
    module docstring): a float32 rounding of the Gramian moves them by up to
    0.5 on some inputs, in TorchJD as in mtl_optax. The tolerance is
    therefore ``1e-6 + 4 * spread``, where ``spread`` is how far TorchJD's
    own float64 weights move when its input is perturbed by 1e-6 relative
    (``_float32_spread``); observed errors are at most 1.3 times ``spread``.
    One step from a fresh state.
    """
    jac = _representable(np.random.default_rng(100 + seed).standard_normal((k, 300)), dtype)
    ((ours_w, update, ref_w, gram),) = list(_low_precision_run(dtype, [jac], {}))
    tol = 1e-6 + 4 * _float32_spread(gram, {}, seed)
    np.testing.assert_allclose(ours_w, ref_w, rtol=0, atol=tol)
    _assert_update_close(update, ref_w, jac, tol, OUT_RTOL[dtype])


def test_registry_builds_the_same_method(x64):
    jac = random_jacobian(3, 3, 50)
    tx = mtl_optax.get("sdmgrad", num_tasks=3, lambda_=0.5, lr=1.0)
    params = params_like(jacobian_to_tree(jac))
    update, _ = tx.update(jacobian_to_tree(jac), tx.init(params), params)
    weights = to_numpy(
        aggregation.SDMGradWeighting(lambda_=0.5, lr=1.0)(torch.from_numpy(jac @ jac.T))
    )
    _assert_update_close(tree_to_vector(update), weights, jac, BASE_ATOL, U_RTOL)
