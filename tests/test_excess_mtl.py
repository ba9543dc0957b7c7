"""excess_mtl: its steps against the paper's equations, warmup, state, numerics, jit, vmap, errors.

Parity with TorchJD is in tests/parity/test_excess_mtl_parity.py. Here the
steps are checked against a float64 NumPy loop written from the paper's
equations (the multiplicative exponentiated-gradient step, normalised, rather
than the log-space softmax) and against the official code's rule (the
default, up to its factor K), the warmup and the baseline, the weights staying
on the simplex, the scale invariance from the baseline on, the state's dtypes,
the edge cases of the issue tracker (all finite), non-finite input, jit, vmap,
``optax.inject_hyperparams`` and the errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

PARAMS = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))}  # P = 13


def _tree(jac, dtype=None):
    """A (K, 13) matrix as task gradients shaped like PARAMS."""
    jac = jnp.asarray(jac, dtype)
    k = jac.shape[0]
    return {"a": jac[:, :8].reshape(k, 4, 2), "b": jac[:, 8:]}


def _vec(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _params(dtype=None):
    """Zeros shaped like PARAMS, in ``dtype`` or the default float dtype (float64 under x64)."""
    return jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), PARAMS)


def paper_steps(jacs, eta, n_warmup):
    """The paper's rule (Eqs. 6, 7, 9 and the scale processing), float64, step by step.

    ``n_warmup = 0`` is TorchJD's variant: the step that sets the baseline
    moves the weights by the unscaled excess risks. Returns the weights and
    the update of every step.
    """
    k, p = jacs[0].shape
    s = np.zeros((k, p))
    alpha = np.full(k, 1.0 / k)
    warm = np.zeros(k)
    base = None
    out = []
    for t, jac in enumerate(jacs):
        s = s + jac**2
        e = np.sum(jac**2 / np.sqrt(s + 1e-7), axis=1)  # g^T diag(sqrt(S))^-1 g
        if t < n_warmup:
            warm = warm + e
        else:
            if base is None:  # the baseline: the warmup mean, or the first excess risks
                base = warm / n_warmup if n_warmup else e
                r = e / (base + 1e-7) if n_warmup else e
            else:
                r = e / (base + 1e-7)
            a = alpha * np.exp(eta * (r - r.max()))  # alpha * exp(eta r), normalised
            alpha = a / a.sum()
        out.append((alpha.copy(), alpha @ jac))
    return out


def _jacs(seed, k, steps, scales=None, p=13):
    """Task gradients of excess risks of order 1 (entries of order 1/P), rows scaled."""
    rng = np.random.default_rng(seed)
    scales = np.ones(k) if scales is None else np.asarray(scales)
    return [rng.standard_normal((k, p)) * scales[:, None] * (3.0 / p) for _ in range(steps)]


@functools.cache
def _method(k, eta=1.0, n_warmup=None):
    """``excess_mtl`` and its jitted update; ``n_warmup=None``: the factory's default."""
    warmup = {} if n_warmup is None else {"n_warmup_steps": n_warmup}
    tx = mtl_optax.excess_mtl(robust_step_size=eta, num_tasks=k, **warmup)
    return tx, jax.jit(tx.update)


def _run(jacs, eta=1.0, n_warmup=None, dtype=None):
    """Our (weights, update vector, state) after every step, jitted once per setting.

    ``n_warmup=None``: the factory's default (1 warmup step).
    """
    k = jacs[0].shape[0]
    tx, step = _method(k, eta, n_warmup)
    params = _params(dtype)
    state = tx.init(params)
    out = []
    for jac in jacs:
        u, state = step(_tree(jac, dtype), state, params)
        out.append((np.asarray(state.alpha, np.float64), _vec(u), state))
    return out


@pytest.mark.parametrize(
    ("eta", "n_warmup"), [(1.0, 0), (0.3, 0), (1.0, 1), (0.3, 1), (1.0, 2), (0.3, 2)]
)
def test_steps_follow_the_papers_equations(x64, eta, n_warmup):
    """Six steps, K = 3 tasks of scales 0.3, 1, 4: weights and update at 1e-12 (relative).

    The first two steps (n_warmup_steps=0, TorchJD's default: the unscaled
    step, then the first scaled one; with warmup, 1 by default: the uniform
    weights) are the closed-form check; the rest carries the state.
    """
    jacs = _jacs(0, 3, 6, scales=[0.3, 1.0, 4.0])
    ours = _run(jacs, eta, n_warmup)
    ref = paper_steps(jacs, eta, n_warmup)
    for t, ((w, u, state), (w_ref, u_ref)) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=0, err_msg=f"step {t}")
        np.testing.assert_allclose(np.asarray(state.weights), w_ref, rtol=1e-6)
        np.testing.assert_allclose(u, u_ref, rtol=1e-12, atol=1e-15, err_msg=f"step {t}")
        assert int(state.count) == t + 1
        assert bool(state.has_baseline) == (t >= n_warmup)
    # The weights moved away from 1/3 (a rule that keeps them would fail above too).
    assert np.abs(ours[-1][0] - 1 / 3).max() > 0.05


def official_steps(jacs, eta):
    """The official code's and LibMTL's rule, as they describe it, float64, step by step.

    Weights start at 1 and are renormalised to sum to K; the first call only
    sets the baseline (the weights stay 1); later calls multiply the weights
    by exp(eta e / baseline), without an epsilon. The update is sum_k w_k g_k.
    """
    k, p = jacs[0].shape
    s = np.zeros((k, p))
    weights = np.ones(k)
    base = None
    out = []
    for jac in jacs:
        s = s + jac**2
        e = np.sum(jac * (jac / np.sqrt(s + 1e-7)), axis=1)
        if base is None:
            base = e
        else:
            weights = weights * np.exp(eta * e / base)
            weights = weights / weights.sum() * k
        out.append((weights.copy(), weights @ jac))
    return out


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_default_follows_the_official_code_up_to_its_factor_k(x64, eta):
    """The default (n_warmup_steps=1) against the official code's rule: K times ours.

    Six steps, K = 3 tasks of scales 0.01, 1 and 10 (the first update is the
    mean, K times: the sum). Relative 1e-5: the official code divides by the
    baseline without the 1e-7, and the smallest task's baseline is about 0.02
    (a relative difference of 5e-6 in its step).
    """
    jacs = _jacs(9, 3, 6, scales=[0.01, 1.0, 10.0])
    ours = _run(jacs, eta)
    ref = official_steps(jacs, eta)
    for t, ((w, u, _), (w_ref, u_ref)) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(3 * w, w_ref, rtol=1e-5, err_msg=f"step {t}")
        np.testing.assert_allclose(3 * u, u_ref, rtol=1e-5, atol=1e-9, err_msg=f"step {t}")
    np.testing.assert_array_equal(ours[0][0], np.full(3, 1 / 3))
    assert np.abs(ours[-1][0] - 1 / 3).max() > 0.05  # the weights moved
    # TorchJD's default (no warmup) moves all the weight to the task of scale 10 at
    # the first step, and it stays there.
    torchjd_rule = _run(jacs, eta, n_warmup=0)
    assert torchjd_rule[0][0][2] > 0.99 and torchjd_rule[-1][0][2] > 0.99


def test_torchjd_first_step_without_warmup_is_the_softmax_of_the_unscaled_excess_risks(x64):
    """n_warmup_steps=0, by hand: weights = softmax(log(1/K) + eta e).

    With e_k = sum_j g_kj^2 / sqrt(g_kj^2 + 1e-7), unscaled.
    """
    jac = np.array([[1.0, 0.0] + [0.0] * 11, [0.0, -2.0] + [0.0] * 11, [0.5, 0.5] + [0.0] * 11])
    e = np.sum(jac**2 / np.sqrt(jac**2 + 1e-7), axis=1)
    z = np.log(1 / 3) + 0.7 * e
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    (w, u, state), (w2, _, state2) = _run([jac, 2 * jac], eta=0.7, n_warmup=0)
    np.testing.assert_allclose(w, expected, rtol=1e-14)
    np.testing.assert_allclose(u, expected @ jac, rtol=1e-14)
    np.testing.assert_allclose(np.asarray(state.baseline), e, rtol=1e-14)
    # Second step, gradients doubled: S = 5 g^2, e' = 4 g^2 / sqrt(5 g^2 + 1e-7),
    # scaled by the baseline e: about 4 / sqrt(5) for every task, the same step.
    e2 = np.sum(4 * jac**2 / np.sqrt(5 * jac**2 + 1e-7), axis=1)
    z2 = np.log(expected) + 0.7 * e2 / (e + 1e-7)
    np.testing.assert_allclose(w2, np.exp(z2) / np.exp(z2).sum(), rtol=1e-14)
    np.testing.assert_allclose(w2, expected, rtol=1e-6)  # equal relative excess risks
    # The state is Q = (S + 1e-7)^(-1/2) with S = g^2 + (2 g)^2 = 5 g^2.
    np.testing.assert_allclose(
        _vec(state2.inv_sqrt_sum), _vec(_tree((5 * jac**2 + 1e-7) ** -0.5)), rtol=1e-14
    )


def test_warmup_keeps_uniform_weights_then_scales_by_the_warmup_mean(x64):
    jacs = _jacs(1, 4, 5, scales=[0.1, 1.0, 3.0, 10.0])
    ours = _run(jacs, 1.0, 3)
    e_sum = 0.0
    s = 0.0
    for t in range(3):
        w, u, state = ours[t]
        np.testing.assert_array_equal(w, np.full(4, 0.25))
        np.testing.assert_array_equal(np.asarray(state.weights), np.full(4, 0.25, np.float32))
        np.testing.assert_allclose(u, jacs[t].mean(0), rtol=1e-14, atol=1e-17)  # the mean
        s = s + jacs[t] ** 2
        e_sum = e_sum + np.sum(jacs[t] ** 2 / np.sqrt(s + 1e-7), axis=1)
        np.testing.assert_allclose(np.asarray(state.warmup_sum), e_sum, rtol=1e-14)
        assert not bool(state.has_baseline)
    w, _, state = ours[3]
    np.testing.assert_allclose(np.asarray(state.baseline), e_sum / 3, rtol=1e-14)
    assert bool(state.has_baseline)
    assert not np.allclose(w, 0.25)


@pytest.mark.parametrize("n_warmup", [1, 2])
def test_scale_invariance_from_the_first_step_with_warmup(x64, n_warmup):
    """With warmup (1 step by default), every weight step divides by a baseline of the same scale.

    So c J gives J's weights at every step. (With ``n_warmup_steps=0``,
    TorchJD's default, the first step is the softmax of the unscaled excess
    risks: not invariant.)
    """
    # Entries of order 1 (S >> 1e-7, the epsilon under the square root).
    jacs = [13 * j for j in _jacs(2, 3, 4, scales=[0.5, 1.0, 2.0])]
    for c in (1e-1, 1e3, 1e6):
        for (w, _, _), (w_c, _, _) in zip(
            _run(jacs, 1.0, n_warmup), _run([c * j for j in jacs], 1.0, n_warmup), strict=True
        ):
            np.testing.assert_allclose(w_c, w, rtol=1e-5)
    w1 = _run(jacs[:1], n_warmup=0)[0][0]
    w1_small = _run([1e-2 * jacs[0]], n_warmup=0)[0][0]
    assert np.abs(w1_small - w1).max() > 0.1  # the first step without warmup depends on the scale


def test_float32_weights_do_not_depend_on_the_scale_up_to_norms_of_1_5e19():
    """Default warmup, float32, jitted: c J gives J's weights and c times its update.

    Rows of norm c up to 1.5e19, where the sums of squares of the rows' entries
    still fit float32 (tests/test_all_methods.py checks one step of every
    method at these norms; here the weight steps after the baseline).
    """
    rng = np.random.default_rng(10)
    jacs = [rng.standard_normal((3, 13)) for _ in range(4)]
    jacs = [j / np.linalg.norm(j, axis=1, keepdims=True) for j in jacs]
    unit = _run([j.astype(np.float32) for j in jacs], dtype=jnp.float32)
    assert np.abs(unit[-1][0] - 1 / 3).max() > 0.01  # the weights moved
    for c in (1e18, 1e19, 1.5e19):
        big = _run([(c * j).astype(np.float32) for j in jacs], dtype=jnp.float32)
        for t, ((w, u, _), (w_c, u_c, _)) in enumerate(zip(unit, big, strict=True)):
            assert np.all(np.isfinite(u_c)), (c, t)
            np.testing.assert_allclose(w_c, w, rtol=1e-4, err_msg=f"c={c}, step {t}")
            np.testing.assert_allclose(u_c / c, u, rtol=1e-4, atol=1e-6, err_msg=f"c={c}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weights_stay_on_the_simplex(dtype):
    rng = np.random.default_rng(3)
    tx, step = _method(5)
    params = _params(dtype)
    state = tx.init(params)
    for t in range(8):
        jac = rng.standard_normal((5, 13)) * 10.0 ** rng.uniform(-6, 6, (5, 1))
        jac[t % 5] = 0.0
        u, state = step(_tree(jac, dtype), state, params)
        w = np.asarray(state.alpha, np.float64)
        assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-6, (t, w)
        assert np.all(np.isfinite(_vec(u)))


def test_bfloat16_leaves_accumulate_in_float32():
    """bfloat16 leaves: S and the weights in float32, the update in bfloat16.

    The computation is the float32 one on the bfloat16 values: same weights to 1e-6.
    """
    jacs = _jacs(4, 3, 3, scales=[0.5, 1.0, 2.0])
    ours = _run(jacs, dtype=jnp.bfloat16)
    rounded = [np.asarray(jnp.asarray(j, jnp.bfloat16), np.float32) for j in jacs]
    ref = _run(rounded, dtype=jnp.float32)
    for (w, u, state), (w_ref, u_ref, _) in zip(ours, ref, strict=True):
        assert state.alpha.dtype == jnp.float32
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.inv_sqrt_sum))
        np.testing.assert_allclose(w, w_ref, rtol=1e-6)
        np.testing.assert_allclose(u, u_ref, rtol=1e-2, atol=1e-3)  # bfloat16 output
    tx, step = _method(3)
    u, _ = step(_tree(jacs[0], jnp.bfloat16), tx.init(_params(jnp.bfloat16)), None)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))


def test_float64_state_for_float64_params(x64):
    tx, _ = _method(2)
    state = tx.init(_params(jnp.float64))
    assert state.alpha.dtype == jnp.float64
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(state.inv_sqrt_sum))
    assert [x.shape for x in jax.tree.leaves(state.inv_sqrt_sum)] == [(2, 4, 2), (2, 5)]
    for x in jax.tree.leaves(state.inv_sqrt_sum):
        np.testing.assert_array_equal(x, 1e-7**-0.5)  # S = 0
    assert state.weights.dtype == jnp.float32 and np.isnan(np.asarray(state.weights)).all()


def _edge(name):
    rng = np.random.default_rng(5)
    g, h = rng.standard_normal(13) / 5, rng.standard_normal(13) / 5
    h_orth = h - (h @ g) / (g @ g) * g
    mag = rng.standard_normal((3, 13)) / 5
    mag[0] *= 1e-8
    mag[2] *= 1e4
    zero = rng.standard_normal((3, 13)) / 5
    zero[1] = 0.0
    return {
        "K1": g[None],
        "identical": np.stack([g, g]),
        "opposite": np.stack([g, -g]),
        "orthogonal": np.stack([g, h_orth]),
        "collinear": np.stack([g, 2.5 * g, -0.5 * g]),
        "zero_task": zero,
        "all_zero": np.zeros((3, 13)),
        "magnitudes_1e-8_1e4": mag,
    }[name]


@pytest.mark.parametrize(
    "case",
    [
        "K1",
        "identical",
        "opposite",
        "orthogonal",
        "collinear",
        "zero_task",
        "all_zero",
        "magnitudes_1e-8_1e4",
    ],
)
@pytest.mark.parametrize("n_warmup", [1, 0])
def test_edge_cases_are_finite_and_follow_the_equations(case, n_warmup):
    """Float32, four steps of the same gradients scaled by 1, 0.5, 2, 1: the NumPy rule at 1e-5.

    With the default warmup of 1 step and with TorchJD's 0.
    """
    jac = _edge(case)
    jacs = [c * jac for c in (1.0, 0.5, 2.0, 1.0)]
    ours = _run([j.astype(np.float32) for j in jacs], n_warmup=n_warmup)
    ref = paper_steps([j.astype(np.float32).astype(np.float64) for j in jacs], 1.0, n_warmup)
    for (w, u, _), (w_ref, u_ref) in zip(ours, ref, strict=True):
        assert np.all(np.isfinite(w)) and np.all(np.isfinite(u))
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(u, u_ref, rtol=1e-5, atol=1e-6 * np.abs(jac).max())
    w = ours[-1][0]
    if case in ("K1", "identical", "opposite", "all_zero"):
        np.testing.assert_allclose(w, np.full(len(w), 1 / len(w)), rtol=1e-6)
    if case == "opposite":
        np.testing.assert_allclose(ours[-1][1], 0.0, atol=1e-7)
    if case == "magnitudes_1e-8_1e4":
        if n_warmup == 0:
            assert w[2] == 1.0  # the first, unscaled step saturates on the large task
        else:  # each task scaled by its own baseline: the 1e4 task weighs as the task of scale 1
            np.testing.assert_allclose(w[2], w[1], rtol=1e-4)


def test_a_zero_baseline_saturates_instead_of_overflowing():
    """The first gradients are zero (baselines 0); then task 1 has entries of 1e18 (float32).

    Task 1's e / (0 + 1e-7) is about 2e25 and the softmax puts all the weight
    on it; with a step size of 1e30 its step is beyond float32's range: it is
    clipped to the largest float32 and saturates likewise (TorchJD's float32
    softmax of inf is NaN).
    """
    for eta in (1.0, 1e30):
        tx = mtl_optax.excess_mtl(robust_step_size=eta, num_tasks=2)
        params = {"w": jnp.zeros(3)}
        state = tx.init(params)
        _, state = tx.update({"w": jnp.zeros((2, 3))}, state)
        np.testing.assert_array_equal(np.asarray(state.alpha), [0.5, 0.5])
        np.testing.assert_array_equal(np.asarray(state.baseline), [0.0, 0.0])
        u, state = tx.update({"w": jnp.array([[1e-3, 0.0, 0.0], [1e18, 0.0, -1e18]])}, state)
        np.testing.assert_array_equal(np.asarray(state.alpha), [0.0, 1.0])
        np.testing.assert_array_equal(np.asarray(u["w"]), np.float32([1e18, 0.0, -1e18]))
        assert np.all(np.isfinite(np.asarray(state.alpha)))
        # Task 0 now has weight 0 for good (log 0 = -inf), as in TorchJD.
        u, state = tx.update({"w": jnp.array([[5.0, 5.0, 5.0], [1.0, 0.0, 0.0]])}, state)
        np.testing.assert_array_equal(np.asarray(state.alpha), [0.0, 1.0])


@pytest.mark.parametrize("n_warmup", [1, 0])
def test_overflowing_squares_contribute_their_exact_term(n_warmup):
    """Entries of 1e20 in float32: g^2 = inf, but Q = (g^2 + 1e-7)^(-1/2) = 1e-20 is not.

    The term g (g Q) is then the exact g^2 / sqrt(g^2 + 1e-7) = 1e20 (TorchJD's
    S = inf gives inf / inf = NaN), and the state stays finite.
    """
    tx = mtl_optax.excess_mtl(n_warmup_steps=n_warmup, num_tasks=2)
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.array([[1e20, 1.0], [0.5, 0.5]], jnp.float32)}
    u, state = tx.update(g, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(u["w"]))) and np.all(np.isfinite(state.alpha))
    np.testing.assert_allclose(
        np.asarray(state.inv_sqrt_sum["w"]),
        [[1e-20, (1 + 1e-7) ** -0.5], [(0.25 + 1e-7) ** -0.5] * 2],
        rtol=1e-6,
    )
    # Task 0: 1e20 + 1 / sqrt(1 + 1e-7); task 1: 2 (0.25 / sqrt(0.25 + 1e-7)),
    # summed for the warmup, or the baseline at once without warmup.
    e = state.warmup_sum if n_warmup else state.baseline
    np.testing.assert_allclose(np.asarray(e), [1e20, 1.0], rtol=1e-6)
    # A second step from that state: Q stays finite, the term is again about |g|.
    u, state = tx.update(g, state, params)
    assert np.all(np.isfinite(np.asarray(u["w"]))) and np.all(np.isfinite(state.alpha))
    np.testing.assert_allclose(
        np.asarray(state.inv_sqrt_sum["w"])[0], [2**-0.5 * 1e-20, (2 + 1e-7) ** -0.5], rtol=1e-6
    )


@pytest.mark.parametrize("entry", [1e30, 3e38])
def test_largest_float32_entries_keep_the_state_and_the_update_finite(entry):
    """|g Q| beyond float32's range at the first step (Q = 1e-7^(-1/2) ~ 3162).

    Q' = 1 / |g| then comes from rsqrt(|g|)^2, not from t = g Q (inf); at 3e38
    it is below the smallest normal float32 and may flush to 0 (the term is 0).
    """
    tx = mtl_optax.excess_mtl(num_tasks=2)
    params = {"w": jnp.zeros(2)}
    g = {"w": jnp.array([[entry, 1.0], [0.5, 0.5]], jnp.float32)}
    state = tx.init(params)
    for _ in range(3):
        u, state = jax.jit(tx.update)(g, state, params)
        assert np.all(np.isfinite(np.asarray(u["w"]))) and np.all(np.isfinite(state.alpha))
        assert np.all(np.isfinite(np.asarray(state.inv_sqrt_sum["w"])))
    q0 = float(np.asarray(state.inv_sqrt_sum["w"])[0, 0])
    if entry == 1e30:
        np.testing.assert_allclose(q0, 3**-0.5 / entry, rtol=1e-6)  # S = 3 g^2
    else:
        assert 0.0 <= q0 <= 1.2e-38


def test_float32_state_tracks_the_sums_of_squares_over_many_steps():
    """Q is updated multiplicatively; after 300 float32 steps it still equals (S + 1e-7)^(-1/2).

    S is summed in float64 from the same float32 gradients, whose scales span 1e-4 to 1e2
    (rounding drift of the recurrence: observed 1.1e-6 relative; a float32 running sum
    S, as TorchJD keeps, drifts 3e-7 in (S + 1e-7)^(-1/2) on the same gradients).
    """
    rng = np.random.default_rng(11)
    k, p, steps = 3, 50, 300
    scales = 10.0 ** rng.uniform(-4, 2, (steps, k, 1))
    grads = (rng.standard_normal((steps, k, p)) * scales).astype(np.float32)
    grads[:, 0, :5] = 0.0  # coordinates that never get a gradient keep Q = 1e-7^(-1/2)
    tx = mtl_optax.excess_mtl(num_tasks=k)
    params = {"w": jnp.zeros(p, jnp.float32)}
    step = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads:
        _, state = step({"w": jnp.asarray(g)}, state, params)
    s = np.sum(grads.astype(np.float64) ** 2, axis=0)
    q = np.asarray(state.inv_sqrt_sum["w"], np.float64)
    np.testing.assert_allclose(q, (s + 1e-7) ** -0.5, rtol=2e-5)
    np.testing.assert_allclose(q[0, :5], 1e-7**-0.5, rtol=1e-7)


def test_large_k40_p1e5_stays_on_the_simplex():
    k, p = 40, 100_000
    tx = mtl_optax.excess_mtl(num_tasks=k)
    params = {"x": jnp.zeros((p,))}
    step = jax.jit(tx.update, donate_argnums=1)
    state = tx.init(params)
    # Equal scales at the first step (the baseline), then scales 0.5 to 2.
    for i, scales in enumerate([jnp.ones(k), *[jnp.linspace(0.5, 2.0, k)] * 2]):
        jac = jax.random.normal(jax.random.key(i), (k, p)) / p * scales[:, None]
        u, state = step({"x": jac}, state, params)
        w = np.asarray(state.alpha, np.float64)
        assert np.all(np.isfinite(np.asarray(u["x"]))) and abs(w.sum() - 1) < 1e-5
    assert w[-10:].mean() > w[:10].mean()  # the largest relative excess risks gain weight


@pytest.mark.parametrize("n_warmup", [0, 1])
def test_non_finite_input_gives_a_non_finite_update(n_warmup):
    """During warmup too; the state takes the NaN (apply_if_finite skips such steps)."""
    tx = mtl_optax.excess_mtl(n_warmup_steps=n_warmup, num_tasks=2)
    params = {"w": jnp.zeros(2)}
    for bad in (jnp.nan, jnp.inf):
        g = {"w": jnp.array([[1.0, bad], [0.5, 0.5]])}
        u, state = jax.jit(tx.update)(g, tx.init(params), params)
        assert not np.all(np.isfinite(np.asarray(u["w"])))
        # NaN in the warmup sum (or the baseline and the weights without warmup).
        assert not np.all(np.isfinite(np.asarray(state.warmup_sum if n_warmup else state.alpha)))
    opt = mtl_optax.apply_if_finite(optax.chain(tx, optax.sgd(1.0)))
    state = opt.init(params)
    _, state = opt.update({"w": jnp.array([[1.0, jnp.nan], [0.5, 0.5]])}, state, params)
    assert int(state.inner_state[0].count) == 0 and int(state.total_notfinite) == 1


def test_jit_eager_and_vmap_agree():
    """Three steps (the first a warmup one); the batched run equals each problem alone."""
    rng = np.random.default_rng(6)
    jacs = rng.standard_normal((3, 2, 3, 13)) / 5  # steps, batch, K, P
    tx, step = _method(3, 0.5, 1)
    params = _params()
    states = jax.vmap(lambda _: tx.init(params))(jnp.arange(2))
    alone = [tx.init(params), tx.init(params)]
    eager = tx.init(params)
    batched = jax.jit(jax.vmap(lambda g, s: tx.update(g, s, params)))
    for t in range(3):
        grads = jax.vmap(_tree)(jnp.asarray(jacs[t]))
        u, states = batched(grads, states)
        for i in range(2):
            u_i, alone[i] = step(_tree(jacs[t, i]), alone[i], params)
            np.testing.assert_allclose(
                _vec(jax.tree.map(lambda x, i=i: x[i], u)), _vec(u_i), rtol=1e-6
            )
            np.testing.assert_allclose(np.asarray(states.alpha[i]), alone[i].alpha, rtol=1e-6)
        if t < 2:  # op by op: the warmup step and the first weighted one
            u_e, eager = tx.update(_tree(jacs[t, 0]), eager, params)
            np.testing.assert_allclose(_vec(u_e), _vec(jax.tree.map(lambda x: x[0], u)), rtol=1e-6)


def test_robust_step_size_can_be_scheduled_with_inject_hyperparams():
    values = [1.0, 0.3, 2.0]
    schedule = lambda count: jnp.asarray(values, jnp.float32)[jnp.minimum(count, 2)]
    injected = optax.inject_hyperparams(
        mtl_optax.excess_mtl, static_args=("num_tasks", "n_warmup_steps")
    )(robust_step_size=schedule, n_warmup_steps=0, num_tasks=3)
    step = jax.jit(lambda g, s: injected.update(g, s, PARAMS))
    state = injected.init(PARAMS)
    # Without warmup, so that every step, the first too, takes a step of its size.
    fixed_state = mtl_optax.excess_mtl(n_warmup_steps=0, num_tasks=3).init(PARAMS)
    for t, (value, jac) in enumerate(zip(values, _jacs(7, 3, 3), strict=True)):
        u, state = step(_tree(jac), state)
        fixed = mtl_optax.excess_mtl(robust_step_size=value, n_warmup_steps=0, num_tasks=3)
        u_ref, fixed_state = fixed.update(_tree(jac), fixed_state, PARAMS)
        np.testing.assert_allclose(_vec(u), _vec(u_ref), rtol=1e-6, err_msg=f"step {t}")
        np.testing.assert_allclose(state.inner_state.alpha, fixed_state.alpha, rtol=1e-6)
    # n_warmup_steps traced as well (inject_hyperparams traces every numeric argument).
    injected = optax.inject_hyperparams(mtl_optax.excess_mtl, static_args=("num_tasks",))(
        robust_step_size=1.0, n_warmup_steps=1, num_tasks=3
    )
    state = injected.init(PARAMS)
    u, state = jax.jit(lambda g, s: injected.update(g, s, PARAMS))(_tree(_jacs(8, 3, 1)[0]), state)
    np.testing.assert_array_equal(
        np.asarray(state.inner_state.alpha), np.full(3, 1 / 3, np.float32)
    )


def test_errors():
    with pytest.raises(ValueError, match="robust_step_size must be positive"):
        mtl_optax.excess_mtl(robust_step_size=0.0, num_tasks=2)
    with pytest.raises(ValueError, match="robust_step_size must be positive"):
        mtl_optax.excess_mtl(robust_step_size=float("nan"), num_tasks=2)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n_warmup_steps must be a non-negative int"):
            mtl_optax.excess_mtl(n_warmup_steps=bad, num_tasks=2)
    with pytest.raises(ValueError, match="needs num_tasks=K"):
        mtl_optax.excess_mtl()
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        mtl_optax.excess_mtl(num_tasks=0)
    tx = mtl_optax.excess_mtl(num_tasks=2)
    with pytest.raises(ValueError, match="init needs the params"):
        tx.init(None)
    state = tx.init(PARAMS)
    grads = _tree(np.ones((2, 13)))
    with pytest.raises(ValueError, match=r"num_tasks=2.*\(3, 4, 2\).*expected shape \(2, 4, 2\)"):
        jax.jit(tx.update)(_tree(np.ones((3, 13))), state, PARAMS)
    # Without params, the task gradients are checked against the state's shapes.
    bad = {"a": grads["a"], "b": jnp.ones((2, 6))}
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(2, 6\); expected \(2, 5\)"):
        jax.jit(tx.update)(bad, state)
    assert mtl_optax.get("excess_mtl", num_tasks=2) is not None
