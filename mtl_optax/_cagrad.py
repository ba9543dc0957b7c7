"""CAGrad: conflict-averse gradient descent, its dual solved in JAX.

CAGrad (Liu et al., NeurIPS 2021) looks for the update :math:`d` that
maximises the worst task's improvement :math:`\\min_k \\langle g_k, d\\rangle`
in a ball around the average gradient :math:`g_0`. Its dual is a small convex
problem over the probability simplex that only involves the Gramian
:math:`G = J J^\\top`, and the update is a linear combination of the task
gradients, so the method is written as a :class:`~mtl_optax.Weighting`: the
dual is solved by ``jaxopt.ProjectedGradient`` on the ``K x K`` problem inside
the jitted update (no scipy, no host round trip), or in closed form for two
tasks, and the engine combines the task gradients once.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtl_optax import engine
from mtl_optax.base import (
    PerTaskTransformation,
    WeightedTransformation,
    Weighting,
    from_weighting,
    initial_weights,
    is_traced,
)
from mtl_optax.registry import register

__all__ = ["CAGradState", "cagrad"]


# Default solver tolerances (see the ``tol`` argument of :func:`cagrad`).
_DEFAULT_TOL_F32 = 1e-5
_DEFAULT_TOL_F64 = 1e-8


class _Terms(NamedTuple):
    """The pieces of one CAGrad step (internal; see :func:`_cagrad_terms`).

    The update is ``mean_scale * g_0 + corr_scale * g_w`` with ``g_0`` the mean
    task gradient and ``g_w = sum_k dual_k g_k``; its weights are
    ``mean_scale / K + corr_scale * dual``.
    """

    dual: jax.Array  # [K] solution of the dual, on the simplex.
    mean_scale: jax.Array  # scalar: rescale factor, or 0 where the update is zero.
    corr_scale: jax.Array  # scalar: rescale factor * lambda.
    objective: jax.Array  # scalar: the dual objective F(dual) (in G's units).
    iterations: jax.Array  # int32 scalar: solver iterations.
    error: jax.Array  # scalar: solver's last error (distance between iterates / step).


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` with a zero (finite) derivative at and below 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _dual_objective(w: jax.Array, gram: jax.Array, c: jax.Array, eps: jax.Array) -> jax.Array:
    """F(w) = w^T G 1/K + c sqrt(w^T G w + eps), with a safe subgradient at g_w = 0."""
    return jnp.mean(gram @ w) + c * _safe_sqrt(w @ gram @ w + eps)


def _solve_dual(
    gram: jax.Array, c: jax.Array, eps: jax.Array, *, max_iter: int, tol: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Minimises :func:`_dual_objective` over the simplex (jaxopt projected gradient).

    ``gram``, ``c`` and ``eps`` are already normalised (see
    :func:`_cagrad_terms`). Returns ``(w, iterations, error)``.
    """
    with warnings.catch_warnings():
        # jaxopt warns on import that it is no longer maintained.
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
        from jaxopt.projection import projection_simplex

    k = gram.shape[0]
    solver = jaxopt.ProjectedGradient(
        fun=_dual_objective,
        projection=projection_simplex,
        maxiter=max_iter,
        tol=tol,
        # Up to 2^-30 per line search: ill-conditioned Gramians (task norms
        # 1e-4 against 1e3) need tiny steps, and jaxopt resets a step below
        # 1e-6 to 1 at the next iteration.
        maxls=30,
        # No FISTA: its stopping test (distance between successive iterates)
        # can fire at a non-optimal vertex of the simplex.
        acceleration=False,
        implicit_diff=False,
        jit=True,
        # A lax.while_loop that stops at convergence. jaxopt's default without
        # implicit differentiation ("auto") unrolls: a scan over all max_iter
        # iterations, each masked by a lax.cond once converged. Free on CPU;
        # on an H100 each masked step costs ~30 us, 31-51 ms for a solve that
        # converges in 10-30 iterations (torchjd's host-side cvxpy: 9-16 ms).
        unroll=False,
    )
    w0 = jnp.full((k,), 1.0 / k, gram.dtype)
    params, state = solver.run(w0, None, gram, c, eps)
    return params, state.iter_num.astype(jnp.int32), state.error


def _solve_dual_two(gram: jax.Array, c: jax.Array, eps: jax.Array) -> jax.Array:
    r"""Minimises :func:`_dual_objective` over the 2-simplex in closed form.

    With :math:`w = (1 - t, t)` and :math:`G = [[a, b], [b, d]]` the dual is
    the convex function of one variable
    :math:`F(t) = L + \ell t + c\sqrt{Q(t)}` with slope
    :math:`\ell = (d - a) / 2` and :math:`Q(t) = \alpha t^2 + \beta t +
    \gamma`, :math:`\alpha = a - 2b + d = \|g_1 - g_2\|^2`,
    :math:`\beta = 2(b - a)`, :math:`\gamma = a + \epsilon`. Since
    :math:`Q'^2 = 4\alpha Q - D` with :math:`D = 4\alpha\gamma - \beta^2 \ge
    0`, the stationarity condition :math:`\ell + c Q' / (2\sqrt{Q}) = 0`
    reads :math:`Q'^2 (c^2\alpha - \ell^2) = \ell^2 D`: when
    :math:`c^2\alpha > \ell^2`, :math:`Q'(t^\star) = -\ell
    \sqrt{D / (c^2\alpha - \ell^2)}` and :math:`t^\star = (Q' - \beta) /
    (2\alpha)`, clipped to :math:`[0, 1]` (the minimiser of a convex function
    of one variable over an interval); otherwise :math:`|c Q' / (2\sqrt{Q})|
    \le c\sqrt{\alpha} \le |\ell|`, :math:`F` is monotone and the minimum is
    the vertex :math:`t = 0` (:math:`\ell > 0`) or :math:`t = 1`
    (:math:`\ell < 0`); with :math:`\ell = 0` too, :math:`F` is constant and
    :math:`t = 1/2`, the iterative solver's starting point.
    """
    a, b, d = gram[0, 0], gram[0, 1], gram[1, 1]
    slope = (d - a) / 2
    alpha = jnp.maximum(a - 2 * b + d, 0)
    beta = 2 * (b - a)
    disc = jnp.maximum(4 * alpha * (a + eps) - beta**2, 0)
    denom = c**2 * alpha - slope**2
    inside = denom > 0
    dq = -slope * jnp.sqrt(disc / jnp.where(inside, denom, 1))
    t_inside = (dq - beta) / (2 * jnp.where(inside, alpha, 1))
    t_vertex = jnp.where(slope > 0, 0.0, jnp.where(slope < 0, 1.0, 0.5)).astype(gram.dtype)
    t = jnp.clip(jnp.where(inside, t_inside, t_vertex), 0, 1)
    return jnp.stack([1 - t, t])


@partial(
    jax.jit,
    static_argnames=("max_iter", "tol", "safeguard"),
)
def _cagrad_terms(
    gram: jax.Array,
    *,
    alpha: float | jax.Array,
    rescale: int | jax.Array,
    eps: float | jax.Array,
    norm_eps: float | jax.Array,
    max_iter: int,
    tol: float | None,
    dual: jax.Array | None = None,
    safeguard: bool = True,
) -> _Terms:
    """Solves the CAGrad dual on the Gramian and returns the step's pieces.

    Jitted as a whole, so that an eager update reuses the compiled solver and
    gives bitwise the same result as a jitted one (rounding differences in
    the normalisation would otherwise move the solver's path). Everything is
    computed in ``gram.dtype``. If ``dual`` is given, the solver
    is skipped and the update formula is applied to it (used by the tests to
    replay a reference's dual weights); ``safeguard=False`` skips the
    safeguard (the references' plain formula).
    """
    dtype = gram.dtype
    k = gram.shape[0]
    tiny = jnp.finfo(dtype).eps
    # Hyperparameters are traced (not static), so that changing them does not
    # recompile the solver.
    alpha = jnp.asarray(alpha, dtype)
    eps = jnp.asarray(eps, dtype)
    norm_eps = jnp.asarray(norm_eps, dtype)
    if tol is None:
        tol = _DEFAULT_TOL_F64 if dtype == jnp.float64 else _DEFAULT_TOL_F32
    # ||g_0|| and the ball radius c ||g_0|| (official code: both with + eps).
    # ||g_0||^2 = u^T G u with u = 1/K: each entry is scaled before it is
    # summed, so no intermediate exceeds max |G_ij| (jnp.mean(gram) sums the
    # K^2 entries first, which overflows float32 for 64 equal tasks of norm 1e18).
    uniform = jnp.full((k,), 1.0 / k, dtype)
    g0_norm = _safe_sqrt(uniform @ gram @ uniform + eps)
    c = alpha * g0_norm + eps

    # Solve on G / s, s = max(mean squared task-gradient norm, eps): the same
    # argmin, an O(1) objective, so the solver's tolerance is relative. The
    # mean is u^T diag(G), again scaled before summed (trace(G) / K overflows
    # float32 once the K squared norms sum past 3.4e38).
    mean_sq = jnp.diagonal(gram) @ uniform
    s = jnp.maximum(mean_sq, eps)
    s = jnp.where(s > 0, s, jnp.ones((), dtype))
    if dual is None:
        args = (
            # Not gram / s: XLA makes it gram * (1 / s), zero for s > 2^126.
            engine.divide_by_scalar(lax.stop_gradient(gram), lax.stop_gradient(s)),
            lax.stop_gradient(c / jnp.sqrt(s)),
            eps / lax.stop_gradient(s),
        )
        if k == 2:
            w = _solve_dual_two(*args)
            iterations, error = jnp.zeros((), jnp.int32), jnp.zeros((), dtype)
        else:
            w, iterations, error = _solve_dual(*args, max_iter=max_iter, tol=tol)
        w = lax.stop_gradient(w)
    else:
        w = jnp.asarray(dual, dtype)
        iterations, error = jnp.zeros((), jnp.int32), jnp.zeros((), dtype)

    q = w @ gram @ w  # ||g_w||^2
    gw_norm = _safe_sqrt(q)
    objective = uniform @ gram @ w + c * _safe_sqrt(q + eps)
    factor = jnp.where(
        rescale == 0, 1.0, jnp.where(rescale == 1, 1.0 / (1.0 + alpha**2), 1.0 / (1.0 + alpha))
    ).astype(dtype)

    # TorchJD's rule (norm_eps > 0): the update is zero when ||J||_F^2 <
    # norm_eps, or when ||g_w|| / ||J||_F < norm_eps (approximately Pareto
    # stationary); no safeguard.
    # ||J||_F^2 = trace(G) = K mean_sq; the tests are written on mean_sq so that
    # they hold where the trace itself would overflow.
    torchjd_ok = (mean_sq >= norm_eps / k) & (q >= (k * norm_eps**2) * mean_sq) & (q > 0)
    torchjd_lam = c / jnp.where(torchjd_ok, gw_norm, 1.0)

    # Otherwise: with eps > 0 the official formula (eps keeps the division
    # finite); with eps = 0, ||g_w|| at rounding level means that zero is in
    # the convex hull of the g_k and the direction of g_w is noise: the
    # correction is dropped.
    ok = (eps > 0) | (q > tiny * jnp.max(jnp.diagonal(gram)))
    lam = jnp.where(ok, c / jnp.where(ok, gw_norm + eps, 1.0), 0.0)
    # Safeguard (see "Degenerate cases" in cagrad's docstring): keep the
    # candidate update with the best worst-case improvement min_k <g_k, d>,
    # among d (the paper's), g_0 and, when it lies in the ball (alpha >= 1), 0.
    # d wins unless another is better beyond rounding.
    coef = 1.0 / k + lam * w
    worst_d = jnp.min(gram @ coef)
    worst_mean = jnp.min(gram @ uniform)
    margin = 4 * k * tiny * jnp.max(jnp.abs(gram)) * (1.0 + lam)
    use_mean = (worst_mean > worst_d + margin) & safeguard
    use_zero = (alpha >= 1) & (worst_d + margin < 0) & (worst_mean + margin < 0) & safeguard

    torchjd = norm_eps > 0
    mean_scale = jnp.where(
        torchjd, jnp.where(torchjd_ok, factor, 0.0), jnp.where(use_zero, 0.0, factor)
    )
    corr_scale = jnp.where(
        torchjd,
        jnp.where(torchjd_ok, factor * torchjd_lam, 0.0),
        jnp.where(use_zero | use_mean, 0.0, factor * lam),
    )
    return _Terms(
        dual=w,
        mean_scale=mean_scale.astype(dtype),
        corr_scale=corr_scale.astype(dtype),
        objective=objective,
        iterations=iterations,
        error=error.astype(dtype),
    )


class CAGradState(NamedTuple):
    """State of :func:`cagrad` (logging only: CAGrad is stateless)."""

    weights: jax.Array  # [K] float32: the update is sum_k weights_k g_k.
    dual_weights: jax.Array  # [K] float32: the dual solution w on the simplex.
    solver_iterations: jax.Array  # int32 scalar: iterations of the dual solver.
    solver_error: jax.Array  # float32 scalar: the solver's last error (vs tol).


@register("cagrad")
def cagrad(
    alpha: float = 0.5,
    rescale: int = 1,
    *,
    eps: float = 0.0,
    norm_eps: float = 0.0,
    max_iter: int = 1000,
    tol: float | None = None,
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""Conflict-averse gradient descent (CAGrad).

    .. math::
      w^\star = \operatorname*{arg\,min}_{w \in \Delta_K}\;
        g_w^\top g_0 + c\,\|g_0\|\,\|g_w\|, \qquad
      g_0 = \frac{1}{K}\sum_k g_k, \quad g_w = \sum_k w_k g_k,

      d = g_0 + \frac{c\,\|g_0\|}{\|g_w^\star\|}\, g_w^\star, \qquad
      u = \begin{cases} d & \text{rescale} = 0 \\ d / (1 + c^2) & \text{rescale} = 1
        \\ d / (1 + c) & \text{rescale} = 2 \end{cases}

    with :math:`c` = ``alpha``. :math:`d` solves
    :math:`\max_d \min_k \langle g_k, d\rangle` subject to
    :math:`\|d - g_0\| \le c\,\|g_0\|` (the paper's primal problem): the update
    stays within :math:`c\|g_0\|` of the average gradient and maximises the
    worst task's improvement, whose optimal value is the dual minimum above.
    Every inner product comes from the Gramian
    (:math:`g_w^\top g_0 = w^\top G \mathbf{1}/K`,
    :math:`\|g_w\|^2 = w^\top G w`, :math:`\|g_0\|^2 = \mathrm{mean}(G)`), so
    the dual is solved in the ``K x K`` world by ``jaxopt.ProjectedGradient``
    (projection onto the simplex, backtracking line search, started at
    :math:`w = \mathbf{1}/K`) inside the jitted update; for :math:`K = 2` it
    is a convex problem in one variable, solved in closed form (a quadratic
    stationarity condition, no iterations; ``solver_iterations`` is then 0).
    The update is
    :math:`u = \sum_k \big(\tfrac{1}{K} + \lambda w^\star_k\big) g_k` times the
    rescale factor, with :math:`\lambda = c\|g_0\| / \|g_w^\star\|`.

    The per-task form ``tx.per_task`` (vambn's) returns
    :math:`(g_k + \lambda g_w) / K` for task :math:`k`, times the rescale
    factor; its sum over the tasks is the update.

    Args:
      alpha: :math:`c \ge 0`, the radius of the ball around :math:`g_0`
        relative to :math:`\|g_0\|` (LibMTL ``calpha``, default 0.5; TorchJD
        ``c``, no default; vambn ``alpha``, default 10). ``alpha=0`` gives the
        mean gradient.
      rescale: 0, 1 or 2: the update is :math:`d`, :math:`d / (1 + c^2)` or
        :math:`d / (1 + c)`, as in the official code and LibMTL (default 1).
        TorchJD and vambn do not rescale: use 0 to match them.
      eps: the official code's stabiliser (LibMTL and vambn use ``1e-8``):
        :math:`\|g_0\| = \sqrt{\mathrm{mean}(G) + \epsilon}`, radius
        :math:`r = c\|g_0\| + \epsilon`, dual term
        :math:`r\sqrt{w^\top G w + \epsilon}` and
        :math:`\lambda = r / (\|g_w\| + \epsilon)`. Default 0: the paper's
        formula, whose update scales with the gradients
        (:math:`u(tJ) = t\,u(J)`); with ``eps > 0`` it does not for gradients
        of squared norm near ``eps`` or below.
      norm_eps: when positive, TorchJD's rule for degenerate cases (TorchJD's
        default is ``1e-4``): the update is zero when
        :math:`\|J\|_F^2 = \mathrm{tr}(G) < \text{norm\_eps}` or
        :math:`\|g_w\| < \text{norm\_eps}\,\|J\|_F`, and the safeguard below is
        off. Default 0: see "Degenerate cases".
      max_iter: maximum number of iterations of the dual solver (``K >= 3``).
      tol: (``K >= 3``) the solver's tolerance on its fixed-point residual
        :math:`\|w_{t+1} - w_t\| / \text{step}`, for the dual normalised by the
        mean squared task-gradient norm (so it does not depend on the
        gradients' scale). Default (``None``): ``1e-5`` when the computation is
        in float32 (float32, bfloat16 and float16 leaves), ``1e-8`` in float64;
        the dual objective then lies within about ``1e-6`` (float32) or
        ``1e-8`` (float64) of its minimum, relative to the mean squared norm,
        and the update to at worst about the square root of that. Near the kink
        :math:`g_w = 0` (degenerate cases) the solver may stop at
        ``max_iter`` instead.
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on; without it the
        state's fields change shape at the first update.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.WeightedTransformation`); its state is a
      :class:`CAGradState`.

    Raises:
      ValueError: ``alpha``, ``eps`` or ``norm_eps`` negative or not finite,
        ``rescale`` not in {0, 1, 2}, ``max_iter < 1`` or ``tol <= 0``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("cagrad", alpha=0.5, rescale=0)
      >>> g = {"w": jnp.array([[1.0, 0.0], [-0.5, 1.0]])}  # conflicting tasks
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> g0 = g["w"].mean(0)
      >>> # d lies on the sphere of radius alpha * ||g0|| around g0 ...
      >>> bool(jnp.isclose(jnp.linalg.norm(u["w"] - g0), 0.5 * jnp.linalg.norm(g0)))
      True
      >>> # ... and its worst-case improvement beats the mean gradient's.
      >>> bool(jnp.min(g["w"] @ u["w"]) > jnp.min(g["w"] @ g0))
      True

    Degenerate cases:
      When zero lies in the convex hull of the task gradients (a zero task,
      opposite gradients, ``K`` larger than the number of parameters, a
      Pareto-stationary point) the dual minimum can have :math:`g_w = 0`; the
      paper's :math:`d` is then undefined and, near it, the direction of the
      solver's :math:`g_w` is numerical noise (the references return noise
      there too). Two rules keep the update finite and meaningful:

      * when :math:`\|g_w\|^2 \le \varepsilon \max_k \|g_k\|^2`
        (:math:`\varepsilon` the machine epsilon of the computation dtype;
        ``eps = 0`` only) the correction is dropped: :math:`d = g_0`, which is
        also the official formula's value at :math:`g_w = 0`;
      * safeguard: the update is the candidate with the largest worst-case
        improvement :math:`\min_k \langle g_k, \cdot\rangle` (computed from
        :math:`G`) among :math:`d`, :math:`g_0` and, when :math:`c \ge 1` (so
        that it lies in the ball), :math:`0`; :math:`d` is kept unless another
        is better beyond rounding. At the exact dual optimum :math:`d` is the
        best (it solves the primal problem), so this changes nothing in
        non-degenerate cases; in degenerate ones it returns :math:`g_0` or
        :math:`0`, whichever is better in the worst case (:math:`0` is
        primal-optimal whenever zero is in the convex hull and
        :math:`c \ge 1`). It also guarantees, up to rounding,
        :math:`\min_k \langle g_k, u\rangle \ge s \min_k \langle g_k,
        g_0\rangle` with :math:`s` the rescale factor.

    References:
      Liu, Liu, Jin, Stone, Liu, `Conflict-Averse Gradient Descent for
      Multi-task Learning <https://arxiv.org/abs/2110.14048>`_, NeurIPS 2021
      (Algorithm 1; official code https://github.com/Cranial-XIX/CAGrad).
      LibMTL ``CAGrad`` (``calpha``, ``rescale``); TorchJD ``CAGrad(c,
      norm_eps)``; vambn ``CAGrad(alpha)``
      (``nfdi4health/docker-vambn``, ``vambn.modelling.mtl``).

    Differences from the references:
      * Solver: projected gradient with backtracking on the normalised dual
        (the objective divided by the mean squared task-gradient norm, so the
        tolerance is scale-free), in JAX, instead of scipy SLSQP with
        finite-difference gradients and an absolute ``ftol`` of 1e-6 (official
        code, LibMTL, vambn; it stops far from the optimum for large
        gradients) or cvxpy/CLARABEL (TorchJD); for 2 tasks the exact
        minimiser in closed form. No FISTA acceleration: its
        stopping test (distance between successive iterates) can fire at a
        non-optimal vertex of the simplex. The parity tests check that the
        objective reached is no worse than the references'.
      * The default ``eps=0`` is the paper's formula; the official code,
        LibMTL and vambn add ``1e-8`` in four places (``eps=1e-8`` reproduces
        them), which changes the update for small gradients.
      * TorchJD's ``CAGrad(c, norm_eps)`` equals ``cagrad(alpha=c, rescale=0,
        norm_eps=norm_eps)`` (its normalisation of :math:`G` by
        :math:`\mathrm{tr}(G)` leaves :math:`\lambda` unchanged). At its
        default ``norm_eps=1e-4`` the update is zero for every Jacobian with
        :math:`\|J\|_F < 10^{-2}`, whatever the conflict; that rule is off by
        default here.
      * The safeguard of "Degenerate cases" (not in the references) replaces
        :math:`d` by :math:`g_0` or :math:`0` where those are better in the
        worst case, i.e. where :math:`d` comes from a noisy or unconverged
        dual (e.g. SLSQP's answer for gradients of very different
        magnitudes).
      * LibMTL only runs with exactly 3 tasks (a hard-coded reshape) and in
        float32; vambn rounds :math:`w` to float32 before the update. Here any
        ``K``, in the computation dtype.
      * The dual weights are not differentiated through (``stop_gradient``):
        differentiating the update treats :math:`w^\star` as a constant.
        TorchJD's CAGrad is not differentiable at all.
    """
    if not is_traced(alpha):
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"cagrad: alpha must be a finite number >= 0; got {alpha!r}.")
        alpha = float(alpha)
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad: rescale must be 0, 1 or 2; got {rescale!r}.")
    for name, val in (("eps", eps), ("norm_eps", norm_eps)):
        if not (math.isfinite(val) and val >= 0):
            raise ValueError(f"cagrad: {name} must be a finite number >= 0; got {val!r}.")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"cagrad: max_iter must be an integer >= 1; got {max_iter!r}.")
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"cagrad: tol must be None or a finite number > 0; got {tol!r}.")
    eps, norm_eps = float(eps), float(norm_eps)
    tol = None if tol is None else float(tol)
    options = dict(
        alpha=alpha,
        rescale=int(rescale),
        eps=eps,
        norm_eps=norm_eps,
        max_iter=int(max_iter),
        tol=tol,
    )

    def state_of(terms: _Terms, weights: jax.Array) -> CAGradState:
        return CAGradState(
            weights=weights.astype(jnp.float32),
            dual_weights=terms.dual.astype(jnp.float32),
            solver_iterations=terms.iterations,
            solver_error=terms.error.astype(jnp.float32),
        )

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del state, value
        terms = _cagrad_terms(gramian.astype(dtype), **options)
        weights = terms.mean_scale / num_tasks + terms.corr_scale * terms.dual
        return weights, state_of(terms, weights)

    def init_state() -> CAGradState:
        return CAGradState(
            weights=initial_weights(num_tasks),
            dual_weights=initial_weights(num_tasks),
            solver_iterations=jnp.zeros((), jnp.int32),
            solver_error=jnp.full((), jnp.nan, jnp.float32),
        )

    tx = from_weighting(
        Weighting(name="cagrad", init=init_state, weights=weights_fn, num_tasks=num_tasks)
    )

    @engine.full_precision
    def per_task_update_fn(
        updates: Any,
        state: Any,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, CAGradState]:
        del state, extra_args
        k = engine.check_task_grads(updates, params, num_tasks=num_tasks, method="cagrad")
        if value is not None:
            engine.check_value(value, k, method="cagrad")
        dtype = engine.tree_accumulation_dtype(updates)
        terms = _cagrad_terms(engine.gramian(updates).astype(dtype), **options)
        weights = terms.mean_scale / k + terms.corr_scale * terms.dual

        def one(leaf):
            acc = jnp.promote_types(engine.accumulation_dtype(leaf.dtype), dtype)
            x = leaf.astype(acc)
            gw = jnp.tensordot(terms.dual.astype(acc), x, axes=1)
            out = (terms.mean_scale.astype(acc) * x + terms.corr_scale.astype(acc) * gw) / k
            return out.astype(leaf.dtype)

        return jax.tree_util.tree_map(one, updates), state_of(terms, weights)

    tx.per_task = PerTaskTransformation("cagrad", tx.init, per_task_update_fn)
    return tx
