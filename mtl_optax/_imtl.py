"""Impartial multi-task learning, gradient part: ``imtl_g``.

IMTL-G combines the task gradients so that the update has the same projection
onto every task's unit gradient. Every inner product it needs is an entry of
the Gramian :math:`G = J J^\\top`, so it is written as a
:class:`~mtl_optax.base.Weighting`: the weights are solved for in the
``K x K`` world and the update is one weighted combination of the task
gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtl_optax import engine
from mtl_optax.base import WeightedTransformation, Weighting, from_weighting, initial_weights
from mtl_optax.registry import register

__all__ = ["IMTLGState", "imtl_g", "imtl_g_weights"]

_NAME = "imtl_g"


def _safe_reciprocal(x: jax.Array) -> jax.Array:
    """``1 / x`` where ``x > 0``, else 0 (double ``where``: finite gradients too)."""
    positive = x > 0
    return jnp.where(positive, 1 / jnp.where(positive, x, 1), 0)


def _inverse_norms(gramian: jax.Array) -> jax.Array:
    """``1 / ||g_k||`` from the Gramian's diagonal, 0 for a zero gradient."""
    squared = jnp.maximum(jnp.diagonal(gramian), 0)
    positive = squared > 0
    norms = jnp.sqrt(jnp.where(positive, squared, 1))
    return jnp.where(positive, 1 / norms, 0)


@jax.custom_jvp
def _pinv(matrix: jax.Array, cutoff: jax.Array) -> jax.Array:
    """Pseudo-inverse keeping the singular values ``> cutoff``.

    Differentiated with the fixed-rank derivative of the pseudo-inverse
    (Golub & Pereyra 1973), which is finite even where singular values repeat
    or vanish, unlike the derivative of the SVD; ``cutoff`` is not
    differentiated.
    """
    w, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    keep = s > cutoff
    s_inv = jnp.where(keep, 1 / jnp.where(keep, s, 1), 0)
    return (vt.T * s_inv) @ w.T


@_pinv.defjvp
def _pinv_jvp(primals, tangents):
    (a, cutoff), (da, _) = primals, tangents
    p = _pinv(a, cutoff)
    eye_rows, eye_cols = jnp.eye(a.shape[0], dtype=a.dtype), jnp.eye(a.shape[1], dtype=a.dtype)
    # a @ p and p @ a are the projectors onto the kept singular subspaces.
    dp = -p @ da @ p + p @ p.T @ da.T @ (eye_rows - a @ p) + (eye_cols - p @ a) @ da.T @ p.T @ p
    return p, dp


@engine.full_precision
def imtl_g_weights(gramian: jax.Array, *, rcond: float | None = None) -> jax.Array:
    r"""The IMTL-G weights :math:`\alpha` from the Gramian (see :func:`imtl_g`).

    Args:
      gramian: the ``[K, K]`` Gramian :math:`G_{kl} = \langle g_k, g_l \rangle`.
      rcond: see :func:`imtl_g`.

    Returns:
      The ``[K]`` weights, summing to 1, in the Gramian's dtype.
    """
    gramian = jnp.asarray(gramian)
    k = gramian.shape[0]
    dtype = gramian.dtype
    if k == 1:
        return jnp.ones((1,), dtype)
    if rcond is None:
        rcond = float(np.sqrt(np.finfo(dtype).eps))
    inv_norm = _inverse_norms(gramian)
    squared = jnp.maximum(jnp.diagonal(gramian), 0)
    norms = jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1)), 0)
    # C[i, j] = <g_i, u_j>: every inner product of D = g_1 - g_i and U = u_1 - u_j.
    c = gramian * inv_norm[None, :]
    b = c[0, 0] - c[0, 1:]  # b_j = <g_1, U_j>
    m = c[0, 0] - c[0, None, 1:] - c[1:, 0, None] + c[1:, 1:]  # (D U^T)_{ij}
    # Row i of D U^T is computed with an absolute error proportional to
    # ||g_1|| + ||g_i||: scaling the rows by it makes the rank decision
    # independent of the tasks' magnitudes (and zero for a zero row).
    inv_scale = _safe_reciprocal(norms[0] + norms[1:])
    scaled = m * inv_scale[:, None]
    cutoff = jnp.asarray(rcond, dtype)
    sv = jnp.linalg.svd(lax.stop_gradient(scaled), compute_uv=False)
    kept = sv > cutoff

    def full_rank():
        # The pseudo-inverse is the inverse: one LU solve (a quarter of the
        # time of the SVD with singular vectors at K = 40). Under vmap both
        # branches run: a singular matrix is swapped for the identity so that
        # the branch not taken stays finite, its gradient too.
        matrix = jnp.where(jnp.all(kept), scaled, jnp.eye(k - 1, dtype=dtype))
        return jnp.linalg.solve(matrix.T, b) * inv_scale

    def min_norm():
        # On a rank-deficient system, take the minimum-norm solution in the
        # original coordinates (as a plain pseudo-inverse of D U^T would):
        # remove from a0 its component along the left null space of the
        # truncated D U^T, spanned by the columns of diag(inv_scale) (I - scaled @ pinv).
        pinv = _pinv(scaled, cutoff)
        a0 = (b @ pinv) * inv_scale
        free = inv_scale[:, None] * (jnp.eye(k - 1, dtype=dtype) - scaled @ pinv)
        # The kept directions leave rounding noise of relative size about
        # eps * cond(truncated D U^T) in the projector; cut below 10 K times that.
        smallest = jnp.min(jnp.where(kept, sv, jnp.inf))
        cond = jnp.where(jnp.any(kept), sv[0] / smallest, 1)
        free_max = jnp.linalg.svd(lax.stop_gradient(free), compute_uv=False)[0]
        noise = free_max * 10 * k * float(np.finfo(dtype).eps) * cond
        return a0 - a0 @ (free @ _pinv(free, lax.stop_gradient(noise)))

    a = lax.cond(jnp.all(kept), full_rank, min_norm)
    return jnp.concatenate([(1 - jnp.sum(a))[None], a])


class IMTLGState(NamedTuple):
    """State of :func:`imtl_g`."""

    weights: jax.Array  # [K] weights alpha of the last step, for logging.


@register("imtl_g")
def imtl_g(num_tasks: int | None = None, *, rcond: float | None = None) -> WeightedTransformation:
    r"""IMTL-G: the combination with equal projections onto every unit task gradient.

    With :math:`u_k = g_k / \|g_k\|`, :math:`D_i = g_1 - g_i` and
    :math:`U_i = u_1 - u_i` (:math:`i = 2, \dots, K`):

    .. math::
      \alpha_{2:K} = g_1 U^\top \big(D U^\top\big)^{+}, \qquad
      \alpha_1 = 1 - \sum_{i=2}^K \alpha_i, \qquad
      u = \sum_{k=1}^K \alpha_k\, g_k

    so that :math:`\langle u, u_k \rangle` is the same for every task and
    :math:`\sum_k \alpha_k = 1`. Every inner product is read from the Gramian
    (:math:`\langle g_i, u_j \rangle = G_{ij} / \sqrt{G_{jj}}`).

    When :math:`D U^\top` is singular (identical or positively collinear
    gradients, :math:`K - 1` larger than the number of parameters, ...) the
    pseudo-inverse :math:`(\cdot)^+` gives the minimum-norm least-squares
    :math:`\alpha_{2:K}`, always finite. Its rank is decided on
    :math:`D U^\top` with row :math:`i` divided by
    :math:`\|g_1\| + \|g_i\|` (a bound of the row's rounding error), keeping
    the singular values above ``rcond``: the decision does not depend on the
    tasks' scales and ignores the rounding noise of exactly degenerate inputs.
    Resulting conventions:

    * identical or positively collinear gradients: :math:`\alpha = (1, 0,
      \dots, 0)` and :math:`u = g_1` (every combination has equal
      projections there; the references agree in exact arithmetic);
    * a zero task gradient has :math:`u_k = 0`, so the equal projections are
      all 0 and the update is 0 (up to rounding);
    * ``K = 1``: :math:`\alpha = (1)`, :math:`u = g_1`.

    The common projection is :math:`1 / (\mathbf{1}^\top G^{-1} \|g\|)`
    when :math:`G` is invertible: positive for well-spread gradients, but not
    guaranteed to be (nearly dependent gradients can make it negative, an
    ascent direction for every task; the normalization :math:`\sum_k \alpha_k
    = 1` of the paper fixes the scale, not the sign, in every reference).
    The weights are differentiable: the pseudo-inverse is differentiated at
    fixed rank, finite on degenerate inputs too.

    Args:
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on; without it the
        state's ``weights`` change shape at the first update.
      rcond: singular values of the row-scaled :math:`D U^\top` (entries of
        magnitude at most 2) at or below ``rcond`` are treated as zero.
        Default ``sqrt(eps)`` of the computation dtype (1.5e-8 in float64,
        3.5e-4 in float32): two tasks whose unit gradients differ by less
        than about ``sqrt(rcond)`` then count as collinear.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`, with ``.weighting`` and
      ``.per_task``, whose per-task output is :math:`\alpha_k g_k`).

    Raises:
      ValueError: ``rcond`` is negative or not finite; at update time,
        malformed task gradients or ``K`` other than ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("imtl_g")
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}  # orthogonal, norms 1 and 3
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # projections <u, e_1> = <u, e_2> = 0.75
      Array([0.75, 0.75], dtype=float32)
      >>> state.weights
      Array([0.75, 0.25], dtype=float32)

    References:
      Liu et al., `Towards Impartial Multi-task Learning
      <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021 (IMTL-G,
      Algorithm 1 and Eq. 9). ConFIG's ``conflictfree.grad_operator.IMTLGOperator``;
      LibMTL ``IMTL`` (gradient part); TorchJD ``IMTLG`` (which generalizes it as
      :math:`\alpha \propto G^+ (\|g_k\|)_k`); vambn / impartial-vaes ``IMTLG``.

    Differences from the references:
      * LibMTL inverts :math:`D U^\top` with ``torch.inverse`` (an error or
        non-finite weights on singular systems) and divides by zero norms
        (NaN). ConFIG and vambn use a pseudo-inverse whose cutoff is relative
        to the largest singular value (``eps * (K - 1)`` and ``1e-15``): on
        exactly collinear gradients the matrix is rounding noise, nothing is
        cut and the weights are arbitrary (vambn flags those cases unstable).
        The row-scaled cutoff above removes that noise.
      * TorchJD's generalization solves :math:`G \alpha \propto (\|g_k\|)_k`
        with :math:`G^+`: the same update when :math:`G` is invertible, but
        it ignores a zero task (we return 0, as ConFIG and vambn) and, on
        collinear gradients :math:`c_k g`, weights :math:`\alpha \propto c`
        (we return :math:`g_1`).
      * LibMTL's ``IMTL`` also learns loss scales (IMTL-L); this is the
        gradient part only (at LibMTL's initial scales, 1, they coincide).
    """

    if rcond is not None and not (np.isfinite(rcond) and rcond >= 0):
        raise ValueError(f"{_NAME}: rcond must be a finite number >= 0; found {rcond!r}.")

    def weights(gramian, state, value, *, num_tasks, dtype):
        del state, value, num_tasks
        alpha = imtl_g_weights(gramian.astype(dtype), rcond=rcond)
        return alpha, IMTLGState(weights=alpha.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name=_NAME,
            init=lambda: IMTLGState(weights=initial_weights(num_tasks)),
            weights=weights,
            num_tasks=num_tasks,
        )
    )
