"""Chaining methods in their per-task form: ``identity`` and ``compose``.

A method's per-task form (``method.per_task``, a
:class:`~mtl_optax.base.PerTaskTransformation`) maps the ``K`` task gradients
to ``K`` modified task gradients instead of their combination; every method
built by :func:`~mtl_optax.from_weighting` has one (it returns
:math:`w_k g_k`). :func:`compose` applies several per-task forms in sequence
and sums the result, as vambn's ``Compose`` inside its ``MOOForLoop`` (with
``rescale="sum_norm"``): e.g. IMTL-G's projections followed by NSGD's
normalisation, or GradNorm's weights followed by GradDrop's sign dropout.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import engine
from mtl_optax.base import (
    PerTaskTransformation,
    WeightedTransformation,
    Weighting,
    from_weighting,
    initial_weights,
)
from mtl_optax.registry import register

__all__ = ["ComposedTransformation", "IdentityState", "compose", "identity"]

# vambn's MOOForLoop floor on the norm of the combined direction.
_RESCALE_EPS = 1e-10


class IdentityState(NamedTuple):
    """State of :func:`identity`."""

    weights: jax.Array  # [K] weights of the last step (ones), for logging.


@register("identity")
def identity(num_tasks: int | None = None) -> WeightedTransformation:
    r"""Leaves the task gradients unchanged: their sum as an update.

    .. math::
      \text{per task: } g_k \mapsto g_k, \qquad u = \sum_{k=1}^K g_k

    As a transformation it equals :func:`mtl_optax.sum`; it exists for its
    per-task form (``tx.per_task`` returns the task gradients as they are),
    the neutral element of :func:`compose` and vambn's ``Identity``.

    Args:
      num_tasks: ``K``, optional. When given, it is checked at every update
        and the state has its final shape from ``init`` on.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (with ``.per_task``).

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("identity")
      >>> g = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
      >>> tx.update(g, tx.init({"w": jnp.zeros(2)}))[0]["w"]
      Array([4., 6.], dtype=float32)
      >>> tx.per_task.update(g, tx.per_task.init({"w": jnp.zeros(2)}))[0]["w"]
      Array([[1., 2.],
             [3., 4.]], dtype=float32)

    References:
      ``Identity`` in ``adrianjav/impartial-vaes``
      (``heterogeneous/torchmoo/mtl.py``) and ``nfdi4health/docker-vambn``
      (``vambn/modelling/mtl/mtl.py``).
    """

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del gramian, state, value
        w = jnp.ones((num_tasks,), dtype)
        return w, IdentityState(weights=w.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name="identity",
            init=lambda: IdentityState(weights=initial_weights(num_tasks, 1.0)),
            weights=weights_fn,
            num_tasks=num_tasks,
            needs_gramian=False,
        )
    )


class ComposedTransformation(optax.GradientTransformationExtraArgs):
    """The ``optax.GradientTransformationExtraArgs`` returned by :func:`compose`.

    Attributes (besides ``init`` and ``update``):
      methods: the per-task forms applied, in order.
      per_task: the composed :class:`~mtl_optax.base.PerTaskTransformation`.
    """

    methods: tuple[PerTaskTransformation, ...]
    per_task: PerTaskTransformation


def _per_task_form(method: Any, position: int) -> PerTaskTransformation:
    if isinstance(method, PerTaskTransformation):
        return method
    form = getattr(method, "per_task", None)
    if isinstance(form, PerTaskTransformation):
        return form
    if isinstance(method, str):
        hint = f" Pass the built method, e.g. mtl_optax.get({method!r}, ...), not its name."
    else:
        hint = (
            " Only methods whose update is a per-task transformation of the task"
            " gradients have one: every weighting method (built with"
            " mtl_optax.from_weighting), identity, compose(...) itself, and the"
            " methods that document a `.per_task` attribute."
        )
    raise TypeError(
        f"compose: method #{position} ({type(method).__name__}) has no per-task form"
        f" (a `.per_task` attribute holding a PerTaskTransformation).{hint}"
    )


def _task_sum(tree: Any) -> Any:
    """``sum_k`` of each leaf over the task axis, in its accumulation dtype."""
    return jax.tree_util.tree_map(
        lambda x: engine.sum_tasks(x.astype(engine.accumulation_dtype(x.dtype))), tree
    )


def _safe_norm(tree: Any) -> jax.Array:
    """Euclidean norm over all leaves: 0 (with a finite derivative) for a zero tree."""
    leaves = jax.tree_util.tree_leaves(tree)
    squared = sum(jnp.sum(jnp.square(x)) for x in leaves)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


@register("compose")
def compose(
    *methods: Any,
    rescale: Literal["none", "sum_norm"] = "none",
    num_tasks: int | None = None,
) -> ComposedTransformation:
    r"""Applies methods' per-task forms in sequence, then sums the task gradients.

    With :math:`T_1, \dots, T_m` the per-task forms of ``methods`` (each maps
    the ``K`` task gradients to ``K`` task gradients):

    .. math::
      (o_1, \dots, o_K) = T_m \circ \dots \circ T_1 (g_1, \dots, g_K), \qquad
      u = s \sum_{k=1}^K o_k

    with :math:`s = 1` for ``rescale="none"`` and, for ``rescale="sum_norm"``,

    .. math::
      s = \frac{\lVert \sum_k g_k \rVert}{\max(\lVert \sum_k o_k \rVert, 10^{-10})}

    so the combined direction gets the norm of the plain summed gradient
    (vambn's ``MOOForLoop``). The per-task form ``compose(...).per_task``
    returns :math:`s\, o_k` (its sum over tasks is the update), so composed
    methods can be composed again. The state is the tuple of the methods'
    states; each update passes ``params``, ``value`` and any extra keyword
    arguments to every method. ``compose()`` with no method is
    :func:`identity` (vambn's ``setup_moo([])``).

    Args:
      *methods: transformations with a per-task form (a ``.per_task``
        attribute: every weighting method, :func:`identity`, a composition,
        and other methods that document one), or per-task forms themselves.
      rescale: ``"none"`` (vambn's ``Compose``) or ``"sum_norm"`` (vambn's
        ``MOOForLoop``; a positive global scale of the methods' outputs then
        has no effect).
      num_tasks: ``K``, optional; checked at every update when given.

    Returns:
      A :class:`ComposedTransformation`, an
      ``optax.GradientTransformationExtraArgs`` with ``.per_task`` and
      ``.methods``.

    Raises:
      TypeError: a method has no per-task form (at construction).
      ValueError: ``rescale`` is not one of the above; at the update, the
        state is not the tuple of the methods' states.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> from mtl_optax._compose import compose
      >>> g = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
      >>> nsgd = mtl_optax.get("nsgd", update_at=1, num_tasks=2)
      >>> tx = compose(mtl_optax.get("identity"), nsgd)
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # both gradients rescaled to the norm 2.5
      Array([2.5, 2.5], dtype=float32)
      >>> len(state), int(state[1].count)
      (2, 1)
      >>> tx = compose(nsgd, rescale="sum_norm")
      >>> u, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # the same direction, rescaled to the norm of g_1 + g_2 = (3, 1): sqrt(10)
      Array([2.236068, 2.236068], dtype=float32)

    References:
      ``Compose``, ``setup_moo`` and ``MOOForLoop`` in
      ``nfdi4health/docker-vambn`` (``vambn/modelling/mtl/``), adapted from
      ``adrianjav/impartial-vaes`` (``heterogeneous/torchmoo/``); used in
      Javaloy et al., `Mitigating Modality Collapse in Multimodal VAEs via
      Impartial Optimization <https://arxiv.org/abs/2206.04496>`_, ICML 2022.

    Differences from the references: vambn's ``MOOForLoop`` rescales a
    method's output to the norm of the summed gradients of a shared
    representation, inside the backward pass; here the same rule applies to
    the stacked task gradients of any parameters. When
    :math:`\lVert\sum_k o_k\rVert` is below the ``1e-10`` floor (e.g.
    opposite gradients), the update is :math:`\sum_k o_k \cdot
    \lVert\sum_k g_k\rVert / 10^{-10}`, as in the reference (zero when the
    outputs sum to exactly zero).
    """
    if rescale not in ("none", "sum_norm"):
        raise ValueError(f"compose: rescale must be 'none' or 'sum_norm'; found {rescale!r}.")
    forms = tuple(_per_task_form(m, i) for i, m in enumerate(methods))

    def init_fn(params: Any) -> tuple[Any, ...]:
        return tuple(form.init(params) for form in forms)

    def run(updates, state, params, value, extra_args):
        k = engine.check_task_grads(updates, params, num_tasks=num_tasks, method="compose")
        if value is not None:
            value = engine.check_value(value, k, method="compose")
        if not isinstance(state, tuple) or len(state) != len(forms):
            raise ValueError(
                f"compose: the state must be the tuple of the {len(forms)} methods'"
                f" states (as returned by init); found {type(state).__name__}"
                + (f" of length {len(state)}." if isinstance(state, tuple) else ".")
            )
        out, new_states = updates, []
        for form, form_state in zip(forms, state, strict=True):
            out, form_state = form.update(out, form_state, params, value=value, **extra_args)
            new_states.append(form_state)
        summed = _task_sum(out)
        scale = None
        if rescale == "sum_norm":
            out_norm = _safe_norm(summed)
            scale = _safe_norm(_task_sum(updates)) / jnp.maximum(out_norm, _RESCALE_EPS)
        return out, summed, scale, tuple(new_states)

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: tuple[Any, ...],
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, tuple[Any, ...]]:
        _, summed, scale, new_state = run(updates, state, params, value, extra_args)
        if scale is not None:
            summed = jax.tree_util.tree_map(lambda x: scale.astype(x.dtype) * x, summed)
        update = jax.tree_util.tree_map(lambda x, g: x.astype(g.dtype), summed, updates)
        return update, new_state

    @engine.full_precision
    def per_task_update_fn(
        updates: Any,
        state: tuple[Any, ...],
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, tuple[Any, ...]]:
        out, _, scale, new_state = run(updates, state, params, value, extra_args)
        if scale is not None:
            k = jax.tree_util.tree_leaves(out)[0].shape[0]
            out = engine.scale_rows(out, jnp.full((k,), scale))
        return out, new_state

    tx = ComposedTransformation(init_fn, update_fn)
    tx.methods = forms
    tx.per_task = PerTaskTransformation("compose", init_fn, per_task_update_fn)
    return tx
