"""Parity of ``imtl_g`` with ConFIG, TorchJD, LibMTL and the vambn fixtures.

Every comparison feeds the same ``(K, P)`` Jacobian to both sides in float64
(split into a pytree of several leaves for mtl_optax). IMTL-G is a direct
solve, not an iteration, so the references agree to rounding amplified by the
conditioning of :math:`D U^\\top`: tolerance 1e-9 relative to
``sum_k |alpha_k| |J_kj|`` for the updates and 1e-9 of ``max |alpha|`` for the
weights on well-conditioned inputs (observed: about 1e-13); 1e-6 where a
magnitude ratio of 1e12 makes :math:`\\alpha_1 = 1 - \\sum \\alpha_{2:K}`
cancel (the vambn README's suggestion).

References:

* ConFIG 0.1.8 ``IMTLGOperator().calculate_gradient(J)``: the update, from
  ``g_1 U^T pinv(D U^T)`` with zero-norm unit vectors set to 0.
* TorchJD 0.18 ``IMTLG`` / ``IMTLGWeighting``: ``alpha = pinv(G) n / sum``, the
  same weights when ``G`` is invertible.
* LibMTL 1.1.5 ``IMTL`` (parameter gradients, ``rep_grad=False``), driven on
  linear losses ``L = J theta``; its loss scales start at 0 (scale 1), so its
  gradients are ``J`` and its ``alpha`` is IMTL-G's. It uses ``torch.inverse``.
* vambn's ``imtlg`` fixtures (``out`` per task; ``stable`` flags respected)
  and ``helper.unitary``.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax._imtl import _inverse_norms, imtl_g_weights

from .conftest import (
    assert_combination_close,
    import_libmtl,
    jacobian_to_tree,
    random_jacobian,
    reference,
    to_numpy,
    torch_default_float64,
    tree_to_matrix,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")
operators = reference("conflictfree.grad_operator")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "vambn_fixtures.npz"


_TX = mtl_optax.get("imtl_g")


@jax.jit
def _run(tree):
    """mtl_optax's update, per-task output, logged weights and weights (one compilation per shape)."""
    update, state = _TX.update(tree, _TX.init(None))
    per_task, _ = _TX.per_task.update(tree, _TX.init(None))
    return update, per_task, state.weights, imtl_g_weights(mtl_optax.gramian(tree))


def _mtl(jac, tree=None):
    """mtl_optax's update (as a vector) and its weights on ``jac``."""
    tree = jacobian_to_tree(jac) if tree is None else tree
    update, per_task, logged, alpha = _run(tree)
    for leaf, g in zip(
        jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(tree), strict=True
    ):
        assert leaf.dtype == g.dtype and leaf.shape == g.shape[1:]
    alpha = np.asarray(alpha, np.float64)
    scale = np.abs(alpha).max()
    np.testing.assert_allclose(np.asarray(logged), alpha, rtol=1e-6, atol=1e-6 * scale)
    # The per-task form is alpha_k g_k.
    np.testing.assert_allclose(
        tree_to_matrix(per_task).astype(np.float64),
        alpha[:, None] * tree_to_matrix(tree).astype(np.float64),
        rtol=1e-2 if tree_to_matrix(tree).dtype != np.float64 else 1e-13,
        atol=1e-300,
    )
    return tree_to_vector(update).astype(np.float64), alpha


def _config(jac):
    return to_numpy(operators.IMTLGOperator().calculate_gradient(torch.from_numpy(jac)))


def _torchjd(jac):
    jac_t = torch.from_numpy(jac)
    weights = to_numpy(aggregation.IMTLGWeighting()(jac_t @ jac_t.T))
    return to_numpy(aggregation.IMTLG()(jac_t)), weights


def _libmtl(jac):
    """LibMTL's IMTL on linear losses: (alpha, theta.grad)."""
    IMTL = import_libmtl().weighting.IMTL
    k, p = jac.shape
    with torch_default_float64():  # LibMTL allocates with the default dtype.
        weighting = IMTL()
        weighting.task_num, weighting.device, weighting.rep_grad = k, "cpu", False
        theta = torch.zeros(p, requires_grad=True)
        weighting.get_share_params = lambda: [theta]

        def zero_grad():
            if theta.grad is not None:
                theta.grad.zero_()

        weighting.zero_grad_share_params = zero_grad
        weighting.init_param()
        alpha = weighting.backward(torch.from_numpy(jac) @ theta)
    return np.asarray(alpha, np.float64), to_numpy(theta.grad)


def _assert_weights_close(actual, expected, rtol=1e-9):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


# K in {2, 3, 5, 10}, P in the hundreds to thousands; two seeds per (K, P)
# (same shapes, one compilation).
CASES = [(2, 300), (3, 2000), (5, 1000), (10, 700)]


@pytest.mark.parametrize(("k", "p"), CASES, ids=[f"K{k}-P{p}" for k, p in CASES])
def test_random_jacobians_match_all_references(x64, k, p):
    for seed in range(2):
        jac = random_jacobian(100 * k + seed, k, p)
        update, alpha = _mtl(jac)
        assert_combination_close(update, _config(jac), alpha, jac, rtol=1e-9)
        torchjd_update, torchjd_weights = _torchjd(jac)
        _assert_weights_close(alpha, torchjd_weights)
        assert_combination_close(update, torchjd_update, alpha, jac, rtol=1e-9)
        libmtl_alpha, libmtl_update = _libmtl(jac)
        _assert_weights_close(alpha, libmtl_alpha)
        assert_combination_close(update, libmtl_update, alpha, jac, rtol=1e-9)


def test_k40_p1e5_matches_config_and_torchjd(x64):
    jac = random_jacobian(400, 40, 100_000)
    update, alpha = _mtl(jac, tree={"x": jnp.asarray(jac)})
    assert_combination_close(update, _config(jac), alpha, jac, rtol=1e-9)
    torchjd_update, torchjd_weights = _torchjd(jac)
    _assert_weights_close(alpha, torchjd_weights)
    assert_combination_close(update, torchjd_update, alpha, jac, rtol=1e-9)


def _edge(name):
    rng = np.random.default_rng(23)
    p = 301
    g1, g2 = rng.standard_normal(p), rng.standard_normal(p)
    return {
        "K1": lambda: g1[None],
        "identical": lambda: np.stack([g1, g1]),
        "opposite": lambda: np.stack([g1, -g1]),
        "orthogonal": lambda: np.stack([g1, g2 - (g1 @ g2) / (g1 @ g1) * g1]),
        "collinear_positive": lambda: np.stack([g1, 2.5 * g1, 0.3 * g1]),
        "collinear_mixed": lambda: np.stack([g1, -2.0 * g1, 0.5 * g1]),
        "zero_task": lambda: np.stack([g1, np.zeros(p), g2]),
        "magnitudes_K2": lambda: random_jacobian(11, 2, p, scales=[1e-8, 1e4]),
        "magnitudes_K3": lambda: random_jacobian(12, 3, p, scales=[1e-8, 1.0, 1e4]),
    }[name]()


def test_edge_k1_is_the_gradient(x64):
    jac = _edge("K1")
    update, alpha = _mtl(jac)
    np.testing.assert_array_equal(alpha, [1.0])
    np.testing.assert_array_equal(update, jac[0])
    np.testing.assert_allclose(_torchjd(jac)[0], jac[0], rtol=1e-14)
    libmtl_alpha, libmtl_update = _libmtl(jac)
    np.testing.assert_array_equal(libmtl_alpha, [1.0])
    np.testing.assert_allclose(libmtl_update, jac[0], rtol=1e-14)
    with pytest.raises(RuntimeError):  # ConFIG's IMTLGOperator needs K >= 2.
        _config(jac)


@pytest.mark.parametrize("case", ["orthogonal", "opposite", "magnitudes_K2", "magnitudes_K3"])
def test_edge_full_rank_cases_match_all_references(x64, case):
    """Nonsingular D U^T: every reference agrees (opposite: alpha = (1/2, 1/2), u = 0)."""
    jac = _edge(case)
    rtol = 1e-6 if case.startswith("magnitudes") else 1e-9
    update, alpha = _mtl(jac)
    assert_combination_close(update, _config(jac), alpha, jac, rtol=rtol)
    libmtl_alpha, libmtl_update = _libmtl(jac)
    _assert_weights_close(alpha, libmtl_alpha, rtol)
    assert_combination_close(update, libmtl_update, alpha, jac, rtol=rtol)
    # Equal projections onto the unit gradients, relative to the largest one.
    proj = (jac / np.linalg.norm(jac, axis=1, keepdims=True)) @ update
    np.testing.assert_allclose(proj, proj.mean(), rtol=0, atol=1e-9 * np.abs(proj).max())
    torchjd_update, _ = _torchjd(jac)
    if case.startswith("magnitudes"):
        # TorchJD's pinv(G) cuts eigenvalues below eps * K * max: the 1e-8 task's
        # (1e-16 P against 1e8 P) is dropped and its projection is not equalized.
        torchjd_proj = (jac / np.linalg.norm(jac, axis=1, keepdims=True)) @ torchjd_update
        assert np.ptp(torchjd_proj) > 1e3 * np.abs(update).max()
    else:
        assert_combination_close(update, torchjd_update, alpha, jac, rtol=rtol)
    if case == "opposite":
        np.testing.assert_allclose(alpha, [0.5, 0.5], rtol=1e-15)
        assert np.abs(update).max() <= 1e-15 * np.abs(jac).max()


def test_edge_identical_gives_the_gradient(x64):
    """Identical gradients: D U^T = 0, alpha = (1, 0), u = g. ConFIG and TorchJD give g too."""
    jac = _edge("identical")
    update, alpha = _mtl(jac)
    np.testing.assert_array_equal(alpha, [1.0, 0.0])
    np.testing.assert_array_equal(update, jac[0])
    np.testing.assert_allclose(_config(jac), jac[0], rtol=1e-14)
    np.testing.assert_allclose(_torchjd(jac)[0], jac[0], rtol=1e-14)
    with pytest.raises(RuntimeError):  # LibMTL: torch.inverse of the zero matrix.
        _libmtl(jac)


def test_edge_collinear_positive_gives_the_first_gradient(x64):
    """c_k g with c > 0: alpha = (1, 0, 0) and u = g_1 (equal projections hold for any alpha).

    The references differ: TorchJD's generalization weights alpha ∝ c (u = 9.09/3.8 g);
    ConFIG's pseudo-inverse keeps the rounding noise of D U^T, so its answer
    is arbitrary; LibMTL inverts that noise.
    """
    jac = _edge("collinear_positive")
    update, alpha = _mtl(jac)
    np.testing.assert_array_equal(alpha, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(update, jac[0])
    c = np.array([1.0, 2.5, 0.3])
    torchjd_update, torchjd_weights = _torchjd(jac)
    np.testing.assert_allclose(torchjd_weights, c / c.sum(), rtol=1e-10)
    np.testing.assert_allclose(torchjd_update, (c @ c) / c.sum() * jac[0], rtol=1e-10)


def test_edge_collinear_mixed_gives_zero(x64):
    """c = (1, -2, 0.5): equal projections onto u and -u force u = 0. ConFIG agrees.

    TorchJD's alpha = c / sum c gives -10.5 g, whose projections onto the unit
    gradients are not equal (+-10.5 ||g||).
    """
    jac = _edge("collinear_mixed")
    update, alpha = _mtl(jac)
    assert np.isclose(alpha.sum(), 1.0, rtol=0, atol=1e-15)
    assert np.abs(update).max() <= 1e-14 * np.abs(jac).max()
    assert np.abs(_config(jac)).max() <= 1e-14 * np.abs(jac).max()
    torchjd_update, _ = _torchjd(jac)
    np.testing.assert_allclose(torchjd_update, -10.5 * jac[0], rtol=1e-10)


def test_edge_zero_task_gives_zero(x64):
    """A zero task has u_k = 0, so every projection must be 0: u = 0, as ConFIG.

    TorchJD drops the zero task (IMTL-G on the other two); LibMTL divides by
    the zero norm and returns NaN.
    """
    jac = _edge("zero_task")
    update, alpha = _mtl(jac)
    assert np.all(np.isfinite(alpha))
    scale = np.abs(jac).max()
    assert np.abs(update).max() <= 1e-14 * scale
    assert np.abs(_config(jac)).max() <= 1e-14 * scale
    torchjd_update, _ = _torchjd(jac)
    others, _ = _mtl(jac[[0, 2]])
    np.testing.assert_allclose(torchjd_update, others, rtol=1e-9, atol=1e-12 * scale)
    assert np.abs(torchjd_update).max() > 0.1 * scale
    libmtl_alpha, libmtl_update = _libmtl(jac)
    assert np.all(np.isnan(libmtl_alpha)) and np.all(np.isnan(libmtl_update))


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # float32 Gramian and solve (K=5, cond ~10): ~1e-6 observed; bfloat16 output: 2**-8.
    [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)],
    ids=["float32", "bfloat16"],
)
def test_low_precision_leaves_match_float64_torchjd(x64, dtype, rtol):
    """float32 / bfloat16 leaves against TorchJD in float64 on the same rounded inputs."""
    jac64 = random_jacobian(91, 5, 3000)
    tree = jax.tree_util.tree_map(lambda x: x.astype(dtype), jacobian_to_tree(jac64))
    rounded = tree_to_matrix(jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), tree))
    update, alpha = _mtl(rounded, tree=tree)
    expected, weights = _torchjd(rounded)
    _assert_weights_close(alpha, weights, rtol)
    assert_combination_close(update, expected, weights, rounded, rtol=rtol)


# ---------------------------------------------------------------------------
# vambn fixtures.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vambn():
    with np.load(FIXTURES) as data:
        return {key: data[key] for key in data.files}


CASE_IDS = [str(c) for c in np.load(FIXTURES)["cases.id"]]


def _per_task(grads):
    update, per_task, _, _ = _run({"z": jnp.asarray(grads)})
    return np.asarray(per_task["z"]), np.asarray(update["z"])


@pytest.mark.parametrize("cid", CASE_IDS)
def test_vambn_imtlg_out(x64, vambn, cid):
    """Stable cases: vambn's per-task ``out`` (1e-10 of max|out|; 1e-8 for magnitude cases).

    Unstable cases (identical, positively collinear, some zero-task inputs):
    our documented result, and vambn's summed update agrees where it is not
    rounding noise.
    """
    i = CASE_IDS.index(cid)
    grads = vambn[f"case.{cid}.grads"]
    out = vambn[f"imtlg.{cid}.out"]
    ours, total = _per_task(grads)
    scale = np.abs(grads).max()
    np.testing.assert_allclose(total, ours.sum(0), rtol=0, atol=1e-14 * max(scale, 1e-300))
    if vambn["imtlg.stable"][i]:
        rtol = 1e-8 if "magnitude" in cid else 1e-10
        np.testing.assert_allclose(ours, out, rtol=0, atol=rtol * max(np.abs(out).max(), 1e-300))
        return
    kind = str(vambn["cases.kind"][i])
    if kind in ("identical", "collinear_pos"):
        np.testing.assert_array_equal(ours[0], grads[0])
        np.testing.assert_array_equal(ours[1:], 0.0)
    elif kind == "zero_one":
        assert np.abs(ours.sum(0)).max() <= 1e-13 * scale
        assert np.abs(out.sum(0)).max() <= 1e-13 * scale
    else:
        raise AssertionError(f"unexpected unstable case {cid}")
    if kind == "identical":
        np.testing.assert_allclose(out.sum(0), grads[0], rtol=1e-12)


def test_vambn_collinear_positive_is_rounding_noise(x64, vambn):
    """Where vambn differs: on c_k g its weights come from inverting rounding noise."""
    cid = "c32_collinear_pos_K3_B4_D16"
    grads, out = vambn[f"case.{cid}.grads"], vambn[f"imtlg.{cid}.out"]
    ours, _ = _per_task(grads)
    assert not vambn["imtlg.stable"][CASE_IDS.index(cid)]
    assert np.abs(out.sum(0) - ours.sum(0)).max() > 0.01 * np.abs(grads[0]).max()


def test_vambn_unitary_convention(x64, vambn):
    """vambn's unit vectors: x / ||x||, and 0 for a zero vector; ours from the Gramian.

    vambn divides through ``exp(log(|x_i| + 1e-15) - log(||x|| + 2e-15))``: exact
    to rounding for ordinary vectors, but biased for tiny ones (norm 2e-12:
    relative error 1e-3; entries of 1e-20 become 1e-16). We use the exact
    ``x / ||x||`` (the same on the other rows), and show where vambn differs.
    """
    x, out = vambn["helper.unitary.x"], vambn["helper.unitary.out"]
    inv = np.asarray(jax.vmap(lambda v: _inverse_norms(jnp.dot(v, v)[None, None]))(jnp.asarray(x)))
    ours = inv[:, 0, None] * x
    norms = np.linalg.norm(x, axis=1)
    tiny = (np.abs(x) < 1e-12 * np.maximum(norms[:, None], 1e-300)) & (x != 0)
    ordinary = (norms > 1e-6) & ~tiny.any(axis=1)
    assert ordinary.sum() >= 3 and np.any(norms == 0)
    np.testing.assert_allclose(ours[ordinary], out[ordinary], rtol=0, atol=1e-14)
    np.testing.assert_array_equal(ours[norms == 0], 0.0)
    np.testing.assert_allclose(ours, x / np.where(norms > 0, norms, 1)[:, None], rtol=1e-15)
    assert np.abs(ours - out)[~ordinary].max() > 1e-5
