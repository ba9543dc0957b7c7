"""Fixed and random loss weightings: ``mean``, ``sum``, ``constant``, ``rlw``.

These methods do not look at the task gradients' geometry: the weights depend
only on ``K`` (and a random draw for ``rlw``), so no Gramian is computed and the
update costs one weighted combination of the task gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax import _random
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    canonicalize_key,
    from_weighting,
    initial_weights,
)
from mtl_optax.registry import register

__all__ = [
    "ConstantState",
    "MeanState",
    "RLWState",
    "SumState",
    "constant",
    "mean",
    "rlw",
    "sum",
]


class MeanState(NamedTuple):
    """State of :func:`mean`."""

    weights: jax.Array  # [K] weights of the last step (1/K), for logging.


@register("mean")
def mean(num_tasks: int | None = None) -> WeightedTransformation:
    r"""Averages the task gradients.

    .. math::
      u = \frac{1}{K} \sum_{k=1}^K g_k = \nabla_\theta\, \frac{1}{K}\sum_k L_k

    Chained with an optimizer, this is the same training as that optimizer on
    the gradient of the mean loss.

    Args:
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on; without it the
        state's ``weights`` change shape at the first update (a jitted step
        then compiles twice, and ``lax.scan`` over steps rejects the state).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.mean()
      >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}  # K=2 tasks
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]
      Array([2., 3.], dtype=float32)

    References:
      TorchJD ``Mean`` aggregator. (LibMTL's ``EW`` sums the losses despite
      its name: it matches :func:`sum`, and ``mean`` is ``EW`` divided by K.)
    """

    def weights(gramian, state, value, *, num_tasks, dtype):
        del gramian, state, value
        w = jnp.full((num_tasks,), 1.0 / num_tasks, dtype)
        return w, MeanState(weights=w.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name="mean",
            init=lambda: MeanState(
                weights=initial_weights(num_tasks, 1.0 / num_tasks if num_tasks else None)
            ),
            weights=weights,
            num_tasks=num_tasks,
            needs_gramian=False,
        )
    )


class SumState(NamedTuple):
    """State of :func:`sum`."""

    weights: jax.Array  # [K] weights of the last step (ones), for logging.


@register("sum")
def sum(num_tasks: int | None = None) -> WeightedTransformation:  # noqa: A001
    r"""Sums the task gradients.

    .. math::
      u = \sum_{k=1}^K g_k = \nabla_\theta \sum_k L_k

    Args:
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on; without it the
        state's ``weights`` change shape at the first update (a jitted step
        then compiles twice, and ``lax.scan`` over steps rejects the state).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.sum()
      >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> tx.update(g, tx.init({"w": jnp.zeros(2)}))[0]["w"]
      Array([4., 6.], dtype=float32)

    References:
      TorchJD ``Sum`` aggregator; LibMTL ``EW`` (which sums the losses).
    """

    def weights(gramian, state, value, *, num_tasks, dtype):
        del gramian, state, value
        w = jnp.ones((num_tasks,), dtype)
        return w, SumState(weights=w.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name="sum",
            init=lambda: SumState(weights=initial_weights(num_tasks, 1.0)),
            weights=weights,
            num_tasks=num_tasks,
            needs_gramian=False,
        )
    )


class ConstantState(NamedTuple):
    """State of :func:`constant`."""

    weights: jax.Array  # [K] the constant weights, for logging.


@register("constant")
def constant(weights: jax.typing.ArrayLike, num_tasks: int | None = None) -> WeightedTransformation:
    r"""Combines the task gradients with fixed weights.

    .. math::
      u = \sum_{k=1}^K c_k\, g_k

    Args:
      weights: the ``[K]`` weights :math:`c` (any finite real numbers; they
        are not normalised). ``K`` is taken from their length and checked at
        every update.
      num_tasks: optional; if given, it must equal ``len(weights)`` (accepted
        so that every method takes ``num_tasks``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: ``weights`` is not a non-empty vector of finite numbers, or
        its length differs from ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.constant([1.0, 0.5])
      >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> tx.update(g, tx.init({"w": jnp.zeros(2)}))[0]["w"]
      Array([2.5, 4. ], dtype=float32)

    References:
      TorchJD ``Constant`` aggregator; the usual hand-tuned loss weights.
    """
    c = np.asarray(weights, dtype=np.float64)
    if c.ndim != 1 or c.shape[0] == 0:
        raise ValueError(f"constant: weights must be a non-empty vector; found shape {c.shape}.")
    if not np.all(np.isfinite(c)):
        raise ValueError(f"constant: weights must be finite; found {c.tolist()}.")
    k = c.shape[0]
    if num_tasks is not None and num_tasks != k:
        raise ValueError(f"constant: num_tasks={num_tasks} but {k} weights were given.")

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del gramian, value, num_tasks
        return jnp.asarray(c, dtype), state

    return from_weighting(
        Weighting(
            name="constant",
            init=lambda: ConstantState(weights=jnp.asarray(c, jnp.float32)),
            weights=weights_fn,
            num_tasks=k,
            needs_gramian=False,
        )
    )


class RLWState(NamedTuple):
    """State of :func:`rlw`."""

    weights: jax.Array  # [K] weights drawn at the last step, for logging.
    key: jax.Array  # PRNG key for the next draw.


@register("rlw")
def rlw(key: jax.Array | int = 0, num_tasks: int | None = None) -> WeightedTransformation:
    r"""Random loss weighting: a fresh softmax of Gaussian draws at every step.

    .. math::
      z \sim \mathcal{N}(0, I_K), \qquad w = \mathrm{softmax}(z), \qquad
      u = \sum_{k=1}^K w_k\, g_k

    The weights lie on the probability simplex, so in expectation the update
    is a positively weighted average of the task gradients. The key is split
    inside the state at every step: the same key gives the same sequence of
    weights, and a restored state continues the sequence.

    Args:
      key: an int seed or a PRNG key (``jax.random.key``).
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on; without it the
        state's ``weights`` change shape at the first update (a jitted step
        then compiles twice, and ``lax.scan`` over steps rejects the state).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.rlw(key=0)
      >>> g = {"w": jnp.ones((3, 2))}  # K=3 tasks with the same gradient
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> bool(jnp.allclose(u["w"], 1.0)), bool(jnp.isclose(state.weights.sum(), 1.0))
      (True, True)

    References:
      Lin et al., `Reasonable Effectiveness of Random Weighting: A Litmus Test
      for Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022
      (Algorithm 2). TorchJD ``Random``; LibMTL ``RLW``.
    """
    base_key = canonicalize_key(key)

    def weights(gramian, state, value, *, num_tasks, dtype):
        del gramian, value
        next_key, draw_key = _random.split(state.key)
        w = jax.nn.softmax(jax.random.normal(_random.fused(draw_key), (num_tasks,), dtype))
        return w, RLWState(weights=w.astype(jnp.float32), key=next_key)

    return from_weighting(
        Weighting(
            name="rlw",
            init=lambda: RLWState(weights=initial_weights(num_tasks), key=jnp.copy(base_key)),
            weights=weights,
            num_tasks=num_tasks,
            needs_gramian=False,
        )
    )
