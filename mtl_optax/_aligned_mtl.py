r"""Aligned-MTL: the task gradients aligned to one condition number, ``aligned_mtl``.

Aligned-MTL replaces the task gradients :math:`J = U \Sigma W^\top` (rows
:math:`g_k`) by :math:`\hat J = \sigma\, U W^\top`, whose singular values are
all :math:`\sigma`: orthogonal task gradients of equal norm, a condition number
of 1. Every quantity comes from the eigendecomposition of the Gramian
:math:`G = J J^\top = U \Sigma^2 U^\top`, since :math:`\hat J = B J` with
:math:`B = \sigma\, U \Sigma^{-1} U^\top`; the update :math:`\hat J^\top p =
J^\top (B p)` is one weighted combination of the task gradients, so it is a
:class:`~mtl_optax.base.Weighting` rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtl_optax import engine
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    check_pref_vector,
    from_weighting,
    initial_weights,
)
from mtl_optax.registry import register

__all__ = ["AlignedMTLState", "aligned_mtl", "aligned_mtl_weights"]

_NAME = "aligned_mtl"
_SCALE_MODES = ("min", "median", "rmse")


def _check_scale_mode(scale_mode: str) -> None:
    if scale_mode not in _SCALE_MODES:
        raise ValueError(
            f"{_NAME}: scale_mode must be one of {_SCALE_MODES}; found {scale_mode!r}."
        )


@engine.full_precision
def aligned_mtl_weights(
    gramian: jax.typing.ArrayLike,
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    scale_mode: str = "min",
) -> jax.Array:
    r"""The Aligned-MTL weights :math:`B p` from the Gramian (see :func:`aligned_mtl`).

    Args:
      gramian: the ``[K, K]`` Gramian.
      pref_vector: the ``[K]`` preference :math:`p` (default :math:`1/K`).
      scale_mode: ``"min"``, ``"median"`` or ``"rmse"`` (see :func:`aligned_mtl`).

    Returns:
      The ``[K]`` weights, in the Gramian's dtype (float32 at least).
    """
    _check_scale_mode(scale_mode)
    gramian = jnp.asarray(gramian)
    gramian = lax.stop_gradient(gramian.astype(jnp.promote_types(gramian.dtype, jnp.float32)))
    k = gramian.shape[0]
    dtype = gramian.dtype
    if pref_vector is None:
        pref = jnp.full((k,), 1.0 / k, dtype)
    else:
        pref = jnp.asarray(pref_vector, dtype)
        if pref.shape != (k,):
            raise ValueError(f"{_NAME}: pref_vector must have shape ({k},); found {pref.shape}.")
    # B does not depend on the Gramian's scale: the eigendecomposition runs on
    # G / max_k G_kk (no overflow for gradients of norm up to 1.8e19).
    g, _ = engine.scale_by_largest_diagonal(gramian)
    eigenvalues, vectors = jnp.linalg.eigh((g + g.T) / 2)  # ascending
    # TorchJD's rank decision: eigenvalues above max(lambda) K eps are kept.
    tol = jnp.max(eigenvalues) * k * jnp.finfo(dtype).eps
    kept = eigenvalues > tol
    rank = jnp.sum(kept)
    safe = jnp.where(kept, eigenvalues, 1)
    inv_sqrt = jnp.where(kept, lax.rsqrt(safe), 0)
    if scale_mode == "min":
        chosen = jnp.min(jnp.where(kept, eigenvalues, jnp.inf))
    elif scale_mode == "median":
        # torch.median: the lower of the two middle values for an even count.
        # The kept eigenvalues are the last `rank` of the ascending ones.
        chosen = eigenvalues[jnp.clip(k - rank + (rank - 1) // 2, 0, k - 1)]
    else:
        chosen = jnp.sum(jnp.where(kept, eigenvalues, 0)) / jnp.maximum(rank, 1)
    balance = jnp.sqrt(jnp.where(rank > 0, chosen, 1)) * (vectors * inv_sqrt) @ vectors.T
    balance = jnp.where(rank > 0, balance, jnp.eye(k, dtype=dtype))
    # A non-finite Gramian gives non-finite weights (eigh itself would not say).
    balance = jnp.where(jnp.all(jnp.isfinite(gramian)), balance, jnp.nan)
    return balance @ pref


class AlignedMTLState(NamedTuple):
    """State of :func:`aligned_mtl`."""

    weights: jax.Array  # [K] weights of the last step, for logging.


@register(_NAME)
def aligned_mtl(
    num_tasks: int | None = None,
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    scale_mode: str = "min",
) -> WeightedTransformation:
    r"""Aligned-MTL: the update of the task gradients aligned to condition number 1.

    With the eigendecomposition :math:`G = U \Lambda U^\top` of the Gramian,
    restricted to its rank :math:`r` (the eigenvalues above :math:`K \epsilon
    \max \Lambda`), :math:`\Lambda = \Sigma^2` the squared singular values of
    :math:`J` and the preference :math:`p` (default :math:`1/K`):

    .. math::
      B = \sqrt{\lambda_s}\; U \Lambda^{-1/2} U^\top, \qquad
      w = B\, p, \qquad
      u = \sum_{k=1}^K w_k\, g_k = (B J)^\top p

    where the rows of :math:`B J = \sqrt{\lambda_s}\, U W^\top` (for :math:`J =
    U \Sigma W^\top`) are the aligned task gradients: orthogonal, all of norm
    :math:`\sqrt{\lambda_s}`, i.e. the Jacobian with its condition number set
    to 1 (Senushkin et al. 2023, Algorithm 1). :math:`\lambda_s` is the
    smallest kept eigenvalue (``"min"``, the paper's :math:`\sigma_{\min}^2`),
    their lower median (``"median"``) or their mean (``"rmse"``).

    Degenerate cases: with rank :math:`r < K` (identical, collinear or zero
    tasks, more tasks than parameters) only the kept directions are aligned
    (:math:`B` has rank :math:`r`); a zero Gramian gives :math:`B = I` and
    :math:`u = \sum_k p_k g_k` (0); ``K = 1`` gives :math:`u = p_1 g_1`. The
    rank decision and :math:`B` do not depend on the scale of the gradients
    (the eigendecomposition runs on :math:`G / \max_k G_{kk}`). The weights are
    constants under differentiation (the derivative of an eigendecomposition
    is infinite where eigenvalues repeat).

    Args:
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on.
      pref_vector: ``[K]`` preference :math:`p`; default :math:`1/K`
        (TorchJD's default, the mean of the aligned gradients).
      scale_mode: ``"min"`` (the paper's and TorchJD's default), ``"median"``
        or ``"rmse"`` (the mean eigenvalue, "as in the original
        implementation" according to TorchJD).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`).

    Raises:
      ValueError: an unknown ``scale_mode``, a malformed ``pref_vector`` or
        ``num_tasks``; at update time, malformed task gradients or ``K``
        other than ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.aligned_mtl(num_tasks=2)
      >>> g = {"w": jnp.array([[4.0, 0.0], [0.0, 1.0]])}  # orthogonal, norms 4 and 1
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # aligned to the smaller norm: (1, 0) and (0, 1), averaged
      Array([0.5, 0.5], dtype=float32)
      >>> state.weights
      Array([0.125, 0.5  ], dtype=float32)

    References:
      Senushkin, Patakin, Kuznetsov and Konushin, `Independent Component
      Alignment for Multi-Task Learning
      <https://arxiv.org/abs/2305.19000>`_, CVPR 2023 (Algorithm 1). Reference
      implementation: TorchJD ``AlignedMTL`` / ``AlignedMTLWeighting`` (adapted
      from the authors' SamsungLabs/MTL code).

    Differences from the references:
      * TorchJD decomposes :math:`G` itself; here :math:`G / \max_k G_{kk}`, the
        same :math:`B` (it is scale invariant) without overflow for the
        largest gradients. Live parity in float64 is tested.
    """
    _check_scale_mode(scale_mode)
    pref, k = check_pref_vector(_NAME, pref_vector, check_num_tasks(_NAME, num_tasks))

    def weights(gramian: Any, state: Any, value: Any, *, num_tasks: int, dtype: Any):
        del state, value, num_tasks
        w = aligned_mtl_weights(gramian.astype(dtype), pref_vector=pref, scale_mode=scale_mode)
        return w, AlignedMTLState(weights=w.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name=_NAME,
            init=lambda: AlignedMTLState(weights=initial_weights(k)),
            weights=weights,
            num_tasks=k,
        )
    )
