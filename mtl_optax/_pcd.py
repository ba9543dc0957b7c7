r"""PCD: Priority-Constrained Descent.

PCD (TMLR 2026) treats the first task as the primary objective and the others
as constraints: the update follows the primary gradient as closely as possible
while giving every secondary objective at least a fraction :math:`\tau` of the
first-order progress of a step along its own (normalized) gradient. The
quadratic program that defines it only reads inner products of the task
gradients, so it is solved in the ``K x K`` world from the Gramian, with the
dual active-set method of Goldfarb and Idnani (:func:`pcd_qp`), and the rule
(:func:`pcd_weights`) is a :class:`~mtl_optax.base.Weighting`: the update is
one weighted combination of the task gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mtl_optax import engine
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    from_weighting,
    initial_weights,
    is_traced,
)
from mtl_optax.registry import register

__all__ = ["PCDState", "pcd", "pcd_qp", "pcd_weights"]

_NAME = "pcd"
# The step count saturates here (beta ** count is 0 long before): no overflow.
_MAX_COUNT = 2**30


def _tolerances(dtype: Any) -> tuple[float, float]:
    """``(precision, tol)``: ``10 eps(dtype)`` and ``max(1e-9, precision)``."""
    precision = 10.0 * float(np.finfo(dtype).eps)
    return precision, max(1e-9, precision)


def _taus(tau: Any, k: int, dtype: Any) -> jax.Array:
    """``tau`` (a scalar or a ``[K - 1]`` vector) as a ``[K - 1]`` vector of ``dtype``."""
    taus = jnp.asarray(tau).astype(dtype)
    if taus.ndim > 1 or (taus.ndim == 1 and taus.shape[0] != k - 1):
        raise ValueError(
            f"{_NAME}: tau must be a scalar or a vector of length K - 1 = {k - 1} (one value"
            f" per secondary task); found shape {taus.shape}."
        )
    return jnp.broadcast_to(taus, (k - 1,))


def _active_solve(
    gs: jax.Array, active: jax.Array, rhs: jax.Array, eye: jax.Array, jitter: Any
) -> jax.Array:
    """``r`` with ``Gs[A, A] r_A = rhs_A`` and ``r = 0`` off the active set ``A``.

    The rows and columns off the active set are replaced by the identity, and
    the system is solved for ``D Gs D`` (unit diagonal, ``D = diag(Gs)^(-1/2)``
    on ``A``) by a Cholesky factorization with a jitter of ``4 n eps``, then
    one step of iterative refinement with the matrix without jitter, which
    removes the jitter's bias. The active gradients are linearly independent
    (each joined with an orthogonal component above ``dependence_tol``), so
    the matrix is positive definite; a Cholesky solve also compiles in a
    fraction of the time of an LU solve.
    """
    diag = jnp.diagonal(gs)
    on = active & (diag > 0)
    d = jnp.where(on, lax.rsqrt(jnp.where(on, diag, 1)), 1)
    unit = jnp.where(active[:, None] & active[None, :], gs * d[:, None] * d[None, :], eye)
    b = jnp.where(active, rhs * d, 0)
    factor = (jnp.linalg.cholesky(unit + jitter * eye), True)
    y = jax.scipy.linalg.cho_solve(factor, b)
    y = y + jax.scipy.linalg.cho_solve(factor, b - unit @ y)
    r = jnp.where(active, d * y, 0)
    # Never NaN from a factorization of a matrix that rounding made indefinite.
    return jnp.where(jnp.isfinite(r), r, 0)


def _solve_qp(
    gramian: jax.Array, taus: jax.Array, tol: float, dependence_tol: float, max_iters: int
) -> jax.Array:
    """The multipliers ``[1, mu]`` of :func:`pcd_qp`, after validation."""
    k = gramian.shape[0]
    dtype = gramian.dtype
    if k == 1:
        return jnp.ones((1,), dtype)
    n = k - 1
    gs = gramian[1:, 1:]
    # b_j > 0 iff g_1 violates constraint j.
    b = taus * jnp.diagonal(gs) - gramian[1:, 0]
    largest = jnp.maximum(jnp.max(jnp.diagonal(gramian)), jnp.finfo(dtype).tiny)
    atol = tol * largest
    eye = jnp.eye(n, dtype=dtype)
    jitter = 4 * n * jnp.finfo(dtype).eps
    never = jnp.iinfo(jnp.int32).max
    idx = jnp.arange(n, dtype=jnp.int32)

    def cond(carry):
        *_, done, _, it = carry
        return ~done & (it < max_iters)

    def body(carry):
        mu, active, stamp, p, slack_p, adding, _, _, it = carry
        # Not adding a constraint: pick the most violated one, or stop.
        slacks = jnp.where(active, 0, gs @ mu - b)
        p_new = jnp.argmin(slacks).astype(jnp.int32)
        stop = ~adding & (slacks[p_new] >= -atol)
        p = jnp.where(adding, p, p_new)
        slack_p = jnp.where(adding, slack_p, slacks[p_new])

        # The dual step: +1 on mu_p, -r on the active multipliers, with r the
        # coefficients of g_p on the active gradients (rows and columns off the
        # active set replaced by the identity, so r = 0 there), and the primal
        # step z = g_p - sum_j r_j g_j of squared norm z_sq.
        r = _active_solve(gs, active, gs[:, p], eye, jitter)
        z_sq = gs[p, p] - gs[p] @ r
        positive = active & (r > 0)
        ratios = jnp.where(positive, mu / jnp.where(positive, r, 1), jnp.inf)
        partial = jnp.min(ratios)
        # Ties: the constraint added first is dropped, as in the reference's list.
        drop = jnp.argmin(jnp.where(positive & (ratios == partial), stamp, never))
        # z = 0: g_p is a combination of the active gradients, no primal step.
        independent = z_sq > dependence_tol * gs[p, p]
        full = jnp.where(independent, -slack_p / jnp.where(independent, z_sq, 1), jnp.inf)
        step = jnp.minimum(partial, full)
        infeasible = ~stop & jnp.isinf(step)
        moving = ~stop & ~infeasible
        step = jnp.where(moving, step, 0)
        at_p = idx == p
        moved = mu - step * r + jnp.where(at_p, step, 0)
        add = full <= partial

        # Full step: p joins the active set. Partial step: drop a constraint
        # whose multiplier reached 0, and try adding p again.
        at_drop = idx == drop
        dropped = jnp.where(at_drop, 0, moved)
        mu_next = jnp.where(add, moved, dropped)
        active_next = jnp.where(add, active | at_p, active & ~at_drop)
        stamp_next = jnp.where(add & at_p, it, stamp)
        slack_next = gs[p] @ dropped - b[p]
        return (
            jnp.where(moving, mu_next, mu),
            jnp.where(moving, active_next, active),
            jnp.where(moving, stamp_next, stamp),
            p,
            jnp.where(moving, slack_next, slack_p),
            moving & ~add,
            stop | infeasible,
            infeasible,
            it + moving.astype(jnp.int32),
        )

    zero = jnp.asarray(0, jnp.int32)
    start = (
        jnp.zeros((n,), dtype),
        jnp.zeros((n,), bool),
        jnp.full((n,), never, jnp.int32),
        zero,
        jnp.zeros((), dtype),
        jnp.asarray(False),
        jnp.asarray(False),
        jnp.asarray(False),
        zero,
    )
    mu, *_, infeasible, _ = lax.while_loop(cond, body, start)
    mu = jnp.where(infeasible, 0, jnp.maximum(mu, 0))
    return jnp.concatenate([jnp.ones((1,), dtype), mu])


@engine.full_precision
def pcd_qp(
    gramian: jax.Array,
    tau: Any = 0.02,
    *,
    tol: float | None = None,
    max_iters: int | None = None,
) -> jax.Array:
    r"""The multipliers of PCD's quadratic program, from the Gramian.

    With :math:`G` the Gramian of :math:`g_1, \dots, g_K` (the primary task
    first), solves

    .. math::
      \min_d \tfrac12 \|d - g_1\|^2 \quad \text{s.t.} \quad
      g_j^\top d \ge \tau_j \|g_j\|^2, \quad j = 2, \dots, K

    and returns :math:`(1, \mu_2, \dots, \mu_K)` with :math:`\mu_j \ge 0` the
    KKT multipliers of the constraints, so that the minimizer is
    :math:`d = g_1 + \sum_j \mu_j g_j`; :math:`(1, 0, \dots, 0)` when the
    constraints are infeasible. The method is the dual active-set method of
    Goldfarb and Idnani (1983) for an identity Hessian, written with the
    Gramian only, in one ``lax.while_loop`` of at most ``max_iters`` steps,
    each adding or dropping one constraint (a masked linear solve on the
    active set). It is exact up to rounding: it stops when no constraint is
    violated by more than ``tol`` times the largest diagonal entry of
    :math:`G`, and counts a gradient as dependent on the active ones when its
    orthogonal component has a squared norm of at most ``tol`` times its own.

    Args:
      gramian: the ``[K, K]`` Gramian, the primary task first.
      tau: :math:`\tau`, a scalar or a ``[K - 1]`` vector.
      tol: the relative tolerance; default ``max(1e-9, 10 eps)`` of the
        computation dtype (1e-9 in float64, as TorchJD; 1.2e-6 in float32).
      max_iters: default ``10 K``, as TorchJD: a guard against cycling caused
        by rounding, at which the current iterate is returned.

    Returns:
      The ``[K]`` vector :math:`(1, \mu)`, in the Gramian's dtype (at least
      float32). A non-finite Gramian is the caller's to reject (see
      :func:`pcd_weights`).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtl_optax._pcd import pcd_qp
      >>> g = jnp.array([[1.0, -1.0], [0.0, 1.0]])  # g_1 = (1, -1), g_2 = (0, 1)
      >>> pcd_qp(g @ g.T, 0.5)  # g_2^T d >= 0.5 binds: d = g_1 + 1.5 g_2
      Array([1. , 1.5], dtype=float32)
    """
    gramian = jnp.asarray(gramian)
    dtype = jnp.promote_types(gramian.dtype, jnp.float32)
    gramian = gramian.astype(dtype)
    k = gramian.shape[0]
    _, default_tol = _tolerances(dtype)
    tol = default_tol if tol is None else tol
    max_iters = 10 * k if max_iters is None else int(max_iters)
    return _solve_qp(gramian, _taus(tau, k, dtype), tol, tol, max_iters)


@engine.full_precision
def pcd_weights(gramian: jax.Array, tau: Any = 0.02, scales: Any = None) -> jax.Array:
    r"""The PCD weights from the Gramian and the tasks' scales (see :func:`pcd`).

    With :math:`\tilde g_i = s_i g_i` (Gramian :math:`\tilde G = S G S`),
    :math:`(1, \mu) =` :func:`pcd_qp` :math:`(\tilde G, \tau)` and
    :math:`\tilde d = \tilde g_1 + \sum_j \mu_j \tilde g_j`:

    .. math::
      w = (1, \mu) \odot s \cdot \sqrt{G_{11} / \|\tilde d\|^2}

    so that :math:`\sum_k w_k g_k = \tilde d\, \|g_1\| / \|\tilde d\|`. The
    weights are 0 when :math:`g_1 = 0`, or when :math:`\|\tilde d\|^2` is at
    most ``10 eps`` of its rounding scale :math:`(\sum_k |w_k| \|\tilde
    g_k\|)^2`; they are ``(1, 0, ..., 0)`` when the constraints are
    infeasible; NaN when the Gramian is not finite.

    Args:
      gramian: the ``[K, K]`` Gramian, the primary task first.
      tau: :math:`\tau`, a scalar or a ``[K - 1]`` vector.
      scales: the ``[K]`` scales :math:`s \ge 0`; default :math:`1 / \|g_k\|`
        (0 for a zero gradient): PCD's first step with :math:`\epsilon = 0`.

    Returns:
      The ``[K]`` weights, in the Gramian's dtype (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from mtl_optax._pcd import pcd_weights
      >>> g = jnp.array([[1.0, 0.0], [0.0, 3.0]])  # orthogonal tasks
      >>> w = pcd_weights(g @ g.T, 0.75)  # d~ = e_1 + 0.75 e_2, rescaled to norm 1
      >>> w
      Array([0.8, 0.2], dtype=float32)
      >>> w @ g
      Array([0.8, 0.6], dtype=float32)
    """
    gramian = jnp.asarray(gramian)
    dtype = jnp.promote_types(gramian.dtype, jnp.float32)
    gramian = gramian.astype(dtype)
    k = gramian.shape[0]
    taus = _taus(tau, k, dtype)
    finite = jnp.all(jnp.isfinite(gramian))
    gramian = jnp.where(finite, gramian, 0)
    sq_norms = jnp.maximum(jnp.diagonal(gramian), 0)
    if scales is None:
        positive = sq_norms > 0
        scales = jnp.where(positive, lax.rsqrt(jnp.where(positive, sq_norms, 1)), 0)
    scales = jnp.where(finite, jnp.broadcast_to(jnp.asarray(scales).astype(dtype), (k,)), 0)
    # Rows first, then columns: s_i s_j alone can underflow (s ~ 1e-19 in float32).
    normalized = (scales[:, None] * gramian) * scales[None, :]
    precision, tol = _tolerances(dtype)
    w = _solve_qp(normalized, taus, tol, tol, 10 * k)
    # ||d~||^2 and the scale of its rounding error when it is read from the Gramian.
    sq_norm = w @ normalized @ w
    magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diagonal(normalized), 0))) ** 2
    ok = (sq_norms[0] > 0) & (sq_norm > precision * magnitude)
    factor = jnp.sqrt(jnp.where(ok, sq_norms[0], 1)) / jnp.sqrt(jnp.where(ok, sq_norm, 1))
    weights = jnp.where(ok, w * scales * factor, 0)
    return jnp.where(finite, weights, jnp.nan)


class PCDState(NamedTuple):
    """State of :func:`pcd`."""

    weights: jax.Array  # [K] float32: the weights of the last step, for logging.
    sq_norm_ema: jax.Array  # [K] EMA of the squared gradient norms, default float dtype.
    count: jax.Array  # int32 []: steps in the EMA (for its bias correction).


@register("pcd")
def pcd(
    tau: Any = 0.02, beta: float = 0.999, eps: float = 1e-8, num_tasks: int | None = None
) -> WeightedTransformation:
    r"""PCD: follow the primary task's gradient, with progress guaranteed to the others.

    Task 1 is the primary objective; tasks :math:`2, \dots, K` are secondary:

    .. math::
      \tilde d = \mathop{\mathrm{arg\,min}}_d \tfrac12 \|d - \tilde g_1\|^2
      \quad \text{s.t.} \quad \tilde g_j^\top d \ge \tau_j \|\tilde g_j\|^2,
      \quad j = 2, \dots, K, \qquad u = \frac{\|g_1\|}{\|\tilde d\|}\, \tilde d

    with :math:`\tilde g_k = s_k g_k` and :math:`s_k = 1 / \sqrt{\hat v_k +
    \epsilon}`, :math:`\hat v_k` the bias-corrected exponential moving average
    (decay :math:`\beta`) of :math:`\|g_k\|^2` over the steps, kept in the
    state. The program is solved exactly from the Gramian by the dual
    active-set method of Goldfarb and Idnani (:func:`pcd_qp`): :math:`\tilde d
    = \tilde g_1 + \sum_j \mu_j \tilde g_j` with the KKT multipliers
    :math:`\mu \ge 0`, so :math:`u = \sum_k w_k g_k` with the weights of
    :func:`pcd_weights`. Because of the normalization, :math:`\tau` is a
    scale-free fraction: multiplying a secondary task's gradient by the same
    :math:`c > 0` at every step leaves the update unchanged (up to
    :math:`\epsilon`), and scaling every gradient by :math:`c` scales the
    update by :math:`c`.

    Special cases (all finite):

    * :math:`g_1 = 0`: the update is 0 (the EMA is still updated);
    * infeasible constraints (:math:`K \ge 3`, e.g. two opposite secondary
      gradients, or collinear ones of both signs): the update is :math:`g_1`;
    * :math:`\tilde d = 0` up to the rounding of the Gramian (e.g.
      :math:`g_2 = -g_1` with :math:`\tau = 0`): the update is 0;
    * :math:`g_2 = -g_1` with :math:`\tau > 0`: :math:`\tilde d = -\tau
      \tilde g_1`, so the update is :math:`-g_1` (the constraint wins);
    * ``K = 1``: the update is :math:`g_1`;
    * a non-finite task gradient: NaN weights and update, and the EMA and
      step count are left unchanged.

    Args:
      tau: :math:`\tau \in [0, 1]`, the fraction of normalized first-order
        progress guaranteed to each secondary task: a float shared by all of
        them, or a vector of ``K - 1`` values (default 0.02, TorchJD's).
      beta: the EMA's decay :math:`\beta \in [0, 1)` (default 0.999).
      eps: :math:`\epsilon \ge 0`, added to the EMA before the inverse square
        root (default 1e-8). It is absolute: gradients of norm below about
        :math:`\sqrt\epsilon = 10^{-4}` are not fully normalized.
      num_tasks: ``K``, required: the state holds the ``[K]`` EMA from
        ``init`` on.

    Returns:
      A :class:`~mtl_optax.WeightedTransformation` (with ``.weighting`` and
      ``.per_task``, whose per-task output is :math:`w_k g_k`).

    Raises:
      ValueError: ``tau``, ``beta`` or ``eps`` out of range, ``tau`` a
        vector whose length is not ``K - 1``, or ``num_tasks`` missing; at
        update time, malformed task gradients or ``K`` other than
        ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.pcd(tau=0.75, num_tasks=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}  # primary first
      >>> u, state = tx.update(g, tx.init(params), params)
      >>> u["w"].round(6)  # d~ = e_1 + 0.75 e_2, rescaled to the norm of g_1
      Array([0.8, 0.6], dtype=float32)
      >>> state.weights.round(6)
      Array([0.8, 0.2], dtype=float32)

    References:
      `Not All Objectives Are Born Equal: Priority-Constrained Descent for
      Hierarchical Multi-Objective Optimization
      <https://openreview.net/forum?id=HT01yGHLEt>`_, TMLR 2026
      (`arXiv:2606.29521 <https://arxiv.org/abs/2606.29521>`_); official
      code: `DaraVaram/priority-constrained-descent
      <https://github.com/DaraVaram/priority-constrained-descent>`_.
      Reference implementation: TorchJD 0.18 ``PCD`` / ``PCDWeighting``
      (``torchjd/aggregation/_pcd.py``), which this follows step for step.
      Goldfarb and Idnani, `A numerically stable dual method for solving
      strictly convex quadratic programs
      <https://doi.org/10.1007/BF02591962>`_, Math. Programming 27 (1983).

    Differences from the references:
      The paper's code enumerates working sets (exponential in ``K``);
      TorchJD and this use the dual active-set method, which finds the same
      minimizer. TorchJD runs it on the CPU in float64 with Python branching;
      here it is one jitted ``lax.while_loop`` (it vmaps, and runs on the
      accelerator) in the accumulation dtype of the task gradients (float64
      for float64 leaves with ``jax_enable_x64``, float32 otherwise), with
      TorchJD's limit of ``10 K`` iterations. TorchJD's tolerances are
      ``10 eps`` of the Gramian's dtype (``precision``), and ``1e-9`` for the
      stopping and dependence tests while it solves in float64; here both
      tests use ``max(1e-9, 10 eps)`` of the dtype the program is solved in:
      identical in float64, and above float32's rounding in float32. TorchJD
      keeps the EMA in float64 and resets it when ``K`` changes; here ``K``
      is fixed and the EMA is kept in the default float dtype (float64 with
      ``jax_enable_x64``). The bias correction :math:`1 - \beta^t` is
      computed as ``-expm1(t log beta)`` (the same in exact arithmetic,
      accurate in float32 too), and the scales multiply the Gramian's rows,
      then its columns, so that :math:`s_i s_j` does not underflow for
      gradient norms up to float32's limit. TorchJD solves each active-set
      system with an LU factorization; here with a Cholesky factorization of
      its unit-diagonal form and one refinement step (the same solution to
      rounding; ties between multipliers reaching 0 drop the constraint
      added first, as TorchJD's list does).
    """
    traced_tau = is_traced(tau)
    if not traced_tau:
        tau_np = np.asarray(tau, np.float64)
        if tau_np.ndim > 1 or not np.all((tau_np >= 0.0) & (tau_np <= 1.0)):
            raise ValueError(
                f"{_NAME}: tau must be a float or a vector of floats in [0, 1]; found tau={tau!r}."
            )
        tau = float(tau_np) if tau_np.ndim == 0 else tau_np
    if not is_traced(beta):
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{_NAME}: beta must be in [0, 1); found beta={beta!r}.")
    if not is_traced(eps):
        eps = float(eps)
        if not eps >= 0.0 or not np.isfinite(eps):
            raise ValueError(f"{_NAME}: eps must be non-negative and finite; found eps={eps!r}.")
    k = check_num_tasks(_NAME, num_tasks)
    if k is None:
        raise ValueError(f"{_NAME} keeps the EMA of the squared gradient norms: pass num_tasks=K.")
    if np.ndim(tau) == 1 and np.shape(tau)[0] != k - 1:
        raise ValueError(
            f"{_NAME}: a vector tau needs one value per secondary task (K - 1 = {k - 1});"
            f" found {np.shape(tau)[0]} values."
        )

    def init() -> PCDState:
        return PCDState(
            weights=initial_weights(k),
            sq_norm_ema=jnp.zeros((k,), jnp.result_type(float)),
            count=jnp.zeros((), jnp.int32),
        )

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del value, num_tasks
        gramian = jnp.asarray(gramian).astype(dtype)
        finite = jnp.all(jnp.isfinite(gramian))
        ema_dtype = state.sq_norm_ema.dtype
        cdtype = jnp.promote_types(dtype, ema_dtype)
        sq_norms = jnp.where(finite, jnp.diagonal(gramian), 0).astype(cdtype)
        b = jnp.asarray(beta, cdtype)
        ema = b * state.sq_norm_ema.astype(cdtype) + (1 - b) * sq_norms
        count = jnp.minimum(state.count, _MAX_COUNT) + 1
        # 1 - beta^t, accurately (1 for beta = 0: log 0 = -inf).
        correction = -jnp.expm1(count.astype(cdtype) * jnp.log(b))
        denominators = jnp.sqrt(ema / correction + jnp.asarray(eps, cdtype))
        # A zero EMA (every gradient so far zero, eps = 0): scale 0.
        positive = denominators > 0
        scales = jnp.where(positive, 1 / jnp.where(positive, denominators, 1), 0)
        weights = pcd_weights(gramian, tau, scales.astype(dtype))
        new_state = PCDState(
            weights=weights.astype(jnp.float32),
            sq_norm_ema=jnp.where(finite, ema, state.sq_norm_ema).astype(ema_dtype),
            count=jnp.where(finite, count, state.count),
        )
        return weights, new_state

    return from_weighting(Weighting(name=_NAME, init=init, weights=weights_fn, num_tasks=k))
