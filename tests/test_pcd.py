"""pcd: its QP against brute force, KKT conditions, scale invariance, state, edge cases.

Parity with TorchJD is in tests/parity/test_pcd_parity.py. Here the solver
(:func:`mtl_optax._pcd.pcd_qp`, Goldfarb-Idnani) is checked in float64
against an independent solution of the same QP: the enumeration of the
working sets (the paper's own method), whose KKT point gives the unique
minimizer ``d``, and a linear program (scipy's ``linprog``) deciding
feasibility where no working set is a KKT point. Then the transformation's
properties: invariance to rescaling a secondary task, positive homogeneity,
the EMA state, the documented edge cases, float32 / bfloat16 leaves, jit,
vmap, ``inject_hyperparams`` and the errors. The programs are compiled once
per shape (random problems are batched through ``jax.vmap``).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import mtl_optax
from mtl_optax._pcd import pcd_qp, pcd_weights

K = 6
# One compilation for every random problem (vmapped) of K tasks.
_QP = jax.jit(jax.vmap(pcd_qp))


def _brute_force(gram, taus):
    """``[1, mu]`` from the working set whose equality solution is a KKT point, or None."""
    gs, b = gram[1:, 1:], taus * np.diag(gram)[1:] - gram[1:, 0]
    n = gs.shape[0]
    scale = np.abs(gram).max()
    diag = np.diag(gs)
    inv = np.where(diag > 0, 1 / np.sqrt(np.where(diag > 0, diag, 1)), 0)
    for size in range(n + 1):
        for subset in itertools.combinations(range(n), size):
            s = list(subset)
            mu = np.zeros(n)
            if s:
                sub = gs[np.ix_(s, s)]
                # Independence judged on the unit-diagonal matrix: the rows' scales differ.
                if np.linalg.cond(sub * np.outer(inv[s], inv[s])) > 1e8:
                    continue
                mu[s] = np.linalg.solve(sub, b[s])
            if np.all(mu >= 0) and np.all(gs @ mu - b >= -1e-10 * scale):
                return np.concatenate([[1.0], mu])
    return None


def _feasible(jac, taus):
    """Whether ``g_j^T d >= tau_j ||g_j||^2`` has a solution (scipy's linprog)."""
    a, c = jac[1:], taus * np.sum(jac[1:] ** 2, axis=1)
    res = scipy.optimize.linprog(
        np.zeros(jac.shape[1]), A_ub=-a, b_ub=-c, bounds=(None, None), method="highs"
    )
    return res.status == 0


def _random_problems(n, seed):
    """``n`` Jacobians of K tasks (P from 2 to 40), conflicting rows, random scales and taus.

    Row scales from 0.1 to 10: PCD solves the program on normalized gradients,
    and the solver's tolerances are relative to the largest squared norm.
    """
    rng = np.random.default_rng(seed)
    jacs, taus = [], []
    for i in range(n):
        p = int(rng.choice([2, 3, 5, 12, 40]))
        jac = rng.standard_normal((K, p)) * 10.0 ** rng.uniform(-1, 1, (K, 1))
        # Secondary tasks that conflict with the primary one, and a zero task.
        jac[1] -= 2.0 * jac[0] * np.linalg.norm(jac[1]) / np.linalg.norm(jac[0])
        if i % 5 == 0:
            jac[4] = 0.0
        # Zero columns up to P = 40: the same Gramian, one shape for vmap.
        jacs.append(np.pad(jac, ((0, 0), (0, 40 - p))))
        taus.append(rng.choice([0.0, 0.02, 0.3, 1.0]) if i % 2 else rng.uniform(0, 0.5, K - 1))
    return np.stack(jacs), np.stack([np.broadcast_to(t, (K - 1,)) for t in taus])


def test_qp_matches_brute_force_and_satisfies_kkt(x64):
    """120 random problems in float64, K = 6, P = 2 to 40 (many K > P), scales 0.1 to 10.

    Against the working-set enumeration: the same minimizer ``d`` to 1e-10 of
    ``sum_k |w_k| ||g_k||``, and the same decision on feasibility (confirmed
    by a linear program). KKT conditions of our multipliers: constraints
    satisfied to 1e-9 of the largest squared norm (the solver's stopping
    tolerance), multipliers >= 0, complementary slackness ``mu_j * slack_j``
    below 1e-9 of ``mu_j * ||g_j||^2`` plus the same tolerance.
    """
    jacs, taus = _random_problems(120, seed=0)
    grams = np.einsum("bkp,blp->bkl", jacs, jacs)
    ws = np.asarray(_QP(jnp.asarray(grams), jnp.asarray(taus)))
    n_active = n_infeasible = 0
    for jac, gram, tau, w in zip(jacs, grams, taus, ws, strict=True):
        ref = _brute_force(gram, tau)
        assert (ref is not None) == _feasible(jac, tau)
        if ref is None:
            n_infeasible += 1
            np.testing.assert_array_equal(w, np.eye(K)[0])
            continue
        norms = np.linalg.norm(jac, axis=1)
        bound = 1e-10 * (np.abs(ref) @ norms + np.abs(w) @ norms)
        assert np.linalg.norm(w @ jac - ref @ jac) <= bound
        # KKT of our multipliers.
        d = w @ jac
        slack = jac[1:] @ d - tau * norms[1:] ** 2
        tol = 1e-9 * norms.max() ** 2
        assert w[0] == 1.0 and np.all(w[1:] >= 0)
        assert np.all(slack >= -tol)
        assert np.all(np.abs(w[1:] * slack) <= 1e-9 * w[1:] * norms[1:] ** 2 + tol)
        n_active += np.count_nonzero(w[1:])
    # The problems exercise the solver: constraints bind, some sets are infeasible.
    assert n_active > 100 and 0 < n_infeasible < 60


P = 30  # the float64 tests' parameters: one compilation per K


@functools.cache
def _step(k):
    """The jitted update of ``pcd`` for ``k`` tasks, with the hyperparameters as arguments.

    The factory accepts traced hyperparameters (as under ``inject_hyperparams``):
    every (tau, beta, eps) shares one compilation per shape and dtype.
    """

    def step(grads, state, tau, beta, eps):
        return mtl_optax.pcd(tau=tau, beta=beta, eps=eps, num_tasks=k).update(grads, state)

    return jax.jit(step)


def _run(jacs, tau=0.02, beta=0.999, eps=1e-8, dtype=jnp.float64):
    """Updates (float64 rows) and final state of ``pcd`` over the Jacobians, from ``init``."""
    k = jacs[0].shape[0]
    state, out = mtl_optax.pcd(num_tasks=k).init(None), []
    for jac in jacs:
        u, state = _step(k)({"w": jnp.asarray(jac, dtype)}, state, tau, beta, eps)
        out.append(np.asarray(u["w"], np.float64))
    return np.stack(out), state


def test_infeasible_constraints_give_the_primary_gradient(x64):
    """Opposite secondary gradients (tau > 0): no d satisfies both, the update is g_1 (1e-12)."""
    rng = np.random.default_rng(1)
    g, h = rng.standard_normal(P), rng.standard_normal(P)
    jac = np.stack([g, h, -3.0 * h])
    # Padded to K = 6 with zero secondary tasks (0 >= 0 holds): the compiled solver of
    # test_qp_matches_brute_force_and_satisfies_kkt.
    padded = np.pad(jac @ jac.T, ((0, 3), (0, 3)))[None]
    w = _QP(jnp.asarray(padded), jnp.full((1, K - 1), 0.1))[0]
    np.testing.assert_array_equal(np.asarray(w), np.eye(K)[0])
    np.testing.assert_allclose(_run([jac], tau=0.1)[0][0], g, rtol=1e-12)
    # tau = 0: d = g_1 projected onto h^T d = 0 satisfies both.
    d = _run([jac], tau=0.0, eps=0.0)[0][0]
    expected = g - (g @ h) / (h @ h) * h
    np.testing.assert_allclose(
        d, expected * np.linalg.norm(g) / np.linalg.norm(expected), rtol=1e-12
    )


def _steps(seed, k=3, n=4):
    """``n`` Jacobians whose rows change scale from step to step (the EMA matters)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((k, P))
    base[1] -= 1.5 * base[0]
    return [
        (base + 0.5 * rng.standard_normal((k, P))) * 10.0 ** rng.uniform(-1, 1, (k, 1))
        for _ in range(n)
    ]


def test_rescaling_a_secondary_task_at_every_step_changes_nothing(x64):
    """Row 2 times 1e3 and row 3 times 1e-2 at every step: same updates (1e-12 relative, eps = 0).

    With the default eps = 1e-8 the invariance holds up to eps / ||g_k||^2:
    1e-6 relative for rows scaled by 1e3 and 10 (squared norms above 0.2).
    """
    jacs = _steps(3)
    ref = _run(jacs, tau=0.3, beta=0.9, eps=0.0)[0]
    scaled = [j * np.array([1.0, 1e3, 1e-2])[:, None] for j in jacs]
    out = _run(scaled, tau=0.3, beta=0.9, eps=0.0)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    scaled = [j * np.array([1.0, 1e3, 10.0])[:, None] for j in jacs]
    out = _run(scaled, tau=0.3, beta=0.9)[0]
    np.testing.assert_allclose(out, _run(jacs, tau=0.3, beta=0.9)[0], rtol=1e-6, atol=1e-7)
    # Not a trivial identity: the constraints bind (the update is not g_1).
    assert np.abs(ref[-1] - jacs[-1][0]).max() > 1e-2


def test_positive_homogeneity_and_ema_state(x64):
    """Every gradient times c = 1e4 scales the updates by c (1e-12 relative, eps = 0); the
    state's EMA and count follow their definition (1e-14)."""
    jacs = _steps(5)
    ref, state = _run(jacs, beta=0.8, eps=0.0)
    out, _ = _run([1e4 * j for j in jacs], beta=0.8, eps=0.0)
    np.testing.assert_allclose(out, 1e4 * ref, rtol=1e-12, atol=1e-8 * np.abs(ref).max())
    ema = np.zeros(3)
    for j in jacs:
        ema = 0.8 * ema + 0.2 * np.sum(j**2, axis=1)
    np.testing.assert_allclose(np.asarray(state.sq_norm_ema), ema, rtol=1e-14)
    assert int(state.count) == len(jacs)
    # The weights logged (float32) are those of the last update.
    np.testing.assert_allclose(np.asarray(state.weights) @ jacs[-1], ref[-1], rtol=1e-5, atol=1e-5)


def test_non_finite_gradient_gives_nan_and_leaves_the_ema_unchanged(x64):
    good = np.random.default_rng(0).standard_normal((3, P))
    _, state = _run([good])
    for bad in (np.nan, np.inf):
        jac = good.copy()
        jac[2, 1] = bad
        u, new = _step(3)({"w": jnp.asarray(jac)}, state, 0.02, 0.999, 1e-8)
        assert np.all(np.isnan(np.asarray(u["w"]))) and np.all(np.isnan(new.weights))
        np.testing.assert_array_equal(np.asarray(new.sq_norm_ema), np.asarray(state.sq_norm_ema))
        assert int(new.count) == 1


def _unit(v):
    return v / np.linalg.norm(v)


def test_edge_cases_have_documented_results(x64):
    """First-step updates of the issue's edge cases, against closed forms (1e-12 relative)."""
    rng = np.random.default_rng(2)
    g, h = rng.standard_normal(P), rng.standard_normal(P)
    h_orth = h - (h @ g) / (g @ g) * g
    tau = 0.3

    def first(jac, tau=tau):
        return _run([jac], tau=tau, eps=0.0)[0][0]

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(g).max())

    close(first(g[None]), g)  # K = 1
    close(first(np.stack([g, g])), g)  # identical: g_1 satisfies the constraint
    close(first(np.stack([g, -2.0 * g])), -g)  # opposite, tau > 0: d~ = -tau g~_1
    close(first(np.stack([g, -2.0 * g]), tau=0.0), 0 * g)  # opposite, tau = 0: d~ = 0
    # Orthogonal: d~ = u_1 + tau u_2, rescaled to ||g_1||.
    expected = np.linalg.norm(g) * _unit(_unit(g) + tau * _unit(h_orth))
    close(first(np.stack([g, 5.0 * h_orth])), expected)
    close(first(np.stack([g, 2.5 * g, -0.5 * g])), g)  # collinear of both signs: infeasible
    close(first(np.stack([0 * g, h, -h])), 0 * g)  # zero primary: zero update
    close(first(np.stack([g, 0 * g, 3 * g])), g)  # zero secondary: 0 >= 0 holds
    # Magnitudes 1e-8 against 1e4 (default eps): finite, the norm of g_1 kept.
    jac = np.stack([1e-8 * g, 1e4 * h, -1e4 * h_orth])
    u = _run([jac, jac])[0]
    assert np.all(np.isfinite(u))
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1e-8 * np.linalg.norm(g), rtol=1e-12)


def test_float32_large_k_and_duplicated_tasks():
    """K = 40, P = 1e5 in float32: every task progresses and ||u|| = ||g_1|| (1e-5);
    duplicated secondary tasks in float32 give the update without the duplicates (1e-5).
    (bfloat16 leaves and the whole K = 40 update are in tests/test_all_methods.py.)"""
    k, p = 40, 100_000
    rng = np.random.default_rng(4)
    jac = rng.standard_normal((k, p), dtype=np.float32)
    jac[1:] -= 0.3 * jac[0]
    j64 = jac.astype(np.float64)
    w = jax.jit(pcd_weights)(jnp.asarray(j64 @ j64.T, jnp.float32), 0.05)
    u = np.asarray(w, np.float64) @ j64
    norms = np.linalg.norm(j64, axis=1)
    assert np.all(j64[1:] @ u / norms[1:] > 0.01 * norms[0])
    np.testing.assert_allclose(np.linalg.norm(u), norms[0], rtol=1e-5)

    j5 = rng.standard_normal((5, 35))
    j5[1:] -= 0.5 * j5[0]
    dup = np.stack([j5[0], j5[1], j5[1], j5[1], j5[2]])
    np.testing.assert_allclose(
        _run([dup], tau=0.2, dtype=jnp.float32)[0][0],
        _run([j5[:3]], tau=0.2, dtype=jnp.float32)[0][0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_inject_hyperparams_schedules_tau():
    """A tau schedule through ``optax.inject_hyperparams`` equals the method with each
    step's tau (1e-6, float32), the EMA carried."""
    rng = np.random.default_rng(5)
    jacs = rng.standard_normal((3, 3, 35))
    jacs[:, 1] -= jacs[:, 0]
    values = [0.0, 0.5, 1.0]
    injected = optax.inject_hyperparams(mtl_optax.pcd, static_args=("num_tasks",))(
        tau=lambda count: jnp.asarray(values)[jnp.minimum(count, 2)], num_tasks=3
    )
    step = jax.jit(injected.update)
    state, fixed_state = injected.init(None), mtl_optax.pcd(num_tasks=3).init(None)
    for i, tau in enumerate(values):
        g = {"w": jnp.asarray(jacs[i], jnp.float32)}
        u, state = step(g, state)
        expected, fixed_state = _step(3)(g, fixed_state, tau, 0.999, 1e-8)
        np.testing.assert_allclose(u["w"], expected["w"], rtol=1e-6, atol=1e-6)
    assert int(state.inner_state.count) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": -0.1}, "tau must be"),
        ({"tau": 1.5}, "tau must be"),
        ({"tau": [0.1, 0.2]}, "one value per secondary task"),
        ({"tau": [[0.1, 0.2, 0.3]]}, "tau must be"),
        ({"beta": 1.0}, "beta must be in"),
        ({"eps": -1e-8}, "eps must be"),
        ({"num_tasks": None}, "pass num_tasks=K"),
        ({"num_tasks": 0}, "positive int"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mtl_optax.pcd(**{"num_tasks": 4, **kwargs})
    with pytest.raises(ValueError, match="vector of length K - 1"):
        pcd_weights(jnp.eye(3), jnp.ones(3))
