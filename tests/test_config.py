"""conflict_free (ConFIG) and m_conflict_free (M-ConFIG): guarantees, options, state, errors.

The numbers are checked against a float64 NumPy computation of the definition
on the ``K x P`` unit gradients (SVD least squares), independent of the
``K x K`` route mtl_optax takes; the live PyTorch references are compared in
``tests/parity/test_config_parity.py``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtl_optax
from mtl_optax import _config

P = 24
PARAMS = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((12,))}  # P = 24


def _tree(jac, dtype=None):
    """(K, 24) matrix -> stacked task gradients with the structure of PARAMS."""
    jac = jnp.asarray(jac) if dtype is None else jnp.asarray(jac, dtype)
    k = jac.shape[0]
    return {"a": jac[:, :12].reshape(k, 4, 3), "b": jac[:, 12:]}


def _vec(tree):
    return np.concatenate(
        [np.asarray(tree["a"], np.float64).reshape(-1), np.asarray(tree["b"], np.float64)]
    )


def _params(dtype=None):
    return jax.tree.map(lambda x: x.astype(dtype or jnp.result_type(float)), PARAMS)


def _update(jac, name="conflict_free", **hparams):
    tx = mtl_optax.get(name, **hparams)
    params = _params()
    u, state = tx.update(_tree(jac), tx.init(params), params)
    return _vec(u), state


def _definition(jac, weights=None, length_model="projection", track_id=None):
    """ConFIG in float64 on the K x P unit gradients (SVD least squares)."""
    jac = np.asarray(jac, np.float64)
    k = jac.shape[0]
    norms = np.linalg.norm(jac, axis=1)
    units = np.divide(jac, norms[:, None], out=np.zeros_like(jac), where=norms[:, None] > 0)
    w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    d = np.linalg.lstsq(units, w, rcond=None)[0]
    d_hat = d / np.linalg.norm(d)
    if length_model == "projection":
        return np.sum(jac @ d_hat) * d_hat
    tau = {
        "track_min": np.min(norms),
        "track_max": np.max(norms),
        "track_harmonic": k / np.sum(1 / norms),
        "track_arithmetic": np.mean(norms),
        "track_geometric": np.exp(np.mean(np.log(norms))),
        "track_specific": None if track_id is None else norms[track_id],
    }[length_model]
    return tau * np.sum(units @ d_hat) * d_hat


def _cosines(jac, u):
    jac = np.asarray(jac, np.float64)
    return jac @ u / np.linalg.norm(jac, axis=1) / np.linalg.norm(u)


def _random(seed, k, log_scale=0.0):
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((k, P)) + rng.standard_normal(P)  # correlated tasks
    return jac * np.exp(rng.uniform(-log_scale, log_scale, (k, 1)))


# ---------------------------------------------------------------------------
# ConFIG: the definition and its guarantees.
# ---------------------------------------------------------------------------


def test_registered_under_both_names():
    assert mtl_optax.registry._REGISTRY["config"] is mtl_optax.registry._REGISTRY["conflict_free"]
    assert "m_conflict_free" in mtl_optax.available()
    tx = mtl_optax.get("config")
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert tx.weighting.name == "conflict_free" and tx.weighting.needs_gramian


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 6),
    log_scale=st.sampled_from([0.0, 3.0, 9.0]),
    weighted=st.booleans(),
)
def test_update_never_conflicts_and_has_cosines_proportional_to_the_weights(
    x64, seed, k, log_scale, weighted
):
    """Full-rank gradients (K <= P): <u, g_k> >= 0 for every task, and cos(u, g_k) is
    proportional to w_k (equal for equal weights), whatever the norms (1e-4 to 1e4)."""
    jac = _random(seed, k, log_scale)
    weights = np.random.default_rng(seed).uniform(0.1, 2.0, k) if weighted else None
    u, _ = _update(jac, weights=None if weights is None else weights.tolist())
    assert np.all(jac @ u >= 0)
    cos = _cosines(jac, u)
    w = np.ones(k) if weights is None else weights
    np.testing.assert_allclose(cos / w, cos[0] / w[0], rtol=1e-9)
    np.testing.assert_allclose(
        u, _definition(jac, weights), rtol=1e-9, atol=1e-12 * np.abs(u).max()
    )


LENGTHS = [(m, None) for m in _config.LENGTH_MODELS if m != "track_specific"] + [
    ("track_specific", 0),
    ("track_specific", 2),
    ("track_specific", -1),
]


@pytest.mark.parametrize(
    ("length_model", "track_id"), LENGTHS, ids=[f"{m}{'' if i is None else i}" for m, i in LENGTHS]
)
def test_length_models(x64, length_model, track_id):
    """||u|| = sum_k <g_k, u/||u||> (projection) or tau * sum_k cos(g_k, u) (track_*)."""
    jac = _random(3, 4, log_scale=2.0)
    u, _ = _update(jac, length_model=length_model, track_id=track_id)
    norms = np.linalg.norm(jac, axis=1)
    u_hat = u / np.linalg.norm(u)
    if length_model == "projection":
        expected = np.sum(jac @ u_hat)
    else:
        tau = {
            "track_min": norms.min(),
            "track_max": norms.max(),
            "track_harmonic": 4 / np.sum(1 / norms),
            "track_arithmetic": norms.mean(),
            "track_geometric": np.prod(norms) ** 0.25,
            "track_specific": norms[track_id] if track_id is not None else None,
        }[length_model]
        expected = tau * np.sum(_cosines(jac, u))
    np.testing.assert_allclose(np.linalg.norm(u), expected, rtol=1e-12)
    np.testing.assert_allclose(u, _definition(jac, None, length_model, track_id), rtol=1e-10)


def test_geometric_mean_does_not_overflow():
    """40 norms of 1e4 in float32: their product (1e160) overflows, the log-space mean does not."""
    rng = np.random.default_rng(0)
    jac = 1e4 * rng.standard_normal((40, 400)) / np.sqrt(400)
    tx = mtl_optax.get("conflict_free", length_model="track_geometric")
    u, _ = tx.update({"x": jnp.asarray(jac, jnp.float32)}, tx.init(None))
    u = np.asarray(u["x"], np.float64)
    assert np.all(np.isfinite(u))
    cos = _cosines(jac, u)
    tau = np.exp(np.mean(np.log(np.linalg.norm(jac, axis=1))))
    np.testing.assert_allclose(np.linalg.norm(u), tau * cos.sum(), rtol=1e-4)


def test_state_weights_and_per_task_form_give_the_update(x64):
    jac = _random(5, 3)
    tx = mtl_optax.get("conflict_free", num_tasks=3)
    params = _params()
    u, state = tx.update(_tree(jac), tx.init(params), params)
    np.testing.assert_allclose(np.asarray(state.weights, np.float64) @ jac, _vec(u), rtol=1e-6)
    per_task, _ = tx.per_task.update(_tree(jac), tx.init(params), params)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x.sum(0), per_task), u, rtol=1e-12)


@pytest.mark.parametrize("rho", [-0.95, -0.3, 0.0, 0.5, 0.99, 0.999999])
@pytest.mark.parametrize("weights", [None, [1.0, 3.0], [2.0, 0.0]])
def test_two_task_closed_form_equals_general_path(x64, rho, weights):
    """A pair with cosine rho: the closed form and the general (pseudo-inverse) path agree
    to rounding (amplified by the conditioning 1 / (1 - |rho|))."""
    rng = np.random.default_rng(11)
    e1, e2 = np.linalg.qr(rng.standard_normal((P, 2)))[0].T
    jac = np.stack([3.0 * e1, 0.5 * (rho * e1 + np.sqrt(1 - rho**2) * e2)])
    closed, _ = _update(jac, weights=weights)
    general, _ = _update(jac, weights=weights, two_task_closed_form=False)
    tol = 1e-14 / (1 - abs(rho))
    np.testing.assert_allclose(closed, general, rtol=0, atol=tol * np.abs(general).max())
    np.testing.assert_allclose(
        closed, _definition(jac, weights), rtol=0, atol=1e3 * tol * np.abs(general).max()
    )


@pytest.mark.parametrize("case", ["identical", "zero_task", "both_zero", "opposite"])
def test_two_task_closed_form_falls_back_on_degenerate_pairs(x64, case):
    g = _random(12, 1)[0]
    jac = {
        "identical": np.stack([g, g]),
        "zero_task": np.stack([g, 0 * g]),
        "both_zero": np.zeros((2, P)),
        "opposite": np.stack([g, -2 * g]),
    }[case]
    closed, _ = _update(jac)
    general, _ = _update(jac, two_task_closed_form=False)
    np.testing.assert_array_equal(closed, general)
    expected = {"identical": 2 * g, "zero_task": g, "both_zero": 0 * g, "opposite": 0 * g}[case]
    np.testing.assert_allclose(closed, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("k", [2, 3, 6, 30])  # 30 > P: rank-deficient, least squares.
def test_solvers_agree(x64, k):
    jac = _random(20 + k, k)
    weights = np.linspace(0.5, 1.5, k).tolist()
    lstsq, _ = _update(jac, weights=weights, solver="lstsq", two_task_closed_form=False)
    pinv, _ = _update(jac, weights=weights, solver="pinv", two_task_closed_form=False)
    np.testing.assert_allclose(lstsq, pinv, rtol=1e-9, atol=1e-12 * np.abs(pinv).max())
    if k <= P:
        np.testing.assert_allclose(pinv, _definition(jac, weights), rtol=1e-9)


def test_rank_deficient_update_is_the_least_squares_solution(x64):
    """K = 30 > P = 24 tasks: the minimum-norm least-squares direction (the definition)."""
    jac = _random(50, 30)
    u, _ = _update(jac)
    np.testing.assert_allclose(u, _definition(jac), rtol=1e-7)


def test_rcond_cuts_off_small_eigenvalues(x64):
    """Two gradients with cosine 0.9 (eigenvalues 0.1 and 1.9 of the cosine matrix) and
    weights (1, 2): exact by default (cosines 1:2); with rcond = 0.1 > 0.1 / 1.9 the
    small eigenvalue is dropped and the update follows u_1 + u_2 (equal cosines)."""
    rng = np.random.default_rng(1)
    e1, e2 = np.linalg.qr(rng.standard_normal((P, 2)))[0].T
    jac = np.stack([e1, 2.0 * (0.9 * e1 + np.sqrt(1 - 0.81) * e2)])
    for closed_form in (True, False):
        u, _ = _update(jac, weights=[1.0, 2.0], two_task_closed_form=closed_form)
        cos = _cosines(jac, u)
        np.testing.assert_allclose(cos[1] / cos[0], 2.0, rtol=1e-12)
        u, _ = _update(jac, weights=[1.0, 2.0], rcond=0.1, two_task_closed_form=closed_form)
        cos = _cosines(jac, u)
        np.testing.assert_allclose(cos[1], cos[0], rtol=1e-12)


def test_default_rcond_treats_float32_collinear_gradients_as_collinear():
    """g, 2.5 g, -0.5 g in float32: rounding leaves eigenvalues ~1e-7 of the cosine matrix,
    below the default cut-off; the update is the minimum-norm answer 3 g (d = u / 3)."""
    g = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    jac = np.stack([g, 2.5 * g, -0.5 * g])
    tx = mtl_optax.get("conflict_free")
    u, _ = tx.update({"x": jnp.asarray(jac)}, tx.init(None))
    np.testing.assert_allclose(np.asarray(u["x"]), 3 * g, rtol=1e-5, atol=1e-5 * np.abs(g).max())


# ---------------------------------------------------------------------------
# Zero-norm gradients and degenerate inputs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_zero_task_is_left_out(x64, k):
    jac = _random(30 + k, k)
    jac[1] = 0.0
    u, state = _update(jac)
    np.testing.assert_allclose(u, _definition(np.delete(jac, 1, 0)), rtol=1e-10)
    assert state.weights[1] == 0.0


@pytest.mark.parametrize("length_model", _config.LENGTH_MODELS)
def test_zero_task_gives_finite_update_for_every_length_model(length_model):
    jac = _random(31, 3)
    jac[0] = 0.0
    track_id = 0 if length_model == "track_specific" else None
    tx = mtl_optax.get("conflict_free", length_model=length_model, track_id=track_id)
    u, _ = tx.update(_tree(jac, jnp.float32), tx.init(None))
    u = _vec(u)
    assert np.all(np.isfinite(u))
    tracks_zero = length_model in (
        "track_min",
        "track_harmonic",
        "track_geometric",
        "track_specific",
    )
    assert np.all(u == 0.0) == tracks_zero


def test_opposite_and_zero_gradients_give_exact_zero():
    g = _random(40, 1)[0]
    for jac in (
        np.stack([g, -g]),
        np.stack([g, -0.01 * g]),
        np.zeros((3, P)),
        np.stack([g, -g, 0 * g]),
    ):
        u, state = _update(jac.astype(np.float32))
        assert np.all(u == 0.0)
        assert np.all(np.asarray(state.weights) == 0.0)


def test_gradient_through_the_update_is_finite_and_correct(x64):
    """Degenerate spectra (orthogonal gradients of equal norm, a zero task) keep finite
    derivatives; on a generic input they match finite differences."""

    for solver in ("lstsq", "pinv"):
        tx = mtl_optax.get("conflict_free", solver=solver)

        @jax.jit
        def loss(jac, tx=tx):
            u, _ = tx.update({"x": jac}, tx.init(None))
            return jnp.sum(jnp.sin(u["x"]))

        grad = jax.jit(jax.grad(loss))
        for jac in (jnp.eye(3, 5), jnp.eye(3, 5).at[1].set(0.0)):
            assert bool(jnp.all(jnp.isfinite(grad(jac)))), solver
        # Directional derivatives against central differences (step 1e-5: error ~1e-10).
        jac = jnp.asarray(_random(41, 3)[:, :5])
        g = grad(jac)
        for seed in range(2):
            v = jnp.asarray(np.random.default_rng(seed).standard_normal(jac.shape))
            fd = (loss(jac + 1e-5 * v) - loss(jac - 1e-5 * v)) / 2e-5
            np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------
# ConFIG: optax integration.
# ---------------------------------------------------------------------------


def test_jits_in_a_chain_with_adam_and_scans_with_num_tasks():
    opt = optax.chain(mtl_optax.get("conflict_free", num_tasks=3), optax.adam(1e-2))
    params = _params(jnp.float32)

    def step(carry, i):
        p, s = carry
        g = _tree(_random(0, 3) * (1.0 + i), jnp.float32)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), u

    (p_scan, s_scan), _ = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(3.0))
    p_loop, s_loop = params, opt.init(params)
    for i in range(3):
        (p_loop, s_loop), _ = step((p_loop, s_loop), float(i))
    chex.assert_trees_all_close(p_scan, p_loop, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(s_scan, opt.init(params))
    assert not np.allclose(_vec(p_scan), 0.0)


def test_bfloat16_leaves_keep_their_dtype():
    tx = mtl_optax.get("conflict_free")
    params = _params(jnp.bfloat16)
    u, state = jax.jit(tx.update)(_tree(_random(1, 3), jnp.bfloat16), tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    assert state.weights.dtype == jnp.float32


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        ({"length_model": "track_median"}, "unknown length_model"),
        ({"length_model": "track_specific"}, "needs track_id"),
        ({"length_model": "track_specific", "track_id": 1.0}, "needs track_id"),
        ({"track_id": 1}, "only used with"),
        ({"solver": "qr"}, "unknown solver"),
        ({"rcond": -1.0}, "rcond"),
        ({"rcond": 1.0}, "rcond"),
        ({"weights": [1.0, -1.0]}, "non-negative"),
        ({"weights": [0.0, 0.0]}, "not all zero"),
        ({"weights": [1.0, np.nan]}, "finite"),
        ({"weights": [[1.0, 2.0]]}, "vector"),
        ({"weights": [1.0, 2.0], "num_tasks": 3}, "num_tasks=3"),
    ],
)
def test_invalid_hyperparameters(hparams, match):
    with pytest.raises(ValueError, match=match):
        mtl_optax.get("conflict_free", **hparams)


def test_errors_at_update():
    jac = _tree(_random(0, 3), jnp.float32)
    tx = mtl_optax.get("conflict_free", length_model="track_specific", track_id=3)
    with pytest.raises(ValueError, match="track_id=3 is out of range for K=3"):
        tx.update(jac, tx.init(None))
    tx = mtl_optax.get("conflict_free", weights=[1.0, 2.0])  # K = 2 from the weights.
    with pytest.raises(ValueError, match="num_tasks=2"):
        tx.update(jac, tx.init(None))
    tx = mtl_optax.get("conflict_free")
    with pytest.raises(ValueError, match="task axis is missing"):
        tx.update(jax.tree.map(lambda x: x[0], jac), tx.init(None), _params(jnp.float32))


# ---------------------------------------------------------------------------
# M-ConFIG.
# ---------------------------------------------------------------------------


def _numpy_m_config(jac_steps, masks, beta_1=0.9, beta_2=0.999, eps=1e-8):
    """The rule of the docstring in NumPy float64, with the ConFIG step of _definition."""
    k, p = jac_steps[0].shape
    m, s, fake_m = np.zeros((k, p)), np.zeros(p), np.zeros(p)
    counts, t, outs = np.zeros(k, int), 0, []
    for jac, mask in zip(jac_steps, masks, strict=True):
        m[mask] = beta_1 * m[mask] + (1 - beta_1) * jac[mask]
        counts += mask
        if np.any(counts == 0):
            outs.append(np.zeros(p))
            continue
        t += 1
        c = _definition(m / (1 - beta_1 ** counts[:, None]))
        new_fake_m = c * (1 - beta_1**t)
        fake_grad = (new_fake_m - beta_1 * fake_m) / (1 - beta_1)
        fake_m = new_fake_m
        s = beta_2 * s + (1 - beta_2) * fake_grad**2
        outs.append(c / (np.sqrt(s / (1 - beta_2**t)) + eps))
    return outs


@pytest.mark.parametrize(("beta_1", "beta_2"), [(0.9, 0.999), (0.0, 0.5)])
def test_m_conflict_free_follows_its_rule(x64, beta_1, beta_2):
    rng = np.random.default_rng(0)
    k = 3
    masks = [
        np.array(m, bool)
        for m in ([1, 0, 0], [0, 1, 0], [1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1])
    ]
    jac_steps = [rng.standard_normal((k, P)) + 1.0 for _ in masks]
    expected = _numpy_m_config(jac_steps, masks, beta_1, beta_2)
    tx = mtl_optax.get("m_conflict_free", beta_1=beta_1, beta_2=beta_2, num_tasks=k)
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i, (jac, mask) in enumerate(zip(jac_steps, masks, strict=True)):
        u, state = step(_tree(np.where(mask[:, None], jac, 0.0)), state, params, task_mask=mask)
        if i < 2:
            assert np.all(_vec(u) == 0.0) and int(state.count) == 0
            # The pseudo first moment and the second moment stay zero until every
            # task has had a gradient (the update relies on it: it does not
            # re-read the old pseudo_mu).
            assert np.all(_vec(state.pseudo_mu) == 0.0) and np.all(_vec(state.nu) == 0.0)
        else:
            np.testing.assert_allclose(_vec(u), expected[i], rtol=1e-9)
            assert int(state.count) == i - 1
        np.testing.assert_array_equal(state.task_counts, np.sum(masks[: i + 1], axis=0))


def test_m_conflict_free_does_not_read_the_other_rows():
    k = 3
    tx = mtl_optax.get("m_conflict_free", num_tasks=k)
    params = _params(jnp.float32)
    jac = _random(1, k)
    mask = np.array([True, False, True])
    runs = []
    for fill in (0.0, np.nan, 1e30):
        state = tx.init(params)
        given = _tree(np.where(mask[:, None], jac, fill), jnp.float32)
        for _ in range(2):
            u, state = tx.update(_tree(jac, jnp.float32), state, params)  # all tasks
            u, state = tx.update(given, state, params, task_mask=mask)
        runs.append((_vec(u), state))
    for u, state in runs[1:]:
        np.testing.assert_array_equal(u, runs[0][0])
        chex.assert_trees_all_equal(state, runs[0][1])
    assert np.all(np.isfinite(runs[0][0]))


def test_m_conflict_free_donated_state_gives_the_same_steps():
    """With the state donated, the moments are updated in place: same numbers."""
    k = 3
    tx = mtl_optax.get("m_conflict_free", num_tasks=k)
    params = _params(jnp.float32)
    masks = [[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 1, 0], [1, 0, 1]]
    jacs = [_tree(_random(10 + i, k), jnp.float32) for i in range(len(masks))]
    runs = []
    for donate in ((), (1,)):
        step = jax.jit(tx.update, donate_argnums=donate)
        state, us = tx.init(params), []
        for jac, mask in zip(jacs, masks, strict=True):
            u, state = step(jac, state, params, task_mask=jnp.array(mask, bool))
            us.append(_vec(u))
        runs.append((us, jax.device_get(state)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    chex.assert_trees_all_equal(runs[0][1], runs[1][1])
    assert np.all(np.abs(runs[0][0][-1]) > 0)


def test_m_conflict_free_task_indices_equal_the_mask():
    k = 4
    tx = mtl_optax.get("m_conflict_free", num_tasks=k)
    params = _params(jnp.float32)
    jac = _tree(_random(2, k), jnp.float32)
    step = jax.jit(tx.update)
    for indices, mask in (
        (2, [False, False, True, False]),
        (jnp.array([1, 1, 2]), [False, True, True, False]),  # repeated indices count once
    ):
        by_index = step(jac, tx.init(params), params, task_indices=indices)
        by_mask = step(jac, tx.init(params), params, task_mask=jnp.array(mask))
        chex.assert_trees_all_equal(by_index, by_mask)


def test_m_conflict_free_cyclic_tasks_in_a_scan_with_sgd():
    """One task per step (index = step % K) inside lax.scan, chained with SGD."""
    k = 3
    opt = optax.chain(mtl_optax.get("m_conflict_free", num_tasks=k), optax.sgd(0.01))
    params = _params(jnp.float32)
    jac = _tree(_random(3, k), jnp.float32)

    def step(carry, i):
        p, s = carry
        u, s = opt.update(jac, s, p, task_indices=i % k)
        return (optax.apply_updates(p, u), s), _vec_jnp(u)

    (p, state), us = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(7))
    assert np.all(np.asarray(us[: k - 1]) == 0.0)  # not every task seen yet
    assert np.all(np.abs(np.asarray(us[k - 1 :])) > 0)
    mstate = state[0]
    np.testing.assert_array_equal(mstate.task_counts, [3, 2, 2])
    assert int(mstate.count) == 7 - (k - 1)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(params))
    assert not np.allclose(_vec(p), 0.0)


def _vec_jnp(tree):
    return jnp.concatenate([tree["a"].reshape(-1), tree["b"]])


def test_m_conflict_free_state_shapes_and_dtypes():
    k = 2
    tx = mtl_optax.get("m_conflict_free", num_tasks=k)
    params = _params(jnp.bfloat16)
    state = tx.init(params)
    assert state.mu["a"].shape == (k, 4, 3) and state.mu["a"].dtype == jnp.float32
    assert state.nu["b"].shape == (12,) and state.pseudo_mu["b"].dtype == jnp.float32
    assert state.task_counts.shape == (k,) and state.count.shape == ()
    u, new_state = jax.jit(tx.update)(_tree(_random(4, k), jnp.bfloat16), state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    # First step with every task: c / (|c| + eps), i.e. the sign of the ConFIG direction.
    np.testing.assert_allclose(np.abs(_vec(u)), 1.0, rtol=1e-2)


def test_m_conflict_free_ignores_value():
    tx = mtl_optax.get("m_conflict_free", num_tasks=2)
    params = _params(jnp.float32)
    jac = _tree(_random(5, 2), jnp.float32)
    a = tx.update(jac, tx.init(params), params)
    b = tx.update(jac, tx.init(params), params, value=jnp.array([1.0, 5.0]))
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        ({}, "needs num_tasks"),
        ({"num_tasks": 0}, "positive int"),
        ({"num_tasks": 2, "beta_1": 1.0}, "beta_1"),
        ({"num_tasks": 2, "beta_2": -0.1}, "beta_2"),
        ({"num_tasks": 2, "eps": 0.0}, "eps"),
        ({"num_tasks": 2, "length_model": "norm"}, "unknown length_model"),
        ({"num_tasks": 2, "weights": [1.0, 2.0, 3.0]}, "num_tasks=2"),
        ({"num_tasks": 2, "length_model": "track_specific", "track_id": 2}, "out of range"),
    ],
)
def test_m_conflict_free_invalid_hyperparameters(hparams, match):
    with pytest.raises(ValueError, match=match):
        mtl_optax.get("m_conflict_free", **hparams)


def test_m_conflict_free_errors_at_init_and_update():
    tx = mtl_optax.get("m_conflict_free", num_tasks=3)
    with pytest.raises(ValueError, match="init needs the params"):
        tx.init(None)
    params = _params(jnp.float32)
    state = tx.init(params)
    jac = _tree(_random(0, 3), jnp.float32)
    with pytest.raises(ValueError, match="task_mask must be a boolean vector of shape"):
        tx.update(jac, state, params, task_mask=jnp.ones(2, bool))
    with pytest.raises(ValueError, match="task_mask must be a boolean"):
        tx.update(jac, state, params, task_mask=jnp.ones(3))
    with pytest.raises(ValueError, match="not both"):
        tx.update(jac, state, params, task_mask=jnp.ones(3, bool), task_indices=0)
    with pytest.raises(ValueError, match="task_indices must be an integer"):
        tx.update(jac, state, params, task_indices=0.5)
    with pytest.raises(ValueError, match="num_tasks=3"):
        tx.update(_tree(_random(0, 2), jnp.float32), state, params)
    with pytest.raises(ValueError, match="expected"):  # params-free: checked against the state
        tx.update({"a": jac["a"], "b": jac["b"][:, :5]}, state)


def test_two_task_closed_form_steps_on_nearly_parallel_gradients():
    """cos = 0.999: ConFIG's direction is the bisector-like solution, not zero (float32)."""
    g1 = jnp.array([1.0, 0.0])
    g2 = jnp.array([0.999, jnp.sqrt(1 - 0.999**2)])
    grads = {"w": jnp.stack([g1, 3.0 * g2])}
    closed = mtl_optax.conflict_free(num_tasks=2)
    general = mtl_optax.conflict_free(num_tasks=2, two_task_closed_form=False)
    u_closed, _ = closed.update(grads, closed.init({"w": jnp.zeros(2)}))
    u_general, _ = general.update(grads, general.init({"w": jnp.zeros(2)}))
    assert float(jnp.linalg.norm(u_closed["w"])) > 1.0
    np.testing.assert_allclose(np.asarray(u_closed["w"]), np.asarray(u_general["w"]), rtol=2e-3)
    # Equal cosines with both (unit) task gradients: the ConFIG property.
    unit = np.asarray(u_closed["w"]) / np.linalg.norm(np.asarray(u_closed["w"]))
    np.testing.assert_allclose(unit @ np.asarray(g1), unit @ np.asarray(g2), rtol=1e-4)
