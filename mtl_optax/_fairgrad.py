r"""Fair shares of the update: ``fairgrad`` (:math:`\alpha`-fairness) and ``nash_mtl``.

Both methods choose the update :math:`d = J^\top w = \sum_k w_k g_k` by the
share :math:`\langle g_k, d\rangle = (G w)_k` of the first-order decrease it
gives each task. FairGrad asks the shares to be :math:`\alpha`-fair,
:math:`(G w)_k = w_k^{-1/\alpha}` (Ban & Ji, 2024); Nash-MTL asks for the Nash
bargaining solution, :math:`w_k (G w)_k = 1`, which is the case
:math:`\alpha = 1` (Navon et al., 2022). Both are rules in the ``K x K`` world
(:class:`~mtl_optax.base.Weighting`) on one solver,
:func:`mtl_optax.solvers.solve_alpha_fair`: Newton's method on a strictly
convex function, jitted, where the references call scipy's ``least_squares``
(FairGrad) or a sequence of cvxpy/ECOS problems (Nash-MTL) on the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mtl_optax import solvers
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    from_weighting,
    initial_weights,
    is_traced,
)
from mtl_optax.registry import register

__all__ = ["FairGradState", "NashMTLState", "fairgrad", "nash_mtl"]


class FairGradState(NamedTuple):
    """State of :func:`fairgrad`."""

    weights: jax.Array  # [K] weights of the last step, for logging.


@register("fairgrad")
def fairgrad(
    alpha: float,
    num_tasks: int | None = None,
    *,
    reg_eps: float = 1e-8,
    max_iter: int = 100,
) -> WeightedTransformation:
    r"""FairGrad: the update whose per-task decreases are :math:`\alpha`-fair.

    With the Gramian :math:`G = J J^\top` and :math:`\alpha > 0`:

    .. math::
      w \in \mathbb{R}^K_{>0}: \quad (G w)_k = w_k^{-1/\alpha} \;\; (k = 1, \dots, K),
      \qquad u = \sum_{k=1}^K w_k\, g_k

    so that :math:`\langle g_k, u\rangle = w_k^{-1/\alpha}` (Ban & Ji 2024,
    Equation 4, the step of their Algorithm 1): the update maximises the
    :math:`\alpha`-fair utility :math:`\sum_k \frac{\langle g_k,
    u\rangle^{1-\alpha}}{1-\alpha}` of the per-task decreases under a norm
    constraint. :math:`\alpha = 1` is proportional fairness (Nash-MTL's
    weights, without its norm clipping, see :func:`nash_mtl`), larger
    :math:`\alpha` moves towards max-min fairness, and :math:`\alpha = 0` is
    the linear scalarisation: the weights :math:`1/K`. The weights come from
    :func:`mtl_optax.solvers.solve_alpha_fair` (Newton's method, converged to
    rounding in about 5 to 20 iterations, fewer when warm-started from the
    last step's weights, as here: the weights do not depend on the start).

    The weights are invariant to each task's scale in the sense that a task of
    small norm gets a large weight: for orthogonal gradients :math:`w_k =
    \lVert g_k\rVert^{-2/(1+1/\alpha)}`. Degenerate Gramians (two opposite
    gradients, a task with a zero gradient, collinear gradients of both
    signs) have no exact solution; the solver's relative regularisation
    ``reg_eps`` gives a finite one (see
    :func:`~mtl_optax.solvers.solve_alpha_fair`): a zero task gets a large
    weight on its zero gradient, and two opposite gradients equal weights (an
    update of 0). ``K = 1`` gives :math:`u = \lVert g\rVert^{-2\alpha/(1+\alpha)}
    g`.

    Args:
      alpha: :math:`\alpha \ge 0`, a Python number. TorchJD requires it (no
        default); the paper's experiments use values from 0.5 to 10.
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on.
      reg_eps: the solver's relative regularisation :math:`\delta` (default
        1e-8, at least :math:`4 K \epsilon` of the dtype); ``0`` solves the
        exact condition, as TorchJD does.
      max_iter: cap on the solver's Newton iterations (default 100).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`).

    Raises:
      ValueError: ``alpha``, ``reg_eps``, ``max_iter`` or ``num_tasks`` out of
        range; at update time, malformed task gradients or ``K`` other than
        ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.fairgrad(alpha=1.0, num_tasks=2)
      >>> g = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}  # orthogonal, norms 2 and 1
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> state.weights.round(4)  # w_k = ||g_k||^(-2 alpha / (1 + alpha)): 1 / ||g_k|| here
      Array([0.5, 1. ], dtype=float32)
      >>> u["w"].round(4)  # each task decreases by <g_k, u> = 1 / w_k
      Array([1., 1.], dtype=float32)

    References:
      Ban & Ji, `Fair Resource Allocation in Multi-Task Learning
      <https://arxiv.org/abs/2402.15638>`_, ICML 2024. Reference
      implementation: TorchJD ``FairGrad`` / ``FairGradWeighting`` (adapted
      from the authors' OptMN-Lab/fairgrad), which solves the condition with
      ``scipy.optimize.least_squares`` (bounds ``w >= 0``, start :math:`1/K`).

    Differences from the references:
      * TorchJD stops ``least_squares`` at its default tolerances (``ftol =
        xtol = gtol = 1e-8``, at most ``100 K`` evaluations, TorchJD's
        ``max_iters``): on ill-conditioned or badly scaled Gramians its
        weights can be far from the solution (relative residuals of
        :math:`10^{-3}` to :math:`10` were measured on random problems), where
        the Newton solver here converges to rounding. Where TorchJD's
        solution is accurate the weights agree (live parity test, float64).
      * The regularisation ``reg_eps`` (TorchJD: none) only matters where
        :math:`G` is singular or nearly so.
    """
    _check(alpha, reg_eps, max_iter)
    k = check_num_tasks("fairgrad", num_tasks)
    alpha, reg_eps, max_iter = float(alpha), float(reg_eps), int(max_iter)

    def weights(gramian: Any, state: Any, value: Any, *, num_tasks: int, dtype: Any):
        del value
        # Warm start from the last step's weights (NaN before the first step).
        last = state.weights if state.weights.shape == (num_tasks,) else None
        w = solvers.alpha_fair_weights(
            gramian.astype(dtype), alpha, reg_eps=reg_eps, max_iter=max_iter, init=last
        )
        return w, FairGradState(weights=w.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name="fairgrad",
            init=lambda: FairGradState(weights=initial_weights(k)),
            weights=weights,
            num_tasks=k,
        )
    )


def _check(alpha: Any, reg_eps: Any, max_iter: Any, name: str = "fairgrad") -> None:
    for arg, val in (("alpha", alpha), ("reg_eps", reg_eps), ("max_iter", max_iter)):
        if is_traced(val) or not isinstance(val, int | float | np.number):
            raise TypeError(
                f"{name}: {arg} must be a Python number (it is fixed when the update is"
                f" traced; with optax.inject_hyperparams, list it in static_args); found"
                f" {type(val).__name__}."
            )
    solvers._check_alpha_fair_args(alpha, reg_eps, max_iter, name)


class NashMTLState(NamedTuple):
    """State of :func:`nash_mtl`."""

    count: jax.Array  # int32 number of updates done so far.
    alpha: jax.Array  # [K] the Nash weights of the last solve (before the norm clipping).
    weights: jax.Array  # [K] weights used in the last step (after the clipping), for logging.


@register("nash_mtl")
def nash_mtl(
    num_tasks: int,
    *,
    max_norm: float = 1.0,
    update_weights_every: int = 1,
    reg_eps: float = 1e-8,
    max_iter: int = 100,
) -> WeightedTransformation:
    r"""Nash-MTL: the Nash bargaining solution of the tasks, with a norm cap.

    With the Gramian :math:`G = J J^\top`, every ``update_weights_every``
    steps the weights are recomputed as the Nash bargaining solution

    .. math::
      \alpha \in \mathbb{R}^K_{>0}: \quad \alpha_k\, (G \alpha)_k = 1
      \;\; (k = 1, \dots, K),

    the maximiser of :math:`\sum_k \log \langle g_k, d\rangle` over
    :math:`\lVert d\rVert \le 1`, scaled (Navon et al. 2022, Theorem 5.1);
    the steps in between reuse the last :math:`\alpha`. The update is

    .. math::
      u = c \sum_{k=1}^K \alpha_k\, g_k, \qquad
      c = \min\Bigl(1, \frac{\text{max\_norm}}{\lVert J^\top \alpha\rVert}\Bigr)

    (no cap for ``max_norm = 0``). At the solution :math:`\lVert J^\top
    \alpha\rVert^2 = \alpha^\top G \alpha = K`, so with the default cap of 1
    every update has norm 1 (for ``K >= 2``): the method sets the direction
    and the optimiser's learning rate the step. The weights :math:`c\,\alpha`
    are :func:`fairgrad`'s with :math:`\alpha_{\text{fair}} = 1`, from
    :func:`mtl_optax.solvers.solve_alpha_fair`; degenerate Gramians (opposite
    or zero gradients) get its regularised, finite solution, which the cap
    then scales.

    Args:
      num_tasks: ``K`` (required, as in the references: the state holds the
        last :math:`\alpha`).
      max_norm: the cap on the update's norm (default 1.0, the references');
        ``0`` disables it. May be scheduled with ``optax.inject_hyperparams``.
      update_weights_every: solve for new weights every this many steps
        (default 1), reusing the last :math:`\alpha` in between (the cap is
        recomputed at every step).
      reg_eps: the solver's relative regularisation (default 1e-8; see
        :func:`~mtl_optax.solvers.solve_alpha_fair`).
      max_iter: cap on the solver's Newton iterations (default 100).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`).

    Raises:
      ValueError: a hyperparameter out of range; at update time, malformed
        task gradients or ``K`` other than ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.nash_mtl(num_tasks=2, max_norm=0.0)
      >>> g = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}  # orthogonal, norms 2 and 1
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> state.weights.round(4)  # alpha_k = 1 / ||g_k||
      Array([0.5, 1. ], dtype=float32)
      >>> u["w"].round(4)  # <g_k, u> = 1 / alpha_k
      Array([1., 1.], dtype=float32)

    References:
      Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya,
      `Multi-Task Learning as a Bargaining Game
      <https://arxiv.org/abs/2202.01017>`_, ICML 2022 (Algorithm 1).
      Reference implementation: TorchJD ``NashMTL`` (adapted from the authors'
      AvivNavon/nash-mtl), defaults ``max_norm=1.0``,
      ``update_weights_every=1``, ``optim_niter=20``.

    Differences from the references:
      * The references approach the solution by a sequence of convex problems
        (the paper's concave-convex procedure, up to ``optim_niter = 20``
        cvxpy/ECOS solves on the host, warm-started from the last
        :math:`\alpha`); here Newton's method solves the condition itself to
        rounding. On regular Gramians TorchJD's weights agree to its own
        accuracy (live parity test, float64); ``optim_niter`` has no
        counterpart (``max_iter`` caps Newton's iterations).
      * Where ECOS fails, TorchJD keeps the last :math:`\alpha` (and returns
        the initial ones, all 1, if it never succeeded); here a singular
        Gramian gets the regularised solution.
    """
    k = check_num_tasks("nash_mtl", num_tasks)
    if k is None:
        raise ValueError("nash_mtl: num_tasks is required (the state holds the last weights).")
    _check(1.0, reg_eps, max_iter, "nash_mtl")
    if not is_traced(max_norm):
        if isinstance(max_norm, bool) or not np.isfinite(max_norm) or max_norm < 0:
            raise ValueError(f"nash_mtl: max_norm must be a finite number >= 0; got {max_norm!r}.")
    if (
        isinstance(update_weights_every, bool)
        or int(update_weights_every) != update_weights_every
        or update_weights_every < 1
    ):
        raise ValueError(
            "nash_mtl: update_weights_every must be a positive int; found"
            f" {update_weights_every!r}."
        )
    every, reg_eps, max_iter = int(update_weights_every), float(reg_eps), int(max_iter)

    def init() -> NashMTLState:
        return NashMTLState(
            count=jnp.zeros((), jnp.int32),
            alpha=jnp.ones((k,)),
            weights=initial_weights(k),
        )

    def weights(gramian: Any, state: NashMTLState, value: Any, *, num_tasks: int, dtype: Any):
        del value, num_tasks
        gramian = gramian.astype(dtype)

        def solve():
            # Warm start from the last solve (none before the first step).
            last = jnp.where(state.count > 0, state.alpha.astype(dtype), jnp.nan)
            return solvers.alpha_fair_weights(
                gramian, 1.0, reg_eps=reg_eps, max_iter=max_iter, init=last
            )

        if every == 1:
            alpha = solve()
        else:
            alpha = lax.cond(state.count % every == 0, solve, lambda: state.alpha.astype(dtype))
        norm = jnp.sqrt(jnp.maximum(alpha @ (gramian @ alpha), 0))
        cap = jnp.asarray(max_norm, dtype)
        clip = (cap > 0) & (norm > cap)
        w = jnp.where(clip, alpha * (cap / jnp.where(clip, norm, 1)), alpha)
        new_state = NashMTLState(
            count=optax.safe_int32_increment(state.count),
            alpha=alpha.astype(state.alpha.dtype),
            weights=w.astype(jnp.float32),
        )
        return w, new_state

    return from_weighting(Weighting(name="nash_mtl", init=init, weights=weights, num_tasks=k))
