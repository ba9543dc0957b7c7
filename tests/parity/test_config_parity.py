"""Parity of ``conflict_free`` (ConFIG) and ``m_conflict_free`` (M-ConFIG) with the references.

References, run live in float64 on the same inputs:

* conflictfree 0.1.8: ``ConFIG_update`` (general path, ``torch.linalg.lstsq`` or
  ``pinv`` on the ``K x P`` unit gradients), ``ConFIG_update_double`` (the
  two-task closed form), every length model of ``length_model.py``, weights
  through a ``WeightModel``, and ``PseudoMomentumOperator`` (M-ConFIG).
* torchjd 0.18 ``ConFIG`` (projection length, ``pinv``, ``pref_vector``).
* An exact float64 computation of the definition, independent of mtl_optax's
  Gramian route: ``np.linalg.lstsq`` (SVD) on the ``K x P`` unit gradients.

mtl_optax gets the Jacobian split into a pytree of three leaves
(``conftest.jacobian_to_tree``). Tolerance in float64: ``rtol = 1e-10``
relative to the largest entry of the reference (the observed differences are
below 1e-13; the K x K route squares the condition number of the unit
gradients, which is small for these inputs).

Where a reference is wrong (REFERENCE_QUIRKS.md: torchjd returns zero at
P = 1e7 in float32, conflictfree's general path gives a wrong direction at
large P in float32) or produces NaN / normalised rounding noise (zero-norm
gradients with the track models or the two-task form, opposite or identical
gradients), the tests assert mtl_optax's documented result and show where the
reference differs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax

from .conftest import (
    jacobian_to_tree,
    params_like,
    random_jacobian,
    reference,
    torch_default_dtype,
    torch_default_float64,
    tree_to_vector,
)

torch = reference("torch")
cf_grad = reference("conflictfree.grad_operator")
cf_length = reference("conflictfree.length_model")
cf_weight = reference("conflictfree.weight_model")
cf_momentum = reference("conflictfree.momentum_operator")
aggregation = reference("torchjd.aggregation")


@pytest.fixture
def f64(x64):
    """float64 in JAX and as torch's default dtype.

    conflictfree builds its weights with ``torch.ones`` (and the momentum
    operator its buffers with ``torch.zeros``) in the default dtype; with
    float32 weights and float64 gradients ``torch.linalg.lstsq`` refuses the
    mixed dtypes.
    """
    with torch_default_float64():
        yield


RTOL = 1e-10


def _assert_close(actual, expected, rtol=RTOL, what=""):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    err = np.max(np.abs(actual - expected))
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3e} > {rtol} * {scale:.3e}"


# ---------------------------------------------------------------------------
# The three sides.
# ---------------------------------------------------------------------------


def _ours(jac, *, dtype=None, **hparams):
    """mtl_optax's update on ``jac`` (a pytree of three leaves), as a float64 vector."""
    tree = jacobian_to_tree(jac)
    if dtype is not None:
        tree = jax.tree.map(lambda x: x.astype(dtype), tree)
    tx = mtl_optax.get("conflict_free", **hparams)
    params = params_like(tree)
    update, state = tx.update(tree, tx.init(params), params)
    for leaf, param in zip(jax.tree.leaves(update), jax.tree.leaves(params), strict=True):
        assert leaf.dtype == param.dtype
    return tree_to_vector(update).astype(np.float64), state


def _weight_model(weights):
    if weights is None:
        return cf_weight.EqualWeight()

    class Fixed(cf_weight.WeightModel):
        def get_weights(self, gradients, losses=None, device=None):
            return torch.tensor(weights, dtype=gradients.dtype)

    return Fixed()


def _length_model(name, track_id=None):
    return {
        "projection": cf_length.ProjectionLength,
        "track_min": cf_length.TrackMinimum,
        "track_max": cf_length.TrackMaximum,
        "track_harmonic": cf_length.TrackHarmonicAverage,
        "track_arithmetic": cf_length.TrackArithmeticAverage,
        "track_geometric": cf_length.TrackGeometricAverage,
        "track_specific": lambda: cf_length.TrackSpecific(track_id),
    }[name]()


def _conflictfree(jac, weights=None, length_model="projection", track_id=None, **kwargs):
    """conflictfree's general path ``ConFIG_update``."""
    return cf_grad.ConFIG_update(
        torch.from_numpy(np.array(jac)),  # a writable copy (jac may be a view of a jax array)
        weight_model=_weight_model(weights),
        length_model=_length_model(length_model, track_id),
        **kwargs,
    ).numpy()


def _conflictfree_double(jac, weights=None, length_model="projection", track_id=None):
    """conflictfree's two-task closed form ``ConFIG_update_double``."""
    g = torch.from_numpy(jac)
    return cf_grad.ConFIG_update_double(
        g[0],
        g[1],
        weight_model=_weight_model(weights),
        length_model=_length_model(length_model, track_id),
    ).numpy()


def _torchjd(jac, weights=None):
    pref = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    return aggregation.ConFIG(pref_vector=pref)(torch.from_numpy(jac)).numpy()


def _exact(jac, weights=None, length_model="projection", track_id=None):
    """The definition in float64 on the K x P unit gradients (SVD least squares)."""
    jac = np.asarray(jac, np.float64)
    k = jac.shape[0]
    norms = np.linalg.norm(jac, axis=1)
    units = np.divide(jac, norms[:, None], out=np.zeros_like(jac), where=norms[:, None] > 0)
    w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    d = np.linalg.lstsq(units, w, rcond=None)[0]
    d_hat = d / np.linalg.norm(d)
    if length_model == "projection":
        length = np.sum(jac @ d_hat)
    else:
        tau = {
            "track_min": np.min(norms),
            "track_max": np.max(norms),
            "track_harmonic": k / np.sum(1 / norms),
            "track_arithmetic": np.mean(norms),
            "track_geometric": np.exp(np.mean(np.log(norms))),
            "track_specific": norms[track_id] if track_id is not None else None,
        }[length_model]
        length = tau * np.sum(units @ d_hat)
    return length * d_hat


def _cosines(jac, u):
    jac, u = np.asarray(jac, np.float64), np.asarray(u, np.float64)
    return jac @ u / np.linalg.norm(jac, axis=1) / np.linalg.norm(u)


# ---------------------------------------------------------------------------
# Random Jacobians: every reference, default options.
# ---------------------------------------------------------------------------

CASES = [(10 * k + i, k, p) for k in (2, 3, 5, 10) for i, p in enumerate((100, 2000))] + [
    (400, 40, 3000)
]


@pytest.mark.parametrize(("seed", "k", "p"), CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in CASES])
def test_random_jacobians_match_conflictfree_torchjd_and_definition(f64, seed, k, p):
    jac = random_jacobian(seed, k, p)
    exact = _exact(jac)
    ours, state = _ours(jac)  # K = 2: the closed form.
    general, _ = _ours(jac, two_task_closed_form=False)
    _assert_close(ours, exact, what="definition")
    _assert_close(general, exact, what="general path vs definition")
    _assert_close(ours, _conflictfree(jac), what="conflictfree ConFIG_update")
    _assert_close(ours, _conflictfree(jac, use_least_square=False), what="conflictfree pinv")
    _assert_close(ours, _torchjd(jac), what="torchjd ConFIG")
    if k == 2:
        _assert_close(ours, _conflictfree_double(jac), what="conflictfree ConFIG_update_double")
    # The logged coefficients give the update.
    _assert_close(np.asarray(state.weights, np.float64) @ jac, ours, rtol=1e-6, what="weights")


# ---------------------------------------------------------------------------
# Length models and weights.
# ---------------------------------------------------------------------------

LENGTHS = [
    ("projection", None),
    ("track_min", None),
    ("track_max", None),
    ("track_harmonic", None),
    ("track_arithmetic", None),
    ("track_geometric", None),
    ("track_specific", 1),
    ("track_specific", -1),
]


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize(
    ("length_model", "track_id"), LENGTHS, ids=[f"{m}{'' if i is None else i}" for m, i in LENGTHS]
)
def test_length_models_and_weights_match_conflictfree(f64, length_model, track_id, k):
    """Each length model, with equal and with random weights, on gradients of spread norms."""
    rng = np.random.default_rng(100 + k)
    jac = random_jacobian(200 + k, k, 400, scales=np.exp(rng.uniform(-2, 2, k)))
    for weights in (None, rng.uniform(0.2, 3.0, k).tolist()):
        opts = {"weights": weights, "length_model": length_model, "track_id": track_id}
        ours, _ = _ours(jac, **opts)
        _assert_close(ours, _exact(jac, **opts), what=f"definition, weights={weights}")
        _assert_close(ours, _conflictfree(jac, **opts), what=f"ConFIG_update, weights={weights}")
        if k == 2:
            _assert_close(ours, _conflictfree_double(jac, **opts), what="ConFIG_update_double")
            general, _ = _ours(jac, two_task_closed_form=False, **opts)
            _assert_close(general, _conflictfree(jac, **opts), what="general path, K=2")


@pytest.mark.parametrize(("seed", "k"), [(1, 2), (2, 3), (3, 5), (4, 10)])
def test_pinv_solver_matches_torchjd_pref_vector_and_conflictfree_pinv(f64, seed, k):
    jac = random_jacobian(300 + seed, k, 700)
    weights = np.random.default_rng(seed).uniform(0.5, 2.0, k).tolist()
    ours, _ = _ours(jac, weights=weights, solver="pinv", two_task_closed_form=False)
    _assert_close(ours, _torchjd(jac, weights), what="torchjd ConFIG(pref_vector)")
    _assert_close(
        ours, _conflictfree(jac, weights, use_least_square=False), what="conflictfree pinv"
    )
    # The update's cosines to the task gradients are proportional to the weights.
    cos = _cosines(jac, ours)
    np.testing.assert_allclose(cos / cos[0], np.asarray(weights) / weights[0], rtol=1e-10)


# ---------------------------------------------------------------------------
# Edge cases.
# ---------------------------------------------------------------------------


def _pair(name, p=301):
    rng = np.random.default_rng(7)
    g, h = rng.standard_normal(p), rng.standard_normal(p)
    return {
        "identical": np.stack([g, g]),
        "opposite": np.stack([g, -g]),
        "opposite_scaled": np.stack([g, -3.0 * g]),
        "orthogonal": np.stack([g, h - (g @ h) / (g @ g) * g]),
    }[name]


def test_k1_is_the_task_gradient(f64):
    jac = random_jacobian(5, 1, 257)
    ours, _ = _ours(jac)
    _assert_close(ours, jac[0], rtol=1e-14)
    _assert_close(ours, _conflictfree(jac), rtol=1e-14)
    _assert_close(ours, _torchjd(jac), rtol=1e-14)


def test_orthogonal_pair_matches_every_reference(f64):
    """Orthogonal gradients: the update is their sum (equal cosines 1/sqrt(2) of each unit)."""
    jac = _pair("orthogonal")
    ours, _ = _ours(jac)
    norms = np.linalg.norm(jac, axis=1)
    d = jac[0] / norms[0] + jac[1] / norms[1]
    d = d / np.linalg.norm(d)
    _assert_close(ours, np.sum(jac @ d) * d, rtol=1e-13)
    for ref in (_conflictfree(jac), _conflictfree_double(jac), _torchjd(jac)):
        _assert_close(ours, ref)


def test_identical_pair_gives_their_sum_where_the_two_task_form_does_not(f64):
    """g, g: the unit gradients coincide, d = u and the update is 2 g (projection length).

    conflictfree's general path and torchjd agree. ``ConFIG_update_double`` builds
    the components of each gradient orthogonal to the other, which are rounding
    noise here, and normalises them: a different (arbitrary) answer. mtl_optax's
    two-task form detects the collinear pair and takes the general path.
    """
    jac = _pair("identical")
    ours, _ = _ours(jac)
    _assert_close(ours, 2 * jac[0], rtol=1e-13)
    _assert_close(ours, _conflictfree(jac))
    _assert_close(ours, _torchjd(jac))
    double = _conflictfree_double(jac)
    assert np.max(np.abs(double - ours)) > 1e-3 * np.max(np.abs(ours))


def test_opposite_pairs_give_zero(f64):
    """g, -c g with equal weights: no direction has equal cosines to both but 0, so d = 0.

    mtl_optax returns exactly zero (the weights are orthogonal to the range of the
    cosine matrix). For c = 1 conflictfree's lstsq also gives exactly zero; for
    c = 3 its least-squares solution is rounding noise along g, which it
    normalises: it returns the projection of the sum, -2 g. torchjd's normalize
    (with its absolute eps = 1e-12) shrinks the noise to a tiny update.
    """
    for name in ("opposite", "opposite_scaled"):
        jac = _pair(name)
        ours, state = _ours(jac)
        assert np.all(ours == 0.0) and np.all(np.asarray(state.weights) == 0.0)
        assert np.linalg.norm(_torchjd(jac)) < 1e-4 * np.linalg.norm(jac[0])
    jac = _pair("opposite_scaled")
    np.testing.assert_allclose(
        np.abs(_conflictfree(jac)), np.abs(jac.sum(0)), rtol=1e-10
    )  # conflictfree: +-(g - 3 g) from normalised noise, where d = 0.


def test_collinear_gradients_match_references(f64):
    """g, 2.5 g, -0.5 g: rank one; the minimum-norm solution gives d = u / 3 and u = 3 g."""
    rng = np.random.default_rng(8)
    g = rng.standard_normal(333)
    jac = np.stack([g, 2.5 * g, -0.5 * g])
    ours, _ = _ours(jac)
    _assert_close(ours, 3 * g, rtol=1e-12)
    _assert_close(ours, _conflictfree(jac))
    _assert_close(ours, _torchjd(jac))


@pytest.mark.parametrize("k", [2, 3])
def test_zero_task_gradient(f64, k):
    """A zero gradient has a zero unit vector (the references' nan_to_num): the projection
    update equals ConFIG of the other tasks. With the track models conflictfree divides
    by the zero norm (NaN; the two-task form already does in its cosine); mtl_optax's
    documented result: the zero task contributes nothing, and the tracked minimum,
    harmonic and geometric means are zero, hence so is the update."""
    jac = random_jacobian(40 + k, k, 211)
    jac[1] = 0.0
    others = np.delete(jac, 1, axis=0)
    ours, _ = _ours(jac)
    _assert_close(ours, _exact(others), rtol=1e-12)
    _assert_close(ours, _conflictfree(jac))
    _assert_close(ours, _torchjd(jac))
    if k == 2:
        assert np.all(np.isnan(_conflictfree_double(jac)))
    for length_model in ("track_min", "track_harmonic", "track_geometric", "track_max"):
        ours, _ = _ours(jac, length_model=length_model)
        assert np.all(np.isfinite(ours))
        if length_model == "track_max":
            _assert_close(ours, _exact(others, length_model="track_max"), rtol=1e-12)
        else:
            assert np.all(ours == 0.0)
        assert np.all(np.isnan(_conflictfree(jac, length_model=length_model)))


def test_all_zero_gradients_give_zero(f64):
    jac = np.zeros((2, 50))
    ours, _ = _ours(jac)
    assert np.all(ours == 0.0)
    assert np.all(_conflictfree(jac) == 0.0)
    assert np.all(np.isnan(_conflictfree_double(jac)))  # 0 / 0 in the closed form.


@pytest.mark.parametrize("k", [2, 3])
def test_magnitudes_1e_8_and_1e4(f64, k):
    scales = [1e-8, 1e4, 1.0][:k]
    jac = random_jacobian(50 + k, k, 401, scales=scales)
    ours, _ = _ours(jac)
    _assert_close(ours, _exact(jac))
    _assert_close(ours, _conflictfree(jac))
    _assert_close(ours, _torchjd(jac))
    cos = _cosines(jac, ours)
    np.testing.assert_allclose(cos, cos[0], rtol=1e-10)


def test_large_k40_p1e5(f64):
    """K = 40, P = 1e5 against torchjd (the other references at K = 40 in the random cases,
    P <= 3000: conflictfree's lstsq takes seconds here)."""
    jac = random_jacobian(60, 40, 100_000)
    ours, _ = _ours(jac)
    _assert_close(ours, _torchjd(jac))
    cos = _cosines(jac, ours)
    np.testing.assert_allclose(cos, cos[0], rtol=1e-10)


@pytest.mark.parametrize(
    ("dtype", "rtol", "k"),
    # float32: the Gramian of float32 leaves (float32 accumulation) and the float32
    # K x K solve: ~1e-6 relative here; 1e-5 asserted. bfloat16: the update is
    # returned in bfloat16 (8 significant bits): 2**-8 relative per entry, plus the
    # float32 computation.
    [("float32", 1e-5, 2), ("float32", 1e-5, 5), ("bfloat16", 2.0**-8, 3)],
)
def test_low_precision_leaves_against_float64_reference(f64, dtype, rtol, k):
    jac = random_jacobian(70 + k, k, 900)
    rounded = np.asarray(jnp.asarray(jac).astype(dtype).astype(jnp.float64))
    ours, _ = _ours(jac, dtype=dtype)
    ref = _conflictfree(rounded)
    # Entrywise, relative to the entry (bfloat16 rounding of the output) and to the
    # largest entry (rounding in the float32 computation).
    err = np.abs(ours - ref)
    bound = rtol * np.abs(ref) + 1e-5 * np.max(np.abs(ref))
    assert np.all(err <= bound), np.max(err / bound)
    cos = _cosines(rounded, ours)
    np.testing.assert_allclose(cos, cos[0], rtol=10 * rtol)


def _gramian64(jac32, block=1_000_000):
    """The float64 Gramian of a large float32 Jacobian, block by block."""
    k = jac32.shape[0]
    gram = np.zeros((k, k))
    for i in range(0, jac32.shape[1], block):
        blk = jac32[:, i : i + block].astype(np.float64)
        gram += blk @ blk.T
    return gram


def test_p1e7_float32_where_the_references_fail(f64):
    """K = 3, P = 1e7, float32 gradients (REFERENCE_QUIRKS.md).

    The exact answer: the definition in float64 from the float64 Gramian of the
    same float32 numbers (full rank, well conditioned: the K x K route is exact
    to ~1e-15 there). mtl_optax matches it to float32 accuracy and its update has
    equal cosines to the three tasks. torchjd's pinv tolerance eps * P = 1.19
    discards every singular value and returns zero; conflictfree's lstsq (same
    tolerance in gelsy) returns a direction with unequal cosines.
    """
    k, p = 3, 10_000_000
    jac = np.random.default_rng(0).standard_normal((k, p), dtype=np.float32)
    gram = _gramian64(jac)
    norms = np.sqrt(np.diag(gram))
    c = np.linalg.solve(gram / np.outer(norms, norms), np.ones(k)) / norms
    exact_weights = (np.ones(k) @ gram @ c) / (c @ gram @ c) * c

    tx = mtl_optax.get("conflict_free")
    update, state = jax.jit(tx.update)({"x": jnp.asarray(jac)}, tx.init(None))
    update = np.asarray(update["x"])
    np.testing.assert_allclose(np.asarray(state.weights), exact_weights, rtol=1e-5)
    cos = (jac @ update).astype(np.float64) / norms / np.linalg.norm(update.astype(np.float64))
    np.testing.assert_allclose(cos, cos[0], rtol=1e-5)

    with _float32_torch():
        t_jac = torch.from_numpy(jac)
        assert np.all(aggregation.ConFIG()(t_jac).numpy() == 0.0)  # torchjd: zero.
        ref = cf_grad.ConFIG_update(t_jac).numpy()
    ref_cos = (jac @ ref).astype(np.float64) / norms / np.linalg.norm(ref.astype(np.float64))
    assert np.max(ref_cos) - np.min(ref_cos) > 0.1, ref_cos  # conflictfree: not conflict-free.


def _float32_torch():
    return torch_default_dtype(torch.float32)


# ---------------------------------------------------------------------------
# M-ConFIG: PseudoMomentumOperator.
# ---------------------------------------------------------------------------


def _random_masks(rng, k, steps):
    masks = rng.random((steps, k)) < 0.5
    for mask in masks:  # the reference needs at least one task per step.
        if not mask.any():
            mask[rng.integers(k)] = True
    return masks


MCASES = [
    # (K, steps, beta_1, beta_2, weights, length model, two-task closed form)
    (2, 10, 0.9, 0.999, None, "projection", True),
    (2, 10, 0.5, 0.8, None, "projection", False),
    (3, 12, 0.7, 0.95, [1.0, 2.0, 0.5], "track_harmonic", True),
    (5, 12, 0.9, 0.999, None, "projection", True),
]


@pytest.mark.parametrize(
    ("k", "steps", "beta_1", "beta_2", "weights", "length_model", "closed_form"),
    MCASES,
    ids=[
        f"K{c[0]}-b{c[2]}-{c[5]}-{'w' if c[4] else 'eq'}-{'cf' if c[6] else 'gen'}" for c in MCASES
    ],
)
def test_m_conflict_free_matches_pseudo_momentum_operator(
    f64, k, steps, beta_1, beta_2, weights, length_model, closed_form
):
    """Consecutive steps on random subsets of tasks: the update and the whole state."""
    rng = np.random.default_rng(1000 + k)
    p = 157
    operator = cf_momentum.PseudoMomentumOperator(
        num_vectors=k,
        beta_1=beta_1,
        beta_2=beta_2,
        gradient_operator=cf_grad.ConFIGOperator(
            weight_model=_weight_model(weights),
            length_model=_length_model(length_model),
            allow_simplified_model=closed_form,
        ),
    )
    tx = mtl_optax.get(
        "m_conflict_free",
        beta_1=beta_1,
        beta_2=beta_2,
        num_tasks=k,
        weights=weights,
        length_model=length_model,
        two_task_closed_form=closed_form,
    )
    params = params_like(jacobian_to_tree(np.zeros((k, p))))
    state = tx.init(params)
    step_fn = jax.jit(tx.update)
    masks = _random_masks(rng, k, steps)
    seen_zero = seen_nonzero = False
    for step, mask in enumerate(masks):
        jac = rng.standard_normal((k, p)) + 0.3 * step  # drifting, mostly agreeing tasks
        idx = np.flatnonzero(mask).tolist()
        ref = operator.calculate_gradient(idx, [torch.from_numpy(jac[i]) for i in idx]).numpy()
        given = np.where(mask[:, None], jac, 0.0)  # the other rows are not read
        update, state = step_fn(jacobian_to_tree(given), state, params, task_mask=jnp.asarray(mask))
        ours = tree_to_vector(update)
        if np.all(ref == 0.0):
            seen_zero = True
            assert np.all(ours == 0.0), step
        else:
            seen_nonzero = True
            _assert_close(ours, ref, rtol=1e-9, what=f"step {step}")
        assert int(state.count) == operator.t
        assert np.asarray(state.task_counts).tolist() == operator.t_grads
        mu = np.stack(
            [tree_to_vector(jax.tree.map(lambda x, i=i: x[i], state.mu)) for i in range(k)]
        )
        np.testing.assert_allclose(
            mu, np.stack([m.numpy() for m in operator.m]), rtol=1e-12, atol=0
        )
        if operator.t:
            _assert_close(tree_to_vector(state.nu), operator.s.numpy(), rtol=1e-9, what="s")
            _assert_close(
                tree_to_vector(state.pseudo_mu), operator.fake_m.numpy(), rtol=1e-9, what="fake_m"
            )
    assert seen_nonzero and (seen_zero or masks[0].all())


def test_m_conflict_free_cyclic_single_task_matches_reference_example(f64):
    """The reference's own usage: one task per step, index = step % K (task_indices)."""
    k, p = 3, 90
    operator = cf_momentum.PseudoMomentumOperator(num_vectors=k)
    tx = mtl_optax.get("m_conflict_free", num_tasks=k)
    params = {"x": jnp.zeros(p)}
    state = tx.init(params)
    step_fn = jax.jit(tx.update)
    rng = np.random.default_rng(5)
    for step in range(3 * k + 2):
        i = step % k
        g = rng.standard_normal(p) + (i - 1.0)
        ref = operator.calculate_gradient(i, torch.from_numpy(g)).numpy()
        given = np.zeros((k, p))
        given[i] = g
        update, state = step_fn({"x": jnp.asarray(given)}, state, params, task_indices=i)
        if step < k - 1:
            assert np.all(ref == 0.0) and np.all(np.asarray(update["x"]) == 0.0)
        else:
            _assert_close(update["x"], ref, rtol=1e-9, what=f"step {step}")
