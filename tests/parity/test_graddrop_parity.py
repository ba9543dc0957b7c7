"""Parity of ``graddrop`` with TorchJD, LibMTL and the vambn fixtures.

GradDrop is random; every exact comparison replays mtl_optax's own uniform
draws in the reference (``tx.uniforms(task_grads, state)`` gives the draws of
the next update; TorchJD's ``torch.rand`` and LibMTL's ``torch.rand_like`` are
monkeypatched to return them), or feeds the reference's recorded draws to
mtl_optax (``graddrop_uniforms=`` on ``update``; vambn's ``case.<id>.graddrop_u``).
Given the draws, the output is a masked sum, so both sides agree to rounding:
tolerance 1e-12 relative to ``sum_k |g_k|`` per coordinate (a flipped mask
changes a coordinate by a whole ``|g_k|``). Everything runs in float64 except
the float32 / bfloat16 leaf tests.

The law of the draws is checked separately: the empirical mean of many
updates against the exact expectation (vambn's ``expected_out`` and the
paper's formula), and a Kolmogorov-Smirnov test of the uniforms.

References: TorchJD 0.18 ``GradDrop(f, leak)`` on the ``(K, P)`` Jacobian;
LibMTL 1.1.5 ``GradDrop`` (representation gradients, statistic
``sum_b sign(rep) * g``, ``P = 0.5 (1 + sum / (sum|.| + 1e-7))``, scalar
``leak``); vambn's ``GradDrop`` fixtures (``graddrop_l0p2``, ``graddrop_l0``,
``graddrop_lmix``, ``graddrop_orig_l0p2``, ``graddrop_unbatched``).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax._graddrop import apply_graddrop

from .conftest import (
    EDGE_CASE_NAMES,
    edge_jacobian,
    import_libmtl,
    jacobian_to_tree,
    params_like,
    random_jacobian,
    reference,
    require_reference,
    to_numpy,
    torch_default_float64,
    tree_to_matrix,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")


FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "vambn_fixtures.npz"


def _vambn_clamp(p):
    """vambn's purity: ``0.5 * clamp(1 + ratio, 0, 1) = min(P, 1/2)``."""
    return jnp.minimum(p, 0.5)


def assert_masked_close(actual, expected, jac, *, rtol=1e-12):
    """``actual ≈ expected`` coordinatewise, to ``rtol * sum_k |J_kj|``."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    bound = rtol * np.abs(np.asarray(jac, np.float64)).sum(0)
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())}/{bad.size} coordinates differ; worst"
        f" {np.max(np.where(bad, err - bound, -np.inf)):.3e} above the bound"
    )


# ---------------------------------------------------------------------------
# TorchJD: GradDrop on the Jacobian, one statistic per coordinate.
# ---------------------------------------------------------------------------


def _patch_torch_rand(monkeypatch, draws, calls):
    """Makes ``torch.rand`` (as called by TorchJD's GradDrop) return ``draws``."""
    real_rand = torch.rand

    def fake_rand(*size, dtype=None, device=None, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if kwargs.get("generator") is not None or shape != tuple(draws.shape):
            return real_rand(*size, dtype=dtype, device=device, **kwargs)
        calls.append(shape)
        return torch.from_numpy(np.asarray(draws)).to(dtype=dtype or torch.float32)

    monkeypatch.setattr(torch, "rand", fake_rand)


_RUNNERS: dict = {}


def _runner(leak, batch_axes=None):
    """A jitted ``(task_grads, state, params) -> (draws, update)`` for one configuration.

    Cached, so that test cases with the same configuration and shapes share a
    compilation; the seed enters through the state's key.
    """
    config = (tuple(np.atleast_1d(leak).tolist()), np.ndim(leak), batch_axes)
    if config not in _RUNNERS:
        tx = mtl_optax.get("graddrop", leakage=leak, batch_axes=batch_axes)

        @jax.jit
        def run(tree, state, params):
            return tx.uniforms(tree, state), tx.update(tree, state, params)[0]

        _RUNNERS[config] = (tx, run)
    return _RUNNERS[config]


def _draws_and_update(leak, tree, seed, params=None, *, batch_axes=None):
    """The draws of the next update from the state of ``key=seed``, and that update."""
    tx, run = _runner(leak, batch_axes)
    state = tx.init(params)._replace(key=jax.random.key(seed))
    return run(tree, state, params)


def _torchjd_replay(jac, leak, seed, monkeypatch, *, tree=None, reference_jac=None):
    """(mtl_optax update, TorchJD's update with the same draws, the draws) on ``jac``."""
    tree = jacobian_to_tree(jac) if tree is None else tree
    params = params_like(tree)
    k = jac.shape[0]
    draws, update = _draws_and_update(leak, tree, seed, params)
    draws = tree_to_vector(draws)
    calls = []
    _patch_torch_rand(monkeypatch, draws.astype(np.float64), calls)
    if np.ndim(leak) == 1:
        leak_t = torch.tensor(np.asarray(leak, np.float64))
    elif leak == 0:
        leak_t = None  # TorchJD's default: no leak.
    else:
        leak_t = torch.full((k,), float(leak), dtype=torch.float64)
    ref_jac = jac if reference_jac is None else reference_jac
    expected = to_numpy(aggregation.GradDrop(leak=leak_t)(torch.from_numpy(ref_jac)))
    assert len(calls) == 1, "TorchJD drew its uniforms somewhere else"
    return tree_to_vector(update), expected, draws


# K in {2, 3, 5, 10}, P in the hundreds to thousands; two seeds per K (same
# shapes, so one compilation each).
RANDOM_CASES = [(2, 300, 0.0), (3, 2000, 0.3), (5, 1000, 0.0), (10, 700, 0.3)]


@pytest.mark.parametrize(
    ("k", "p", "leak"), RANDOM_CASES, ids=[f"K{k}-P{p}-l{lk}" for k, p, lk in RANDOM_CASES]
)
def test_random_jacobians_match_torchjd(x64, monkeypatch, k, p, leak):
    for seed in range(2):
        jac = random_jacobian(100 * k + seed, k, p)
        ours, theirs, _ = _torchjd_replay(jac, leak, seed, monkeypatch)
        assert_masked_close(ours, theirs, jac)


def test_per_task_leakage_matches_torchjd(x64, monkeypatch):
    jac = random_jacobian(5, 4, 777)
    leak = np.array([0.0, 0.1, 0.5, 1.0])
    ours, theirs, _ = _torchjd_replay(jac, leak, 9, monkeypatch)
    assert_masked_close(ours, theirs, jac)


def _sparse_ties(rng, p):
    """Coordinates where some or all tasks are exactly 0."""
    jac = rng.standard_normal((4, p))
    jac[rng.random((4, p)) < 0.6] = 0.0
    jac[:, :5] = 0.0
    return jac


def _edge_case(name):
    return edge_jacobian(name, seed=17, extra={"sparse_ties": _sparse_ties})


EDGE_CASES = (
    *(c for c in EDGE_CASE_NAMES if c not in ("all_zero", "tiny_vs_huge")),
    "sparse_ties",
)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_match_torchjd(x64, monkeypatch, case):
    """Edge cases against TorchJD (leak 0.2), and what they give independently of it."""
    jac = _edge_case(case)
    ours, theirs, draws = _torchjd_replay(jac, 0.2, 3, monkeypatch)
    assert_masked_close(ours, theirs, jac)
    assert np.all(np.isfinite(ours))
    if case in ("K1", "identical"):  # purity 1 or 0: every gradient is kept whole.
        np.testing.assert_array_equal(ours, jac.sum(0))
    if case == "opposite":  # purity 1/2: one sign survives, the other leaks 0.2.
        pos = np.where(jac[0] > 0, jac[0], jac[1])
        kept = np.where(draws < 0.5, pos, -pos)
        np.testing.assert_allclose(ours, kept - 0.2 * kept, rtol=1e-15)
    if case == "sparse_ties":  # all-zero coordinates: TorchJD's purity is 0/0 = NaN; 0 both.
        assert np.all(ours[:5] == 0) and np.all(theirs[:5] == 0)


def test_k40_p1e5_matches_torchjd(x64, monkeypatch):
    jac = random_jacobian(40, 40, 100_000)
    ours, theirs, _ = _torchjd_replay(jac, 0.1, 40, monkeypatch, tree={"x": jnp.asarray(jac)})
    assert_masked_close(ours, theirs, jac)


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # float32 sums of at most 5 terms: a few ulps of 2**-24; bfloat16 outputs: 2**-8.
    [(jnp.float32, 1e-6), (jnp.bfloat16, 2**-7)],
    ids=["float32", "bfloat16"],
)
def test_low_precision_leaves_match_float64_torchjd(x64, monkeypatch, dtype, rtol):
    """float32 / bfloat16 leaves against TorchJD in float64 on the same (rounded) inputs.

    The purity is computed in float32 on our side and in float64 in the
    reference, so a coordinate whose purity is within 1e-5 of its uniform could
    flip its mask: such razor-edge coordinates are excluded (and must be rare).
    """
    jac64 = random_jacobian(77, 5, 3000)
    tree = jax.tree_util.tree_map(lambda x: x.astype(dtype), jacobian_to_tree(jac64))
    rounded = tree_to_matrix(jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), tree))
    ours, theirs, draws = _torchjd_replay(
        rounded, 0.0, 7, monkeypatch, tree=tree, reference_jac=rounded
    )
    purity = 0.5 * (1 + rounded.sum(0) / np.abs(rounded).sum(0))
    clear = np.abs(purity - draws) > 1e-5
    assert clear.mean() > 0.99
    leaves = jax.tree_util.tree_leaves(tree)
    assert all(x.dtype == dtype for x in leaves)
    assert_masked_close(ours[clear], theirs[clear], rounded[:, clear], rtol=rtol)


# ---------------------------------------------------------------------------
# LibMTL: GradDrop on representation gradients (batch-separated).
# ---------------------------------------------------------------------------


def _libmtl_graddrop(grads, rep, draws, leak, monkeypatch):
    """Drives LibMTL's GradDrop on per-task representation gradients ``grads`` [K, B, D].

    The representation ``rep`` [B, D] feeds K heads whose losses are
    ``<rep_k, grads[k]>``, so the gradient each task sends back is ``grads[k]``;
    ``torch.rand_like`` returns ``draws`` [D]. Returns the gradient that
    reaches the representation: ``sum_k (leak + (1 - leak) M_k) * grads[k]``.
    """
    GradDrop = import_libmtl().weighting.GradDrop
    k = grads.shape[0]
    calls = []
    real_rand_like = torch.rand_like

    def fake_rand_like(tensor, **kwargs):
        if tuple(tensor.shape) != tuple(draws.shape):
            return real_rand_like(tensor, **kwargs)
        calls.append(tuple(tensor.shape))
        return torch.from_numpy(np.array(draws, np.float64))

    monkeypatch.setattr(torch, "rand_like", fake_rand_like)
    with torch_default_float64():  # LibMTL allocates with the default dtype.
        base = torch.from_numpy(rep).requires_grad_()
        weighting = GradDrop()
        weighting.task_num, weighting.device, weighting.rep_grad = k, "cpu", True
        weighting.task_name = [f"t{i}" for i in range(k)]
        weighting.rep = base * 1.0
        weighting.rep_tasks = {
            name: weighting.rep.detach().clone().requires_grad_() for name in weighting.task_name
        }
        losses = torch.stack(
            [
                (weighting.rep_tasks[name] * torch.from_numpy(grads[i])).sum()
                for i, name in enumerate(weighting.task_name)
            ]
        )
        weighting.backward(losses, leak=leak)
    assert len(calls) == 1
    return to_numpy(base.grad)


@pytest.mark.parametrize(
    ("seed", "k", "b", "d", "leak"), [(1, 2, 4, 16, 0.0), (2, 3, 8, 64, 0.2), (3, 5, 16, 200, 0.5)]
)
def test_batched_graddrop_matches_libmtl_on_positive_representations(
    x64, monkeypatch, seed, k, b, d, leak
):
    """With ``rep > 0`` LibMTL's statistic is the batch sum: ``batch_axes=0``."""
    rng = np.random.default_rng(seed)
    grads = rng.standard_normal((k, b, d))
    rep = rng.random((b, d)) + 0.1
    tree = {"z": jnp.asarray(grads)}
    draws, update = _draws_and_update(leak, tree, seed, batch_axes=0)
    draws = np.asarray(draws["z"])
    assert draws.shape == (1, d)
    expected = _libmtl_graddrop(grads, rep, draws[0], leak, monkeypatch)
    assert_masked_close(np.asarray(update["z"]).ravel(), expected.ravel(), grads.reshape(k, -1))


def test_paper_sign_form_matches_libmtl(x64, monkeypatch):
    """LibMTL's (the paper's) statistic ``sum_b sign(A) g``: feed ``sign(A) g``, multiply by ``sign(A)``."""
    rng = np.random.default_rng(8)
    k, b, d = 4, 8, 96
    grads = rng.standard_normal((k, b, d))
    rep = rng.standard_normal((b, d))
    sign = np.sign(rep)
    tree = {"z": jnp.asarray(sign * grads)}
    draws, update = _draws_and_update(0.1, tree, 8, batch_axes=0)
    draws = np.asarray(draws["z"])[0]
    expected = _libmtl_graddrop(grads, rep, draws, 0.1, monkeypatch)
    assert_masked_close(
        (sign * np.asarray(update["z"])).ravel(), expected.ravel(), grads.reshape(k, -1)
    )
    # Without the sign the statistic differs, and so do some masks.
    tx = mtl_optax.get("graddrop", leakage=0.1, batch_axes=0)
    plain, _ = tx.update({"z": jnp.asarray(grads)}, tx.init(None), graddrop_uniforms={"z": draws})
    assert np.abs(np.asarray(plain["z"]) - expected).max() > 1e-3


def test_libmtl_epsilon_biases_tiny_gradients(x64, monkeypatch):
    """LibMTL adds 1e-7 to the purity's denominator: for tiny gradients P -> 1/2.

    Every task positive at 1e-9 scale: the paper's purity is 1 and mtl_optax
    keeps every gradient; LibMTL's purity is about 0.5 + 0.5 * 1e-9 * K * B / 1e-7
    and it drops the gradients wherever the draw exceeds it.
    """
    rng = np.random.default_rng(4)
    k, b, d = 3, 2, 200
    grads = 1e-9 * (rng.random((k, b, d)) + 0.5)
    rep = np.ones((b, d))
    draws = rng.random(d)
    tx = mtl_optax.get("graddrop", batch_axes=0)
    ours, _ = tx.update({"z": jnp.asarray(grads)}, tx.init(None), graddrop_uniforms={"z": draws})
    np.testing.assert_array_equal(np.asarray(ours["z"]), grads.sum(0))
    theirs = _libmtl_graddrop(grads, rep, draws, 0.0, monkeypatch)
    dropped = np.all(theirs == 0, axis=0)
    assert 0.2 < dropped.mean() < 0.8, dropped.mean()


# ---------------------------------------------------------------------------
# vambn fixtures (batched: [K, B, D] with the statistic summed over B).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vambn():
    with np.load(FIXTURES) as data:
        return {key: data[key] for key in data.files}


CASE_IDS = [str(c) for c in np.load(FIXTURES)["cases.id"]]


def _vambn_leakage(variant, k):
    return {
        "graddrop_l0p2": 0.2,
        "graddrop_l0": 0.0,
        "graddrop_lmix": np.linspace(0.0, 0.6, k),
        # impartial-vaes multiplies by a float32 mask: float32(0.2) = 0.20000000298.
        "graddrop_orig_l0p2": float(np.float32(0.2)),
    }[variant]


def _replay(vambn, cid, leakage, *, f=None, per_task=True, via="update"):
    grads = vambn[f"case.{cid}.grads"]
    draws = vambn[f"case.{cid}.graddrop_u"]
    tree, u = {"z": jnp.asarray(grads)}, {"z": jnp.asarray(draws)}
    if via == "apply":
        out = apply_graddrop(tree, u, leakage=leakage, batch_axes=0, f=f, per_task=per_task)
    else:
        tx = mtl_optax.get("graddrop", leakage=leakage, batch_axes=0, f=f, num_tasks=grads.shape[0])
        form = tx.per_task if per_task else tx
        out, _ = form.update(tree, tx.init(None), graddrop_uniforms=u)
    return np.asarray(out["z"]), grads


def _assert_close_to_out(ours, out, grads):
    # Suggested tolerance 1e-10 of max|out|; the masks are exact, so 1e-13 holds.
    scale = max(np.abs(out).max(), np.abs(grads).max(), 1e-300)
    np.testing.assert_allclose(ours, out, rtol=0, atol=1e-13 * scale)


VARIANTS = ("graddrop_l0p2", "graddrop_l0", "graddrop_lmix")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cid", CASE_IDS)
def test_vambn_replay_with_its_clamp(x64, vambn, variant, cid):
    """vambn's outputs, given its draws, with vambn's clamped purity ``f = min(P, 1/2)``."""
    assert vambn[f"{variant}.stable"][CASE_IDS.index(cid)]
    k = vambn[f"case.{cid}.grads"].shape[0]
    ours, grads = _replay(vambn, cid, _vambn_leakage(variant, k), f=_vambn_clamp)
    _assert_close_to_out(ours, vambn[f"{variant}.{cid}.out"], grads)
    # The summed update is the sum of the per-task outputs.
    total, _ = _replay(vambn, cid, _vambn_leakage(variant, k), f=_vambn_clamp, per_task=False)
    _assert_close_to_out(total, vambn[f"{variant}.{cid}.out"].sum(0), grads)


@pytest.mark.parametrize("cid", CASE_IDS)
def test_original_impartial_vaes_graddrop_is_the_paper(x64, vambn, cid):
    """The original (unclamped) GradDrop is mtl_optax's default, bit for bit."""
    k = vambn[f"case.{cid}.grads"].shape[0]
    out = vambn[f"graddrop_orig_l0p2.{cid}.out"]
    ours, grads = _replay(vambn, cid, _vambn_leakage("graddrop_orig_l0p2", k), via="apply")
    _assert_close_to_out(ours, out, grads)
    # With the exact 0.2 the dropped entries differ by float32(0.2) - 0.2 = 3e-9 relative.
    exact, _ = _replay(vambn, cid, 0.2)
    np.testing.assert_allclose(exact, out, rtol=2e-8, atol=0)


@pytest.mark.parametrize("cid", CASE_IDS)
def test_vambn_agrees_with_the_paper_where_its_clamp_is_inactive(x64, vambn, cid):
    """Without the clamp, vambn's outputs are matched on every feature with odds <= 1/2."""
    ours, grads = _replay(vambn, cid, 0.2)
    out = vambn[f"graddrop_l0p2.{cid}.out"]
    odds = vambn[f"case.{cid}.graddrop_odds_orig"][0]
    np.testing.assert_array_equal(vambn[f"case.{cid}.graddrop_odds"][0], np.minimum(odds, 0.5))
    inactive = odds <= 0.5
    _assert_close_to_out(ours[..., inactive], out[..., inactive], grads[..., inactive])


def test_vambn_clamp_drops_agreeing_positive_gradients(x64, vambn):
    """Where vambn differs: features with odds > 1/2 and a draw in (1/2, odds].

    There the paper keeps the positive gradients (and drops the negative ones);
    vambn's clamped odds 1/2 < u do the opposite. The fixtures hold such
    features, and on every one of them the two outputs differ exactly so.
    """
    count = 0
    for cid in CASE_IDS:
        ours, grads = _replay(vambn, cid, 0.2)
        out = vambn[f"graddrop_l0p2.{cid}.out"]
        odds = vambn[f"case.{cid}.graddrop_odds_orig"][0]
        draws = vambn[f"case.{cid}.graddrop_u"][0]
        flipped = (odds > 0.5) & (draws > 0.5) & (draws < odds)
        stat = grads.sum(1, keepdims=True)  # [K, 1, D]
        mask_paper = np.where(stat > 0, 1.0, 0.2)
        mask_vambn = np.where(stat < 0, 1.0, 0.2)
        np.testing.assert_allclose(
            ours[..., flipped], (mask_paper * grads)[..., flipped], rtol=1e-15
        )
        np.testing.assert_allclose(
            out[..., flipped], (mask_vambn * grads)[..., flipped], rtol=1e-15
        )
        assert np.all(np.abs(ours - out)[..., ~flipped] <= 1e-13 * np.abs(grads).max())
        count += int(flipped.sum())
    assert count >= 20, count


@pytest.mark.parametrize("gid", ["gdu0_K2_D16", "gdu1_K3_D5", "gdu2_K5_D64"])
def test_vambn_unbatched_branch_is_activation_sign(x64, vambn, gid):
    """vambn's unbatched statistic ``sign(x) g_k`` is ``activation_sign=True`` with ``params=x``.

    Exact on every feature, including ``x = 0`` (statistic 0: every task keeps
    ``leakage * g``), and the same through the summed update.
    """
    p = f"graddrop_unbatched.{gid}."
    grads, x, leak, draws, out = (vambn[p + n] for n in ("grads", "inputs", "leakage", "u", "out"))
    assert (x == 0).sum() >= 1
    tx = mtl_optax.get("graddrop", leakage=leak, f=_vambn_clamp, activation_sign=True)
    params = {"z": jnp.asarray(x)}
    g = {"z": jnp.asarray(grads)}
    ours, _ = tx.per_task.update(g, tx.init(params), params, graddrop_uniforms={"z": draws})
    _assert_close_to_out(np.asarray(ours["z"]), out, grads)
    summed, _ = tx.update(g, tx.init(params), params, graddrop_uniforms={"z": draws})
    np.testing.assert_allclose(
        np.asarray(summed["z"]), out.sum(0), rtol=0, atol=1e-13 * np.abs(grads).max()
    )
    # Without the activation's sign the statistic differs wherever x < 0.
    plain = mtl_optax.get("graddrop", leakage=leak, f=_vambn_clamp)
    other, _ = plain.per_task.update(g, plain.init(params), params, graddrop_uniforms={"z": draws})
    assert not np.allclose(np.asarray(other["z"]), out, rtol=1e-10, atol=0)


# ---------------------------------------------------------------------------
# The law of the draws.
# ---------------------------------------------------------------------------

NUM_STEPS = 3000
LAW_CASES = [
    "c04_rand_K2_B4_D16",
    "c23_rand_K8_B4_D64",
    "c30_zero_one_K3_B1_D16",
    "c33_collinear_mixed_K3_B4_D16",
]


def _mean_per_task_output(grads, steps, **hparams):
    """Mean and variance over ``steps`` successive per-task outputs from the state's own key."""
    k = grads.shape[0]
    tx = mtl_optax.get("graddrop", key=1234 + k, batch_axes=0, num_tasks=k, **hparams)
    tree = {"z": jnp.asarray(grads)}

    @jax.jit
    def run(state):
        def step(carry, _):
            state, total, total2 = carry
            out, state = tx.per_task.update(tree, state)
            return (state, total + out["z"], total2 + out["z"] ** 2), None

        zeros = jnp.zeros_like(tree["z"])
        (_, total, total2), _ = jax.lax.scan(step, (state, zeros, zeros), None, length=steps)
        return total / steps, total2 / steps

    mean, second = run(tx.init(None))
    return np.asarray(mean), np.asarray(second) - np.asarray(mean) ** 2


def _expectation(grads, odds, leak):
    """``(l + (1 - l) p_k) g_k`` with ``p_k = odds, 1 - odds, 0`` for ``S_k >, <, = 0``."""
    stat = grads.sum(1, keepdims=True)
    p = np.where(stat > 0, odds, np.where(stat < 0, 1 - odds, 0.0))
    return (leak + (1 - leak) * p) * grads


def _z_scores(mean, expected, grads, odds, leak, steps):
    stat = grads.sum(1, keepdims=True)
    p = np.where(stat > 0, odds, np.where(stat < 0, 1 - odds, 0.0))
    se = np.sqrt(p * (1 - p) / steps) * (1 - leak) * np.abs(grads)
    err = np.abs(mean - expected)
    assert np.all(err[se == 0] <= 1e-12 * np.abs(grads).max()), "deterministic entries differ"
    return np.where(se > 0, err / np.where(se > 0, se, 1), 0.0)


@pytest.mark.parametrize("cid", LAW_CASES)
def test_vambn_expected_out_statistically(x64, vambn, cid):
    """Mean of 3000 clamped-purity outputs vs vambn's exact ``expected_out`` (5 sigma).

    The same test rejects the paper's (unclamped) law on the fixtures: the
    paper's draws are more than 5 sigma away from vambn's expectation
    somewhere whenever some odds exceed 1/2.
    """
    grads = vambn[f"case.{cid}.grads"]
    expected = vambn[f"graddrop_l0p2.{cid}.expected_out"]
    odds = vambn[f"case.{cid}.graddrop_odds"]
    np.testing.assert_allclose(expected, _expectation(grads, odds, 0.2), rtol=1e-14, atol=0)
    mean, _ = _mean_per_task_output(grads, NUM_STEPS, leakage=0.2, f=_vambn_clamp)
    z = _z_scores(mean, expected, grads, odds, 0.2, NUM_STEPS)
    assert z.max() < 5, z.max()
    # The paper's law: checked against its own expectation, and rejected by vambn's.
    odds_orig = vambn[f"case.{cid}.graddrop_odds_orig"]
    paper_mean, _ = _mean_per_task_output(grads, NUM_STEPS, leakage=0.2)
    paper_z = _z_scores(
        paper_mean, _expectation(grads, odds_orig, 0.2), grads, odds_orig, 0.2, NUM_STEPS
    )
    assert paper_z.max() < 5, paper_z.max()
    if np.any((odds_orig > 0.55) & np.any(grads.sum(1, keepdims=True) != 0, axis=0)):
        se = np.sqrt(0.25 / NUM_STEPS) * 0.8 * np.abs(grads)
        assert np.max(np.abs(paper_mean - expected) / np.where(se > 0, se, 1)) > 5


def test_uniforms_are_uniform_and_fresh_every_step(x64):
    """Kolmogorov-Smirnov test of the draws of 200 steps; each step draws anew."""
    stats = require_reference("scipy.stats")
    tx = mtl_optax.get("graddrop", key=5)
    tree = {"a": jnp.zeros((2, 50)), "b": jnp.zeros((2, 7, 3))}

    @jax.jit
    def run(state):
        def step(state, _):
            draws = tx.uniforms(tree, state)
            _, state = tx.update(tree, state)
            return state, jnp.concatenate([draws["a"].ravel(), draws["b"].ravel()])

        return jax.lax.scan(step, state, None, length=200)[1]

    draws = np.asarray(run(tx.init(None)))
    assert draws.shape == (200, 71)
    assert stats.kstest(draws.ravel(), "uniform").pvalue > 1e-3
    assert len({tuple(row) for row in draws}) == 200
    # Different leaves use independent keys.
    assert not np.allclose(draws[:, :21], draws[:, 50:71])
