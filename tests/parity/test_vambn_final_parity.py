"""vambn's ``MOOForLoop`` ``final`` arrays, through ``rep_grad(..., rescale="sum_norm")``.

vambn (``nfdi4health/docker-vambn``) is not on PyPI: the references are the
recorded fixtures ``tests/fixtures/vambn_fixtures.npz`` (float64; see
/work/shared/reference/README.md). ``final`` [B, D] is the gradient that
reaches the shared representation ``z`` when a method runs inside
``MOOForLoop``. Here it is the encoder gradient of
:func:`mtl_optax.representation.rep_grad` for a model built so that task
``k``'s representation gradient is the fixture's ``grads[k]``:

* encoder: the identity, ``z = theta_e`` (so the encoder gradient *is* the
  gradient that reaches ``z``), with ``theta_e = z0`` a fixed [B, D] array;
* heads: ``L_k(h, z) = h_k <grads_k, z - z0> + losses_k`` at ``h = 1``, so
  ``dL_k/dz = grads_k`` and, at ``z = z0``, ``L_k`` is exactly the recorded
  loss (plain GradNorm reads it through ``value=``).

Methods whose reference draws randomness replay the recorded draws: GradDrop
through ``graddrop_uniforms=`` (an extra argument that ``rep_grad`` passes to
the method), PCGrad and GradVac through a test-only weighting that applies
the recorded inner orders, CAGrad through one that applies the recorded
float32 weights ``w_f32`` (vambn's SLSQP path cannot be replayed; see
tests/parity/test_cagrad_parity.py for the solver).

Tolerance: 1e-10 of ``max|final|`` (the README's), 1e-8 with IMTL-G (its
``alpha_0 = 1 - sum a`` cancels for large magnitude ratios), and for CAGrad
1e-10 plus the conditioning of ``||g_w||`` from the Gramian (as in
test_cagrad_parity.py). Cases flagged ``final_stable`` False are only checked
to be finite, or, where the reference is NaN (NSGD on all-zero gradients),
to be the documented zero. MGDA-UB is in ``test_mgdaub_*`` below.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax import _projection
from mtl_optax._cagrad import _cagrad_terms
from mtl_optax._mgda_ub import mgda_ub
from mtl_optax.base import Weighting, from_weighting
from mtl_optax.representation import rep_grad

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vambn_fixtures.npz"
_F = np.load(FIXTURES)
CASE_IDS = [str(c) for c in _F["cases.id"]]

RTOL = 1e-10
RTOL_IMTL = 1e-8
PAD_B, PAD_D = 4, 64


def _fx(key):
    return _F[key]


# ---------------------------------------------------------------------------
# The model whose representation gradients are the fixture's grads.
# ---------------------------------------------------------------------------


def _encoder(theta, grads, losses, z0):
    del grads, losses, z0
    return theta


def _heads(h, z, grads, losses, z0):
    return h * jnp.sum(grads * (z - z0), axis=(1, 2)) + losses


def _final(method, case_id, **extra):
    """``rep_grad(method, rescale="sum_norm")``'s encoder gradient on the case: vambn's final.

    The case's [B, D] block is zero-padded to [4, 64] (the largest B and D of
    the fixtures), so that all cases with the same K share one shape and JAX
    compiles each operation once per K instead of once per case. Zero
    coordinates change no Gramian, norm or GradDrop statistic of the real
    ones (a padded feature has a zero sign statistic and zero gradients); the
    padded part of the result must be exactly zero, and the real part is
    returned.
    """
    grads = _fx(f"case.{case_id}.grads")
    k, b, d = grads.shape
    padded = np.zeros((k, PAD_B, PAD_D))
    padded[:, :b, :d] = grads
    grads_p = jnp.asarray(padded)
    losses = jnp.asarray(_fx(f"case.{case_id}.losses"))
    z0 = jnp.asarray(np.random.default_rng(k).standard_normal((PAD_B, PAD_D)))
    if "graddrop_uniforms" in extra:
        u = np.full((1, PAD_D), 0.5)
        u[:, :d] = np.asarray(extra["graddrop_uniforms"])
        extra = {**extra, "graddrop_uniforms": jnp.asarray(u)}
    rg = rep_grad(method, _encoder, _heads, rescale="sum_norm")
    batch = (grads_p, losses, z0)
    got_losses, out, _ = rg.step(rg.init(z0, *batch), z0, jnp.ones(k), *batch, **extra)
    np.testing.assert_array_equal(np.asarray(got_losses), np.asarray(losses))
    assert out["heads"].shape == (k,)
    final = np.asarray(out["encoder"])
    rest = final.copy()
    rest[:b, :d] = 0.0
    assert np.all(rest == 0.0), "the zero padding received a nonzero gradient"
    return final[:b, :d]


def _check(actual, expected, *, stable, rtol=RTOL):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    if np.isnan(expected).any():
        # NSGD on all-zero gradients: 0/0 in the reference, documented 0 here.
        assert np.all(actual == 0.0), np.abs(actual).max()
        return "nan"
    if not stable:
        return "unstable"
    err = np.abs(actual - expected).max()
    scale = np.abs(expected).max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} * {scale:.3e}"
    return "compared"


# ---------------------------------------------------------------------------
# Test-only replays of recorded randomness / solver output, as weightings.
# ---------------------------------------------------------------------------


def _replay(name, weights_of_gramian):
    def weights(gramian, state, value, *, num_tasks, dtype):
        del value, num_tasks
        return weights_of_gramian(gramian.astype(dtype)), state

    return from_weighting(Weighting(name=name, init=lambda: (), weights=weights))


def _pcgrad_replay(orders):
    return _replay(
        "pcgrad_replay",
        lambda gram: _projection._pcgrad_matrix(gram, jnp.asarray(orders)).sum(axis=0),
    )


def _gradvac_replay(orders):
    def weights(gram):
        k = gram.shape[0]
        phi = jnp.zeros((k, k), gram.dtype)  # vambn resets its EMA at every call
        matrix, _ = _projection._gradvac_matrix(gram, phi, jnp.asarray(orders), 0.5)
        return matrix.sum(axis=0)

    return _replay("gradvac_replay", weights)


def _cagrad_replay(alpha, w_f32):
    def weights(gram):
        terms = _cagrad_terms(
            gram,
            alpha=alpha,
            rescale=0,
            eps=1e-8,
            norm_eps=0.0,
            max_iter=1,
            tol=None,
            dual=jnp.asarray(w_f32),
            safeguard=False,
        )
        return terms.mean_scale / gram.shape[0] + terms.corr_scale * terms.dual

    return _replay("cagrad_replay", weights)


def _vambn_graddrop(leakage, k, *, clamp=True):
    f = (lambda p: jnp.minimum(p, 0.5)) if clamp else None
    return mtl_optax.graddrop(leakage=leakage, num_tasks=k, batch_axes=0, f=f)


# ---------------------------------------------------------------------------
# The variants.
# ---------------------------------------------------------------------------


def _variants(case_id):
    """vambn variant -> (method, extra args, rtol); None where the reference raised."""
    k = _fx(f"case.{case_id}.grads").shape[0]
    uniforms = {"graddrop_uniforms": jnp.asarray(_fx(f"case.{case_id}.graddrop_u"))}
    sgd = None  # GradNorm's logits are updated after the output: the optimizer is irrelevant.
    return {
        "identity": (mtl_optax.identity(), {}, RTOL),
        "imtlg": (mtl_optax.imtl_g(num_tasks=k), {}, RTOL_IMTL),
        "pcgrad": (_pcgrad_replay(_fx(f"case.{case_id}.pcgrad_inner_order")), {}, RTOL),
        "gradvac": (_gradvac_replay(_fx(f"case.{case_id}.gradvac_inner_order")), {}, RTOL),
        "nsgd_u1": (mtl_optax.nsgd(update_at=1, num_tasks=k), {}, RTOL),
        "nsgd_u0": (mtl_optax.nsgd(update_at=0, num_tasks=k), {}, RTOL),
        "gradnormmod_a1_u1": (mtl_optax.gradnorm(1.0, 1, sgd, "gradient", num_tasks=k), {}, RTOL),
        "gradnormmod_a1p5_u0": (
            mtl_optax.gradnorm(1.5, 0, sgd, "gradient", num_tasks=k),
            {},
            RTOL,
        ),
        "gradnorm_a1p5_u0": (mtl_optax.gradnorm(1.5, 0, sgd, "loss", num_tasks=k), {}, RTOL),
        "gradnorm_a1_u1": (mtl_optax.gradnorm(1.0, 1, sgd, "loss", num_tasks=k), {}, RTOL),
        "graddrop_l0p2": (_vambn_graddrop(0.2, k), uniforms, RTOL),
        "graddrop_l0": (_vambn_graddrop(0.0, k), uniforms, RTOL),
        "graddrop_lmix": (_vambn_graddrop(np.linspace(0.0, 0.6, k), k), uniforms, RTOL),
        # impartial-vaes: no clamp (the paper's purity), leakage stored as float32(0.2).
        "graddrop_orig_l0p2": (
            _vambn_graddrop(float(np.float32(0.2)), k, clamp=False),
            uniforms,
            RTOL,
        ),
        "setup_imtlg_nsgd": (
            mtl_optax.compose(
                mtl_optax.imtl_g(num_tasks=k), mtl_optax.nsgd(update_at=1, num_tasks=k)
            ),
            {},
            RTOL_IMTL,
        ),
        "setup_gradnorm_graddrop": (
            mtl_optax.compose(
                mtl_optax.gradnorm(1.0, 1, None, "gradient", num_tasks=k), _vambn_graddrop(0.2, k)
            ),
            uniforms,
            RTOL,
        ),
    }


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_rep_grad_sum_norm_matches_vambn_final(x64, case_id):
    i = CASE_IDS.index(case_id)
    outcomes = {}
    for variant, (method, extra, rtol) in _variants(case_id).items():
        if _fx(f"{variant}.has_error")[i]:  # GradVac's math domain error: no final recorded
            continue
        outcomes[variant] = _check(
            _final(method, case_id, **extra),
            _fx(f"{variant}.{case_id}.final"),
            stable=_fx(f"{variant}.final_stable")[i],
            rtol=rtol,
        )
    assert len(outcomes) >= 15
    if case_id.startswith("c0"):  # well-conditioned random cases: every variant compared
        assert set(outcomes.values()) == {"compared"}, outcomes


@pytest.mark.parametrize("variant", ["cagrad_a0p5", "cagrad_a10"])
def test_rep_grad_replays_vambn_cagrad_final_from_w_f32(x64, variant):
    """CAGrad's final from the recorded float32 weights, every stable case.

    Tolerance as in test_cagrad_parity.py: 1e-10 plus the relative rounding of
    ``||g_w||`` taken from the Gramian, ``4 K eps max|G| / (w^T G w)``.
    """
    alpha = {"cagrad_a0p5": 0.5, "cagrad_a10": 10.0}[variant]
    compared = 0
    for i, case_id in enumerate(CASE_IDS):
        grads = _fx(f"case.{case_id}.grads")
        jac = grads.reshape(grads.shape[0], -1)
        gram = jac @ jac.T
        w_f32 = _fx(f"{variant}.{case_id}.w_f32")
        cond = 4 * len(w_f32) * np.finfo(np.float64).eps * np.abs(gram).max()
        cond /= max(w_f32 @ gram @ w_f32, 1e-300)
        outcome = _check(
            _final(_cagrad_replay(alpha, w_f32), case_id),
            _fx(f"{variant}.{case_id}.final"),
            stable=_fx(f"{variant}.final_stable")[i],
            rtol=RTOL + min(cond, 1.0),
        )
        compared += outcome == "compared"
    assert compared >= 30


# ---------------------------------------------------------------------------
# MGDA-UB.
# ---------------------------------------------------------------------------


def _mgdaub_weights(case_id):
    """mgda_ub's weights on the case, in float64 (the state logs them in float32).

    From the per-task form, whose row k is ``lambda_k g_k``: ``lambda_k =
    <row_k, g_k> / ||g_k||^2`` (0 for a zero gradient, whose weight does not
    change the point; then the weights are completed to sum to 1 on it).
    """
    grads = _fx(f"case.{case_id}.grads")
    k, b, d = grads.shape
    padded = np.zeros((k, PAD_B, PAD_D))  # one shape per K, as in _final
    padded[:, :b, :d] = grads
    tx = mgda_ub(num_tasks=k)
    rows, _ = tx.per_task.update(jnp.asarray(padded), tx.init(None))
    jac, rows = grads.reshape(k, -1), np.asarray(rows)[:, :b, :d].reshape(k, -1)
    sq = np.sum(jac * jac, axis=1)
    lam = np.where(sq > 0, np.sum(rows * jac, axis=1) / np.where(sq > 0, sq, 1), 0.0)
    zero = sq == 0
    if zero.any():
        lam[np.argmax(zero)] += 1.0 - lam.sum()
    return lam


def _boundary(solver_w):
    """The numpy solver's K = 2 boundary values 0.999/0.001 (ours: exactly 1/0)."""
    return len(solver_w) == 2 and np.isclose(np.sort(solver_w), [0.001, 0.999], atol=1e-15).all()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_mgdaub_solver_weights_match_vambn(x64, case_id):
    """The min-norm weights: vambn's numpy solver against mgda_ub, by their cost.

    Where the solution is unique (full-rank gradients) the weights agree to
    2e-3 (vambn's loop stops when the weights move by < 1e-5, and its
    0.999/0.001 two-point rule leaves residual weights of up to 1e-3); every
    case, our cost is at most the reference's (up to rounding). At the K = 2
    boundary vambn returns 0.999/0.001 where the exact answer is 1/0.
    """
    i = CASE_IDS.index(case_id)
    grads = _fx(f"case.{case_id}.grads")
    jac = grads.reshape(grads.shape[0], -1)
    gram = jac @ jac.T
    ref = _fx(f"mgdaub.{case_id}.solver_w")
    ours = _mgdaub_weights(case_id)
    np.testing.assert_allclose(ours.sum(), 1.0, rtol=1e-12)
    cost, ref_cost = ours @ gram @ ours, ref @ gram @ ref
    assert cost <= ref_cost * (1 + 1e-9) + 1e-13 * np.abs(gram).max(), (cost, ref_cost)
    if _boundary(ref):
        np.testing.assert_allclose(np.round(ref), ours, atol=1e-12)
    elif _fx("mgdaub.stable")[i] and np.linalg.matrix_rank(jac) == len(jac):  # unique optimum
        np.testing.assert_allclose(ours, ref, atol=2e-3)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_mgdaub_reference_applies_min_not_max(x64, case_id):
    """vambn's MGDAUB bug: ``out = min(w, 1e-3) * grads``, every weight capped at 1e-3.

    The recorded ``out`` is exactly ``w_clipped * grads`` with ``w_clipped =
    min(solver_w, 1e-3)`` (the reference's quirk, checked here); mtl_optax's
    per-task form is ``lambda_k g_k``. They agree (up to the scale that
    MOOForLoop's rescale removes) only where ``w_clipped`` is proportional to
    ``solver_w``; everywhere else the difference is the bug.
    """
    grads = _fx(f"case.{case_id}.grads")
    solver_w = _fx(f"mgdaub.{case_id}.solver_w")
    clipped = _fx(f"mgdaub.{case_id}.w_clipped")
    np.testing.assert_array_equal(clipped, np.minimum(solver_w, 1e-3))
    out = _fx(f"mgdaub.{case_id}.out")
    np.testing.assert_allclose(out, clipped[:, None, None] * grads, rtol=1e-15, atol=0)
    proportional = np.allclose(clipped / clipped.max(), solver_w / solver_w.max(), atol=1e-12)
    full_rank = np.linalg.matrix_rank(grads.reshape(len(grads), -1)) == len(grads)
    if full_rank and not proportional:  # the bug changes the direction
        ours = _mgdaub_weights(case_id)
        jac = grads.reshape(grads.shape[0], -1)
        norm_ours = np.linalg.norm(ours @ jac)
        direction = clipped @ jac
        cos = (ours @ jac) @ direction / max(norm_ours * np.linalg.norm(direction), 1e-300)
        assert cos < 1 - 1e-6 or norm_ours == 0.0


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_rep_grad_mgda_ub_matches_vambn_final_where_the_cap_is_inactive(x64, case_id):
    """Through rep_grad (sum_norm), mgda_ub gives vambn's MGDAUB final wherever the
    1e-3 cap leaves the weights' direction unchanged: all weight on one task (a
    zero or dominated gradient) or on tasks with equal weights. Elsewhere the
    reference's final is the rescaled ``sum_k min(w_k, 1e-3) g_k`` (checked)."""
    i = CASE_IDS.index(case_id)
    grads = _fx(f"case.{case_id}.grads")
    solver_w = _fx(f"mgdaub.{case_id}.solver_w")
    clipped = _fx(f"mgdaub.{case_id}.w_clipped")
    final = _fx(f"mgdaub.{case_id}.final")
    stable = _fx("mgdaub.final_stable")[i]
    # The reference's final is MOOForLoop's rescale of its (capped) out.
    combo = np.tensordot(clipped, grads, axes=1)
    plain = np.linalg.norm(grads.sum(0))
    rescaled = combo * plain / max(np.linalg.norm(combo), 1e-10)
    _check(rescaled, final, stable=stable)
    ours = _final(mgda_ub(num_tasks=grads.shape[0]), case_id)
    assert np.all(np.isfinite(ours))
    proportional = np.allclose(clipped / clipped.max(), solver_w / solver_w.max(), atol=1e-12)
    if proportional and not _boundary(solver_w):
        assert _check(ours, final, stable=stable) in ("compared", "unstable")
    lam = _mgdaub_weights(case_id)
    combo = np.tensordot(lam, grads, axes=1)
    top = np.linalg.norm(grads.reshape(len(grads), -1), axis=1).max()
    if stable and np.linalg.norm(combo) > 1e-3 * top:
        # Ours, whatever the cap does: the rescaled min-norm combination (its
        # direction is defined away from a Pareto-stationary, near-zero point).
        expected = combo * plain / max(np.linalg.norm(combo), 1e-10)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-10 * max(plain, 1e-300))
