"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

SDMGrad (Xiao et al., NeurIPS 2023) looks for the weights :math:`w` on the
simplex that minimise :math:`\\tfrac12 \\lVert J^\\top w + \\lambda g_0
\\rVert^2`, where :math:`g_0 = J^\\top \\tilde w` is a preferred direction (the
average gradient by default), with a few projected momentum-gradient steps
warm-started from the previous call's solution. The stochastic version of the
algorithm estimates the ``K x K`` matrix of that problem without bias from two
independent mini-batches, :math:`A = J_1 J_2^\\top` (:func:`cross_gramian`), and
applies the weights to the gradients of a third batch.

The ``K x K`` rule is the pure function :func:`sdmgrad_weights`; :func:`sdmgrad`
is the optax transformation that takes the cross matrix as the extra argument
``cross_gramian`` of its update.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mtl_optax import engine
from mtl_optax.base import (
    PerTaskTransformation,
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    check_pref_vector,
    check_update_inputs,
    initial_weights,
    is_traced,
)
from mtl_optax.engine import leaf_path as _path
from mtl_optax.registry import register

__all__ = [
    "SDMGradState",
    "cross_gramian",
    "sdmgrad",
    "sdmgrad_weights",
]

# Added to the squared normalisation scale (as in TorchJD's SDMGradWeighting).
_EPS = 1e-8


# ---------------------------------------------------------------------------
# The cross matrix J_a J_b^T.
# ---------------------------------------------------------------------------


def cross_gramian(task_grads_a: Any, task_grads_b: Any) -> jax.Array:
    r"""The cross matrix :math:`A = J_a J_b^\top` of two stacked task gradients.

    .. math::
      A_{kl} = \langle g^{(a)}_k, g^{(b)}_l \rangle
      = \sum_{\text{leaves}} \sum_i g^{(a)}_{k,i}\, g^{(b)}_{l,i}

    computed in one pass over the leaves, each pair accumulated in
    ``promote_types(leaf.dtype, float32)`` (bfloat16 and float16 leaves are
    multiplied with float32 accumulation, float64 leaves stay float64). With the
    task gradients of two independent mini-batches, :math:`A` is an unbiased
    estimate of :math:`\nabla L \nabla L^\top`; it is not symmetric nor positive
    semi-definite in general. ``cross_gramian(g, g)`` is ``gramian(g)``.

    Args:
      task_grads_a: pytree of stacked task gradients (leading task axis ``K``),
        e.g. from a first mini-batch; gives the rows of :math:`A`.
      task_grads_b: a pytree with the same structure and leaf shapes, e.g. from
        a second, independent mini-batch; gives the columns of :math:`A`.

    Returns:
      The ``[K, K]`` matrix :math:`J_a J_b^\top`.

    Raises:
      ValueError: either input is not valid stacked task gradients, the two
        have different tree structures, or a leaf has different shapes in the
        two (the message names the leaf path and both shapes).

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> a = {"w": jnp.array([[1.0, 0.0], [1.0, 1.0]])}
      >>> b = {"w": jnp.array([[2.0, 1.0], [0.0, -1.0]])}
      >>> mtl_optax.cross_gramian(a, b)
      Array([[ 2.,  0.],
             [ 3., -1.]], dtype=float32)
    """
    k = engine.check_task_grads(task_grads_a, method="cross_gramian")
    engine.check_task_grads(task_grads_b, method="cross_gramian")
    def_a = jax.tree_util.tree_structure(task_grads_a)
    def_b = jax.tree_util.tree_structure(task_grads_b)
    if def_a != def_b:
        raise ValueError(
            "cross_gramian: the two task gradients have different tree structures.\n"
            f"  task_grads_a: {def_a}\n  task_grads_b: {def_b}"
        )
    leaves_a = jax.tree_util.tree_leaves_with_path(task_grads_a)
    leaves_b = jax.tree_util.tree_leaves(task_grads_b)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"cross_gramian: leaf {_path(path)} has shape {tuple(jnp.shape(x))} in"
                f" task_grads_a but {tuple(jnp.shape(y))} in task_grads_b; both must be"
                " the stacked task gradients of the same parameters (same K)."
            )
    return engine.sum_leaf_crosses([x for _, x in leaves_a], leaves_b, k)


# ---------------------------------------------------------------------------
# The K x K rule.
# ---------------------------------------------------------------------------


def checked_matrix(matrix: Any, k: int, *, method: str) -> jax.Array:
    """The ``cross_gramian`` argument of an update, checked: a ``[K, K]`` floating array.

    Raises:
      ValueError: naming ``method``, the shape or dtype found and the one expected.
    """
    matrix = jnp.asarray(matrix)
    if matrix.shape != (k, k):
        raise ValueError(
            f"{method}: cross_gramian must have shape ({k}, {k}) (K={k} tasks);"
            f" found shape {matrix.shape}."
        )
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise ValueError(
            f"{method}: cross_gramian must be floating point; found dtype {matrix.dtype}."
        )
    return matrix


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` for ``x >= 0`` with a finite derivative at 0 (double where)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


@functools.partial(jax.jit, static_argnames=("n_iter",))
def _inner_loop(matrix, inner_weights, w_tilde, lr, momentum, lambda_, *, n_iter):
    """The loop of :func:`sdmgrad_weights`, compiled once per ``n_iter``, shapes and dtype.

    ``lr``, ``momentum`` and ``lambda_`` are scalars of ``matrix``'s dtype.
    """
    dtype = matrix.dtype
    k = matrix.shape[0]
    diag = jnp.maximum(jnp.diagonal(matrix), 0.0)
    scale = jnp.mean(_safe_sqrt(diag))
    # a = matrix / (scale^2 + eps). scale^2 + eps is formed as (m^2 + eps 2^-2e) 2^2e
    # from scale = m 2^e (m in [1/2, 1)), the same number: XLA rewrites the
    # square of a mean as (sum * sum) / K^2, which overflows float32 from a mean
    # norm of 1.8e19 / K. And not matrix / (...): XLA turns that into a product
    # with the reciprocal, flushed to zero above 2^126 (engine.divide_by_scalar).
    m, e = jnp.frexp(scale)
    eps = jnp.asarray(_EPS, dtype)
    a = engine.divide_by_scalar(matrix, jnp.ldexp(m * m + jnp.ldexp(eps, -2 * e), 2 * e))
    pull = lambda_ * w_tilde

    def products(w):
        return a * (w + pull)[None, :]

    # The inner gradient a @ (w + pull) is the row sum of the products
    # a_ij (w + pull)_j, which are carried from one iteration to the next: a
    # loop-carried value is stored, so every product is rounded before it is
    # summed. In one fused kernel XLA's CPU backend would contract a product
    # and an addition into a fused multiply-add, which breaks exact symmetries
    # (e.g. a @ u = 0 for opposite gradients and u = (c, c)); with lr=10 the
    # symmetric point is unstable, so a 1e-17 asymmetry ends at a vertex.
    def step(_, carry):
        w, velocity, prods = carry
        velocity = momentum * velocity + jnp.sum(prods, axis=1)
        w = optax.projections.projection_simplex(w - lr * velocity).astype(dtype)
        return w, velocity, products(w)

    init = (inner_weights, jnp.zeros((k,), dtype), products(inner_weights))
    w, _, _ = lax.fori_loop(0, n_iter, step, init)
    return (w + pull) / (1.0 + lambda_), w


@engine.full_precision
def sdmgrad_weights(
    matrix: jax.typing.ArrayLike,
    inner_weights: jax.typing.ArrayLike,
    *,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""SDMGrad's weights from the ``K x K`` matrix :math:`A`: the pure rule.

    .. math::
      \hat A = \frac{A}{\big(\frac1K \sum_k \sqrt{\max(A_{kk}, 0)}\big)^2
      + 10^{-8}}, \qquad v_0 = 0, \\
      v_{s+1} = \mu\, v_s + \hat A\,(w_s + \lambda \tilde w), \qquad
      w_{s+1} = \Pi_\Delta\big(w_s - \eta\, v_{s+1}\big), \qquad
      s = 0, \dots, S - 1, \\
      \text{weights} = \frac{w_S + \lambda \tilde w}{1 + \lambda}

    where :math:`\Pi_\Delta` is the Euclidean projection onto the probability
    simplex (``optax.projections.projection_simplex``). With :math:`A = J J^\top`
    (or its unbiased estimate :math:`J_1 J_2^\top`),
    :math:`\hat A (w + \lambda \tilde w)` is the gradient of
    :math:`\tfrac12 \lVert J^\top w + \lambda J^\top \tilde w \rVert^2` up to
    the normalisation, so the loop runs ``n_iter`` projected momentum steps on
    that objective, starting from ``inner_weights``. Everything is computed in
    ``matrix``'s dtype (at least float32). Pure and jittable: ``lr``,
    ``momentum``, ``lambda_`` and ``pref_vector`` may be traced (e.g. swept with
    ``vmap``), ``n_iter`` is static; outside ``jit`` the loop is compiled once
    per ``n_iter``, ``K`` and dtype.

    Args:
      matrix: the ``[K, K]`` matrix :math:`A` (floating point).
      inner_weights: the ``[K]`` start :math:`w_0` of the inner loop (a point of
        the simplex: uniform at the first step, then the previous :math:`w_S`).
      lr: the inner step size :math:`\eta > 0`.
      momentum: the inner momentum :math:`\mu \in [0, 1)`.
      n_iter: the number of inner steps :math:`S \ge 1`.
      lambda_: :math:`\lambda \ge 0`, the pull toward the preferred direction.
      pref_vector: the ``[K]`` preference :math:`\tilde w`; uniform
        :math:`1/K` when ``None``.

    Returns:
      ``(weights, new_inner_weights)``: the ``[K]`` weights
      :math:`(w_S + \lambda \tilde w) / (1 + \lambda)` and :math:`w_S`.

    Raises:
      ValueError: ``matrix`` is not a square floating-point matrix, or
        ``inner_weights`` or ``pref_vector`` is not of shape ``[K]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from mtl_optax._sdmgrad import sdmgrad_weights
      >>> weights, w = sdmgrad_weights(jnp.eye(3), jnp.full(3, 1 / 3))
      >>> weights  # a symmetric problem keeps the uniform weights
      Array([0.33333334, 0.33333334, 0.33333334], dtype=float32)
    """
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"sdmgrad_weights: matrix must be [K, K]; found shape {matrix.shape}.")
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise ValueError(f"sdmgrad_weights: matrix must be floating point; found {matrix.dtype}.")
    matrix = matrix.astype(engine.accumulation_dtype(matrix.dtype))
    dtype, k = matrix.dtype, matrix.shape[0]
    inner_weights = jnp.asarray(inner_weights)
    if inner_weights.shape != (k,):
        raise ValueError(
            f"sdmgrad_weights: inner_weights must have shape ({k},); found {inner_weights.shape}."
        )
    if pref_vector is None:
        w_tilde = jnp.full((k,), 1.0 / k, dtype)
    else:
        w_tilde = jnp.asarray(pref_vector)
        if w_tilde.shape != (k,):
            raise ValueError(
                f"sdmgrad_weights: pref_vector must have shape ({k},); found {w_tilde.shape}."
            )
    return _inner_loop(
        matrix,
        inner_weights.astype(dtype),
        w_tilde.astype(dtype),
        jnp.asarray(lr, dtype),
        jnp.asarray(momentum, dtype),
        jnp.asarray(lambda_, dtype),
        n_iter=int(n_iter),
    )


# ---------------------------------------------------------------------------
# The transformation.
# ---------------------------------------------------------------------------


class SDMGradState(NamedTuple):
    """State of :func:`sdmgrad`."""

    weights: jax.Array  # [K] float32: the weights used in the last step, for logging.
    inner_weights: jax.Array  # [K] the inner solver's simplex weights w_S (warm start).


@register("sdmgrad")
def sdmgrad(
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: jax.typing.ArrayLike | None = None,
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""SDMGrad: direction-oriented multi-objective descent with simplex weights.

    .. math::
      w_S = \text{$S$ projected momentum steps on }
      \min_{w \in \Delta_K} \tfrac12 \big\lVert J^\top w + \lambda\, J^\top
      \tilde w \big\rVert^2 \text{ from } w_0 = w_S^{\text{prev}}, \\
      u = \sum_{k=1}^K \frac{(w_S)_k + \lambda \tilde w_k}{1 + \lambda}\, g_k

    The quadratic is seen through a ``K x K`` matrix :math:`A`, normalised by
    the squared mean of :math:`\sqrt{\max(A_{kk}, 0)}` (so the step size does
    not depend on the gradients' scale); the exact loop is
    :func:`sdmgrad_weights`. The inner weights :math:`w_S` are kept in the
    state and warm-start the next call (the momentum is not: it restarts at 0
    at every call).

    :math:`A` is the keyword argument ``cross_gramian`` of ``update``: in the
    stochastic algorithm of the paper, :math:`A = J_1 J_2^\top` from two
    independent mini-batches (:func:`cross_gramian`), and ``update`` receives
    the task gradients :math:`J_3` of a third batch, which it combines. When
    ``cross_gramian`` is not given, :math:`A` is the Gramian :math:`J J^\top`
    of the task gradients given to ``update`` (the deterministic algorithm).

    With :math:`\lambda = 0` the inner problem is MGDA's min-norm problem; as
    :math:`\lambda \to \infty` the weights tend to :math:`\tilde w` (plain
    descent on the preferred objective, the average loss by default), with
    :math:`\lVert \text{weights} - \tilde w \rVert_1 \le 2 / (1 + \lambda)`.
    The inner loop is a fixed number of steps, not a solver run to a
    tolerance: with the default ``lr=10`` the steps are long compared with the
    curvature of the normalised problem, so :math:`w_S` is in general not the
    minimiser (the iterates can jump between faces of the simplex, and
    :math:`w_S` is very sensitive to :math:`A`). A smaller ``lr`` with a larger
    ``n_iter`` solves the inner problem.

    Args:
      lr: step size of the inner solver (default 10.0, as TorchJD and the
        official code). Must be positive.
      momentum: momentum of the inner solver, in :math:`[0, 1)` (default 0.5).
      n_iter: number of inner steps per call, a positive int (default 20).
      lambda_: :math:`\lambda \ge 0`, how strongly the direction is pulled
        toward the preferred direction (default 0.3, TorchJD's default and the
        value of the paper's experiments).
      pref_vector: the ``[K]`` preference vector :math:`\tilde w` defining the
        preferred direction :math:`J^\top \tilde w` (any finite reals; usually
        on the simplex, it is not normalised). Default: uniform :math:`1/K`.
      num_tasks: ``K``. Required unless ``pref_vector`` is given (then ``K`` is
        its length): the state holds the ``[K]`` inner weights from ``init``
        on.

    Returns:
      A :class:`~mtl_optax.WeightedTransformation`. ``update(task_grads, state,
      params=None, *, value=None, cross_gramian=None, **extra)``: the optional
      ``cross_gramian`` is the ``[K, K]`` matrix :math:`A`. Its ``per_task``
      form returns :math:`\text{weights}_k\, g_k` for every task, and its
      ``weighting`` is the rule with :math:`A = J J^\top`.

    Raises:
      ValueError: a hyperparameter is out of range, ``num_tasks`` and
        ``pref_vector`` are both missing or disagree; at update time, bad task
        gradients or a ``cross_gramian`` that is not a ``[K, K]`` floating
        point array.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.sdmgrad(num_tasks=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}  # orthogonal, same norm
      >>> u, state = tx.update(g, tx.init(params), params)
      >>> u["w"]  # a symmetric problem keeps the uniform weights
      Array([0.5, 0.5], dtype=float32)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # J J^T = diag(1, 4)
      >>> u, state = tx.update(g, state, params)
      >>> state.weights  # TorchJD's SDMGradWeighting()(diag(1, 4)) gives the same
      Array([0.14171337, 0.8582874 ], dtype=float32)
      >>> state.inner_weights  # w_S, the warm start of the next call
      Array([0.03422737, 0.9657736 ], dtype=float32)
      >>> # Stochastic form: A from two independent batches, applied to a third.
      >>> g1, g2 = g, {"w": jnp.array([[1.0, 0.5], [0.5, 2.0]])}
      >>> a = mtl_optax.cross_gramian(g1, g2)
      >>> u, state = tx.update(g, state, params, cross_gramian=a)

    References:
      Xiao, Ban and Ji, `Direction-oriented Multi-objective Learning: Simple and
      Provable Stochastic Algorithms <https://arxiv.org/abs/2305.18409>`_,
      NeurIPS 2023 (Algorithm 1). Reference implementations: TorchJD
      ``SDMGradWeighting`` (``torchjd/aggregation/_sdmgrad.py``, which this
      follows exactly) and the official code
      (`OptMN-Lab/SDMGrad <https://github.com/OptMN-Lab/SDMGrad>`_).

    Differences from the references:
      This follows TorchJD 0.18 step for step: the normalisation
      :math:`(\mathrm{mean}_k \sqrt{\max(A_{kk},0)})^2 + 10^{-8}`, the inner
      gradient :math:`\hat A (w + \lambda \tilde w)`, momentum restarted at
      every call and the inner weights kept across calls. TorchJD returns only
      the weights and leaves the third batch to the user; here the weights are
      applied to the gradients given to ``update``, and the Gramian of those is
      the default matrix. The official code normalises with
      :math:`\mathrm{mean}_k \sqrt{G_{kk} + 10^{-4}}` instead, and one of its
      scripts differentiates :math:`w^\top G w` without the factor
      :math:`\tfrac12` (an inner step twice as long). Because of the absolute
      :math:`10^{-8}`, Gramians below about :math:`10^{-8}` (gradient norms
      below :math:`10^{-4}`) make the inner steps proportionally shorter, as in
      TorchJD. Zero gradients are finite everywhere: the square root uses a
      double ``where``, so derivatives through the update stay finite too.
      Every product :math:`\hat A_{ij} (w + \lambda \tilde w)_j` is rounded
      before it is summed (XLA on CPU would otherwise fuse some into
      multiply-adds), so exactly symmetric problems keep exactly symmetric
      weights, as in TorchJD: for opposite gradients :math:`g, -g` the weights
      stay :math:`(\tfrac12, \tfrac12)` and the update is 0, where a
      last-bit asymmetry would be amplified by the long inner steps into a
      vertex (an update of :math:`-0.77\, g`).
    """
    lr, momentum = float(lr), float(momentum)
    traced_lambda = is_traced(lambda_)
    if not traced_lambda:
        lambda_ = float(lambda_)
    if not lr > 0.0 or not np.isfinite(lr):
        raise ValueError(f"sdmgrad: lr must be positive and finite; found lr={lr!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"sdmgrad: momentum must be in [0, 1); found momentum={momentum!r}.")
    if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 1:
        raise ValueError(f"sdmgrad: n_iter must be a positive int; found n_iter={n_iter!r}.")
    n_iter = int(n_iter)
    if not traced_lambda and (not lambda_ >= 0.0 or not np.isfinite(lambda_)):
        raise ValueError(
            f"sdmgrad: lambda_ must be non-negative and finite; found lambda_={lambda_!r}."
        )
    pref, num_tasks = check_pref_vector("sdmgrad", pref_vector, num_tasks)
    if num_tasks is None:
        raise ValueError(
            "sdmgrad keeps its [K] inner weights in its state: pass num_tasks=K"
            " (or a pref_vector of length K)."
        )
    k = check_num_tasks("sdmgrad", num_tasks)
    hparams = dict(lr=lr, momentum=momentum, n_iter=n_iter, lambda_=lambda_, pref_vector=pref)

    def init() -> SDMGradState:
        # The default float dtype: float64 when jax_enable_x64 is on.
        inner_dtype = jnp.result_type(float)
        return SDMGradState(
            weights=initial_weights(k),
            inner_weights=jnp.full((k,), 1.0 / k, inner_dtype),
        )

    def rule(matrix, state, value, *, num_tasks, dtype):
        del value, num_tasks
        matrix = jnp.asarray(matrix).astype(dtype)
        weights, inner = sdmgrad_weights(matrix, state.inner_weights, **hparams)
        new_state = SDMGradState(
            weights=weights.astype(jnp.float32),
            inner_weights=inner.astype(state.inner_weights.dtype),
        )
        return weights, new_state

    return matrix_transformation("sdmgrad", init, rule, k)


def matrix_transformation(
    name: str, init: Callable[[], Any], rule: Any, k: int
) -> WeightedTransformation:
    """A weighted transformation whose rule reads a ``K x K`` matrix.

    The matrix is the extra argument ``cross_gramian`` of ``update`` (checked
    by :func:`checked_matrix`), or the Gramian of the task gradients when it
    is not given; ``rule(matrix, state, value, *, num_tasks, dtype)`` gives
    the weights and the new state, as a :class:`~mtl_optax.Weighting`'s
    rule. Shared by :func:`sdmgrad` and :func:`mtl_optax.modo`.
    """

    def weights_and_state(updates, state, params, value, matrix):
        _, _, dtype = check_update_inputs(updates, params, value, num_tasks=k, method=name)
        if matrix is None:
            matrix = engine.gramian(updates)
        else:
            matrix = checked_matrix(matrix, k, method=name)
            dtype = jnp.promote_types(dtype, engine.accumulation_dtype(matrix.dtype))
        return rule(matrix, state, None, num_tasks=k, dtype=dtype)

    def init_fn(params: Any) -> Any:
        del params
        return init()

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: Any,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        cross_gramian: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, Any]:
        del extra_args
        weights, new_state = weights_and_state(updates, state, params, value, cross_gramian)
        return engine.combine(updates, weights), new_state

    @engine.full_precision
    def per_task_update_fn(
        updates: Any,
        state: Any,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        cross_gramian: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, Any]:
        del extra_args
        weights, new_state = weights_and_state(updates, state, params, value, cross_gramian)
        return engine.scale_rows(updates, weights), new_state

    tx = WeightedTransformation(init_fn, update_fn)
    tx.weighting = Weighting(name=name, init=init, weights=rule, num_tasks=k)
    tx.per_task = PerTaskTransformation(name, init_fn, per_task_update_fn)
    return tx
