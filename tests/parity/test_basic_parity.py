"""Parity of ``mean``, ``sum``, ``constant`` and ``rlw`` with TorchJD and LibMTL.

Every comparison runs in float64 on both sides (JAX with ``jax_enable_x64``,
torch with float64 tensors) and feeds the same ``(K, P)`` Jacobian ``J``: as a
``(K, P)`` tensor to the TorchJD aggregator, and split into a pytree of leaves
of different shapes (``(K, a, 3)``, ``(K, c)``, ``(K,)``) to mtl_optax, whose
update is flattened back to a ``(P,)`` vector. Tolerance: rtol = 1e-12 relative
to ``sum_k |w_k| |J_kj|`` (see ``conftest.assert_combination_close``).

References:

* TorchJD 0.18 ``Mean``, ``Sum``, ``Constant``, ``Random``: ``aggregator(J)``
  returns ``weights @ J``; ``aggregator.weighting(J)`` returns the weights.
* LibMTL 1.1.5 ``EW`` and ``RLW``: a weighting's ``backward(losses)`` backprops
  ``sum_k w_k L_k`` and returns the weights. With linear losses
  ``L = J @ theta`` the gradient w.r.t. ``theta`` is ``w @ J``, which makes them
  cheap to drive without LibMTL's model or trainer. Note: despite its docstring
  ("the loss weight for each task is always 1 / T"), LibMTL's ``EW`` uses
  weights of ones (``torch.ones_like(losses)``), i.e. it sums the losses; it is
  therefore the reference for ``mtl_optax.sum``, and ``mtl_optax.mean`` equals
  ``EW / K``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax

from .conftest import (
    assert_combination_close,
    import_libmtl,
    jacobian_to_tree,
    params_like,
    random_jacobian,
    reference,
    require_reference,
    to_numpy,
    tree_to_vector,
)

torch = reference("torch")
aggregation = reference("torchjd.aggregation")


METHODS = ("mean", "sum", "constant", "rlw")

# (seed, K, P): every K in {1, 2, 3, 10, 40} with four seeds and P from 5 to 3000.
CASES = [(100 * k + i, k, p) for k in (1, 2, 3, 10, 40) for i, p in enumerate((5, 97, 1000, 3000))]


def _mtl_update(tx, jac, state=None):
    """mtl_optax's update on ``jac`` (split into a pytree), flattened, and its state."""
    tree = jacobian_to_tree(jac)
    params = params_like(tree)
    if state is None:
        state = tx.init(params)
    update, new_state = tx.update(tree, state, params)
    for leaf in jax.tree_util.tree_leaves(update):
        assert leaf.dtype == jnp.float64, "parity must run in float64"
    vec = tree_to_vector(update)
    assert vec.shape == (jac.shape[1],)
    return vec, new_state


def _rlw_weights(tx, state, k):
    """The float64 weights rlw draws from ``state``: its update on J = I_K."""
    weights, _ = _mtl_update(tx, np.eye(k), state)
    return weights


def _patch_torch_randn(monkeypatch, log_weights, calls):
    """Makes ``torch.randn`` (as called by TorchJD's RandomWeighting) return ``log_weights``."""
    real_randn = torch.randn

    def fake_randn(*size, device=None, dtype=None, **kwargs):
        if kwargs.get("generator") is not None or size != (len(log_weights),):
            return real_randn(*size, device=device, dtype=dtype, **kwargs)
        calls.append((size, dtype))
        return torch.tensor(log_weights, dtype=dtype, device=device)

    monkeypatch.setattr(torch, "randn", fake_randn)


def _both(method, jac, seed, monkeypatch):
    """(mtl_optax update, mtl_optax state, torchjd aggregate, torchjd weights) on ``jac``."""
    k = jac.shape[0]
    jac_t = torch.from_numpy(jac)
    if method == "mean":
        tx, agg = mtl_optax.mean(), aggregation.Mean()
    elif method == "sum":
        tx, agg = mtl_optax.sum(), aggregation.Sum()
    elif method == "constant":
        c = np.random.default_rng(seed + 1).normal(size=k) * 2.0  # any sign, unnormalised.
        tx, agg = mtl_optax.constant(c), aggregation.Constant(torch.from_numpy(c))
    elif method == "rlw":
        tx, agg = mtl_optax.rlw(key=seed), aggregation.Random()
        weights = _rlw_weights(tx, tx.init(None), k)
        calls = []
        _patch_torch_randn(monkeypatch, np.log(weights), calls)
    else:
        raise AssertionError(method)
    update, state = _mtl_update(tx, jac)
    expected = to_numpy(agg(jac_t))
    if method == "rlw":
        assert calls == [((k,), torch.float64)], calls
        # Replaying the draw through torchjd's softmax returns the same weights
        # only if mtl_optax's weights lie on the simplex.
        torch_weights = to_numpy(torch.softmax(torch.from_numpy(np.log(weights)), dim=-1))
        np.testing.assert_allclose(torch_weights, weights, rtol=1e-13, atol=0)
    else:
        torch_weights = to_numpy(agg.weighting(jac_t))
    assert expected.dtype == np.float64
    return update, state, expected, torch_weights


def _check(method, jac, seed, monkeypatch):
    update, state, expected, torch_weights = _both(method, jac, seed, monkeypatch)
    assert_combination_close(update, expected, torch_weights, jac)
    # The logged weights (float32) are the weights that were used.
    assert state.weights.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(state.weights), torch_weights.astype(np.float32), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("seed", "k", "p"), CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in CASES])
def test_random_jacobians_match_torchjd(x64, monkeypatch, method, seed, k, p):
    jac = random_jacobian(seed, k, p)
    _check(method, jac, seed, monkeypatch)


def _edge_case(name):
    rng = np.random.default_rng(7)
    p = 301
    g1, g2 = rng.standard_normal(p), rng.standard_normal(p)
    if name == "identical":
        return np.stack([g1, g1])
    if name == "opposite":
        return np.stack([g1, -g1])
    if name == "orthogonal":
        g2 = g2 - (g1 @ g2) / (g1 @ g1) * g1
        assert abs(g1 @ g2) < 1e-12 * np.linalg.norm(g1) * np.linalg.norm(g2)
        return np.stack([g1, g2])
    if name == "zero_task":
        jac = rng.standard_normal((3, p))
        jac[1] = 0.0
        return jac
    if name == "magnitudes":
        return random_jacobian(11, 3, p, scales=[1e-8, 1.0, 1e4])
    if name == "tiny_vs_huge":
        return random_jacobian(12, 2, p, scales=[1e-8, 1e4])
    raise AssertionError(name)


EDGE_CASES = ("identical", "opposite", "orthogonal", "zero_task", "magnitudes", "tiny_vs_huge")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_match_torchjd(x64, monkeypatch, method, case):
    jac = _edge_case(case)
    _check(method, jac, 3, monkeypatch)


def test_opposite_gradients_cancel(x64, monkeypatch):
    """For g and -g both libraries' mean is exactly zero (a sharper check than rtol)."""
    jac = _edge_case("opposite")
    update, _, expected, _ = _both("mean", jac, 0, monkeypatch)
    assert np.all(update == 0.0) and np.all(expected == 0.0)


# ---------------------------------------------------------------------------
# LibMTL.
# ---------------------------------------------------------------------------


def _libmtl_backward(weighting, jac, **kwargs):
    """Drives a LibMTL weighting on linear losses ``L = J @ theta``; returns (w @ J, w)."""
    k, p = jac.shape
    weighting.task_num = k
    weighting.device = "cpu"
    theta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    losses = torch.from_numpy(jac) @ theta
    weights = weighting.backward(losses, **kwargs)
    return to_numpy(theta.grad), np.asarray(weights, np.float64)


LIBMTL_CASES = [(7 * k + i, k, p) for k in (1, 2, 3, 10, 40) for i, p in enumerate((13, 500))]


@pytest.mark.parametrize(
    ("seed", "k", "p"), LIBMTL_CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in LIBMTL_CASES]
)
def test_sum_and_mean_match_libmtl_ew(x64, seed, k, p):
    EW = import_libmtl().weighting.EW

    jac = random_jacobian(seed, k, p)
    grad, ew_weights = _libmtl_backward(EW(), jac)
    total, sum_state = _mtl_update(mtl_optax.sum(), jac)
    assert_combination_close(total, grad, ew_weights, jac)
    np.testing.assert_allclose(np.asarray(sum_state.weights), ew_weights, rtol=0, atol=0)
    # LibMTL's EW sums the task losses (weights of ones), so mean == EW / K.
    average, _ = _mtl_update(mtl_optax.mean(), jac)
    assert_combination_close(average, grad / k, ew_weights / k, jac)


@pytest.mark.parametrize(
    ("seed", "k", "p"), LIBMTL_CASES, ids=[f"s{s}-K{k}-P{p}" for s, k, p in LIBMTL_CASES]
)
def test_rlw_replays_libmtl_rlw(x64, seed, k, p):
    """mtl_optax.rlw's draw, replayed through LibMTL's RLW (dist='Normal'), gives its update."""
    RLW = import_libmtl().weighting.RLW

    tx = mtl_optax.rlw(key=seed)
    weights = _rlw_weights(tx, tx.init(None), k)
    log_weights = torch.from_numpy(np.log(weights))

    class ReplayNormal:  # stands in for LibMTL's torch.distributions.Normal(0, 1).
        calls = 0

        def sample(self):
            ReplayNormal.calls += 1
            return log_weights.clone()

    rlw = RLW()
    rlw.distribution = ReplayNormal()
    jac = random_jacobian(seed, k, p)
    grad, libmtl_weights = _libmtl_backward(rlw, jac, dist="Normal")
    assert ReplayNormal.calls == 1
    np.testing.assert_allclose(libmtl_weights, weights, rtol=1e-13, atol=0)
    update, _ = _mtl_update(tx, jac)
    assert_combination_close(update, grad, libmtl_weights, jac)


# ---------------------------------------------------------------------------
# RLW: distribution and key handling.
# ---------------------------------------------------------------------------

NUM_DRAWS = 20_000


def _mtl_rlw_draws(key, k, n):
    """``n`` successive weight vectors of ``mtl_optax.rlw``: its updates on J = I_K."""
    tx = mtl_optax.rlw(key=key, num_tasks=k)
    eye = {"w": jnp.eye(k)}

    @jax.jit
    def draw(state):
        def step(state, _):
            update, state = tx.update(eye, state)
            return state, update["w"]

        return jax.lax.scan(step, state, None, length=n)[1]

    return np.asarray(draw(tx.init(None)))


def _torchjd_rlw_draws(seed, k, n):
    """``n`` weight vectors of TorchJD's ``Random``: its aggregation of I_K."""
    agg, eye = aggregation.Random(), torch.eye(k, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return np.stack([to_numpy(agg(eye)) for _ in range(n)])


def _libmtl_rlw_draws(seed, k, n):
    """``n`` weight vectors of LibMTL's ``RLW(dist='Normal')`` (float32 draws)."""
    RLW = import_libmtl().weighting.RLW

    rlw = RLW()
    rlw.task_num, rlw.device = k, "cpu"
    losses = torch.zeros(k, requires_grad=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return np.stack([rlw.backward(losses, dist="Normal") for _ in range(n)]).astype(np.float64)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _assert_same_law(ours, theirs, k, stats):
    """Two samples of RLW weights agree in law (see the test docstrings)."""
    n_ours, n_theirs = len(ours), len(theirs)
    for sample in (ours, theirs):
        assert sample.shape[1] == k
        assert np.all(sample > 0)
        np.testing.assert_allclose(sample.sum(axis=1), 1.0, rtol=0, atol=1e-6)
        # Exchangeable coordinates: every E[w_k] is 1/K.
        se = sample.std(axis=0, ddof=1) / np.sqrt(len(sample))
        assert np.all(np.abs(sample.mean(axis=0) - 1.0 / k) < 5 * se), sample.mean(axis=0)
    # Per-coordinate first and second moments: two-sample z-tests at 5 sigma.
    for name, a, b in (("mean", ours, theirs), ("second moment", ours**2, theirs**2)):
        se = np.sqrt(a.var(axis=0, ddof=1) / n_ours + b.var(axis=0, ddof=1) / n_theirs)
        z = np.abs(a.mean(axis=0) - b.mean(axis=0)) / se
        assert np.all(z < 5), (name, a.mean(axis=0), b.mean(axis=0), z)
    pvalue = stats.ks_2samp(ours[:, 0], theirs[:, 0]).pvalue
    assert pvalue > 1e-3, pvalue
    return pvalue


@pytest.mark.parametrize("k", [2, 3, 10])
def test_rlw_distribution_matches_torchjd(x64, k):
    """mtl_optax.rlw draws its weights from the same law as TorchJD's Random.

    Property: w = softmax(z), z ~ N(0, I_K), on both sides. With N = 20000 draws
    each (fixed seeds, so the test is deterministic): both samples lie on the
    simplex, every coordinate mean is 1/K within 5 standard errors, the
    per-coordinate means and second moments agree by a two-sample z-test at 5
    sigma, and a two-sample Kolmogorov-Smirnov test on w_0 gives p > 1e-3.
    As a check of the test's power, the same KS test rejects (p < 1e-3) the law
    softmax(1.1 z), a 10% change of the Gaussian's scale.
    """
    stats = require_reference("scipy.stats")
    ours = _mtl_rlw_draws(1000 + k, k, NUM_DRAWS)
    theirs = _torchjd_rlw_draws(2000 + k, k, NUM_DRAWS)
    _assert_same_law(ours, theirs, k, stats)
    tempered = _softmax(1.1 * np.random.default_rng(3000 + k).standard_normal((NUM_DRAWS, k)))
    assert stats.ks_2samp(tempered[:, 0], theirs[:, 0]).pvalue < 1e-3


def test_rlw_distribution_matches_libmtl(x64):
    """mtl_optax.rlw and LibMTL's RLW(dist='Normal') draw weights from the same law.

    Same property and checks as the TorchJD test, for K = 3 and N = 20000
    (LibMTL draws in float32).
    """
    stats = require_reference("scipy.stats")
    k = 3
    ours = _mtl_rlw_draws(4000, k, NUM_DRAWS)
    theirs = _libmtl_rlw_draws(5000, k, NUM_DRAWS)
    _assert_same_law(ours, theirs, k, stats)


def test_rlw_key_determines_the_sequence(x64):
    """Same key -> same sequence (int seed or PRNG key); different key -> different."""
    k, n = 4, 16
    first = _mtl_rlw_draws(5, k, n)
    np.testing.assert_array_equal(first, _mtl_rlw_draws(5, k, n))
    np.testing.assert_array_equal(first, _mtl_rlw_draws(jax.random.key(5), k, n))
    other = _mtl_rlw_draws(6, k, n)
    assert not np.any(np.all(first == other, axis=1))
    # A fresh draw at every step.
    assert len({tuple(row) for row in first}) == n
    # Stepping eagerly from the state continues the same sequence as the jitted
    # scan (up to the last bit: XLA fuses the jitted softmax differently).
    tx = mtl_optax.rlw(key=5, num_tasks=k)
    state = tx.init(None)
    for i in range(4):
        update, state = tx.update({"w": jnp.eye(k)}, state)
        np.testing.assert_allclose(np.asarray(update["w"]), first[i], rtol=1e-14, atol=0)


def test_torchjd_reference_draws_are_seeded():
    """The torch side is deterministic under a fixed seed (so the law test is too)."""
    a = _torchjd_rlw_draws(1, 3, 5)
    np.testing.assert_array_equal(a, _torchjd_rlw_draws(1, 3, 5))
    assert not np.array_equal(a, _torchjd_rlw_draws(2, 3, 5))
