"""pcgrad and gradvac: definitions, guarantees, states, randomness and errors.

Parity with the references (TorchJD, LibMTL, conflictfree, vambn) is in
tests/parity/test_projection_parity.py.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_optax import _projection
from mtl_optax._projection import gradvac, pcgrad
from mtl_optax.engine import gramian

PARAMS = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))}  # P = 13


def _grads(seed=0, k=3, scale=1.0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return {
        "a": scale * jax.random.normal(ka, (k, 4, 2)),
        "b": scale * jax.random.normal(kb, (k, 5)),
    }


def _matrix(tree):
    """Stacked task gradients as a float64 (K, P) numpy matrix."""
    leaves = jax.tree_util.tree_leaves(tree)
    k = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(k, -1) for x in leaves], 1)


def _vector(tree):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)]
    )


def _from_matrix(jac, dtype=jnp.float32):
    jac = jnp.asarray(jac, dtype)
    k = jac.shape[0]
    return {"a": jac[:, :8].reshape(k, 4, 2), "b": jac[:, 8:]}


def _cos(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


# ---------------------------------------------------------------------------
# The transformation uses the drawn orders and the K x K rule.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_update_and_per_task_replay_the_orders_drawn_from_the_state(name):
    k = 5
    tx = pcgrad(key=3) if name == "pcgrad" else gradvac(key=3, num_tasks=k)
    grads = _grads(1, k)
    state = tx.init(PARAMS)
    for _ in range(2):
        next_key, orders = _projection._next_orders(state.key, k)
        gram = gramian(grads)
        if name == "pcgrad":
            matrix = _projection._pcgrad_matrix(gram, orders)
        else:
            matrix, phi = _projection._gradvac_matrix(gram, state.phi_hat, orders, 0.5)
        update, new_state = tx.update(grads, state, PARAMS)
        per_task, per_task_state = tx.per_task.update(grads, state, PARAMS)
        chex.assert_trees_all_equal(new_state, per_task_state)
        chex.assert_trees_all_equal_shapes_and_dtypes(update, PARAMS)
        jac = _matrix(grads)
        m = np.asarray(matrix, np.float64)
        np.testing.assert_allclose(_matrix(per_task), m @ jac, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_vector(update), m.sum(0) @ jac, rtol=1e-5, atol=1e-5)
        # Summing the per-task form over tasks gives the update.
        np.testing.assert_allclose(_matrix(per_task).sum(0), _vector(update), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(new_state.weights), m.sum(0), rtol=1e-6)
        assert jnp.array_equal(jax.random.key_data(new_state.key), jax.random.key_data(next_key))
        if name == "gradvac":
            np.testing.assert_array_equal(np.asarray(new_state.phi_hat), np.asarray(phi))
        state = new_state


def test_pcgrad_matrix_follows_the_definition_in_numpy():
    """C from the Gramian equals the sequential projections on full vectors."""
    rng = np.random.default_rng(0)
    jac = rng.standard_normal((5, 13))
    orders = np.array(_projection._draw_orders(jax.random.key(9), 5))
    expected = []
    for i in range(5):
        g = jac[i].copy()
        for j in orders[i]:
            if g @ jac[j] < 0:
                g = g - (g @ jac[j]) / (jac[j] @ jac[j]) * jac[j]
        expected.append(g)
    matrix = np.asarray(_projection._pcgrad_matrix(jnp.asarray(jac @ jac.T, jnp.float32), orders))
    np.testing.assert_allclose(matrix @ jac, np.stack(expected), rtol=1e-5, atol=1e-5)


def test_gradvac_matrix_follows_the_definition_in_numpy():
    """C and the targets equal the paper's loop on full vectors, from nonzero targets."""
    rng = np.random.default_rng(1)
    k, beta = 5, 0.3
    jac = rng.standard_normal((k, 13)) + 0.5
    phi = rng.uniform(-0.3, 0.9, (k, k))
    orders = np.array(_projection._draw_orders(jax.random.key(2), k))
    expected, new_phi = [], phi.copy()
    for i in range(k):
        g = jac[i].copy()
        for j in orders[i]:
            c, t = _cos(g, jac[j]), phi[i, j]
            if c < t:
                w = np.linalg.norm(g) * (t * np.sqrt(1 - c**2) - c * np.sqrt(1 - t**2))
                g = g + w / (np.linalg.norm(jac[j]) * np.sqrt(1 - t**2)) * jac[j]
            new_phi[i, j] = (1 - beta) * t + beta * c
        expected.append(g)
    matrix, got_phi = _projection._gradvac_matrix(
        jnp.asarray(jac @ jac.T, jnp.float32), jnp.asarray(phi, jnp.float32), orders, beta
    )
    np.testing.assert_allclose(np.asarray(matrix) @ jac, np.stack(expected), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_phi), new_phi, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# PCGrad: guarantees and special cases.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_tasks_update_conflicts_with_neither(seed):
    """Yu et al. (2020): with two tasks the PCGrad update never conflicts with a task."""
    rng = np.random.default_rng(seed)
    g1 = rng.standard_normal(13)
    g2 = -2.0 * g1 + 0.5 * rng.standard_normal(13)  # conflicting, and larger
    assert g1 @ g2 < -(g1 @ g1)  # so the plain sum conflicts with g1
    jac = np.stack([g1, g2])
    tx = pcgrad(key=seed)
    update, _ = tx.update(_from_matrix(jac), tx.init(PARAMS))
    per_task, _ = tx.per_task.update(_from_matrix(jac), tx.init(PARAMS))
    u, gp = _vector(update), _matrix(per_task)
    scale = np.abs(jac).sum() ** 2
    assert np.all(jac @ u >= -1e-6 * scale)
    # Each projected gradient is orthogonal to the other task's gradient.
    np.testing.assert_allclose([gp[0] @ g2, gp[1] @ g1], 0.0, atol=1e-5 * scale)
    assert (g1 + g2) @ g1 < 0


@pytest.mark.parametrize("seed", range(3))
def test_pcgrad_each_gradient_ends_without_conflict_with_its_last_task(seed):
    k = 5
    grads = _grads(seed, k)
    tx = pcgrad(key=seed)
    state = tx.init(PARAMS)
    orders = np.asarray(_projection._next_orders(state.key, k)[1])
    per_task, _ = tx.per_task.update(grads, state)
    gp, jac = _matrix(per_task), _matrix(grads)
    for i in range(k):
        assert gp[i] @ jac[orders[i, -1]] >= -1e-5 * np.abs(jac).sum()


def test_pcgrad_without_conflicts_is_the_sum():
    base = np.abs(np.random.default_rng(0).standard_normal((3, 13)))  # all inner products > 0
    tx = pcgrad()
    update, state = tx.update(_from_matrix(base), tx.init(PARAMS))
    np.testing.assert_allclose(_vector(update), base.sum(0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.weights), np.ones(3))


def test_pcgrad_mean_reduction_divides_by_k():
    grads = _grads(2, 5)
    total, s1 = pcgrad(key=1).update(grads, pcgrad(key=1).init(PARAMS))
    mean, s2 = pcgrad(key=1, reduction="mean").update(grads, pcgrad(key=1).init(PARAMS))
    chex.assert_trees_all_close(mean, jax.tree.map(lambda x: x / 5, total), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s2.weights), np.asarray(s1.weights) / 5, rtol=1e-6)
    tx = pcgrad(key=1, reduction="mean")
    per_task, _ = tx.per_task.update(grads, tx.init(PARAMS))
    np.testing.assert_allclose(_matrix(per_task).sum(0), _vector(mean), rtol=1e-5, atol=1e-6)


def test_pcgrad_zero_task_is_skipped_and_finite():
    jac = np.random.default_rng(3).standard_normal((3, 13))
    jac[1] = 0.0
    tx = pcgrad(key=0)
    update, state = tx.update(_from_matrix(jac), tx.init(PARAMS))
    without, _ = pcgrad(key=0).update(_from_matrix(jac[[0, 2]]), tx.init(PARAMS))
    assert np.all(np.isfinite(_vector(update)))
    np.testing.assert_allclose(_vector(update), _vector(without), rtol=1e-6)
    assert float(state.weights[1]) == 1.0  # nothing projected onto the zero gradient


def test_pcgrad_projection_coefficients_are_finite_under_grad():
    """The double where keeps derivatives finite through zero-norm gradients."""
    jac = np.random.default_rng(4).standard_normal((3, 6))
    jac[2] = 0.0
    orders = _projection._draw_orders(jax.random.key(0), 3)

    def f(j):
        return _projection._pcgrad_matrix(j @ j.T, orders).sum()

    grad = jax.grad(f)(jnp.asarray(jac, jnp.float32))
    assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------------------
# GradVac: the correction, the EMA targets and their evolution.
# ---------------------------------------------------------------------------


def test_gradvac_first_step_from_zero_targets_is_pcgrad():
    grads = _grads(5, 5)
    u_gv, _ = gradvac(key=8, num_tasks=5).update(grads, gradvac(key=8, num_tasks=5).init(PARAMS))
    u_pc, _ = pcgrad(key=8).update(grads, pcgrad(key=8).init(PARAMS))
    chex.assert_trees_all_close(u_gv, u_pc, rtol=1e-5, atol=1e-6)


def test_gradvac_correction_reaches_the_target_cosine():
    """After a correction cos(g_i', g_j) equals the target it was compared with."""
    rng = np.random.default_rng(6)
    g1 = rng.standard_normal(13)
    g2 = 0.2 * g1 + rng.standard_normal(13)
    jac = np.stack([g1, g2])
    tx = gradvac(beta=0.5, num_tasks=2)
    target = 0.8
    assert _cos(g1, g2) < target
    state = tx.init(PARAMS)._replace(phi_hat=jnp.array([[0.0, target], [target, 0.0]]))
    per_task, new_state = tx.per_task.update(_from_matrix(jac), state)
    gp = _matrix(per_task)
    np.testing.assert_allclose([_cos(gp[0], g2), _cos(gp[1], g1)], target, rtol=1e-5)
    # The EMA moved the targets with the cosine measured before the correction.
    expected = 0.5 * target + 0.5 * _cos(g1, g2)
    np.testing.assert_allclose(np.asarray(new_state.phi_hat)[[0, 1], [1, 0]], expected, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradvac_targets_are_an_ema_of_the_cosines(beta):
    """K = 2: phi_t = (1 - beta) phi_{t-1} + beta cos(g_1^t, g_2^t), over steps; diagonal 0."""
    tx = gradvac(beta=beta, key=1, num_tasks=2)
    state = tx.init(PARAMS)
    assert state.phi_hat.shape == (2, 2) and not np.any(np.asarray(state.phi_hat))
    phi = 0.0
    for t in range(4):
        jac = _matrix(_grads(10 + t, 2))
        _, state = tx.update(_from_matrix(jac), state)
        phi = (1 - beta) * phi + beta * _cos(jac[0], jac[1])
        got = np.asarray(state.phi_hat)
        np.testing.assert_allclose(got[[0, 1], [1, 0]], phi, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.diag(got), 0.0)


def test_gradvac_with_beta_zero_is_pcgrad_at_every_step():
    tx_gv, tx_pc = gradvac(beta=0.0, key=4, num_tasks=3), pcgrad(key=4)
    s_gv, s_pc = tx_gv.init(PARAMS), tx_pc.init(PARAMS)
    for t in range(3):
        grads = _grads(20 + t, 3)
        u_gv, s_gv = tx_gv.update(grads, s_gv)
        u_pc, s_pc = tx_pc.update(grads, s_pc)
        chex.assert_trees_all_close(u_gv, u_pc, rtol=1e-5, atol=1e-6)


def test_gradvac_persistent_targets_change_later_updates():
    """Unlike vambn (which resets its EMA at every call), the state carries the targets."""
    tx = gradvac(beta=0.5, key=2, num_tasks=3)
    state = tx.init(PARAMS)
    grads = _grads(7, 3)
    _, state = tx.update(grads, state)
    persistent, _ = tx.update(grads, state)
    reset, _ = tx.update(grads, state._replace(phi_hat=jnp.zeros((3, 3))))
    assert np.max(np.abs(_vector(persistent) - _vector(reset))) > 1e-3


def test_gradvac_degenerate_targets_and_gradients_stay_finite():
    """Target exactly 1 (no finite correction reaches it) and a zero gradient: skipped."""
    jac = np.random.default_rng(8).standard_normal((3, 13))
    jac[2] = 0.0
    tx = gradvac(num_tasks=3)
    state = tx.init(PARAMS)._replace(phi_hat=jnp.ones((3, 3)))
    update, new_state = tx.update(_from_matrix(jac), state)
    np.testing.assert_allclose(_vector(update), jac.sum(0), rtol=1e-6)  # no correction at all
    assert np.all(np.isfinite(np.asarray(new_state.phi_hat)))
    # The cosine with the zero gradient is taken as 0: the targets move towards 0.
    np.testing.assert_allclose(np.asarray(new_state.phi_hat)[[0, 1], [2, 2]], 0.5, rtol=1e-6)


def test_gradvac_anti_collinear_gradients_cancel_exactly():
    g = np.random.default_rng(9).standard_normal(13)
    tx = gradvac(num_tasks=2)
    state = tx.init(PARAMS)
    for _ in range(3):
        update, state = tx.update(_from_matrix(np.stack([g, -g])), state)
        assert np.all(_vector(update) == 0.0)
    np.testing.assert_allclose(np.asarray(state.phi_hat)[0, 1], -0.875, rtol=1e-6)


def test_gradvac_state_dtype_follows_x64(x64):
    tx = gradvac(num_tasks=2)
    assert tx.init(PARAMS).phi_hat.dtype == jnp.float64


def test_gradvac_state_is_float32_by_default():
    assert gradvac(num_tasks=2).init(PARAMS).phi_hat.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Randomness.
# ---------------------------------------------------------------------------


def test_orders_are_permutations_of_the_other_tasks():
    for k in (1, 2, 5):
        orders = np.asarray(_projection._next_orders(jax.random.key(k), k)[1])
        assert orders.shape == (k, k - 1) and orders.dtype == np.int32
        for i in range(k):
            assert sorted(orders[i]) == [j for j in range(k) if j != i]


def test_orders_are_uniform_and_independent_across_tasks():
    """K = 4: each row is uniform over the 3! orders, and rows 0 and 1 are independent.

    Seeded chi-square tests on 12000 draws (deterministic); the 1e-4 thresholds
    are far below what uniform draws give and far above what a fixed or biased
    order gives (checked: the identity order has p = 0).
    """
    stats = pytest.importorskip("scipy.stats")
    n, k = 12_000, 4
    keys = jax.random.split(jax.random.key(123), n)
    orders = np.asarray(jax.jit(jax.vmap(lambda kk: _projection._draw_orders(kk, k)))(keys))
    perms = {p: idx for idx, p in enumerate(itertools.permutations(range(3)))}

    def codes(i):
        ranks = orders[:, i] - (orders[:, i] > i)  # back to permutations of 0..2
        return np.array([perms[tuple(r)] for r in ranks])

    for i in range(k):
        counts = np.bincount(codes(i), minlength=6)
        assert stats.chisquare(counts).pvalue > 1e-4, counts
    table = np.zeros((6, 6))
    np.add.at(table, (codes(0), codes(1)), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-4
    # Power: a constant order is rejected.
    assert stats.chisquare(np.bincount(np.zeros(n, int), minlength=6)).pvalue < 1e-4


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_same_key_same_sequence_different_key_different(name):
    def run(key):
        tx = pcgrad(key=key) if name == "pcgrad" else gradvac(key=key, num_tasks=5)
        state, out = tx.init(PARAMS), []
        for t in range(3):
            update, state = tx.update(_grads(30 + t, 5), state)
            out.append(_vector(update))
        return np.stack(out)

    np.testing.assert_array_equal(run(7), run(7))
    np.testing.assert_array_equal(run(7), run(jax.random.key(7)))
    assert not np.allclose(run(7), run(8))


# ---------------------------------------------------------------------------
# Shapes, dtypes, jit, chaining.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_k_equals_one_returns_the_gradient(name):
    tx = pcgrad() if name == "pcgrad" else gradvac(num_tasks=1)
    g = _grads(0, 1)
    u, _ = tx.update(g, tx.init(PARAMS))
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: x[0], g))


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_bfloat16_leaves_keep_their_dtype_in_both_forms(name):
    tx = pcgrad() if name == "pcgrad" else gradvac(num_tasks=3)
    g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads())
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    u, _ = tx.update(g, tx.init(p), p)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, p)
    per_task, _ = tx.per_task.update(g, tx.init(p), p)
    chex.assert_trees_all_equal_shapes_and_dtypes(per_task, g)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_jits_in_a_chain_with_adam_and_scans_over_steps(name):
    tx = pcgrad(num_tasks=3) if name == "pcgrad" else gradvac(num_tasks=3)
    opt = optax.chain(tx, optax.adam(1e-2))

    def step(carry, t):
        params, state = carry
        u, state = opt.update(_grads(0, 3), state, params, value=jnp.ones(3))
        return (optax.apply_updates(params, u), state), None

    (params, state), _ = jax.lax.scan(step, (PARAMS, opt.init(PARAMS)), jnp.arange(3))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(PARAMS))
    assert not np.allclose(np.asarray(params["a"]), 0.0)
    eager_state = opt.init(PARAMS)
    eager_params = PARAMS
    for _ in range(3):
        u, eager_state = opt.update(_grads(0, 3), eager_state, eager_params)
        eager_params = optax.apply_updates(eager_params, u)
    chex.assert_trees_all_close(params, eager_params, rtol=1e-5, atol=1e-6)


def test_pcgrad_state_without_num_tasks_takes_its_shape_at_the_first_step():
    tx = pcgrad()
    s0 = tx.init(PARAMS)
    assert s0.weights.shape == (0,)
    _, s1 = tx.update(_grads(), s0)
    assert s1.weights.shape == (3,)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_gradvac_requires_num_tasks():
    with pytest.raises(ValueError, match="num_tasks is required"):
        gradvac()
    with pytest.raises(ValueError, match="positive integer"):
        gradvac(num_tasks=0)


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_gradvac_rejects_beta_outside_unit_interval(beta):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        gradvac(beta=beta, num_tasks=2)


def test_pcgrad_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        pcgrad(reduction="max")


@pytest.mark.parametrize("form", ["update", "per_task"])
@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_wrong_number_of_tasks_and_missing_task_axis_are_reported(name, form):
    tx = pcgrad(num_tasks=3) if name == "pcgrad" else gradvac(num_tasks=3)
    update = tx.update if form == "update" else tx.per_task.update
    with pytest.raises(ValueError, match=r"num_tasks=3.*\['a'\]"):
        update(_grads(0, 2), tx.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="task axis is missing"):
        update(PARAMS, tx.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match=r"value= must hold the 3 per-task losses"):
        update(_grads(0, 3), tx.init(PARAMS), PARAMS, value=jnp.ones(2))


def test_explicit_orders_of_the_wrong_shape_are_rejected():
    gram = jnp.eye(3)
    with pytest.raises(ValueError, match=r"orders must have shape \(3, 2\)"):
        _projection._pcgrad_matrix(gram, jnp.zeros((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="orders must be integers"):
        _projection._pcgrad_matrix(gram, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"phi_hat must have shape \(3, 3\)"):
        _projection._gradvac_matrix(gram, jnp.zeros((2, 2)), jnp.zeros((3, 2), jnp.int32), 0.5)
