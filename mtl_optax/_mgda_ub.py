r"""MGDA-UB: MGDA on the gradients of a shared representation.

Sener & Koltun (NeurIPS 2018) bound the multi-task objective's MGDA direction
(Theorem 1) by solving the min-norm problem on the gradients of the losses
with respect to the shared representation :math:`z` instead of the shared
parameters: ``K`` backward passes through the heads and one through the
encoder. :func:`mgda_ub` is the method; :func:`mtl_optax.representation.rep_grad`
runs it on representation gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mtl_optax import engine
from mtl_optax._mgda import MGDAState, mgda
from mtl_optax.base import PerTaskTransformation, WeightedTransformation, from_weighting
from mtl_optax.registry import register

__all__ = ["mgda_ub"]

_NAME = "mgda_ub"


def _batch_axes(batch_axes: int | Sequence[int] | None) -> tuple[int, ...]:
    if batch_axes is None:
        return ()
    if isinstance(batch_axes, int) and not isinstance(batch_axes, bool):
        return (batch_axes,)
    axes = tuple(batch_axes)
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(
            f"{_NAME}: batch_axes must be an int or a sequence of ints; found {axes!r}."
        )
    return axes


def _sum_batch_axes(task_grads: Any, axes: tuple[int, ...]) -> Any:
    """Each leaf ``(K, *shape)`` summed over ``axes`` of ``shape`` (checked per leaf)."""

    def one(path, leaf):
        ndim = leaf.ndim - 1
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"{_NAME}: batch_axes={axes} names axis {a}, but leaf"
                    f" {jax.tree_util.keystr(path) or '<root>'} has shape {leaf.shape}:"
                    f" {ndim} axes after the task axis; batch axes count from the first"
                    " axis after the task axis."
                )
        summed = tuple(sorted({a % ndim + 1 for a in axes}))
        return jnp.sum(leaf.astype(engine.accumulation_dtype(leaf.dtype)), axis=summed)

    return jax.tree_util.tree_map_with_path(one, task_grads)


@register("mgda_ub")
def mgda_ub(
    normalization: str = "none",
    *,
    batch_axes: int | Sequence[int] | None = None,
    max_iter: int = 250,
    tol: float = 1e-6,
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""MGDA-UB: min-norm weights of the (representation) gradients, applied raw.

    .. math::
      \tilde g_k = g_k / n_k, \qquad
      \lambda = \operatorname*{arg\,min}_{\lambda \in \Delta^K}
      \Big\|\sum_k \lambda_k \tilde g_k\Big\|^2, \qquad
      u = \sum_{k=1}^K \lambda_k\, g_k

    with Sener & Koltun's gradient normalizers :math:`n_k` (none, l2, loss,
    loss+; see :func:`mtl_optax._mgda.gradient_normalizers`). The weights are
    those of :func:`mtl_optax.mgda` and are applied to the *raw* gradients
    (``mgda(normalization, normalize_update=False)``), as Sener & Koltun's
    training script and LibMTL with ``rep_grad=True`` do. Meant for the
    gradients :math:`g_k = \partial L_k / \partial z` of a shared
    representation, through :func:`mtl_optax.representation.rep_grad`; on
    parameter gradients it is MGDA with that raw-weight update.

    With ``batch_axes`` (axes of each leaf, counted after the task axis) the
    Gramian and the normalizers are those of the gradients summed over these
    axes, :math:`\bar g_k = \sum_b g_{k,b}`, as LibMTL computes them with
    ``rep_grad=True`` (``batch_axes=0`` for a ``[B, D]`` representation); the
    weights still multiply the full :math:`g_k`. ``None`` (default) uses the
    whole gradient, as Sener & Koltun and vambn.

    Args:
      normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or
        ``"loss+"``; ``"loss"`` and ``"loss+"`` need ``value=`` (passed by
        ``rep_grad``).
      batch_axes: see above.
      max_iter: maximum solver iterations (see :func:`mtl_optax.mgda`).
      tol: the solver's duality-gap tolerance (see :func:`mtl_optax.mgda`).
      num_tasks: ``K``, recommended: checked at every update, and the state
        has its final shape from ``init`` on.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`) with a ``per_task``
      form :math:`\lambda_k g_k`. Its state is an :class:`~mtl_optax.MGDAState`
      whose ``weights`` and ``simplex_weights`` are both :math:`\lambda`.
      Without ``batch_axes`` its ``weighting`` is MGDA's rule; with them, the
      ``weighting`` attribute is absent (the rule reads another Gramian).

    Raises:
      ValueError: unknown ``normalization``, bad ``max_iter``/``tol``/
        ``batch_axes``; at update, malformed task gradients, ``batch_axes``
        that do not fit a leaf, or ``value`` missing for ``"loss"``/``"loss+"``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.mgda_ub("l2", num_tasks=2)
      >>> g = {"z": jnp.array([[2.0, 0.0], [0.0, 1.0]])}  # orthogonal, norms 2 and 1
      >>> u, state = tx.update(g, tx.init({"z": jnp.zeros(2)}))
      >>> state.weights  # equal weights on the l2-normalized gradients
      Array([0.5, 0.5], dtype=float32)
      >>> u["z"]  # applied to the raw gradients
      Array([1. , 0.5], dtype=float32)

    References:
      Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
      <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018 (Section 3.3,
      MGDA-UB; https://github.com/isl-org/MultiObjectiveOptimization,
      ``multi_task/train_multi_task.py``). LibMTL ``MGDA`` with
      ``rep_grad=True``. vambn / impartial-vaes ``MGDAUB``.

    Differences from the references:
      * vambn's and impartial-vaes' ``MGDAUB`` apply ``min(w, 1e-3)`` to the
        solver weights (a bug for ``max``, the intended floor): every weight
        at or above 1e-3 becomes 1e-3, so after ``MOOForLoop``'s rescale the
        direction is the plain sum of the gradients in the support of the
        min-norm solution. Here the weights are :math:`\lambda` unchanged;
        the results agree only where the reference's capped weights are
        proportional to :math:`\lambda` (e.g. all on one task).
      * Sener & Koltun's script also weights the heads' losses by
        :math:`\lambda_k`; ``rep_grad`` gives the heads the gradient of the
        plain sum of the losses (the paper's Algorithm 2, LibMTL, vambn).
      * The solver and the normalizer guards are :func:`mtl_optax.mgda`'s
        (exact two-point rule instead of 0.999/0.001, duality-gap stopping,
        zero normalizers replaced by 1 instead of a division by zero).
    """
    axes = _batch_axes(batch_axes)
    inner = mgda(
        normalization, max_iter=max_iter, tol=tol, normalize_update=False, num_tasks=num_tasks
    )
    weighting = inner.weighting._replace(name=_NAME)
    if batch_axes is None:
        return from_weighting(weighting)

    def weights_and_state(updates, state, params, value):
        k = engine.check_task_grads(updates, params, num_tasks=num_tasks, method=_NAME)
        if value is not None:
            value = engine.check_value(value, k, method=_NAME)
        elif weighting.needs_value:
            raise ValueError(
                f"{_NAME}: normalization={normalization!r} needs the per-task losses: pass"
                f" value= (shape ({k},)) to update."
            )
        summed = _sum_batch_axes(updates, axes)
        dtype = engine.tree_accumulation_dtype(updates)
        return weighting.weights(engine.gramian(summed), state, value, num_tasks=k, dtype=dtype)

    def init_fn(params: Any) -> MGDAState:
        del params
        return weighting.init()

    @engine.full_precision
    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        w, new_state = weights_and_state(updates, state, params, value)
        return engine.combine(updates, w), new_state

    @engine.full_precision
    def per_task_update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        w, new_state = weights_and_state(updates, state, params, value)
        return engine.scale_rows(updates, w), new_state

    tx = WeightedTransformation(init_fn, update_fn)
    tx.per_task = PerTaskTransformation(_NAME, init_fn, per_task_update_fn)
    return tx
