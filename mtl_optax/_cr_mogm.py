r"""CR-MOGM: an exponential moving average of another method's weights.

Zhou et al. (NeurIPS 2022) show that multi-objective gradient methods whose
weights are recomputed from each mini-batch (MGDA and the like) do not converge
with stochastic gradients, and that averaging the weights across steps fixes
it. :func:`cr_mogm` wraps the :class:`~mtl_optax.base.Weighting` of any
weighted method (its rule in the ``K x K`` world) and smooths what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import registry
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    from_weighting,
    is_traced,
)
from mtl_optax.base import initial_weights as _nan_weights
from mtl_optax.registry import register

__all__ = ["CRMOGMState", "cr_mogm"]


class CRMOGMState(NamedTuple):
    """State of :func:`cr_mogm`."""

    weights: jax.Array  # [K] float32: the smoothed weights of the last step, for logging.
    smoothed: jax.Array  # [K] lambda_t, in the default float dtype.
    count: jax.Array  # int32: the number of steps taken.
    inner: Any  # the wrapped weighting's state.


def _inner_weighting(method: Any, num_tasks: int | None) -> Weighting:
    if isinstance(method, str):
        tx = registry.get(method, **({} if num_tasks is None else {"num_tasks": num_tasks}))
    else:
        tx = method
    if isinstance(tx, Weighting):
        return tx
    weighting = getattr(tx, "weighting", None)
    if not isinstance(weighting, Weighting):
        name = method if isinstance(method, str) else type(method).__name__
        raise ValueError(
            f"cr_mogm smooths the weights of a weighted method: {name!r} has no"
            " `weighting` attribute (its update is not a weighted combination of"
            " the task gradients, as for graddrop, trimmed_mean, m_conflict_free"
            " and compose)."
        )
    return weighting


@register("cr_mogm")
def cr_mogm(
    method: Any = "mgda",
    alpha: float | Callable[[jax.Array], jax.Array] = 0.9,
    initial_weights: jax.typing.ArrayLike | None = None,
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""CR-MOGM: another method's weights, averaged across steps.

    .. math::
      \lambda_t = \alpha_t\, \lambda_{t-1} + (1 - \alpha_t)\, \hat\lambda_t,
      \qquad u_t = \sum_{k=1}^K \lambda_{t,k}\, g_k

    where :math:`\hat\lambda_t` are the weights the wrapped method computes
    at step :math:`t` (from the Gramian, the losses and its own state) and
    :math:`\lambda_0` is ``initial_weights``, or :math:`\hat\lambda_1` when
    none are given (the first update is then the wrapped method's).
    :math:`\alpha = 0` gives the wrapped method back; :math:`\alpha = 1` keeps
    :math:`\lambda_0`. With the weights of MGDA (on the simplex) the averaged
    weights stay on the simplex.

    ``alpha`` may be an ``optax`` schedule of the step count :math:`t - 1`
    (0 at the first step): the paper's analysis (Corollary 1) lets
    :math:`\alpha_t` grow toward 1 as the learning rate decays, e.g.
    ``lambda t: 1 - lr_schedule(t) / lr_schedule(0)``.

    Args:
      method: the weighted method whose weights are smoothed: a name of
        :func:`mtl_optax.available` (built with its defaults and
        ``num_tasks``), a transformation with a ``weighting`` attribute
        (``mtl_optax.upgrad(norm_eps=1e-6)``), or a
        :class:`~mtl_optax.Weighting`. Default: ``"mgda"``. Methods whose
        update is not a weighted combination of the task gradients
        (``graddrop``, ``trimmed_mean``, ``m_conflict_free``, ``compose``) are
        refused.
      alpha: :math:`\alpha \in [0, 1]` (default 0.9, TorchJD's), or a schedule
        ``count -> alpha``.
      initial_weights: :math:`\lambda_0`, a ``[K]`` vector, or ``None``.
      num_tasks: ``K``. Needed unless ``initial_weights`` or the wrapped
        method fixes it: the state holds the ``[K]`` average from ``init``
        on.

    Returns:
      A :class:`~mtl_optax.WeightedTransformation` whose ``weighting`` is the
      smoothed rule (so it can itself be wrapped or used by ``lean``).

    Raises:
      ValueError: ``alpha`` outside ``[0, 1]``; ``method`` without a
        weighting; ``K`` unknown, or given differently by ``num_tasks``,
        ``initial_weights`` and the method.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.cr_mogm("mgda", alpha=0.5, num_tasks=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> u, state = tx.update(g, state, params)
      >>> state.weights  # the first step: MGDA's weights
      Array([0.5, 0.5], dtype=float32)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}  # MGDA alone: (0.9, 0.1)
      >>> u, state = tx.update(g, state, params)
      >>> state.weights
      Array([0.7, 0.3], dtype=float32)

    References:
      Zhou, Zhang, Jiang, Zhang, Yao and Chen, `On the Convergence of
      Stochastic Multi-Objective Gradient Manipulation and Beyond
      <https://proceedings.neurips.cc/paper_files/paper/2022/file/f91bd64a3620aad8e70a27ad9cb3ca57-Paper-Conference.pdf>`_,
      NeurIPS 2022. Reference implementation: TorchJD ``CRMOGMWeighting``
      (``torchjd/aggregation/_cr_mogm.py``), which this follows: the same
      average, the same first step with and without ``initial_weights``.

    Differences from the references:
      TorchJD takes a fixed ``alpha`` that the user may change between calls;
      here ``alpha`` may also be a schedule of the step count, evaluated
      inside the jitted update. A non-finite weight (from a non-finite
      gradient) stays in the average for good, as in TorchJD: wrap the
      method in :func:`mtl_optax.apply_if_finite` to skip such steps.
    """
    if not callable(alpha) and not is_traced(alpha):
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"cr_mogm: alpha must be in [0, 1]; found alpha={alpha!r}.")
    k = check_num_tasks("cr_mogm", num_tasks)
    init_w = None
    if initial_weights is not None:
        init_w = np.asarray(initial_weights, np.float64)
        if init_w.ndim != 1 or init_w.shape[0] == 0:
            raise ValueError(
                f"cr_mogm: initial_weights must be a non-empty vector; found shape {init_w.shape}."
            )
        if k is not None and init_w.shape[0] != k:
            raise ValueError(
                f"cr_mogm: initial_weights has {init_w.shape[0]} entries but num_tasks={k}."
            )
        k = init_w.shape[0]
    inner = _inner_weighting(method, k)
    if inner.num_tasks is not None:
        if k is not None and inner.num_tasks != k:
            raise ValueError(
                f"cr_mogm: the wrapped method {inner.name} is built for"
                f" {inner.num_tasks} tasks, but K={k} here."
            )
        k = inner.num_tasks
    if k is None:
        raise ValueError(
            "cr_mogm keeps the [K] average of the weights in its state: pass"
            " num_tasks=K (or initial_weights of length K)."
        )

    def init() -> CRMOGMState:
        float_dtype = jnp.result_type(float)
        return CRMOGMState(
            weights=_nan_weights(k),
            smoothed=(
                jnp.zeros((k,), float_dtype) if init_w is None else jnp.asarray(init_w, float_dtype)
            ),
            count=jnp.zeros((), jnp.int32),
            inner=inner.init(),
        )

    def rule(gramian, state, value, *, num_tasks, dtype):
        hat, inner_state = inner.weights(
            gramian, state.inner, value, num_tasks=num_tasks, dtype=dtype
        )
        a = alpha(state.count) if callable(alpha) else alpha
        a = jnp.asarray(a, dtype)
        previous = state.smoothed.astype(dtype)
        if init_w is None:
            previous = jnp.where(state.count == 0, hat, previous)
        lam = a * previous + (1 - a) * hat
        new_state = CRMOGMState(
            weights=lam.astype(jnp.float32),
            smoothed=lam.astype(state.smoothed.dtype),
            count=optax.safe_int32_increment(state.count),
            inner=inner_state,
        )
        return lam, new_state

    weighting = Weighting(
        name="cr_mogm",
        init=init,
        weights=rule,
        num_tasks=k,
        needs_gramian=inner.needs_gramian,
        needs_value=inner.needs_value,
    )
    return from_weighting(weighting)
