"""Weightings and the transformation that aggregates task gradients with them.

A :class:`Weighting` is a method's rule in the ``K x K`` world: from the Gramian
:math:`G = J J^\\top` (when it needs it), the per-task losses (when it needs
them) and its own state, it returns the weights :math:`w \\in \\mathbb{R}^K`.
:func:`from_weighting` turns a weighting into an
``optax.GradientTransformationExtraArgs`` whose update is
:math:`\\sum_k w_k g_k`, computed by the engine. This mirrors TorchJD's split of
a ``Weighting`` from the ``Aggregator`` that applies it to the Jacobian, and
lets other execution paths reuse the weighting unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import engine

__all__ = [
    "PerTaskTransformation",
    "WeightedTransformation",
    "Weighting",
    "WeightingFn",
    "canonicalize_key",
    "check_num_tasks",
    "check_pref_vector",
    "from_weighting",
    "initial_weights",
]


class WeightingFn(Protocol):
    """Signature of a weighting's rule.

    Args:
      gramian: the ``[K, K]`` Gramian, or ``None`` when the weighting declared
        ``needs_gramian=False``.
      state: the weighting's state.
      value: the ``[K]`` per-task losses, or ``None`` when not given (a
        weighting with ``needs_value=True`` always receives them).
      num_tasks: ``K``, a Python int.
      dtype: the accumulation dtype of the task gradients (float32 or float64);
        weights should be computed in it.

    Returns:
      ``(weights, new_state)`` with ``weights`` of shape ``[K]``.
    """

    def __call__(
        self,
        gramian: jax.Array | None,
        state: Any,
        value: jax.Array | None,
        *,
        num_tasks: int,
        dtype: Any,
    ) -> tuple[jax.Array, Any]: ...


class Weighting(NamedTuple):
    """A method's rule in the ``K x K`` world.

    Attributes:
      name: the method's name, used in error messages.
      init: ``init() -> state``.
      weights: the rule, see :class:`WeightingFn`.
      num_tasks: ``K`` if the method is configured for a fixed number of tasks.
      needs_gramian: whether ``weights`` reads the Gramian.
      needs_value: whether ``weights`` reads the per-task losses.
    """

    name: str
    init: Callable[[], Any]
    weights: WeightingFn
    num_tasks: int | None = None
    needs_gramian: bool = True
    needs_value: bool = False


class PerTaskTransformation(NamedTuple):
    """A method's per-task form: ``K`` task gradients in, ``K`` task gradients out.

    ``update(task_grads, state, params=None, *, value=None, **extra)`` returns
    ``(new_task_grads, new_state)`` where ``new_task_grads`` keeps the leading
    task axis; summing it over the task axis gives the method's update. This is
    the form that :func:`mtl_optax.compose` chains (vambn's ``Compose``).

    Attributes:
      name: the method's name.
      init: ``init(params) -> state``.
      update: see above.
    """

    name: str
    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class WeightedTransformation(optax.GradientTransformationExtraArgs):
    """An ``optax.GradientTransformationExtraArgs`` built from a :class:`Weighting`.

    It is a plain optax transformation (it chains, jits and vmaps like any
    other). Its attribute ``weighting`` gives the rule it applies, and
    ``per_task`` its :class:`PerTaskTransformation` form, which returns ``K``
    per-task gradients whose sum over tasks is the update: :math:`w_k g_k`
    for the transformation built by :func:`from_weighting` (a method may
    replace it with its own per-task form, e.g. PCGrad's projected
    gradients).
    """

    weighting: Weighting
    per_task: PerTaskTransformation


def is_traced(value: Any) -> bool:
    """Whether a hyperparameter is a traced value.

    ``optax.inject_hyperparams`` calls a method's factory inside the jitted
    update with the current hyperparameters as traced arrays. Factories check
    and convert concrete values (Python or NumPy numbers, concrete arrays) at
    construction, and keep a traced value as it is, unchecked: its schedule is
    the caller's.
    """
    return isinstance(value, jax.core.Tracer)


def canonicalize_key(key: jax.Array | int) -> jax.Array:
    """A typed PRNG key from an int seed, a typed key or a raw ``uint32[2]`` key."""
    if isinstance(key, int):
        return jax.random.key(key)
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(
        "key must be an int seed or a PRNG key (jax.random.key(...));"
        f" found dtype {key.dtype} and shape {key.shape}."
    )


def check_num_tasks(method: str, num_tasks: Any) -> int | None:
    """``num_tasks`` as an int, ``None`` passed through.

    Raises:
      ValueError: naming ``method``, when ``num_tasks`` is not a positive int.
    """
    if num_tasks is None:
        return None
    if isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"{method}: num_tasks must be a positive int; found {num_tasks!r}.")
    return int(num_tasks)


def check_pref_vector(
    method: str, pref_vector: Any, num_tasks: int | None
) -> tuple[np.ndarray | None, int | None]:
    """A method's preference vector, checked: ``(pref as float64, K)``.

    ``None`` passes through with ``num_tasks``; otherwise the vector must be
    1-D, non-empty and finite, and ``K`` is its length (``num_tasks``, when
    given, must agree).

    Raises:
      ValueError: naming ``method``, the shape or values found and ``num_tasks``.
    """
    if pref_vector is None:
        return None, num_tasks
    pref = np.asarray(pref_vector, np.float64)
    if pref.ndim != 1 or pref.shape[0] == 0:
        raise ValueError(
            f"{method}: pref_vector must be a non-empty vector; found shape {pref.shape}."
        )
    if not np.all(np.isfinite(pref)):
        raise ValueError(f"{method}: pref_vector must be finite; found {pref.tolist()}.")
    if num_tasks is not None and num_tasks != pref.shape[0]:
        raise ValueError(
            f"{method}: pref_vector has {pref.shape[0]} entries but num_tasks={num_tasks}."
        )
    return pref, pref.shape[0]


def initial_weights(num_tasks: int | None, fill: float | None = None) -> jax.Array:
    """The ``weights`` field of a state before the first step, for logging.

    Shape ``[K]`` (filled with ``fill``, NaN by default) when ``K`` is known
    at construction, else shape ``[0]``: the field then takes shape ``[K]``
    after the first update. Pass ``num_tasks`` to a method when its state must
    keep one shape from ``init`` on (``lax.scan``, ``optax.apply_if_finite``,
    checkpoint templates).
    """
    if num_tasks is None:
        return jnp.zeros((0,), jnp.float32)
    return jnp.full((num_tasks,), jnp.nan if fill is None else fill, jnp.float32)


def check_update_inputs(
    updates: Any,
    params: Any,
    value: Any,
    *,
    num_tasks: int | None,
    method: str,
    needs_value: bool = False,
) -> tuple[int, Any, Any]:
    """The trace-time checks every update function starts with.

    Args:
      updates: the stacked task gradients.
      params: the parameters, or ``None``.
      value: the per-task losses, or ``None``.
      num_tasks: the number of tasks fixed at construction, or ``None``.
      method: the method's name, for the error messages.
      needs_value: whether ``value`` must be given.

    Returns:
      ``(k, value, dtype)``: the number of tasks, the checked losses (or
      ``None``) and the accumulation dtype of the task gradients' leaves (the
      dtype of the Gramian and of the weights).

    Raises:
      ValueError: when the leaves do not share a leading task axis matching
        ``params`` and ``num_tasks``, when ``value`` does not have shape
        ``(k,)``, or when ``needs_value`` and ``value`` is ``None``.
    """
    k = engine.check_task_grads(updates, params, num_tasks=num_tasks, method=method)
    if value is not None:
        value = engine.check_value(value, k, method=method)
    elif needs_value:
        raise ValueError(
            f"{method} needs the per-task losses: call"
            f" update(task_grads, state, params, value=losses) with losses of"
            f" shape ({k},), e.g. the first output of mtl_optax.task_grads."
        )
    return k, value, engine.tree_accumulation_dtype(updates)


def from_weighting(weighting: Weighting) -> WeightedTransformation:
    r"""Builds the optax transformation that aggregates with ``weighting``.

    .. math::
      w, s' = \mathrm{weights}(J J^\top, s, \ell), \qquad
      u = \sum_{k=1}^K w_k\, g_k

    ``update(task_grads, state, params=None, *, value=None, **extra)`` validates
    ``task_grads`` (and ``params`` and ``value`` when given) at trace time,
    computes the Gramian only if the weighting needs it, and combines the task
    gradients in one pass. Other keyword arguments are ignored, so the
    transformation can sit in an ``optax.chain`` with any other.

    Args:
      weighting: the rule, see :class:`Weighting`.

    Returns:
      A :class:`WeightedTransformation`.
    """

    def init_fn(params: Any) -> Any:
        del params
        return weighting.init()

    def weights_and_state(updates, state, params, value):
        k, value, dtype = check_update_inputs(
            updates,
            params,
            value,
            num_tasks=weighting.num_tasks,
            method=weighting.name,
            needs_value=weighting.needs_value,
        )
        gram = engine.gramian(updates) if weighting.needs_gramian else None
        return weighting.weights(gram, state, value, num_tasks=k, dtype=dtype)

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: Any,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, Any]:
        del extra_args
        weights, new_state = weights_and_state(updates, state, params, value)
        return engine.combine(updates, weights), new_state

    @engine.full_precision
    def per_task_update_fn(
        updates: Any,
        state: Any,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, Any]:
        del extra_args
        weights, new_state = weights_and_state(updates, state, params, value)
        return engine.scale_rows(updates, weights), new_state

    tx = WeightedTransformation(init_fn, update_fn)
    tx.weighting = weighting
    tx.per_task = PerTaskTransformation(weighting.name, init_fn, per_task_update_fn)
    return tx
