r"""Loss-based weightings of LibMTL: ``uw``, ``dwa`` and ``gls``.

These methods weigh the task gradients by functions of the per-task losses
only (the ``value=`` argument of ``update``), not of the gradients: they are
:class:`~mtl_optax.Weighting` rules that read no Gramian, so their update is
one weighted combination of the task gradients, :math:`\sum_k w_k g_k`, the
gradient of :math:`\sum_k w_k L_k` with the weights held fixed.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._normalization import checked_optimizer
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    from_weighting,
    initial_weights,
    is_traced,
)
from mtl_optax.registry import register

__all__ = ["DWAState", "GLSState", "UWState", "dwa", "gls", "uw"]


def _float_dtype() -> Any:
    return jnp.result_type(float)


class GLSState(NamedTuple):
    """State of :func:`gls`."""

    weights: jax.Array  # [K] float32: the weights of the last step, for logging.


@register("gls")
def gls(num_tasks: int | None = None) -> WeightedTransformation:
    r"""GLS: the gradient of the geometric mean of the losses.

    .. math::
      L_{\mathrm{geo}} = \Big(\prod_{k=1}^K L_k\Big)^{1/K}, \qquad
      \nabla L_{\mathrm{geo}} = \sum_{k=1}^K w_k\, g_k, \qquad
      w_k = \frac{L_{\mathrm{geo}}}{K\, L_k}
          = \frac1K \exp\Big(\frac1K \sum_j \log L_j - \log L_k\Big)

    computed in log space, so the product of many losses neither overflows
    nor underflows. Tasks with small losses get large weights: the geometric
    mean is scale-free in each loss.

    The losses must be positive: at a zero loss the gradient of the geometric
    mean is unbounded (its weight :math:`L_{\mathrm{geo}} / (K L_k)` is
    :math:`0/0`), and a negative one has no real geometric mean. A zero,
    negative or non-finite loss gives NaN weights and a NaN update, as any
    non-finite input does: :func:`mtl_optax.apply_if_finite` skips such steps.

    Args:
      num_tasks: ``K``, optional: with it the state has its shape from
        ``init`` on.

    Returns:
      A :class:`~mtl_optax.WeightedTransformation`; ``update`` needs
      ``value=losses``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.gls()
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> u, state = tx.update(g, tx.init(None), value=jnp.array([1.0, 4.0]))
      >>> state.weights  # L_geo = 2: (2 / (2 * 1), 2 / (2 * 4))
      Array([1.  , 0.25], dtype=float32)

    References:
      Chennupati, Sistu, Yogamani and Rawashdeh, `MultiNet++: Multi-Stream
      Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning
      <https://openaccess.thecvf.com/content_CVPRW_2019/papers/WAD/Chennupati_MultiNet_Multi-Stream_Feature_Aggregation_and_Geometric_Loss_Strategy_for_Multi-Task_CVPRW_2019_paper.pdf>`_,
      CVPR Workshops 2019. Reference implementation: LibMTL ``GLS``.

    Differences from the references:
      LibMTL differentiates ``prod(losses) ** (1 / K)`` by autograd (the same
      gradient; its product overflows or underflows with many losses) and
      returns ``losses / (K * prod(losses))`` as its weights, which are not the
      weights of that gradient: the weights here are.
    """
    k = check_num_tasks("gls", num_tasks)

    def rule(gramian, state, value, *, num_tasks, dtype):
        del gramian, state
        value = value.astype(dtype)
        log = jnp.log(value)
        w = jnp.exp(jnp.mean(log) - log) / num_tasks
        # Every weight NaN when a loss is not positive and finite (one zero
        # loss would give 0 * inf = NaN in one weight and zeros elsewhere).
        w = jnp.where(jnp.all((value > 0) & jnp.isfinite(value)), w, jnp.nan)
        return w, GLSState(weights=w.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name="gls",
            init=lambda: GLSState(weights=initial_weights(k)),
            weights=rule,
            num_tasks=k,
            needs_gramian=False,
            needs_value=True,
        )
    )


class DWAState(NamedTuple):
    """State of :func:`dwa`."""

    weights: jax.Array  # [K] float32: the weights of the last step, for logging.
    epoch_sum: jax.Array  # [K] the sum of the losses of the current epoch's steps.
    step: jax.Array  # int32: steps taken in the current epoch.
    epoch: jax.Array  # int32: epochs completed.
    last: jax.Array  # [K] the mean losses of the last completed epoch.
    before_last: jax.Array  # [K] those of the epoch before.


@register("dwa")
def dwa(
    temperature: float = 2.0, steps_per_epoch: int = 1, num_tasks: int | None = None
) -> WeightedTransformation:
    r"""DWA: Dynamic Weight Average, weights from the rate at which each loss falls.

    .. math::
      r_k = \frac{\bar L_k(e-1)}{\bar L_k(e-2)}, \qquad
      w_k = K\, \frac{\exp(r_k / T)}{\sum_j \exp(r_j / T)}

    for the steps of epoch :math:`e \ge 2`, with :math:`\bar L_k(e)` the mean
    of task :math:`k`'s losses over the steps of epoch :math:`e`; the weights
    are 1 during the first two epochs. A task whose loss falls more slowly
    gets a larger weight. An epoch is ``steps_per_epoch`` calls of ``update``
    (the losses of a call count in the epoch it belongs to, after its weights
    are computed); with ``steps_per_epoch=1`` the rates are those of the
    last two steps.

    A zero mean loss in epoch :math:`e-2` makes :math:`r_k` infinite unless
    the next one is zero too: :math:`r_k` is then taken as the largest finite
    number (the task gets the whole softmax), and :math:`0/0` as 1; the
    weights stay finite. A non-finite loss gives a NaN update (and enters the
    epoch's mean): :func:`mtl_optax.apply_if_finite` skips the step and keeps
    the state.

    Args:
      temperature: the softmax temperature :math:`T > 0` (default 2.0, LibMTL's
        and the paper's).
      steps_per_epoch: the number of ``update`` calls per epoch, a positive
        int (default 1).
      num_tasks: ``K``, required: the state holds ``[K]`` epoch means from
        ``init`` on.

    Returns:
      A :class:`~mtl_optax.WeightedTransformation`; ``update`` needs
      ``value=losses``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.dwa(temperature=2.0, num_tasks=2)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> state = tx.init(None)
      >>> for losses in ([1.0, 1.0], [0.5, 0.9], [0.4, 0.8]):
      ...     u, state = tx.update(g, state, value=jnp.array(losses))
      >>> [round(float(w), 4) for w in state.weights]  # third step: rates (0.5, 0.9)
      [0.9003, 1.0997]

    References:
      Liu, Johns and Davison, `End-to-End Multi-Task Learning with Attention
      <https://openaccess.thecvf.com/content_CVPR_2019/papers/Liu_End-To-End_Multi-Task_Learning_With_Attention_CVPR_2019_paper.pdf>`_,
      CVPR 2019 (Equation 7). Reference implementation: LibMTL ``DWA``, which
      reads the epoch means from its trainer's ``train_loss_buffer``.

    Differences from the references:
      LibMTL computes the rates in float64 and the softmax in float32
      (``torch.Tensor`` of a numpy array), and gives ``nan`` or ``inf`` for a
      zero mean loss; here both are in the losses' dtype (at least float32),
      and a zero mean loss gives the finite weights above.
    """
    traced = is_traced(temperature)
    if not traced:
        temperature = float(temperature)
        if not temperature > 0.0 or not np.isfinite(temperature):
            raise ValueError(
                f"dwa: temperature must be positive and finite; found temperature={temperature!r}."
            )
    if (
        isinstance(steps_per_epoch, bool)
        or int(steps_per_epoch) != steps_per_epoch
        or steps_per_epoch < 1
    ):
        raise ValueError(
            f"dwa: steps_per_epoch must be a positive int; found steps_per_epoch={steps_per_epoch!r}."
        )
    steps_per_epoch = int(steps_per_epoch)
    k = check_num_tasks("dwa", num_tasks)
    if k is None:
        raise ValueError("dwa keeps the epochs' mean losses in its state: pass num_tasks=K.")

    def init() -> DWAState:
        # Three distinct buffers, so that a jitted step can donate the state.
        def zeros():
            return jnp.zeros((k,), _float_dtype())

        return DWAState(
            weights=initial_weights(k),
            epoch_sum=zeros(),
            step=jnp.zeros((), jnp.int32),
            epoch=jnp.zeros((), jnp.int32),
            last=zeros(),
            before_last=zeros(),
        )

    def rule(gramian, state, value, *, num_tasks, dtype):
        del gramian
        last, before = state.last.astype(dtype), state.before_last.astype(dtype)
        big = jnp.finfo(dtype).max
        safe = jnp.where(before > 0, before, 1)
        rate = jnp.where(before > 0, last / safe, jnp.where(last > 0, big, 1))
        rate = jnp.minimum(rate, big)
        w = num_tasks * jax.nn.softmax(rate / temperature)
        w = jnp.where(state.epoch >= 2, w, jnp.ones_like(w))
        # This step's losses enter the state only: a non-finite one makes the
        # update non-finite too, so that apply_if_finite skips the step.
        w = jnp.where(jnp.all(jnp.isfinite(value)), w, jnp.nan)
        # The losses of this step count in the current epoch.
        total = state.epoch_sum + value.astype(state.epoch_sum.dtype)
        step = state.step + 1
        done = step >= steps_per_epoch
        mean = total / steps_per_epoch
        new_state = DWAState(
            weights=w.astype(jnp.float32),
            epoch_sum=jnp.where(done, jnp.zeros_like(total), total),
            step=jnp.where(done, 0, step),
            epoch=jnp.where(done, optax.safe_int32_increment(state.epoch), state.epoch),
            last=jnp.where(done, mean, state.last),
            before_last=jnp.where(done, state.last, state.before_last),
        )
        return w, new_state

    return from_weighting(
        Weighting(
            name="dwa",
            init=init,
            weights=rule,
            num_tasks=k,
            needs_gramian=False,
            needs_value=True,
        )
    )


class UWState(NamedTuple):
    """State of :func:`uw`."""

    weights: jax.Array  # [K] float32: the weights of the last step, 1 / (2 exp(s)).
    log_var: jax.Array  # [K] the learned s_k (log sigma_k^2), default float dtype.
    log_var_grad: jax.Array  # [K] the gradient of the loss with respect to s, last step.
    opt_state: Any  # the state of the optimizer of s.


@register("uw")
def uw(
    optimizer: optax.GradientTransformation | None = None,
    initial_log_var: float = -0.5,
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""UW: uncertainty weighting, loss weights learned as homoscedastic noise.

    The loss :math:`\sum_k \big(\frac{L_k}{2 e^{s_k}} + \frac{s_k}{2}\big)`
    (:math:`s_k = \log \sigma_k^2`) is minimised over the parameters and the
    :math:`s_k` together. Its gradient with respect to the parameters is
    :math:`\sum_k w_k g_k` with :math:`w_k = 1 / (2 e^{s_k})`, and with
    respect to :math:`s_k`

    .. math::
      \frac{\partial}{\partial s_k} = \frac12 - \frac{L_k}{2 e^{s_k}},

    on which ``optimizer`` takes one step per ``update`` (the weights of a
    step are those of :math:`s` before its step). :math:`s_k` tends to
    :math:`\log L_k`: tasks with large losses get small weights. A non-finite
    loss gives a NaN update: :func:`mtl_optax.apply_if_finite` skips the
    step and keeps :math:`s`.

    Args:
      optimizer: the optax optimizer of :math:`s`. Default: LibMTL's default
        optimizer (which trains ``loss_scale`` with the model's),
        ``torch.optim.Adam(lr=1e-4, weight_decay=1e-5)``, i.e.
        ``optax.chain(optax.add_decayed_weights(1e-5), optax.adam(1e-4))``.
      initial_log_var: the initial :math:`s_k` (default -0.5, LibMTL's).
      num_tasks: ``K``, required: the state holds :math:`s` from ``init`` on.

    Returns:
      A :class:`~mtl_optax.WeightedTransformation`; ``update`` needs
      ``value=losses``.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_optax
      >>> tx = mtl_optax.uw(optimizer=optax.sgd(0.5), initial_log_var=0.0, num_tasks=2)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> u, state = tx.update(g, tx.init(None), value=jnp.array([1.0, 3.0]))
      >>> state.weights  # 1 / (2 e^0)
      Array([0.5, 0.5], dtype=float32)
      >>> state.log_var  # s - 0.5 * (1/2 - L / 2)
      Array([0. , 0.5], dtype=float32)

    References:
      Kendall, Gal and Cipolla, `Multi-Task Learning Using Uncertainty to
      Weigh Losses for Scene Geometry and Semantics
      <https://openaccess.thecvf.com/content_cvpr_2018/papers/Kendall_Multi-Task_Learning_Using_CVPR_2018_paper.pdf>`_,
      CVPR 2018. Reference implementation: LibMTL ``UW`` (the regression form
      of the paper's loss, :math:`\frac{1}{2\sigma^2} L + \log \sigma`, for
      every task).

    Differences from the references:
      LibMTL leaves :math:`s` to the model's optimizer (its gradient
      accumulates until that optimizer zeroes it); here the step is taken
      inside the update, with its own optimizer.
    """
    optimizer = checked_optimizer("uw", optimizer)
    initial_log_var = float(initial_log_var)
    if not np.isfinite(initial_log_var):
        raise ValueError(f"uw: initial_log_var must be finite; found {initial_log_var!r}.")
    k = check_num_tasks("uw", num_tasks)
    if k is None:
        raise ValueError("uw keeps the learned log-variances in its state: pass num_tasks=K.")

    def init() -> UWState:
        s = jnp.full((k,), initial_log_var, _float_dtype())
        return UWState(
            weights=initial_weights(k),
            log_var=s,
            log_var_grad=jnp.zeros_like(s),
            opt_state=optimizer.init(s),
        )

    def rule(gramian, state, value, *, num_tasks, dtype):
        del gramian, num_tasks
        s = state.log_var
        scale = jnp.exp(-s)
        # A non-finite loss would enter s only: it makes the update non-finite
        # too, so that apply_if_finite skips the step.
        w = jnp.where(jnp.all(jnp.isfinite(value)), 0.5 * scale, jnp.nan)
        grad = 0.5 - 0.5 * value.astype(s.dtype) * scale
        updates, opt_state = optimizer.update(grad, state.opt_state, s)
        new_state = UWState(
            weights=w.astype(jnp.float32),
            log_var=optax.apply_updates(s, updates),
            log_var_grad=grad,
            opt_state=opt_state,
        )
        return w.astype(dtype), new_state

    return from_weighting(
        Weighting(
            name="uw",
            init=init,
            weights=rule,
            num_tasks=k,
            needs_gramian=False,
            needs_value=True,
        )
    )
