"""Parity of ``identity`` and ``compose`` with vambn's Identity, Compose/setup_moo and MOOForLoop.

vambn (``nfdi4health/docker-vambn``) is not on PyPI: the references are the
recorded fixtures ``tests/fixtures/vambn_fixtures.npz`` (see
/work/shared/reference/README.md), in float64. Each task's ``[B, D]`` block is
one leaf ``"z"`` of shape ``[K, B, D]``.

* ``out`` (the method's ``[K, B, D]`` output) is compared with
  ``compose(...).per_task``; ``final`` (the gradient MOOForLoop passes on:
  ``sum_k out_k`` rescaled to ``||sum_k g_k||``) with the update of
  ``compose(..., rescale="sum_norm")``.
* Tolerance: 1e-12 of ``max|reference|`` (observed: below 1e-15), 1e-8 for
  compositions with IMTL-G (its ``alpha_0 = 1 - sum a`` cancels for large
  magnitude ratios; observed up to 6e-12; the README suggests 1e-6). Cases flagged unstable (``stable`` /
  ``final_stable`` False) are only checked to be finite, or, where the
  reference is NaN (NSGD on all-zero gradients), to be the documented zero.
* ``final`` of the single methods (NSGD, GradNorm) and of the stateful
  sequences is MOOForLoop around the method: ``compose(method,
  rescale="sum_norm")``.
* ``setup_imtlg_nsgd`` = ``compose(imtl_g(), nsgd(update_at=1))``;
  ``setup_gradnorm_graddrop`` = ``compose(gradnorm(alpha=1, update_at=1,
  variant="gradient"), graddrop(leakage=0.2, batch_axes=0, f=min(., 0.5)))``
  with the recorded uniforms replayed through ``graddrop_uniforms=`` (which
  compose passes to every method; vambn's GradDrop clamps its odds to 1/2,
  reproduced by ``f``).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax._compose import compose, identity
from mtl_optax._normalization import gradnorm, nsgd

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vambn_fixtures.npz"
_F = np.load(FIXTURES)
CASE_IDS = [str(c) for c in _F["cases.id"]]
SEQ_IDS = sorted(
    {k.split(".")[1] for k in _F.files if k.startswith("seq.") and k.endswith(".grads")}
)

RTOL = 1e-12
RTOL_IMTL = 1e-8  # IMTL-G's alpha_0 = 1 - sum(a) cancels; observed <= 6e-12 (magnitude cases).


def _fx(key):
    return _F[key]


def _check(actual, expected, *, stable, rtol=RTOL, scale=None):
    """``actual`` against a vambn array: rtol of max|expected| if stable, else finite."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.all(np.isfinite(actual))
    if np.isnan(expected).any():
        # NSGD receiving all-zero gradients (0 / 0 in the reference; e.g. after
        # IMTL-G zeroed every task): ours is documented to be 0.
        assert np.all(actual == 0.0), np.abs(actual).max()
        return "nan"
    if not stable:
        return "unstable"
    if scale is None:
        scale = np.abs(expected).max()
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} * {scale:.3e}"
    return "compared"


def _case(case_id):
    grads = _fx(f"case.{case_id}.grads")
    return grads, {"z": jnp.asarray(grads)}, CASE_IDS.index(case_id)


# ---------------------------------------------------------------------------
# Identity.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_identity_matches_vambn_out_and_final(x64, case_id):
    grads, tree, i = _case(case_id)
    for tx in (identity(), compose(), compose(identity())):
        out, _ = tx.per_task.update(tree, tx.per_task.init(None))
        np.testing.assert_array_equal(np.asarray(out["z"]), _fx(f"identity.{case_id}.out"))
    tx = compose(identity(), rescale="sum_norm")
    update, _ = tx.update(tree, tx.init(None))
    final = _fx(f"identity.{case_id}.final")
    _check(update["z"], final, stable=_fx("identity.final_stable")[i])
    # The rescale of the plain sum is a no-op, even where vambn flags the case
    # unstable (exactly opposite gradients: both sum to exactly zero).
    np.testing.assert_allclose(np.asarray(update["z"]), grads.sum(0), rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------
# MOOForLoop around the single methods: the `final` of NSGD and GradNorm.
# ---------------------------------------------------------------------------


def _single_methods(k):
    """vambn variant -> mtl_optax method (the rescale is method-independent: three variants)."""
    return {
        "nsgd_u1": nsgd(update_at=1, num_tasks=k),
        "gradnormmod_a1_u1": gradnorm(1.0, 1, optax.sgd(0.05), "gradient", num_tasks=k),
        "gradnorm_a1p5_u0": gradnorm(1.5, 0, optax.sgd(0.05), "loss", num_tasks=k),
    }


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_sum_norm_rescale_matches_vambn_mooforloop_finals(x64, case_id):
    grads, tree, i = _case(case_id)
    losses = jnp.asarray(_fx(f"case.{case_id}.losses"))
    outcomes = set()
    for variant, method in _single_methods(grads.shape[0]).items():
        tx = compose(method, rescale="sum_norm")
        update, state = tx.update(tree, tx.init(None), value=losses)
        assert len(state) == 1 and int(state[0].count) == 1
        outcomes.add(
            _check(
                update["z"],
                _fx(f"{variant}.{case_id}.final"),
                stable=_fx(f"{variant}.final_stable")[i],
            )
        )
    if np.all(grads == 0):
        assert "nan" in outcomes


# seq variant -> (method, "sgd" when theta starts at the recorded weight_raw_init)
def _sequence_methods(k):
    return {
        "nsgd_u1": (nsgd(update_at=1, num_tasks=k), None),
        "nsgd_u3": (nsgd(update_at=3, num_tasks=k), None),
        "gradnormmod_a1_u1_sgd": (
            gradnorm(1.0, 1, optax.sgd(0.05), "gradient", num_tasks=k),
            "sgd",
        ),
        "gradnormmod_a1p5_u2_sgd": (
            gradnorm(1.5, 2, optax.sgd(0.05), "gradient", num_tasks=k),
            "sgd",
        ),
        "gradnorm_a1p5_u1_sgd": (gradnorm(1.5, 1, optax.sgd(0.05), "loss", num_tasks=k), "sgd"),
        "gradnorm_a0p5_u0_noopt": (
            gradnorm(0.5, 0, optax.set_to_zero(), "loss", num_tasks=k),
            None,
        ),
    }


@pytest.mark.parametrize("sid", SEQ_IDS)
def test_sum_norm_rescale_matches_vambn_sequence_finals(x64, sid):
    """Five calls of MOOForLoop(method) on one instance (vambn's second, identically driven one)."""
    grads, losses = _fx(f"seq.{sid}.grads"), _fx(f"seq.{sid}.losses")
    k = grads.shape[1]
    for variant, (method, init) in _sequence_methods(k).items():
        prefix = f"seq.{sid}.{variant}"
        tx = compose(method, rescale="sum_norm")
        state = tx.init(None)
        if init == "sgd":
            state = (state[0]._replace(logits=jnp.asarray(_fx(f"{prefix}.weight_raw_init"))),)
        for t in range(grads.shape[0]):
            update, state = tx.update(
                {"z": jnp.asarray(grads[t])}, state, value=jnp.asarray(losses[t])
            )
            # vambn's final is not flagged per call: the sequences hold no degenerate input.
            _check(update["z"], _fx(f"{prefix}.final")[t], stable=True)
            if "gradnorm" in variant and not _fx(f"{prefix}.weight_grad_stable")[t]:
                # A rounding-noise weight gradient: continue from the reference's theta.
                logits = jnp.asarray(_fx(f"{prefix}.weight_raw_after")[t])
                state = (state[0]._replace(logits=logits),)


# ---------------------------------------------------------------------------
# setup_moo compositions (need imtl_g and graddrop).
# ---------------------------------------------------------------------------


def _require_method(name):
    if name not in mtl_optax.available():
        pytest.fail(f"mtl_optax has no method {name!r}: the setup_moo parity needs it.")
    return lambda **hparams: mtl_optax.get(name, **hparams)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_setup_imtlg_nsgd_matches_vambn(x64, case_id):
    imtl_g = _require_method("imtl_g")
    grads, tree, i = _case(case_id)
    k = grads.shape[0]
    tx = compose(imtl_g(num_tasks=k), nsgd(update_at=1, num_tasks=k))
    out, _ = tx.per_task.update(tree, tx.per_task.init(None))
    stable = _fx("setup_imtlg_nsgd.stable")[i]
    _check(out["z"], _fx(f"setup_imtlg_nsgd.{case_id}.out"), stable=stable, rtol=RTOL_IMTL)
    tx = compose(imtl_g(num_tasks=k), nsgd(update_at=1, num_tasks=k), rescale="sum_norm")
    update, _ = tx.update(tree, tx.init(None))
    final = _fx(f"setup_imtlg_nsgd.{case_id}.final")
    _check(update["z"], final, stable=_fx("setup_imtlg_nsgd.final_stable")[i], rtol=RTOL_IMTL)


def _vambn_graddrop(k):
    graddrop = _require_method("graddrop")
    return graddrop(leakage=0.2, num_tasks=k, batch_axes=0, f=lambda p: jnp.minimum(p, 0.5))


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_setup_gradnorm_graddrop_matches_vambn(x64, case_id):
    grads, tree, i = _case(case_id)
    k = grads.shape[0]
    uniforms = {"z": jnp.asarray(_fx(f"case.{case_id}.graddrop_u"))}  # [1, D], shared by the tasks

    def build(rescale):
        return compose(
            gradnorm(1.0, 1, None, "gradient", num_tasks=k), _vambn_graddrop(k), rescale=rescale
        )

    tx = build("none")
    out, state = tx.per_task.update(tree, tx.per_task.init(None), graddrop_uniforms=uniforms)
    assert int(state[0].count) == 1
    _check(
        out["z"],
        _fx(f"setup_gradnorm_graddrop.{case_id}.out"),
        stable=_fx("setup_gradnorm_graddrop.stable")[i],
    )
    tx = build("sum_norm")
    update, _ = tx.update(tree, tx.init(None), graddrop_uniforms=uniforms)
    final = _fx(f"setup_gradnorm_graddrop.{case_id}.final")
    _check(update["z"], final, stable=_fx("setup_gradnorm_graddrop.final_stable")[i])
