r"""Projections onto the dual cone of the task gradients: ``upgrad`` and ``dualproj``.

The dual cone of the task gradients :math:`g_1, \dots, g_K` (the rows of
:math:`J`) is :math:`\{x : J x \ge 0\}`: the directions along which no task's
loss increases to first order. Both methods project onto it, and the
projection of :math:`J^\top u` is :math:`J^\top v` with :math:`v = \arg\min_{v
\ge u} v^\top G v` (Quinton & Rey 2024, Proposition 1), a problem in the
``K x K`` world solved exactly by :func:`mtl_optax.solvers.solve_dual_cone`.
Both are therefore :class:`~mtl_optax.base.Weighting` rules: the weights come
from the Gramian, the update is one weighted combination of the task gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax import engine, solvers
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    check_pref_vector,
    from_weighting,
    initial_weights,
    is_traced,
)
from mtl_optax.registry import register

__all__ = [
    "DualProjState",
    "UPGradState",
    "dualproj",
    "dualproj_weights",
    "upgrad",
    "upgrad_weights",
]


def _prepared_gramian(gramian: jax.Array, norm_eps: float, reg_eps: float) -> jax.Array:
    r"""TorchJD's :math:`G / \mathrm{tr}(G) + \text{reg\_eps}\, I` (0 in place of
    :math:`G / \mathrm{tr}(G)` when :math:`\mathrm{tr}(G) < \text{norm\_eps}` or
    :math:`\mathrm{tr}(G) = 0`); ``G`` itself when both are 0.

    The trace is taken of :math:`G / \max_k G_{kk}`, so it does not overflow
    (:math:`K` squared norms of 1.5e19 sum beyond float32's range). Either
    epsilon may be traced (``optax.inject_hyperparams``).
    """
    if not is_traced(norm_eps) and not is_traced(reg_eps) and norm_eps == 0 and reg_eps == 0:
        return gramian
    dtype = gramian.dtype
    k = gramian.shape[0]
    scaled, top = engine.scale_by_largest_diagonal(gramian)
    # In [1, K] for a finite nonzero G; 0 for a zero G (a non-finite G is kept
    # as it is below).
    scaled_trace = jnp.trace(scaled)
    usable = scaled_trace > 0
    # tr(G) < norm_eps, written without forming tr(G) = top * scaled_trace.
    small = top < jnp.asarray(norm_eps, dtype) / jnp.where(usable, scaled_trace, 1)
    zero = ~usable | small
    normalized = jnp.where(zero, 0, scaled / jnp.where(zero, 1, scaled_trace))
    # A non-finite Gramian stays non-finite (the update is then non-finite, as
    # for every method, and optax.apply_if_finite skips the step).
    normalized = jnp.where(jnp.all(jnp.isfinite(gramian)), normalized, gramian)
    return normalized + jnp.asarray(reg_eps, dtype) * jnp.eye(k, dtype=dtype)


def _prepared(
    gramian: Any, pref_vector: Any, norm_eps: Any, reg_eps: Any, method: str
) -> tuple[jax.Array, jax.Array]:
    """The prepared Gramian (float32 at least) and the preference (default ``1/K``)."""
    gramian = jnp.asarray(gramian)
    gramian = gramian.astype(jnp.promote_types(gramian.dtype, jnp.float32))
    k = gramian.shape[0]
    if pref_vector is None:
        pref = jnp.full((k,), 1.0 / k, gramian.dtype)
    else:
        pref = jnp.asarray(pref_vector, gramian.dtype)
        if pref.shape != (k,):
            raise ValueError(f"{method}: pref_vector must have shape ({k},); found {pref.shape}.")
    return _prepared_gramian(gramian, norm_eps, reg_eps), pref


@engine.full_precision
def upgrad_weights(
    gramian: jax.typing.ArrayLike,
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> jax.Array:
    r"""The UPGrad weights from the Gramian (see :func:`upgrad`).

    Args:
      gramian: the ``[K, K]`` Gramian.
      pref_vector: the ``[K]`` preference :math:`p` (default :math:`1/K`).
      norm_eps: see :func:`upgrad`.
      reg_eps: see :func:`upgrad`.

    Returns:
      The ``[K]`` weights :math:`w = \sum_i v^{(i)}`.
    """
    prepared, pref = _prepared(gramian, pref_vector, norm_eps, reg_eps, "upgrad_weights")
    return jnp.sum(solvers.dual_cone_weights(prepared, jnp.diag(pref)), axis=0)


@engine.full_precision
def dualproj_weights(
    gramian: jax.typing.ArrayLike,
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> jax.Array:
    r"""The DualProj weights from the Gramian (see :func:`dualproj`).

    Args:
      gramian: the ``[K, K]`` Gramian.
      pref_vector: the ``[K]`` preference :math:`p` (default :math:`1/K`).
      norm_eps: see :func:`upgrad`.
      reg_eps: see :func:`upgrad`.

    Returns:
      The ``[K]`` weights :math:`v = \arg\min_{v \ge p} v^\top G v`.
    """
    prepared, pref = _prepared(gramian, pref_vector, norm_eps, reg_eps, "dualproj_weights")
    return solvers.dual_cone_weights(prepared, pref)


def _check_eps(method: str, name: str, val: Any) -> Any:
    """A concrete epsilon checked and made a float; a traced one kept as it is."""
    if is_traced(val):
        return val
    if not (np.isfinite(val) and val >= 0):
        raise ValueError(f"{method}: {name} must be a finite number >= 0; found {val!r}.")
    return float(val)


def _build(
    name: str,
    rule: Any,
    state: Any,
    num_tasks: int | None,
    pref_vector: Any,
    norm_eps: Any,
    reg_eps: Any,
) -> WeightedTransformation:
    """The transformation of ``upgrad`` or ``dualproj``: arguments checked, ``rule`` as weighting."""
    norm_eps = _check_eps(name, "norm_eps", norm_eps)
    reg_eps = _check_eps(name, "reg_eps", reg_eps)
    pref, k = check_pref_vector(name, pref_vector, check_num_tasks(name, num_tasks))

    def weights(gramian, state_, value, *, num_tasks, dtype):
        del state_, value, num_tasks
        w = rule(gramian.astype(dtype), pref_vector=pref, norm_eps=norm_eps, reg_eps=reg_eps)
        return w, state(weights=w.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name=name,
            init=lambda: state(weights=initial_weights(k)),
            weights=weights,
            num_tasks=k,
        )
    )


class UPGradState(NamedTuple):
    """State of :func:`upgrad`."""

    weights: jax.Array  # [K] weights of the last step, for logging.


@register("upgrad")
def upgrad(
    num_tasks: int | None = None,
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> WeightedTransformation:
    r"""UPGrad: every task gradient projected onto the dual cone, then combined.

    With :math:`\pi_J` the Euclidean projection onto the dual cone
    :math:`\{x : J x \ge 0\}` of the task gradients and the preference
    :math:`p` (default :math:`p_k = 1/K`):

    .. math::
      u = \sum_{i=1}^K \pi_J(p_i\, g_i) = J^\top w, \qquad
      w = \sum_{i=1}^K v^{(i)}, \qquad
      v^{(i)} = \operatorname*{arg\,min}_{v \ge p_i e_i} v^\top G v

    (Quinton & Rey 2024, Proposition 1), each :math:`v^{(i)}` by the exact
    active-set solver :func:`mtl_optax.solvers.solve_dual_cone` (the ``K``
    problems batched in one loop). The update conflicts with no task,
    :math:`\langle u, g_k \rangle \ge 0` for every :math:`k` (a sum of vectors
    of the dual cone), and is a descent direction of every loss unless
    :math:`u = 0`. For tasks that do not conflict (and :math:`p \ge 0`),
    :math:`u = \sum_k p_k g_k`.

    ``norm_eps`` and ``reg_eps`` reproduce TorchJD's numerical preparation of
    the Gramian for its QP solver: the projections are computed with
    :math:`\tilde G = G / \mathrm{tr}(G) + \text{reg\_eps}\, I`, where
    :math:`G / \mathrm{tr}(G)` is replaced by 0 when :math:`\mathrm{tr}(G) <
    \text{norm\_eps}`. The defaults (both 0) compute the exact projections with
    :math:`G`; ``norm_eps=1e-4, reg_eps=1e-4`` are TorchJD's defaults.

    Degenerate cases (finite, no division by a norm): a zero task gradient
    constrains nothing and gets its own weight :math:`p_k`; identical,
    collinear or more than ``P`` task gradients (a singular :math:`G`) give the
    exact projections, with weights that are one of the minimisers (the
    solver's diagonal jitter picks it); opposite gradients :math:`g, -g` give
    :math:`u = 0`; ``K = 1`` gives :math:`u = p_1 g_1`. The weights are
    constants under differentiation (the solver is a ``lax.while_loop``).

    Args:
      num_tasks: ``K``, recommended (required with ``pref_vector`` unless its
        length gives it). When given, it is checked at every update and the
        state has its final shape from ``init`` on.
      pref_vector: ``[K]`` preference :math:`p` combining the projected
        gradients; default :math:`1/K` (TorchJD's default, the mean).
      norm_eps: if positive, the Gramian counts as zero when its trace
        :math:`\|J\|_F^2` is below it, and the update is :math:`\sum_k p_k
        g_k`. TorchJD's default is ``1e-4``: then every Jacobian with
        :math:`\|J\|_F < 10^{-2}` gets the plain weighted sum, conflicts or not.
        Default 0: the projections at every scale.
      reg_eps: if positive, :math:`\text{reg\_eps}\, I` is added to the
        trace-normalised Gramian (TorchJD's default ``1e-4``, which its solver
        needs). The projections are then those for a slightly different
        Gramian: :math:`\langle u, g_k \rangle \ge -\text{reg\_eps}\,
        \mathrm{tr}(G)\, w_k` instead of :math:`\ge 0`. Default 0. Both
        epsilons may be scheduled with ``optax.inject_hyperparams``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`).

    Raises:
      ValueError: ``norm_eps`` or ``reg_eps`` negative or not finite, a
        malformed ``pref_vector`` or ``num_tasks``; at update time, malformed
        task gradients or ``K`` other than ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.upgrad(num_tasks=2)
      >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # <g1, g2> = -1
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # g1 / 2 projected: (0.25, 0.25); g2 / 2 projected: (0, 0.5)
      Array([0.25, 0.75], dtype=float32)
      >>> state.weights
      Array([1.  , 0.75], dtype=float32)

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024 (UPGrad, Definition 4 and
      Proposition 1). Reference implementation: TorchJD ``UPGrad`` /
      ``UPGradWeighting`` with its ``QuadprogProjector``.

    Differences from the references:
      * TorchJD solves the ``K`` quadratic programs one by one with
        ``quadprog`` on the host (through NumPy, in float64); here they are
        solved together, jitted, in the dtype of the gradients, by an exact
        active-set method. With ``norm_eps=1e-4, reg_eps=1e-4`` the results
        agree to rounding (tested live in float64).
      * TorchJD's defaults ``norm_eps=1e-4, reg_eps=1e-4`` are numerical
        devices for ``quadprog`` (which fails on a Gramian that is not
        positive definite); its side effects, the plain sum for small
        Jacobians and slightly conflicting updates, are off by default here.
    """
    return _build("upgrad", upgrad_weights, UPGradState, num_tasks, pref_vector, norm_eps, reg_eps)


class DualProjState(NamedTuple):
    """State of :func:`dualproj`."""

    weights: jax.Array  # [K] weights of the last step, for logging.


@register("dualproj")
def dualproj(
    num_tasks: int | None = None,
    *,
    pref_vector: jax.typing.ArrayLike | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> WeightedTransformation:
    r"""DualProj: the weighted sum of the task gradients projected onto the dual cone.

    .. math::
      u = \pi_J\Big(\sum_{k=1}^K p_k\, g_k\Big) = J^\top v, \qquad
      v = \operatorname*{arg\,min}_{v \ge p} v^\top G v

    with :math:`\pi_J` the projection onto the dual cone :math:`\{x : J x \ge
    0\}` and the preference :math:`p` (default :math:`1/K`): the closest
    direction to the mean gradient that conflicts with no task (the projection
    of Lopez-Paz & Ranzato's GEM, their Eq. 11, with every task as a
    constraint). Solved exactly by :func:`mtl_optax.solvers.solve_dual_cone`.
    Hyperparameters, degenerate cases and differences from TorchJD as in
    :func:`upgrad` (``norm_eps=1e-4, reg_eps=1e-4`` are TorchJD's defaults).

    Args:
      num_tasks: ``K``, recommended (see :func:`upgrad`).
      pref_vector: ``[K]`` preference :math:`p`; default :math:`1/K`.
      norm_eps: see :func:`upgrad`.
      reg_eps: see :func:`upgrad`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`).

    Raises:
      ValueError: as :func:`upgrad`.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.dualproj(num_tasks=2)
      >>> g = {"w": jnp.array([[1.0, 0.0], [-2.0, 1.0]])}
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # the mean (-0.5, 0.5) conflicts with g1; its projection does not
      Array([0. , 0.5], dtype=float32)
      >>> state.weights
      Array([1. , 0.5], dtype=float32)

    References:
      Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
      <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017 (Eq. 11-13). Quinton &
      Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024 (DualProj as an aggregator).
      Reference implementation: TorchJD ``DualProj`` / ``DualProjWeighting``.
    """
    return _build(
        "dualproj", dualproj_weights, DualProjState, num_tasks, pref_vector, norm_eps, reg_eps
    )
