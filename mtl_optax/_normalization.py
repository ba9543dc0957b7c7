"""Gradient-norm balancing: ``nsgd`` (normalised gradients) and ``gradnorm``.

Both methods weight the task gradients by functions of their norms
:math:`n_k = \\lVert g_k \\rVert = \\sqrt{G_{kk}}`, read from the Gramian, and
keep ``K``-shaped state (reference norms or losses captured at step
``update_at``, and for GradNorm the learned loss weights with their optimizer
state), so ``num_tasks`` is required. They are written as
:class:`~mtl_optax.Weighting` objects: the update is :math:`\\sum_k w_k g_k`,
and ``tx.per_task`` gives the per-task form :math:`w_k g_k` used by
:func:`mtl_optax.compose` (vambn's ``Compose``).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax.base import WeightedTransformation, Weighting, from_weighting, initial_weights
from mtl_optax.registry import register

__all__ = ["GradNormState", "NSGDState", "gradnorm", "nsgd"]

# Floors of the references (vambn / impartial-vaes ``NSGD`` and ``GradNormBase``).
_NSGD_EPS = 1e-15
_GRADNORM_EPS = 1e-5


def _check_num_tasks(num_tasks: int | None, method: str) -> int:
    if num_tasks is None:
        raise ValueError(
            f"{method}: num_tasks is required (its state holds one entry per task from"
            f" init on); call {method}(..., num_tasks=K)."
        )
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{method}: num_tasks must be a positive int; found {num_tasks!r}.")
    return num_tasks


def _check_update_at(update_at: int | None, method: str) -> int | None:
    if update_at is None:
        return None
    if isinstance(update_at, bool) or not isinstance(update_at, int) or update_at < 0:
        raise ValueError(
            f"{method}: update_at must be a non-negative int (the 0-based step at which"
            f" the reference values are captured) or None; found {update_at!r}."
        )
    return update_at


def _capture_now(count: jax.Array, update_at: int | None) -> jax.Array:
    if update_at is None:
        return jnp.zeros((), bool)
    return count == update_at


def _norms(gramian: jax.Array, dtype: Any) -> jax.Array:
    """``sqrt(diag G)`` with a zero (and a finite derivative) for zero gradients."""
    d = jnp.diagonal(gramian).astype(dtype)
    positive = d > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, d, 1.0)), 0.0)


class NSGDState(NamedTuple):
    """State of :func:`nsgd`."""

    count: jax.Array  # int32 number of updates done so far.
    initial_norms: jax.Array  # [K] reference norms: ones until captured at step update_at.
    weights: jax.Array  # [K] weights nu / n_k of the last step (0 for zero tasks), for logging.


@register("nsgd")
def nsgd(update_at: int | None = 20, num_tasks: int | None = None) -> WeightedTransformation:
    r"""Normalised gradients: every task gradient rescaled to one common norm.

    With :math:`n_k = \lVert g_k \rVert` and reference norms :math:`n^{(0)}`
    (ones until they are captured, see ``update_at``):

    .. math::
      r_k = \frac{n_k}{\max(n^{(0)}_k, 10^{-15})}, \qquad
      a = \frac{r}{\sum_j r_j}, \qquad
      \nu = \sum_k a_k n_k, \qquad
      u = \sum_{k=1}^K \frac{\nu}{n_k}\, g_k

    Every non-zero task gradient gets the same norm :math:`\nu`, a weighted
    mean of the current norms that favours the tasks whose gradient norm
    decreased least since the reference step; a zero task gradient stays zero
    (weight 0). The per-task form (``tx.per_task``) returns the rescaled
    :math:`\frac{\nu}{n_k} g_k`.

    Args:
      update_at: the 0-based step at which the current norms are captured as
        the reference norms :math:`n^{(0)}` (the references' default is 20;
        vambn's ``setup_moo("nsgd")`` uses 1). Steps before it use reference
        norms of ones, so :math:`r = n`. ``None`` never captures.
      num_tasks: ``K``, required: the state holds ``K`` reference norms.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (with ``.per_task``). Its
      state is an :class:`NSGDState`: the step count, the reference norms (in
      JAX's default float dtype, float64 with x64 on) and the weights of the
      last step.

    Raises:
      ValueError: ``num_tasks`` is missing or not a positive int, or
        ``update_at`` is neither ``None`` nor a non-negative int.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("nsgd", update_at=1, num_tasks=2)
      >>> g = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}  # norms 3 and 1
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # both rescaled to nu = (3 * 3 + 1 * 1) / (3 + 1) = 2.5
      Array([2.5, 2.5], dtype=float32)
      >>> state.weights, state.initial_norms
      (Array([0.8333333, 2.5      ], dtype=float32), Array([1., 1.], dtype=float32))
      >>> _, state = tx.update(g, state)  # step 1 captures the norms
      >>> state.initial_norms
      Array([3., 1.], dtype=float32)

    References:
      Javaloy et al., `Mitigating Modality Collapse in Multimodal VAEs via
      Impartial Optimization <https://arxiv.org/abs/2206.04496>`_, ICML 2022.
      Reference implementations: ``NSGD`` in ``adrianjav/impartial-vaes``
      (``heterogeneous/torchmoo/mtl.py``) and its copy in
      ``nfdi4health/docker-vambn`` (``vambn/modelling/mtl/mtl.py``).

    Differences from the references: the same rule and floors. When every
    task gradient is zero, the references compute ``0 / 0`` and return NaN;
    here the update is zero (weights 0). The reference rescales each gradient
    by ``nu / max(n_k, 1e-15)``: identical for non-zero gradients, and the
    logged weight of a zero gradient is 0 here. The reference normalises
    ``a`` twice (``r / max(sum r, 1e-15)``, then by its sum again); here
    once, ``r / sum r``, equal up to rounding. In float32 (and for bfloat16
    leaves, whose Gramian is float32), a gradient whose squared entries all
    underflow (entries below about 1e-19) has norm 0 and is treated as zero.
    """
    k = _check_num_tasks(num_tasks, "nsgd")
    update_at = _check_update_at(update_at, "nsgd")

    def init() -> NSGDState:
        return NSGDState(
            count=jnp.zeros((), jnp.int32),
            initial_norms=jnp.ones((k,)),
            weights=initial_weights(k),
        )

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del value, num_tasks
        n = _norms(gramian, dtype)
        capture = _capture_now(state.count, update_at)
        reference = jnp.where(capture, n, state.initial_norms.astype(dtype))
        r = n / jnp.maximum(reference, _NSGD_EPS)
        total = jnp.sum(r)
        a = r / jnp.where(total > 0, total, 1.0)  # all-zero gradients: a = 0, nu = 0.
        nu = jnp.sum(a * n)
        w = jnp.where(n > 0, nu / jnp.maximum(n, _NSGD_EPS), 0.0)
        new_state = NSGDState(
            count=optax.safe_int32_increment(state.count),
            initial_norms=reference.astype(state.initial_norms.dtype),
            weights=w.astype(jnp.float32),
        )
        return w, new_state

    return from_weighting(Weighting(name="nsgd", init=init, weights=weights_fn, num_tasks=k))


class GradNormState(NamedTuple):
    """State of :func:`gradnorm`."""

    count: jax.Array  # int32 number of updates done so far.
    initial_values: jax.Array  # [K] reference losses (or norms): ones until step update_at.
    logits: jax.Array  # [K] the learned parameters theta; weights = K * softmax(theta).
    logits_grad: jax.Array  # [K] gradient of the GradNorm loss w.r.t. theta at the last step.
    loss: jax.Array  # the GradNorm loss of the last step, for logging.
    opt_state: Any  # state of the optimizer of theta.
    weights: jax.Array  # [K] weights used in the last step (from theta before its step).


def checked_optimizer(method: str, optimizer: Any) -> optax.GradientTransformation:
    """A method's inner optimizer: LibMTL's default when ``None``, else checked.

    Raises:
      ValueError: naming ``method``, when ``optimizer`` has no ``init`` and
        ``update``.
    """
    if optimizer is None:
        return _default_gradnorm_optimizer()
    if not (
        callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))
    ):
        raise ValueError(
            f"{method}: optimizer must be an optax.GradientTransformation (e.g."
            f" optax.adam(1e-4)); found {type(optimizer).__name__}."
        )
    return optimizer


def _default_gradnorm_optimizer() -> optax.GradientTransformation:
    """LibMTL's default optimizer: ``torch.optim.Adam(lr=1e-4, weight_decay=1e-5)``."""
    return optax.chain(optax.add_decayed_weights(1e-5), optax.adam(1e-4))


def _gradnorm_weights(logits: jax.Array, num_tasks: int) -> jax.Array:
    """``K * c / sum(c)`` with ``c = max(exp(theta), 1e-5)``, computed without overflow."""
    floor = math.log(_GRADNORM_EPS)
    clamped = jnp.where(logits >= floor, logits, floor)
    return num_tasks * jax.nn.softmax(clamped)


@register("gradnorm")
def gradnorm(
    alpha: float = 1.5,
    update_at: int | None = 20,
    optimizer: optax.GradientTransformation | None = None,
    variant: Literal["loss", "gradient"] = "loss",
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""GradNorm: loss weights learned so that the weighted gradient norms balance.

    The state holds parameters :math:`\theta \in \mathbb{R}^K`; the weights
    are :math:`w = K c / \sum_j c_j` with :math:`c = \max(e^\theta, 10^{-5})`
    (so :math:`\sum_k w_k = K`). With :math:`n_k = \lVert g_k \rVert`, the
    values :math:`v` (the losses, ``value=``; or the gradient norms :math:`n`
    for ``variant="gradient"``) and reference values :math:`v^{(0)}` (ones
    until they are captured at step ``update_at``):

    .. math::
      \tilde v_k = \frac{v_k}{\max(v^{(0)}_k, 10^{-5})}, \qquad
      r_k = \frac{\tilde v_k}{\max(\tfrac1K \sum_j \tilde v_j, 10^{-5})}, \qquad
      \bar G = \tfrac1K \sum_k n_k w_k

      L_{\mathrm{grad}}(\theta) = \sum_{k=1}^K \bigl\lvert n_k w_k(\theta) -
      \mathrm{sg}(\bar G)\, r_k^{\alpha} \bigr\rvert, \qquad
      u = \sum_{k=1}^K w_k(\theta)\, g_k

    where :math:`\mathrm{sg}` stops the gradient (the target is a constant,
    as in the paper). Each update returns :math:`u` with the weights of the
    current :math:`\theta`, then takes one step of ``optimizer`` on
    :math:`\theta` with :math:`\nabla_\theta L_{\mathrm{grad}}` (computed by
    ``jax.grad``; stored in the state as ``logits_grad``). A task whose
    weighted gradient norm is above the target (it trains faster than the
    average, relative to its starting point) gets its weight lowered.

    Args:
      alpha: :math:`\alpha \ge 0`, the strength of the pull towards a common
        training rate (paper, LibMTL and vambn's ``GradNorm``: 1.5; vambn's
        ``setup_moo("gradnorm")``, i.e. ``variant="gradient"``: 1.0).
      update_at: the 0-based step at which the current values are captured as
        the reference values :math:`v^{(0)}` (vambn's default is 20, its
        ``setup_moo`` uses 1; the paper uses the first step, 0). Steps before
        it use reference values of ones. ``None`` never captures.
      optimizer: the optax optimizer of :math:`\theta`. Default: LibMTL's
        default optimizer, ``torch.optim.Adam(lr=1e-4, weight_decay=1e-5)``,
        i.e. ``optax.chain(optax.add_decayed_weights(1e-5),
        optax.adam(1e-4))``. Use e.g. ``optax.sgd(0.025)`` to follow the
        paper (which trains the weights with the network's optimizer), or
        ``optax.set_to_zero()`` to keep :math:`\theta` fixed.
      variant: ``"loss"`` (the paper, LibMTL, vambn's ``GradNorm``): the
        values are the per-task losses, passed as ``update(..., value=losses)``
        and assumed positive. ``"gradient"`` (vambn's ``GradNormModified``,
        its ``"gradnorm"`` method): the values are the gradient norms
        :math:`n`, so no losses are needed.
      num_tasks: ``K``, required: the state holds ``K`` parameters.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (with ``.per_task``, which
      returns :math:`w_k g_k`). Its state is a :class:`GradNormState`;
      ``initial_values``, ``logits`` and the optimizer state are kept in
      JAX's default float dtype (float64 with x64 on).

    Raises:
      ValueError: a bad hyperparameter, a missing ``num_tasks``, or (at the
        update, ``variant="loss"``) a missing or mis-shaped ``value``.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_optax
      >>> tx = mtl_optax.get(
      ...     "gradnorm", alpha=1.0, update_at=0, optimizer=optax.sgd(0.1), num_tasks=2
      ... )
      >>> g = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update(g, state, value=jnp.array([1.0, 1.0]))
      >>> u["w"]  # theta starts uniform: w = (1, 1)
      Array([3., 1.], dtype=float32)
      >>> # Residuals n * w - mean(n * w) = (1, -1): task 0 is above the target.
      >>> state.logits_grad  # sign * n * w - w / K * sum(sign * n * w)
      Array([ 2., -2.], dtype=float32)
      >>> state.logits  # one SGD step: 1 - 0.1 * (2, -2)
      Array([0.8, 1.2], dtype=float32)
      >>> u, state = tx.update(g, state, value=jnp.array([1.0, 1.0]))
      >>> state.weights  # 2 * softmax((0.8, 1.2)) = (2 / (1 + e^0.4), 2 / (1 + e^-0.4))
      Array([0.80262464, 1.1973753 ], dtype=float32)

    References:
      Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss
      Balancing in Deep Multitask Networks
      <https://arxiv.org/abs/1711.02257>`_, ICML 2018. Reference
      implementations: LibMTL ``GradNorm`` (``LibMTL/weighting/GradNorm.py``),
      ``GradNorm`` and ``GradNormModified`` in ``adrianjav/impartial-vaes``
      (``heterogeneous/torchmoo/mtl.py``) and ``nfdi4health/docker-vambn``
      (``vambn/modelling/mtl/mtl.py``).

    Differences from the references: the parametrisation, floors, capture
    step and loss are vambn's. The paper renormalises the weights to sum to
    ``K`` after each gradient step; vambn and LibMTL (and this function) use
    the softmax parametrisation instead. LibMTL has no ``1e-5`` floors (the
    same numbers for values above ``1e-5``), and it uses unit weights and no
    step on :math:`\theta` during its first epoch, then the mean loss of that
    epoch as :math:`v^{(0)}`; here :math:`v^{(0)}` is the value at step
    ``update_at`` and :math:`\theta` is trained from the first step. vambn
    leaves :math:`\theta` to the model's optimizer (gradients accumulate
    until that optimizer zeroes them); here the step is taken inside the
    update. Loss ratios :math:`r_k` are clamped at 0 (only reachable with
    negative losses), where the references give NaN for non-integer
    :math:`\alpha`. :math:`c = \max(e^\theta, 10^{-5})` is computed as
    :math:`e^{\max(\theta, \ln 10^{-5})}` and normalised as a softmax, which
    cannot overflow for large :math:`\theta`. A non-finite value (loss or
    gradient norm) makes the update NaN, whatever the task gradients, so that
    ``optax.apply_if_finite`` skips the step instead of keeping a finite update
    whose new state is NaN.
    """
    k = _check_num_tasks(num_tasks, "gradnorm")
    update_at = _check_update_at(update_at, "gradnorm")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise ValueError(f"gradnorm: alpha must be a real number; found {alpha!r}.")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"gradnorm: alpha must be finite and >= 0; found {alpha!r}.")
    if variant not in ("loss", "gradient"):
        raise ValueError(f"gradnorm: variant must be 'loss' or 'gradient'; found {variant!r}.")
    optimizer = checked_optimizer("gradnorm", optimizer)
    alpha = float(alpha)

    def init() -> GradNormState:
        logits = jnp.ones((k,))
        return GradNormState(
            count=jnp.zeros((), jnp.int32),
            initial_values=jnp.ones((k,)),
            logits=logits,
            logits_grad=jnp.zeros((k,)),
            loss=jnp.zeros(()),
            opt_state=optimizer.init(logits),
            weights=initial_weights(k, 1.0),
        )

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del num_tasks
        n = _norms(gramian, dtype)
        v = value.astype(dtype) if variant == "loss" else n
        capture = _capture_now(state.count, update_at)
        reference = jnp.where(capture, v, state.initial_values.astype(dtype))
        ratio = v / jnp.maximum(reference, _GRADNORM_EPS)
        r = jnp.maximum(ratio / jnp.maximum(jnp.mean(ratio), _GRADNORM_EPS), 0.0)
        target_rate = r**alpha

        def gradnorm_loss(logits):
            w = _gradnorm_weights(logits, k)
            weighted_norms = n * w
            target = jax.lax.stop_gradient(jnp.mean(weighted_norms)) * target_rate
            return jnp.sum(jnp.abs(weighted_norms - target)), w

        logits = state.logits.astype(dtype)
        (loss, w), grad = jax.value_and_grad(gradnorm_loss, has_aux=True)(logits)
        grad = grad.astype(state.logits.dtype)
        step, opt_state = optimizer.update(grad, state.opt_state, state.logits)
        new_state = GradNormState(
            count=optax.safe_int32_increment(state.count),
            initial_values=reference.astype(state.initial_values.dtype),
            logits=optax.apply_updates(state.logits, step),
            logits_grad=grad,
            loss=loss.astype(state.loss.dtype),
            opt_state=opt_state,
            weights=w.astype(jnp.float32),
        )
        # w comes from the state's logits, not from the values: a non-finite
        # value would give a finite update and a NaN state. Make the update NaN
        # then, so that optax.apply_if_finite skips the step and keeps the state.
        return jnp.where(jnp.all(jnp.isfinite(v)), w, jnp.nan), new_state

    return from_weighting(
        Weighting(
            name="gradnorm",
            init=init,
            weights=weights_fn,
            num_tasks=k,
            needs_value=variant == "loss",
        )
    )
