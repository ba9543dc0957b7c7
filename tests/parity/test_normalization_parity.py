"""Parity of ``nsgd`` and ``gradnorm`` with vambn (recorded fixtures) and LibMTL (live).

Everything runs in float64 (``x64``) unless a test says otherwise.

* vambn (``nfdi4health/docker-vambn``, not on PyPI): the recorded fixtures
  ``tests/fixtures/vambn_fixtures.npz`` (see /work/shared/reference/README.md).
  Each task's ``[B, D]`` block is one flattened vector: the task gradients are
  passed as one leaf of shape ``[K, B, D]``, the per-task form
  (``tx.per_task``) is compared with ``out`` and the update with
  ``out.sum(0)``. Tolerance 1e-12 of ``max|out|`` (observed: below 1e-15);
  cases flagged unstable are compared loosely (1e-6) or, where the reference
  is NaN, against the documented finite result.
* NSGD beyond the fixtures (K = 1, orthogonal, 1e-8 against 1e4, K = 40 with
  P = 1e5, multi-step captures, float32 and bfloat16 leaves): vambn cannot be
  run here, so these compare with a float64 numpy transcription of the
  reference's operations (README "Plain-language semantics", vambn_NOTES §4),
  written independently of mtl_optax.
* LibMTL 1.1.5 ``GradNorm`` (live): driven on given task gradients and losses
  (linear losses ``L = v + J theta``), with its default optimizer
  ``torch.optim.Adam(lr=1e-4, weight_decay=1e-5)`` on its ``loss_scale`` and
  mtl_optax's default optimizer (the same rule in optax), over several steps.
  Tolerances: the update, weights and weight gradient to 1e-12 (relative to
  the data), the parameters after the Adam step to 1e-12 absolute.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_optax._normalization import gradnorm, nsgd

from .conftest import (
    assert_combination_close,
    edge_jacobian,
    import_libmtl,
    jacobian_to_tree,
    params_like,
    random_jacobian,
    reference,
    to_numpy,
    torch_default_float64,
    tree_to_matrix,
    tree_to_vector,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vambn_fixtures.npz"
_F = np.load(FIXTURES)
CASE_IDS = [str(c) for c in _F["cases.id"]]
SEQ_IDS = sorted(
    {k.split(".")[1] for k in _F.files if k.startswith("seq.") and k.endswith(".grads")}
)

RTOL = 1e-12  # float64 parity with vambn, relative to max|out| (observed < 1e-15).
LOOSE = 1e-6  # cases flagged unstable by the fixtures.


def _fx(key):
    return _F[key]


def _case_index(case_id):
    return CASE_IDS.index(case_id)


def _assert_close_to_scale(actual, expected, rtol, scale=None):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if scale is None:
        scale = np.abs(expected).max()
    err = np.abs(actual - expected).max() if actual.size else 0.0
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:g} * {scale:.3e}"


# ---------------------------------------------------------------------------
# NSGD against the vambn fixtures.
# ---------------------------------------------------------------------------

NSGD_VARIANTS = {"nsgd_u1": 1, "nsgd_u0": 0}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_nsgd_single_call_matches_vambn(x64, case_id):
    grads = _fx(f"case.{case_id}.grads")
    k, i = grads.shape[0], _case_index(case_id)
    tree = {"z": jnp.asarray(grads)}
    for variant, update_at in NSGD_VARIANTS.items():
        expected = _fx(f"{variant}.{case_id}.out")
        tx = nsgd(update_at=update_at, num_tasks=k)
        out, state = tx.per_task.update(tree, tx.init(None))
        update, _ = tx.update(tree, tx.init(None))
        np.testing.assert_allclose(
            np.asarray(state.initial_norms),
            _fx(f"{variant}.{case_id}.initial_grads_after"),
            rtol=RTOL,
        )
        assert int(state.count) == 1
        if np.isnan(expected).any():
            # All-zero gradients: the reference divides 0 by 0; ours is documented to be 0.
            assert np.all(grads == 0) and np.isnan(expected).all()
            assert np.all(np.asarray(out["z"]) == 0) and np.all(np.asarray(update["z"]) == 0)
            continue
        rtol = RTOL if _fx(f"{variant}.stable")[i] else LOOSE
        _assert_close_to_scale(out["z"], expected, rtol)
        _assert_close_to_scale(update["z"], expected.sum(0), rtol, k * np.abs(expected).max())


@pytest.mark.parametrize("sid", SEQ_IDS)
def test_nsgd_sequences_match_vambn(x64, sid):
    grads = _fx(f"seq.{sid}.grads")
    k = grads.shape[1]
    for update_at in (0, 1, 3):
        prefix = f"seq.{sid}.nsgd_u{update_at}"
        tx = nsgd(update_at=update_at, num_tasks=k)
        state = tx.init(None)
        for t in range(grads.shape[0]):
            out, state = tx.per_task.update({"z": jnp.asarray(grads[t])}, state)
            _assert_close_to_scale(out["z"], _fx(f"{prefix}.out")[t], RTOL)
            np.testing.assert_allclose(
                np.asarray(state.initial_norms), _fx(f"{prefix}.initial_after")[t], rtol=RTOL
            )
            assert int(state.count) == int(_fx(f"{prefix}.counter_after")[t])


# ---------------------------------------------------------------------------
# NSGD against a float64 transcription of the reference (cases the fixtures lack).
# ---------------------------------------------------------------------------


def _nsgd_reference(jac, initial):
    """vambn's NSGD on a (K, P) matrix, in numpy float64, operation by operation."""
    n = np.sqrt((jac * jac).sum(axis=1))
    r = n / np.maximum(initial, 1e-15)
    a = r / max(r.sum(), 1e-15)
    a = a / a.sum()
    nu = (a * n).sum()
    return jac * (nu / np.maximum(n, 1e-15))[:, None]


def _edge_jacobian(name):
    return edge_jacobian(name, seed=17, magnitudes_seed=18)


EDGE = ("K1", "identical", "opposite", "orthogonal", "collinear", "zero_task", "magnitudes")
RANDOM = [(300 + k, k, p) for k, p in ((2, 2000), (3, 200), (5, 1000), (10, 300))]


def _run_nsgd_steps(jacs, update_at):
    """mtl_optax's per-task outputs and reference norms over steps, in float64."""
    k = jacs[0].shape[0]
    tx = nsgd(update_at=update_at, num_tasks=k)
    state, outs = tx.init(None), []
    for jac in jacs:
        tree = jacobian_to_tree(jac)
        out, state = tx.per_task.update(tree, state, params_like(tree))
        outs.append(tree_to_matrix(out))
    return outs, np.asarray(state.initial_norms)


def _reference_steps(jacs, update_at):
    initial, outs = np.ones(jacs[0].shape[0]), []
    for t, jac in enumerate(jacs):
        if t == update_at:
            initial = np.sqrt((jac * jac).sum(axis=1))
        outs.append(_nsgd_reference(jac, initial))
    return outs, initial


@pytest.mark.parametrize(("seed", "k", "p"), RANDOM, ids=[f"s{s}-K{k}-P{p}" for s, k, p in RANDOM])
def test_nsgd_random_sequences_match_the_reference_rule(x64, seed, k, p):
    """Four steps, the norms captured at step 1, per-task scales drifting over time."""
    rng = np.random.default_rng(seed)
    jacs = [random_jacobian(seed + t, k, p, scales=rng.uniform(0.1, 3.0, k)) for t in range(4)]
    ours, initial = _run_nsgd_steps(jacs, update_at=1)
    expected, expected_initial = _reference_steps(jacs, update_at=1)
    for a, b in zip(ours, expected, strict=True):
        _assert_close_to_scale(a, b, RTOL)
    np.testing.assert_allclose(initial, expected_initial, rtol=RTOL)


@pytest.mark.parametrize("case", EDGE)
def test_nsgd_edge_cases_match_the_reference_rule(x64, case):
    jac = _edge_jacobian(case)
    for update_at in (0, 5):
        (ours,), _ = _run_nsgd_steps([jac], update_at)
        (expected,), _ = _reference_steps([jac], update_at)
        _assert_close_to_scale(ours, expected, RTOL)
        if case == "zero_task":
            assert np.all(ours[1] == 0.0)


def test_nsgd_large_k40_p1e5_matches_the_reference_rule(x64):
    jac = random_jacobian(40, 40, 100_000, scales=np.geomspace(0.01, 100.0, 40))
    outs, _ = _run_nsgd_steps([jac, 0.5 * jac], update_at=0)
    expected, _ = _reference_steps([jac, 0.5 * jac], update_at=0)
    for a, b in zip(outs, expected, strict=True):
        _assert_close_to_scale(a, b, RTOL)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2**-7)])
def test_nsgd_low_precision_leaves_match_the_float64_reference(x64, dtype, rtol):
    """Leaves in float32 (tolerance 1e-5) and bfloat16 (2^-7, the output's rounding).

    The reference runs in float64 on the same (rounded) input values, so the
    difference is mtl_optax's float32 accumulation and the output's rounding.
    """
    jac = random_jacobian(7, 5, 1000, scales=[1e-3, 0.1, 1.0, 10.0, 1e3])
    rounded = np.asarray(jnp.asarray(jac, dtype).astype(jnp.float64))
    tree = jax.tree.map(lambda x: x.astype(dtype), jacobian_to_tree(rounded))
    tx = nsgd(update_at=0, num_tasks=5)
    out, _ = tx.per_task.update(tree, tx.init(None))
    assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(out))
    expected = _nsgd_reference(rounded, np.sqrt((rounded**2).sum(axis=1)))
    ours = tree_to_matrix(jax.tree.map(lambda x: x.astype(jnp.float64), out))
    # out_k = g_k * (nu / n_k): every entry carries its row's relative error.
    np.testing.assert_allclose(ours, expected, rtol=rtol, atol=0)
    np.testing.assert_allclose(
        np.linalg.norm(ours, axis=1), np.linalg.norm(expected, axis=1), rtol=rtol
    )


# ---------------------------------------------------------------------------
# GradNorm against the vambn fixtures.
# ---------------------------------------------------------------------------

# variant -> (alpha, update_at, mtl_optax variant)
GRADNORM_VARIANTS = {
    "gradnormmod_a1_u1": (1.0, 1, "gradient"),
    "gradnormmod_a1p5_u0": (1.5, 0, "gradient"),
    "gradnorm_a1p5_u0": (1.5, 0, "loss"),
    "gradnorm_a1_u1": (1.0, 1, "loss"),
}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_gradnorm_single_call_matches_vambn(x64, case_id):
    grads = _fx(f"case.{case_id}.grads")
    losses = jnp.asarray(_fx(f"case.{case_id}.losses"))
    k, i = grads.shape[0], _case_index(case_id)
    tree = {"z": jnp.asarray(grads)}
    n = np.sqrt((grads.reshape(k, -1) ** 2).sum(1))
    for variant, (alpha, update_at, kind) in GRADNORM_VARIANTS.items():
        # The SGD step does not change this call's numbers (theta starts at ones).
        tx = gradnorm(alpha, update_at, optax.sgd(0.05), kind, num_tasks=k)
        out, state = tx.per_task.update(tree, tx.init(None), value=losses)
        _assert_close_to_scale(out["z"], _fx(f"{variant}.{case_id}.out"), RTOL)
        np.testing.assert_allclose(
            np.asarray(state.initial_values),
            _fx(f"{variant}.{case_id}.initial_values_after"),
            rtol=RTOL,
        )
        scale = n.sum()  # the size of each term n_k w_k of the GradNorm loss (w = 1).
        loss_indep = _fx(f"{variant}.gradnorm_loss_indep")[i]
        assert abs(float(state.loss) - loss_indep) <= RTOL * max(scale, 1e-300)
        expected_grad = _fx(f"{variant}.{case_id}.weight_grad")
        if _fx(f"{variant}.weight_grad_stable")[i]:
            _assert_close_to_scale(
                state.logits_grad, expected_grad, 1e-10, max(np.abs(expected_grad).max(), 1e-300)
            )
        else:
            # A residual within rounding of 0: the reference's gradient has the sign of
            # rounding noise there (vambn_NOTES §5). Only its bound is checked:
            # |dL/dtheta_j| <= n_j w_j + mean(n w) with w = 1.
            assert np.all(np.abs(np.asarray(state.logits_grad)) <= n + n.mean() + 1e-300)
        np.testing.assert_allclose(
            np.asarray(state.logits), 1.0 - 0.05 * np.asarray(state.logits_grad), rtol=1e-15
        )


# seq variant -> (alpha, update_at, mtl_optax variant, SGD learning rate or None)
GRADNORM_SEQUENCES = {
    "gradnormmod_a1_u1_noopt": (1.0, 1, "gradient", None),
    "gradnormmod_a1_u1_sgd": (1.0, 1, "gradient", 0.05),
    "gradnormmod_a1p5_u2_sgd": (1.5, 2, "gradient", 0.05),
    "gradnorm_a1p5_u1_sgd": (1.5, 1, "loss", 0.05),
    "gradnorm_a0p5_u0_noopt": (0.5, 0, "loss", None),
}


@pytest.mark.parametrize("sid", SEQ_IDS)
@pytest.mark.parametrize("variant", GRADNORM_SEQUENCES)
def test_gradnorm_sequences_match_vambn(x64, sid, variant):
    """Five calls on one instance with vambn's external step theta -= 0.05 grad (optax.sgd).

    "noopt" sequences keep theta fixed (optax.set_to_zero); vambn accumulates
    the gradient into theta.grad, whose per-call contribution
    (``weight_grad_call``) is what the update computes.
    """
    alpha, update_at, kind, lr = GRADNORM_SEQUENCES[variant]
    prefix = f"seq.{sid}.{variant}"
    grads, losses = _fx(f"seq.{sid}.grads"), _fx(f"seq.{sid}.losses")
    k = grads.shape[1]
    optimizer = optax.set_to_zero() if lr is None else optax.sgd(lr)
    tx = gradnorm(alpha, update_at, optimizer, kind, num_tasks=k)
    state = tx.init(None)
    if lr is not None:
        state = state._replace(logits=jnp.asarray(_fx(f"{prefix}.weight_raw_init")))
    np.testing.assert_allclose(
        np.asarray(state.logits), _fx(f"{prefix}.weight_raw_before")[0], rtol=0
    )
    accumulated = np.zeros(k)
    for t in range(grads.shape[0]):
        np.testing.assert_allclose(
            np.asarray(state.logits), _fx(f"{prefix}.weight_raw_before")[t], rtol=0, atol=1e-14
        )
        g = grads[t].reshape(k, -1)
        out, state = tx.per_task.update(
            {"z": jnp.asarray(grads[t])}, state, value=jnp.asarray(losses[t])
        )
        out = np.asarray(out["z"])
        _assert_close_to_scale(out, _fx(f"{prefix}.out")[t], RTOL)
        # The weights used: out_k = w_k g_k.
        used = (out.reshape(k, -1) * g).sum(1) / (g * g).sum(1)
        np.testing.assert_allclose(used, _fx(f"{prefix}.weight_used")[t], rtol=1e-13)
        np.testing.assert_allclose(
            np.asarray(state.weights), _fx(f"{prefix}.weight_used")[t], rtol=1e-6
        )
        expected_grad = _fx(f"{prefix}.weight_grad_call")[t]
        if _fx(f"{prefix}.weight_grad_stable")[t]:
            _assert_close_to_scale(
                state.logits_grad, expected_grad, 1e-10, np.abs(expected_grad).max()
            )
            np.testing.assert_allclose(
                np.asarray(state.logits), _fx(f"{prefix}.weight_raw_after")[t], rtol=0, atol=1e-13
            )
            accumulated += np.asarray(state.logits_grad)
        else:
            # A rounding-noise gradient (vambn's default first call): not comparable
            # (only bounded); continue from the reference's parameters.
            bound = np.sqrt((g * g).sum(1)) * used
            assert np.all(np.abs(np.asarray(state.logits_grad)) <= bound + bound.mean() + 1e-300)
            state = state._replace(logits=jnp.asarray(_fx(f"{prefix}.weight_raw_after")[t]))
            accumulated += expected_grad
        if lr is None:
            _assert_close_to_scale(accumulated, _fx(f"{prefix}.weight_grad_accum")[t], 1e-10)
        np.testing.assert_allclose(
            np.asarray(state.initial_values), _fx(f"{prefix}.initial_after")[t], rtol=RTOL
        )
        assert int(state.count) == int(_fx(f"{prefix}.counter_after")[t])


# ---------------------------------------------------------------------------
# GradNorm against LibMTL (live).
# ---------------------------------------------------------------------------

torch = reference("torch")


class _LibMTLGradNorm:
    """LibMTL's GradNorm weighting on linear losses ``L = v + J theta`` (theta = 0).

    LibMTL's weighting is a mixin of its model; here the shared parameters are a
    single vector theta, so ``_get_grads`` returns the rows of J. The epoch is
    set to 1 (LibMTL's epoch 0 uses unit weights), and the epoch-0 mean losses
    (``train_loss_buffer[:, 0]``) are the initial losses mtl_optax captures.
    The trainer's optimizer is LibMTL's default, Adam(lr, weight_decay) from
    ``LibMTL.config``, stepping ``loss_scale``.
    """

    def __init__(self, libmtl, k, p, initial_losses):
        args = libmtl.config.LibMTL_args.parse_args([])
        assert args.optim == "adam"

        class Driven(libmtl.weighting.GradNorm):
            def __init__(self):
                super().__init__()
                self.theta = torch.nn.Parameter(torch.zeros(p, dtype=torch.float64))

            def get_share_params(self):
                return [self.theta]

            def zero_grad_share_params(self):
                # In place (torch 1.x semantics, which LibMTL's _reset_grad relies on).
                if self.theta.grad is not None:
                    self.theta.grad.zero_()

        with torch_default_float64():
            self.weighting = Driven()
            self.weighting.task_num, self.weighting.device = k, "cpu"
            self.weighting.rep_grad, self.weighting.epoch = False, 1
            self.weighting.train_loss_buffer = np.zeros((k, 2))
            self.weighting.train_loss_buffer[:, 0] = initial_losses
            self.weighting.init_param()
        self.alpha = args.alpha
        self.optimizer = torch.optim.Adam(
            [self.weighting.loss_scale], lr=args.lr, weight_decay=args.weight_decay
        )

    def step(self, jac, losses):
        """One training step: returns (update, weights, loss_scale grad, loss_scale after)."""
        w = self.weighting
        with torch_default_float64():
            w.theta.grad = None
            self.optimizer.zero_grad()
            total = torch.tensor(losses) + torch.tensor(jac) @ w.theta
            weights = w.backward(total, alpha=self.alpha)
            update = to_numpy(w.theta.grad).copy()
            grad = to_numpy(w.loss_scale.grad).copy()
            self.optimizer.step()
        return update, np.asarray(weights, np.float64), grad, to_numpy(w.loss_scale).copy()


def _compare_with_libmtl(jacs, losses, *, dtype=None, rtol=1e-12):
    """Runs both on the same steps; ``dtype`` casts mtl_optax's leaves (not LibMTL's)."""
    libmtl = import_libmtl()
    k, p = jacs[0].shape
    reference = _LibMTLGradNorm(libmtl, k, p, losses[0])
    tx = gradnorm(alpha=reference.alpha, update_at=0, num_tasks=k)  # default optimizer
    state = tx.init(None)
    # Adam's step is about lr * sign(grad), insensitive to small gradient errors:
    # with float64 leaves the parameters agree to rounding (1e-12 absolute), with
    # float32 / bfloat16 leaves to rtol * lr * 10.
    theta_atol = 1e-12 if dtype is None else rtol * 1e-3
    for jac, value in zip(jacs, losses, strict=True):
        expected_update, weights, expected_grad, expected_logits = reference.step(jac, value)
        np.testing.assert_allclose(
            k * jax.nn.softmax(state.logits), weights, rtol=1e-14, atol=theta_atol
        )
        tree = jacobian_to_tree(jac)
        if dtype is not None:
            tree = jax.tree.map(lambda x: x.astype(dtype), tree)
        update, state = tx.update(tree, state, params_like(tree), value=jnp.asarray(value))
        update = tree_to_vector(jax.tree.map(lambda x: x.astype(jnp.float64), update))
        assert_combination_close(update, expected_update, weights, jac, rtol=rtol)
        _assert_close_to_scale(
            state.logits_grad, expected_grad, max(rtol, 1e-10), np.abs(expected_grad).max() + 1e-300
        )
        np.testing.assert_allclose(
            np.asarray(state.logits), expected_logits, rtol=0, atol=theta_atol
        )
    return state


def _libmtl_problem(seed, k, p, steps, scales=None):
    rng = np.random.default_rng(seed)
    jacs = [random_jacobian(seed + 1000 * t, k, p, scales=scales) for t in range(steps)]
    losses = [rng.uniform(0.2, 2.0, k) for _ in range(steps)]
    return jacs, losses


LIBMTL_CASES = [(500 + k, k, p) for k, p in ((1, 100), (2, 1500), (3, 100), (5, 800), (10, 300))]


@pytest.mark.parametrize(
    ("seed", "k", "p"), LIBMTL_CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in LIBMTL_CASES]
)
def test_gradnorm_matches_libmtl_over_steps(x64, seed, k, p):
    jacs, losses = _libmtl_problem(seed, k, p, steps=3, scales=np.geomspace(0.3, 3.0, k))
    state = _compare_with_libmtl(jacs, losses)
    assert int(state.count) == 3


def test_gradnorm_defaults_are_libmtl_defaults():
    """alpha = 1.5 (LibMTL's config) and the optimizer of the LibMTL test above."""
    libmtl = import_libmtl()
    args = libmtl.config.LibMTL_args.parse_args([])
    assert gradnorm.__defaults__[0] == args.alpha == 1.5
    assert (args.optim, args.lr, args.weight_decay) == ("adam", 1e-4, 1e-5)


@pytest.mark.parametrize("case", EDGE)
def test_gradnorm_edge_cases_match_libmtl(x64, case):
    jac = _edge_jacobian(case)
    k = jac.shape[0]
    rng = np.random.default_rng(3)
    losses = [rng.uniform(0.2, 2.0, k) for _ in range(3)]
    _compare_with_libmtl([jac, 2.0 * jac, 0.5 * jac], losses)


def test_gradnorm_large_k40_p1e5_matches_libmtl(x64):
    jacs, losses = _libmtl_problem(41, 40, 100_000, steps=2, scales=np.geomspace(0.1, 10.0, 40))
    _compare_with_libmtl(jacs, losses)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2**-7)])
def test_gradnorm_low_precision_leaves_match_float64_libmtl(x64, dtype, rtol):
    """float32 / bfloat16 leaves against float64 LibMTL on the same (rounded) values."""
    jacs, losses = _libmtl_problem(9, 3, 500, steps=3, scales=[0.5, 1.0, 4.0])
    jacs = [np.asarray(jnp.asarray(j, dtype).astype(jnp.float64)) for j in jacs]
    _compare_with_libmtl(jacs, losses, dtype=dtype, rtol=rtol)


def test_where_libmtl_differs_floors_and_negative_losses(x64):
    """LibMTL has no 1e-5 floors and no clamp of the loss ratios; mtl_optax follows vambn.

    * A task whose initial loss is below 1e-5: vambn (and mtl_optax) divide by
      1e-5, LibMTL by the loss itself, which changes the target and the step.
    * A negative loss with alpha = 1.5: LibMTL's r^alpha is NaN, so is its
      GradNorm loss, and torch's derivative of |NaN| is 0 (that task's residual
      sign is lost); mtl_optax clamps the ratio at 0 (target 0, sign +1).
    """
    libmtl = import_libmtl()
    jac = random_jacobian(77, 3, 200, scales=[0.5, 1.0, 2.0])
    n = np.linalg.norm(jac, axis=1)

    def vambn_grad(values, initial, alpha=1.5, libmtl=False):
        ratio = values / (initial if libmtl else np.maximum(initial, 1e-5))
        r = ratio / (ratio.mean() if libmtl else max(ratio.mean(), 1e-5))
        with np.errstate(invalid="ignore"):
            residual = n - n.mean() * (r if libmtl else np.maximum(r, 0.0)) ** alpha  # w = 1
        s = np.where(np.isnan(residual), 0.0, np.sign(residual))
        return s * n - np.sum(s * n) / 3

    initial = np.array([1e-7, 1.0, 1.0])
    reference = _LibMTLGradNorm(libmtl, 3, 200, initial)
    tx = gradnorm(update_at=0, num_tasks=3)
    _, state = tx.update(jacobian_to_tree(jac), tx.init(None), value=jnp.asarray(initial))
    _, _, libmtl_grad, _ = reference.step(jac, initial)
    # At the capture step every ratio is 1 for LibMTL; vambn floors task 0's.
    np.testing.assert_allclose(libmtl_grad, vambn_grad(initial, initial, libmtl=True), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(state.logits_grad), vambn_grad(initial, initial), rtol=1e-12
    )
    assert not np.allclose(libmtl_grad, np.asarray(state.logits_grad), rtol=1e-3)

    values = np.array([-0.5, 1.0, 2.0])
    reference = _LibMTLGradNorm(libmtl, 3, 200, np.ones(3))
    _, _, libmtl_grad, _ = reference.step(jac, values)
    np.testing.assert_allclose(libmtl_grad, vambn_grad(values, np.ones(3), libmtl=True), rtol=1e-12)
    tx = gradnorm(update_at=None, num_tasks=3)
    _, state = tx.update(jacobian_to_tree(jac), tx.init(None), value=jnp.asarray(values))
    np.testing.assert_allclose(
        np.asarray(state.logits_grad), vambn_grad(values, np.ones(3)), rtol=1e-12
    )
    assert not np.allclose(libmtl_grad, np.asarray(state.logits_grad), rtol=1e-3)
    assert np.isfinite(float(state.loss)) and np.all(np.isfinite(np.asarray(state.logits)))
