r"""MoDo: multi-objective gradient descent with a projected-gradient step on the weights.

Chen, Fu, Xu and Lyu's MoDo (JMLR 2024) keeps simplex weights :math:`\lambda`
and moves them by one projected gradient step on :math:`\tfrac12 \lambda^\top A
\lambda` per training step, with :math:`A = J_1 J_2^\top` the cross matrix of
the task gradients of two independent mini-batches (:func:`cross_gramian`), so
that :math:`A \lambda` is an unbiased estimate of :math:`J J^\top \lambda`.
The rule lives in the ``K x K`` world; the matrix arrives as the extra argument
``cross_gramian`` of ``update``, as for :func:`sdmgrad`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax import engine, solvers
from mtl_optax._sdmgrad import matrix_transformation
from mtl_optax.base import (
    WeightedTransformation,
    check_num_tasks,
    initial_weights,
    is_traced,
)
from mtl_optax.registry import register

__all__ = ["MoDoState", "modo", "modo_weights"]


@engine.full_precision
def modo_weights(
    matrix: jax.Array, weights: jax.Array, *, gamma: float, rho: float = 0.0
) -> jax.Array:
    r"""One MoDo step on the simplex weights.

    .. math::
      \lambda^+ = \Pi_{\Delta_K}\big(\lambda - \gamma\, (A \lambda + \rho\, \lambda)\big)

    with :math:`\Pi_{\Delta_K}` the Euclidean projection onto the probability
    simplex. The projection is invariant to adding a constant to every entry,
    and an entry more than 1 below the largest cannot be in the support of the
    projection, so the argument is shifted to a largest entry of 0 and clipped
    at -2 before it is projected: the same result in exact arithmetic, and
    finite for steps up to the float range (``optax``'s sort-based projection
    gave ``inf`` for entries of -3e38, and 0 everywhere for 40 entries of
    -1e37).

    Args:
      matrix: the ``[K, K]`` matrix :math:`A` (a Gramian, or the cross matrix
        of two batches: not necessarily symmetric).
      weights: the current ``[K]`` weights :math:`\lambda` on the simplex.
      gamma: the step size :math:`\gamma > 0`.
      rho: the :math:`\ell_2` regularisation :math:`\rho \ge 0`.

    Returns:
      The new ``[K]`` weights, in the promotion of the dtypes of ``matrix``
      and ``weights``; NaN where ``matrix`` or ``weights`` is not finite.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtl_optax._modo import modo_weights
      >>> a = jnp.array([[1.0, 0.0], [0.0, 4.0]])
      >>> modo_weights(a, jnp.array([0.5, 0.5]), gamma=0.1)
      Array([0.575, 0.425], dtype=float32)
    """
    matrix = jnp.asarray(matrix)
    weights = jnp.asarray(weights)
    dtype = jnp.result_type(matrix.dtype, weights.dtype, jnp.float32)
    matrix, weights = matrix.astype(dtype), weights.astype(dtype)
    grad = matrix @ weights + rho * weights
    y = weights - gamma * grad
    y = jnp.maximum(y - jnp.max(y), -2.0)
    return solvers.projection_simplex(y)


class MoDoState(NamedTuple):
    """State of :func:`modo`."""

    weights: jax.Array  # [K] float32: the weights of the last step, for logging.
    lambda_: jax.Array  # [K] the simplex weights lambda, in the default float dtype.


@register("modo")
def modo(
    gamma: float = 0.1, rho: float = 0.1, num_tasks: int | None = None
) -> WeightedTransformation:
    r"""MoDo: a projected-gradient step on simplex weights per training step.

    .. math::
      \lambda_{t+1} = \Pi_{\Delta_K}\big(\lambda_t - \gamma\, (A_t \lambda_t +
      \rho\, \lambda_t)\big), \qquad u_t = \sum_{k=1}^K \lambda_{t+1,k}\, g_k,
      \qquad \lambda_0 = \tfrac1K \mathbf 1

    (:func:`modo_weights`). :math:`A_t` is the keyword argument
    ``cross_gramian`` of ``update``: in the paper's algorithm the cross matrix
    :math:`J_1 J_2^\top` of the task gradients of two independent
    mini-batches (:func:`cross_gramian`), an unbiased estimate of the
    Gramian's action on :math:`\lambda` (a single batch's Gramian
    :math:`J J^\top` is a biased one, which breaks the paper's convergence
    guarantee); ``update`` combines the task gradients it is given, those of
    a third batch or of one of the two. Without ``cross_gramian``,
    :math:`A_t` is the Gramian of the task gradients given to ``update`` (the
    deterministic algorithm).

    :math:`\gamma` multiplies :math:`A`, so the weights depend on the
    gradients' scale: the update is not positively homogeneous in the task
    gradients as the other weightings' are (scaling every gradient by
    :math:`c` acts as :math:`\gamma \to c^2 \gamma`). For large steps the
    weights move to the vertex of the task with the smallest
    :math:`(A\lambda)_k`; the projection stays finite for any finite
    :math:`A` (see :func:`modo_weights`).

    Args:
      gamma: the weights' step size :math:`\gamma > 0` (default 0.1, TorchJD's
        ``MoDoWeighting`` default).
      rho: the :math:`\ell_2` regularisation :math:`\rho \ge 0` of the weights
        (default 0.1, TorchJD's default).
      num_tasks: ``K``, required: the state holds the ``[K]`` weights from
        ``init`` on.

    Returns:
      A :class:`~mtl_optax.WeightedTransformation`. ``update(task_grads,
      state, params=None, *, value=None, cross_gramian=None, **extra)``: the
      optional ``cross_gramian`` is the ``[K, K]`` matrix :math:`A_t`. Its
      ``per_task`` form returns :math:`\lambda_{t+1,k}\, g_k` for every task,
      and its ``weighting`` is the rule with :math:`A_t = J J^\top`.

    Raises:
      ValueError: ``gamma`` or ``rho`` out of range or ``num_tasks`` missing;
        at update time, bad task gradients or a ``cross_gramian`` that is not
        a ``[K, K]`` floating point array.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.modo(gamma=0.1, rho=0.0, num_tasks=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # J J^T = diag(1, 4)
      >>> u, state = tx.update(g, tx.init(params), params)
      >>> state.lambda_  # the task with the larger gradient loses weight
      Array([0.575, 0.425], dtype=float32)
      >>> u["w"]
      Array([0.575, 0.85 ], dtype=float32)
      >>> # Stochastic form: A from two independent batches.
      >>> g2 = {"w": jnp.array([[1.0, 0.5], [0.5, 2.0]])}
      >>> a = mtl_optax.cross_gramian(g, g2)
      >>> u, state = tx.update(g, state, params, cross_gramian=a)

    References:
      Chen, Fu, Xu and Lyu, `Three-Way Trade-Off in Multi-Objective Learning:
      Optimization, Generalization and Conflict-Avoidance
      <https://www.jmlr.org/papers/volume25/23-1287/23-1287.pdf>`_, JMLR 25
      (2024) (Algorithm 1). Reference implementations: TorchJD
      ``MoDoWeighting`` (``torchjd/aggregation/_modo.py``) and the official
      code (`heshandevaka/Trade-Off-MOL
      <https://github.com/heshandevaka/Trade-Off-MOL>`_).

    Differences from the references:
      TorchJD returns only the weights and leaves the combination (with a
      third batch, or the mean of the two batches' losses) to the user; here
      they combine the task gradients given to ``update``. TorchJD projects
      with a sort-based loop in the matrix's dtype; the projection here is the
      same Euclidean projection (see :func:`modo_weights`), so the weights
      agree to rounding, and the weights are kept in the default float dtype
      (float64 when ``jax_enable_x64`` is on), as SDMGrad's are.
    """
    if not is_traced(gamma):
        gamma = float(gamma)
        if not gamma > 0.0 or not np.isfinite(gamma):
            raise ValueError(f"modo: gamma must be positive and finite; found gamma={gamma!r}.")
    if not is_traced(rho):
        rho = float(rho)
        if not rho >= 0.0 or not np.isfinite(rho):
            raise ValueError(f"modo: rho must be non-negative and finite; found rho={rho!r}.")
    k = check_num_tasks("modo", num_tasks)
    if k is None:
        raise ValueError("modo keeps its [K] weights in its state: pass num_tasks=K.")

    def init() -> MoDoState:
        return MoDoState(
            weights=initial_weights(k),
            lambda_=jnp.full((k,), 1.0 / k, jnp.result_type(float)),
        )

    def rule(matrix, state, value, *, num_tasks, dtype):
        del value, num_tasks
        lam = modo_weights(jnp.asarray(matrix).astype(dtype), state.lambda_, gamma=gamma, rho=rho)
        new_state = MoDoState(
            weights=lam.astype(jnp.float32), lambda_=lam.astype(state.lambda_.dtype)
        )
        return lam.astype(dtype), new_state

    return matrix_transformation("modo", init, rule, k)
