r"""Skipping non-finite steps of a transformation of task gradients.

``optax.apply_if_finite`` cannot wrap a chain that starts with a multi-task
method: on a rejected step it returns zeros shaped like its *input*, the
``[K, ...]`` stacked task gradients, while the update has the parameters'
shapes. :func:`apply_if_finite` has ``optax.apply_if_finite``'s semantics for
such chains.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ApplyIfFiniteState", "apply_if_finite"]


class ApplyIfFiniteState(NamedTuple):
    """State of :func:`apply_if_finite`."""

    inner_state: Any  # the wrapped transformation's state after the last kept step.
    notfinite_count: jax.Array  # int32: consecutive non-finite updates so far.
    last_finite: jax.Array  # bool: whether the last update was finite.
    total_notfinite: jax.Array  # int32: non-finite updates in all.


def _check_same_state_shapes(old: Any, new: Any) -> None:
    """A skipped step keeps the old state: it must have the new state's shapes."""
    old_leaves, old_def = jax.tree_util.tree_flatten_with_path(old)
    new_leaves, new_def = jax.tree_util.tree_flatten(new)
    if old_def == new_def:
        mismatches = [
            (
                jax.tree_util.keystr(path),
                jnp.shape(a),
                jnp.shape(b),
                jnp.result_type(a),
                jnp.result_type(b),
            )
            for (path, a), b in zip(old_leaves, new_leaves, strict=True)
            if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b)
        ]
        if not mismatches:
            return
        where = "; ".join(f"{p}: {sa} {da} -> {sb} {db}" for p, sa, sb, da, db in mismatches[:3])
    else:
        where = f"tree structure {old_def} -> {new_def}"
    raise ValueError(
        "apply_if_finite: the wrapped state changes shape at this update, so a skipped"
        f" step cannot keep the previous one ({where}). Pass num_tasks=K to the"
        " method so that its state has its final shape from init."
    )


def apply_if_finite(
    inner: optax.GradientTransformation,
    max_consecutive_errors: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Skips the steps whose update is not finite; for chains over task gradients.

    .. math::
      (u, s') = \mathrm{inner}(g, s), \qquad
      (u_{\text{out}}, s_{\text{out}}) = \begin{cases}
        (u, s') & u \text{ finite (or too many consecutive errors)} \\
        (0, s) & \text{otherwise}
      \end{cases}

    with :math:`0` of the update's shapes and dtypes. A NaN or inf in a task
    gradient (or, for the methods that read them, a loss) makes every method's
    update non-finite; the step is then skipped and the wrapped state, including
    the methods' own states (GradVac's EMA, M-ConFIG's momenta, GradNorm's
    weights, a random method's PRNG key), stays as it was. A run with skipped
    steps ends exactly where the run without those steps ends.

    Args:
      inner: the transformation to protect, typically ``optax.chain(method,
        optimizer)`` taking stacked task gradients.
      max_consecutive_errors: after this many consecutive non-finite updates
        the next ones are applied (as ``optax.apply_if_finite`` does, so that a
        run that only produces NaN does not stall silently). ``None``
        (default): never apply a non-finite update.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`ApplyIfFiniteState`; extra keyword arguments (``value=``...) are
      passed to ``inner``.

    Raises:
      ValueError: at the update, when the wrapped state changes shape (a
        method built without ``num_tasks`` whose state takes its shape at the
        first update): pass ``num_tasks``.

    Example:
      >>> import jax.numpy as jnp, optax, mtl_optax
      >>> method = mtl_optax.mgda(num_tasks=2)
      >>> opt = mtl_optax.apply_if_finite(optax.chain(method, optax.sgd(0.1)))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> bad = {"w": jnp.array([[1.0, jnp.nan], [0.0, 1.0]])}
      >>> u, state = opt.update(bad, state, params)
      >>> u["w"], int(state.total_notfinite)
      (Array([0., 0.], dtype=float32), 1)

    References:
      ``optax.apply_if_finite`` (the same rule for transformations whose
      update has their input's shapes).
    """
    if max_consecutive_errors is not None and max_consecutive_errors < 0:
        raise ValueError(
            f"apply_if_finite: max_consecutive_errors must be >= 0 or None;"
            f" found {max_consecutive_errors}."
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> ApplyIfFiniteState:
        zero = jnp.zeros((), jnp.int32)
        return ApplyIfFiniteState(inner.init(params), zero, jnp.array(True), zero)

    def update_fn(
        updates: Any, state: ApplyIfFiniteState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ApplyIfFiniteState]:
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        finite = jnp.array(True)
        for leaf in jax.tree_util.tree_leaves(new_updates):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        keep = finite
        if max_consecutive_errors is not None:
            keep = keep | (state.notfinite_count >= max_consecutive_errors)
        out = jax.tree_util.tree_map(lambda u: jnp.where(keep, u, jnp.zeros_like(u)), new_updates)
        _check_same_state_shapes(state.inner_state, new_inner)
        inner_state = jax.lax.cond(keep, lambda: new_inner, lambda: state.inner_state)
        bad = (~finite).astype(jnp.int32)
        return out, ApplyIfFiniteState(
            inner_state=inner_state,
            notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1).astype(jnp.int32),
            last_finite=finite,
            total_notfinite=state.total_notfinite + bad,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
