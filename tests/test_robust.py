"""Krum and the trimmed mean: definitions, the sorting network, errors.

Parity with TorchJD is in ``tests/parity/test_robust_parity.py``; here the
methods are checked against their definitions computed independently with
NumPy, and the sorting network by the 0-1 principle (a comparator network
sorts every input iff it sorts every sequence of 0s and 1s).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax._robust import krum_weights, sorting_network


@pytest.mark.parametrize("n", range(1, 17))
def test_sorting_network_sorts_every_0_1_sequence(n):
    seqs = np.array(list(itertools.product((0, 1), repeat=n)), np.int8).T  # (n, 2^n)
    rows = list(seqs)
    for i, j in sorting_network(n):
        assert 0 <= i < j < n
        rows[i], rows[j] = np.minimum(rows[i], rows[j]), np.maximum(rows[i], rows[j])
    np.testing.assert_array_equal(np.stack(rows), np.sort(seqs, axis=0))


def test_sorting_network_sizes_are_batchers():
    # Batcher's odd-even merge sort: (p^2 - p + 4) 2^(p-2) - 1 comparators for 2^p wires.
    for p in range(1, 7):
        assert len(sorting_network(2**p)) == (p * p - p + 4) * 2 ** (p - 2) - 1


def _trimmed_numpy(jac, t):
    return np.sort(jac, axis=0)[t : jac.shape[0] - t].mean(axis=0)


# K up to 64 takes the sorting network, 65 XLA's sort.
@pytest.mark.parametrize(
    ("k", "t"), [(1, 0), (2, 0), (3, 1), (4, 1), (6, 2), (7, 3), (17, 5), (64, 20), (65, 7)]
)
def test_trimmed_mean_is_the_coordinatewise_trimmed_mean(k, t):
    rng = np.random.default_rng(k)
    jac = rng.standard_normal((k, 60)).astype(np.float32)
    jac[:, :20] = np.round(jac[:, :20])  # ties within a coordinate
    jac[:, 20] = 0.0
    tx = mtl_optax.trimmed_mean(trim_number=t, num_tasks=k)
    tree = {"a": jnp.asarray(jac[:, :24].reshape(k, 4, 6)), "b": jnp.asarray(jac[:, 24:])}
    update, state = jax.jit(tx.update)(tree, tx.init(None))
    assert state == mtl_optax.TrimmedMeanState()
    got = np.concatenate([np.asarray(update["a"]).ravel(), np.asarray(update["b"])])
    np.testing.assert_allclose(got, _trimmed_numpy(jac.astype(np.float64), t), rtol=1e-6, atol=1e-6)


def test_trimmed_mean_median_ignores_a_huge_outlier_and_keeps_dtypes():
    g = jnp.array([[1.0, -4.0], [2.0, 0.0], [1e30, 1.0]], jnp.bfloat16)
    tx = mtl_optax.trimmed_mean(trim_number=1)
    update, _ = tx.update({"w": g}, tx.init(None))
    assert update["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(update["w"], np.float32), [2.0, 0.0])


@pytest.mark.parametrize("k", [5, 70])
def test_trimmed_mean_non_finite_coordinates_are_nan(k):
    jac = np.random.default_rng(0).standard_normal((k, 5)).astype(np.float32)
    jac[1, 0], jac[2, 1], jac[3, 2] = np.nan, np.inf, -np.inf
    tx = mtl_optax.trimmed_mean(trim_number=1)
    update = np.asarray(jax.jit(tx.update)({"w": jnp.asarray(jac)}, tx.init(None))[0]["w"])
    assert np.all(np.isnan(update[:3]))
    np.testing.assert_allclose(update[3:], _trimmed_numpy(jac[:, 3:], 1), rtol=1e-6)


def test_trimmed_mean_errors():
    with pytest.raises(ValueError, match="trim_number must be a non-negative int; found -1"):
        mtl_optax.trimmed_mean(trim_number=-1)
    with pytest.raises(ValueError, match=r"trim_number must be a non-negative int; found 1\.5"):
        mtl_optax.trimmed_mean(trim_number=1.5)
    with pytest.raises(ValueError, match=r"at least 2 \* trim_number \+ 1 = 5 tasks; found K=4"):
        mtl_optax.trimmed_mean(trim_number=2, num_tasks=4)
    tx = mtl_optax.trimmed_mean(trim_number=2)
    with pytest.raises(ValueError, match=r"at least 2 \* trim_number \+ 1 = 5 tasks; found K=3"):
        tx.update({"w": jnp.ones((3, 2))}, tx.init(None))


def _krum_numpy(jac, f, m):
    """Krum's selection from the pairwise distances of the rows, in float64."""
    d = np.linalg.norm(jac[:, None] - jac[None], axis=-1)
    scores = np.sort(d, axis=1)[:, 1 : jac.shape[0] - f - 1].sum(axis=1)
    return np.argsort(scores, kind="stable")[:m], scores


@pytest.mark.parametrize(
    ("k", "f", "m"), [(3, 0, 1), (5, 1, 2), (9, 3, 1), (12, 2, 6), (40, 18, 10)]
)
def test_krum_selects_the_tasks_of_smallest_score(k, f, m):
    rng = np.random.default_rng(k)
    for _ in range(5):
        jac = rng.standard_normal((k, 30)) * rng.uniform(0.5, 2.0, (k, 1))
        selected, _ = _krum_numpy(jac, f, m)
        gram = jnp.asarray(jac @ jac.T, jnp.float32)
        w = np.asarray(krum_weights(gram, n_byzantine=f, n_selected=m))
        np.testing.assert_array_equal(np.flatnonzero(w), np.sort(selected))
        np.testing.assert_array_equal(w[selected], np.float32(1.0 / m))
        tx = mtl_optax.krum(n_byzantine=f, n_selected=m, num_tasks=k)
        update, state = jax.jit(tx.update)({"w": jnp.asarray(jac, jnp.float32)}, tx.init(None))
        np.testing.assert_allclose(update["w"], jac[selected].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(state.weights, w)


def test_krum_excludes_byzantine_rows_at_any_scale():
    rng = np.random.default_rng(3)
    center = rng.standard_normal(50)
    honest = center + 0.05 * rng.standard_normal((6, 50))
    byzantine = -10 * center[None] + rng.standard_normal((2, 50))
    jac = np.concatenate([byzantine[:1], honest, byzantine[1:]])
    for scale in (1e-15, 1.0, 1e15):
        gram = jnp.asarray((jac * scale) @ (jac * scale).T, jnp.float32)
        w = np.asarray(krum_weights(gram, n_byzantine=2, n_selected=3))
        assert w[0] == w[-1] == 0 and np.isclose(w.sum(), 1), (scale, w)


def test_krum_ties_select_the_lowest_indices_and_a_nan_gramian_gives_nan():
    gram = jnp.ones((4, 4))  # identical tasks: every score 0
    np.testing.assert_array_equal(krum_weights(gram, n_byzantine=1, n_selected=2), [0.5, 0.5, 0, 0])
    bad = jnp.eye(3).at[0, 1].set(jnp.nan)
    assert np.all(np.isnan(krum_weights(bad, n_byzantine=0)))


def test_krum_errors():
    with pytest.raises(ValueError, match="n_byzantine must be a non-negative int; found -1"):
        mtl_optax.krum(n_byzantine=-1)
    with pytest.raises(ValueError, match="n_selected must be a positive int; found 0"):
        mtl_optax.krum(n_byzantine=0, n_selected=0)
    with pytest.raises(ValueError, match=r"at least n_byzantine \+ 3 = 5 tasks .*found K=4"):
        mtl_optax.krum(n_byzantine=2, num_tasks=4)
    with pytest.raises(ValueError, match="n_selected=5 is more than the K=4 tasks"):
        mtl_optax.krum(n_byzantine=0, n_selected=5, num_tasks=4)
    tx = mtl_optax.krum(n_byzantine=1)
    with pytest.raises(ValueError, match=r"at least n_byzantine \+ 3 = 4 tasks .*found K=3"):
        tx.update({"w": jnp.ones((3, 2))}, tx.init(None))


def test_registered():
    assert {"krum", "trimmed_mean"} <= set(mtl_optax.available())
