"""Per-task gradients: one forward pass, K vector-Jacobian products."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Up to this many tasks, task_grads runs the K backward passes one by one on CPU.
_UNROLLED_MAX_TASKS = 64

__all__ = ["task_grads"]


def _is_nnx_module(obj: Any) -> bool:
    # Flax is optional: if flax.nnx was never imported, obj cannot be an NNX module.
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def task_grads(
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    has_aux: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    r"""Per-task losses and stacked per-task gradients.

    For ``loss_fn(params, *args, **kwargs)`` returning the ``K`` task losses
    :math:`L(\theta) \in \mathbb{R}^K`, returns the losses and the Jacobian
    :math:`J = \partial L / \partial \theta` as a pytree with the structure of
    ``params`` whose every leaf has a leading task axis ``K`` — the input every
    mtl_optax method takes. Built on ``jax.jacrev``: one forward pass and ``K``
    vectorised (``vmap``) backward passes.

    ``params`` may be any pytree (Flax Linen ``variables["params"]``, an
    ``nnx.State``) or a Flax NNX module. For a module, ``loss_fn`` receives the
    module, and the gradients are taken with respect to its ``nnx.Param``
    variables and returned as an ``nnx.State``, as ``nnx.grad`` does; pass them
    to ``nnx.Optimizer.update(model, grads, value=losses)``.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)`` returning the ``[K]``
        losses, or ``(losses, aux)`` when ``has_aux``.
      params: the parameters to differentiate with respect to.
      *args: further positional arguments of ``loss_fn`` (a batch, ...).
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      **kwargs: further keyword arguments of ``loss_fn``.

    Returns:
      ``(losses, grads)``, or ``((losses, aux), grads)`` when ``has_aux`` (the
      convention of ``jax.value_and_grad``).

    Raises:
      ValueError: ``loss_fn`` does not return a vector of losses.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> def losses(p, x):
      ...   return jnp.stack([jnp.sum(p["w"] * x), jnp.sum(p["w"] ** 2)])
      >>> l, g = mtl_optax.task_grads(losses, {"w": jnp.array([1.0, 2.0])}, jnp.ones(2))
      >>> l, g["w"]
      (Array([3., 5.], dtype=float32), Array([[1., 1.],
             [2., 4.]], dtype=float32))
    """
    if _is_nnx_module(params):
        return _nnx_task_grads(loss_fn, params, *args, has_aux=has_aux, **kwargs)

    def split(p, *args):
        out = loss_fn(p, *args, **kwargs)
        losses, aux = out if has_aux else (out, None)
        losses = jnp.asarray(losses)
        if losses.ndim != 1:
            raise ValueError(
                "task_grads: loss_fn must return the K per-task losses as a vector"
                f" of shape (K,); it returned shape {losses.shape}."
                + (" With has_aux=True it must return (losses, aux)." if has_aux else "")
            )
        return losses, (losses, aux)

    losses, vjp_fn, (_, aux) = jax.vjp(lambda p: split(p, *args), params, has_aux=True)
    k = losses.shape[0]
    basis = jnp.eye(k, dtype=losses.dtype)
    if jax.default_backend() == "cpu" and k <= _UNROLLED_MAX_TASKS:
        # K backward passes one after the other, sharing the forward pass: on
        # XLA's CPU backend this is faster than their vmap (which batches every
        # matrix product of the backward pass over K: 1.4x slower at K = 16
        # for a 3-layer MLP); the stacking is the same.
        rows = [vjp_fn(basis[i])[0] for i in range(k)]
        grads = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rows)
    else:
        (grads,) = jax.vmap(vjp_fn)(basis)
    return ((losses, aux), grads) if has_aux else (losses, grads)


def _nnx_task_grads(loss_fn, model, *args, has_aux, **kwargs):
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def pure(p, rest, *args):
        m = nnx.merge(graphdef, p, rest, copy=True)
        out = loss_fn(m, *args, **kwargs)
        losses, aux = out if has_aux else (out, None)
        # Non-parameter state changed by the forward pass (batch statistics,
        # RNG counters) is carried out and written back into the model.
        return losses, (aux, nnx.state(m, nnx.Not(nnx.Param)))

    # ``rest`` goes in as an argument, not a closure, so that the module merged
    # inside the trace may update its non-parameter variables.
    (losses, (aux, new_rest)), grads = task_grads(pure, params, rest, *args, has_aux=True)
    nnx.update(model, new_rest)
    return ((losses, aux), grads) if has_aux else (losses, grads)
