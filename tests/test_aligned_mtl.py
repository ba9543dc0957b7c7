"""``aligned_mtl``: the aligned task gradients and the method's properties.

With ``B`` read column by column from the weights of the preferences ``e_i``
(``w = B p`` is linear in ``p``), the aligned task gradients ``B J`` are checked
against the paper's definition directly: orthogonal, each of norm
``sqrt(lambda_s)`` (float64, 1e-10 relative). Live parity with TorchJD is in
``tests/parity/test_aligned_mtl_parity.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax._aligned_mtl import aligned_mtl_weights


def _balance(gram, scale_mode="min"):
    """``B``, column ``i`` being the weights for the preference ``e_i``."""
    k = gram.shape[0]
    return np.stack(
        [
            np.asarray(aligned_mtl_weights(jnp.asarray(gram), pref_vector=e, scale_mode=scale_mode))
            for e in np.eye(k)
        ],
        axis=1,
    )


@pytest.mark.parametrize(("k", "p"), [(2, 20), (5, 50), (12, 300)])
def test_aligned_gradients_are_orthogonal_with_the_chosen_norm(x64, k, p):
    rng = np.random.default_rng(k)
    jac = rng.standard_normal((k, p)) * 10.0 ** rng.uniform(-1, 1, size=(k, 1))
    eig = np.linalg.eigvalsh(jac @ jac.T)
    for mode, lam in (("min", eig[0]), ("median", eig[(k - 1) // 2]), ("rmse", eig.mean())):
        aligned = _balance(jac @ jac.T, mode) @ jac
        np.testing.assert_allclose(aligned @ aligned.T, lam * np.eye(k), rtol=0, atol=1e-10 * lam)


def test_rank_deficient_jacobian_aligns_the_kept_directions(x64):
    """K = 6 tasks in P = 3 dimensions: B J has rank 3, its nonzero singular values all sqrt(lambda_min)."""
    jac = np.random.default_rng(3).standard_normal((6, 3))
    eig = np.linalg.eigvalsh(jac @ jac.T)[-3:]
    aligned = _balance(jac @ jac.T) @ jac
    sv = np.linalg.svd(aligned, compute_uv=False)
    np.testing.assert_allclose(sv, np.full(3, np.sqrt(eig[0])), rtol=1e-10)


def test_update_is_the_mean_of_the_aligned_gradients_and_scale_invariant(x64):
    jac = np.random.default_rng(4).standard_normal((4, 30))
    tx = mtl_optax.aligned_mtl(num_tasks=4)
    step = jax.jit(lambda g: tx.update({"x": g}, tx.init(None))[0]["x"])
    aligned = _balance(jac @ jac.T) @ jac
    np.testing.assert_allclose(step(jnp.asarray(jac)), aligned.mean(0), rtol=1e-10)
    for t in (1e-150, 1e-3, 1e3, 1e150):
        np.testing.assert_allclose(step(jnp.asarray(t * jac)), t * aligned.mean(0), rtol=1e-10)


def test_degenerate_inputs_give_documented_results():
    """Zero Gramian: B = I (the mean, 0); K = 1: the gradient; NaN in, NaN out."""
    np.testing.assert_array_equal(
        aligned_mtl_weights(jnp.zeros((3, 3))), np.full(3, 1 / 3, np.float32)
    )
    np.testing.assert_allclose(aligned_mtl_weights(jnp.array([[4.0]])), [1.0])
    assert not np.any(np.isfinite(aligned_mtl_weights(jnp.full((2, 2), jnp.nan))))


def test_bad_hyperparameters_raise_clear_errors():
    with pytest.raises(ValueError, match=r"scale_mode must be one of \('min', 'median', 'rmse'\)"):
        mtl_optax.aligned_mtl(scale_mode="max")
    with pytest.raises(ValueError, match="pref_vector has 3 entries but num_tasks=2"):
        mtl_optax.aligned_mtl(num_tasks=2, pref_vector=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        mtl_optax.aligned_mtl(num_tasks=-1)
    with pytest.raises(ValueError, match=r"pref_vector must have shape \(2,\)"):
        aligned_mtl_weights(jnp.eye(2), pref_vector=jnp.ones(3))
