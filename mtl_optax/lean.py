r"""The memory-lean path: Gramian-based methods without the ``K`` stacked gradients.

A method built from a :class:`~mtl_optax.Weighting` (every method with a
``.weighting`` attribute) reads the task gradients only through the
``K x K`` Gramian :math:`G = J J^\top` and applies its weights as
:math:`u = \sum_k w_k g_k = J^\top w`. Neither needs the ``K x P`` Jacobian
in memory at once:

* :math:`u = J^\top w` is the gradient of :math:`\sum_k w_k L_k` with the
  weights held constant: one vector-Jacobian product (VJP);
* the column :math:`G_{:,k} = J g_k` is a Jacobian-vector product (JVP) with
  the task gradient :math:`g_k = J^\top e_k`, itself a VJP.

:func:`lean_grad` linearizes the loss function once (one forward pass, whose
residuals both the JVPs and the VJPs, its transpose, reuse), runs a
``lax.map`` over the tasks that keeps one ``P``-sized task gradient alive at a
time, hands the Gramian to the method's own weighting, and returns the
gradient of the weighted loss. The weighting is the one object the stacked
path (:func:`mtl_optax.task_grads` then ``tx.update``) uses too, so the two
paths give the same weights, state and update, up to floating-point rounding.

Memory against time: the stacked path holds ``K`` gradients (``4 K P`` bytes
in float32: 2.5 GB for ``K = 64`` and ``P = 10^7``); the lean path holds
``chunk_size`` of them, plus one for the update, whatever ``K``. It costs
``K`` VJPs and ``K`` JVPs where the stacked path costs ``K`` vectorised VJPs
and two passes over the ``K x P`` gradients (Gramian and combination). On a
2-core CPU, for a 10.5M-parameter MLP, the lean step took about half the
stacked step's time for ``K`` in {4, 16, 64} (``benchmarks/bench_memory.py``);
on accelerators, where a vectorised pass over ``K`` tasks runs in parallel, it
can be slower. ``chunk_size`` moves between the two.

Why JVPs rather than per-layer quantities (TorchJD's *autogram*, which builds
the Gramian from each layer's inputs and output gradients): the JVP scheme
needs nothing from the model, works for any JAX function of any pytree of
parameters (shared convolutions, attention, custom layers) and is exact;
per-layer formulas need a rule per layer type and per-example structure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from mtl_optax import engine
from mtl_optax.base import Weighting
from mtl_optax.engine import leaf_path as _path
from mtl_optax.gradients import _is_nnx_module

__all__ = ["lean_cross_gramian", "lean_grad", "lean_gramian"]


def _accumulation_dtype(params: Any, caller: str) -> Any:
    """Checks that every parameter leaf is floating; the dtype of the ``K x K`` world."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError(f"{caller}: the params have no leaves.")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{caller}: parameter leaf {_path(path)} has dtype {dtype}; the lean path"
                " differentiates with respect to every leaf, which must be real floating"
                " point. Close over non-trainable arrays in loss_fn instead."
            )
    return engine.tree_accumulation_dtype([x for _, x in leaves])


def _check_chunk_size(chunk_size: int, caller: str) -> int:
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"{caller}: chunk_size must be a positive int; found {chunk_size!r}.")
    return int(chunk_size)


def _linearize(
    loss_fn: Callable[..., Any],
    params: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    has_aux: bool,
    caller: str,
) -> tuple[jax.Array, Any, Callable[[Any], jax.Array], Callable[[jax.Array], Any]]:
    """One forward pass: ``(losses, aux, jvp, vjp)`` with ``jvp(t) = J t``, ``vjp(c) = J^T c``."""
    if _is_nnx_module(params):
        raise TypeError(
            f"{caller}: params is a Flax NNX module; pass its parameters, e.g."
            " graphdef, params, rest = nnx.split(model, nnx.Param, ...), with a loss_fn"
            " that calls nnx.merge(graphdef, params, rest)."
        )

    def split(p: Any) -> tuple[jax.Array, Any]:
        out = loss_fn(p, *args, **kwargs)
        losses, aux = out if has_aux else (out, None)
        losses = jnp.asarray(losses)
        if losses.ndim != 1 or not jnp.issubdtype(losses.dtype, jnp.floating):
            raise ValueError(
                f"{caller}: loss_fn must return the K per-task losses as a floating-point"
                f" vector of shape (K,); it returned shape {losses.shape} and dtype"
                f" {losses.dtype}."
                + (" With has_aux=True it must return (losses, aux)." if has_aux else "")
            )
        return losses, aux

    losses, jvp, aux = jax.linearize(split, params, has_aux=True)
    transposed = jax.linear_transpose(jvp, params)
    return losses, aux, jvp, lambda c: transposed(c)[0]


def _squared_norm(tree: Any, dtype: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(
        (jnp.vdot(x.astype(dtype).ravel(), x.astype(dtype).ravel()) for x in leaves),
        start=jnp.zeros((), dtype),
    )


def _columns(
    vjp: Callable[[jax.Array], Any],
    jvp: Callable[[Any], jax.Array],
    num_tasks: int,
    cotangent_dtype: Any,
    dtype: Any,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """``(M, d)``: ``M[:, k] = jvp(vjp(e_k))`` and ``d[k] = |vjp(e_k)|^2``, task by task."""

    def one(e: jax.Array) -> tuple[jax.Array, jax.Array]:
        g = vjp(e)  # the task gradient g_k: the only P-sized buffer of the loop
        return jvp(g).astype(dtype), _squared_norm(g, dtype)

    eye = jnp.eye(num_tasks, dtype=cotangent_dtype)
    rows, diag = lax.map(one, eye, batch_size=min(chunk_size, num_tasks))
    return rows.T, diag


def _gramian(vjp, jvp, num_tasks, cotangent_dtype, dtype, chunk_size) -> jax.Array:
    columns, diag = _columns(vjp, jvp, num_tasks, cotangent_dtype, dtype, chunk_size)
    gram = 0.5 * (columns + columns.T)
    return gram.at[jnp.diag_indices(num_tasks)].set(diag)


def lean_gramian(
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    has_aux: bool = False,
    chunk_size: int = 1,
    **kwargs: Any,
) -> tuple[Any, jax.Array]:
    r"""Per-task losses and the Gramian :math:`J J^\top`, one task gradient at a time.

    .. math::
      g_k = J^\top e_k, \qquad
      G_{kk} = \lVert g_k \rVert^2, \qquad
      G_{lk} = G_{kl} = \tfrac12\big((J g_k)_l + (J g_l)_k\big)

    One forward pass (``jax.linearize``), then a ``lax.map`` over the tasks of
    one VJP (the task gradient) and one JVP (a column of :math:`G`). Equal to
    ``mtl_optax.gramian(mtl_optax.task_grads(loss_fn, params, *args)[1])`` up
    to rounding; exactly symmetric.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)`` returning the ``[K]``
        losses, or ``(losses, aux)`` when ``has_aux``.
      params: a pytree of floating-point arrays.
      *args: further positional arguments of ``loss_fn`` (a batch, ...).
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      chunk_size: tasks per pass of the loop (vectorised within a chunk):
        ``chunk_size`` task gradients are alive at once. ``K`` or more gives
        ``jax.jacrev``'s memory.
      **kwargs: further keyword arguments of ``loss_fn``.

    Returns:
      ``(losses, gramian)``, or ``((losses, aux), gramian)`` when ``has_aux``.
      The Gramian has the accumulation dtype of the parameters (at least
      float32); its diagonal is accumulated in it, its off-diagonal entries
      come from the model's forward-mode pass, in the losses' dtype.

    Example:
      >>> import jax.numpy as jnp, mtl_optax.lean
      >>> def losses(p, x):
      ...   return jnp.stack([jnp.sum(p["w"] * x), jnp.sum(p["w"] ** 2)])
      >>> l, g = mtl_optax.lean.lean_gramian(losses, {"w": jnp.array([1.0, 2.0])}, jnp.ones(2))
      >>> g  # task gradients (1, 1) and (2, 4)
      Array([[ 2.,  6.],
             [ 6., 20.]], dtype=float32)
    """
    chunk_size = _check_chunk_size(chunk_size, "lean_gramian")
    dtype = _accumulation_dtype(params, "lean_gramian")
    losses, aux, jvp, vjp = _linearize(loss_fn, params, args, kwargs, has_aux, "lean_gramian")
    gram = _gramian(vjp, jvp, losses.shape[0], losses.dtype, dtype, chunk_size)
    return ((losses, aux), gram) if has_aux else (losses, gram)


def lean_cross_gramian(
    loss_fn: Callable[..., Any],
    params: Any,
    args_a: tuple[Any, ...],
    args_b: tuple[Any, ...],
    *,
    chunk_size: int = 1,
) -> jax.Array:
    r"""The cross matrix :math:`A = J_a J_b^\top` of two batches, without stacking.

    .. math::
      A_{:,l} = J_a\, g^{(b)}_l, \qquad g^{(b)}_l = J_b^\top e_l

    where :math:`J_a, J_b` are the Jacobians of the losses on the positional
    arguments ``args_a`` and ``args_b``: one forward pass per batch, then a
    ``lax.map`` of one VJP on batch ``b`` and one JVP on batch ``a`` per task.
    Equal up to rounding to ``mtl_optax.cross_gramian(task_grads(loss_fn,
    params, *args_a)[1], task_grads(loss_fn, params, *args_b)[1])``, the matrix
    :func:`mtl_optax.sdmgrad` takes in its stochastic form; pass it to
    :func:`lean_grad` as ``gramian=``.

    Args:
      loss_fn: ``loss_fn(params, *args)`` returning the ``[K]`` losses.
      params: a pytree of floating-point arrays.
      args_a: the positional arguments of the first batch (rows of ``A``).
      args_b: those of the second batch (columns of ``A``).
      chunk_size: tasks per pass of the loop, see :func:`lean_gramian`.

    Returns:
      The ``[K, K]`` matrix :math:`A`, in the parameters' accumulation dtype.

    Raises:
      ValueError: the two batches give different numbers of losses.

    Example:
      >>> import jax.numpy as jnp, mtl_optax.lean
      >>> def losses(p, x):
      ...   return jnp.stack([jnp.sum(p * x), jnp.sum(p ** 2)])
      >>> p = jnp.array([1.0, 2.0])
      >>> mtl_optax.lean.lean_cross_gramian(losses, p, (jnp.ones(2),), (jnp.zeros(2),))
      Array([[ 0.,  6.],
             [ 0., 20.]], dtype=float32)
    """
    chunk_size = _check_chunk_size(chunk_size, "lean_cross_gramian")
    dtype = _accumulation_dtype(params, "lean_cross_gramian")
    losses_a, _, jvp_a, _ = _linearize(
        loss_fn, params, tuple(args_a), {}, False, "lean_cross_gramian"
    )
    losses_b, _, _, vjp_b = _linearize(
        loss_fn, params, tuple(args_b), {}, False, "lean_cross_gramian"
    )
    if losses_a.shape != losses_b.shape:
        raise ValueError(
            f"lean_cross_gramian: the two batches give losses of shapes {losses_a.shape}"
            f" and {losses_b.shape}; both must be (K,) with the same K."
        )
    columns, _ = _columns(vjp_b, jvp_a, losses_a.shape[0], losses_b.dtype, dtype, chunk_size)
    return columns


def _weighting_of(method: Any) -> Weighting:
    if isinstance(method, Weighting):
        return method
    weighting = getattr(method, "weighting", None)
    if isinstance(weighting, Weighting):
        return weighting
    raise TypeError(
        "lean_grad: the method has no `.weighting`, so its update is not a weighted sum"
        " of the task gradients that a Gramian determines (graddrop masks coordinates,"
        " m_conflict_free keeps per-task momenta, excess_mtl reads every coordinate"
        " of the task gradients, compose chains per-task forms,"
        " mgda_ub(batch_axes=...) reads another Gramian): use the stacked path,"
        " mtl_optax.task_grads then tx.update. Pass the method itself, not an"
        " optax.chain: lean_grad returns a gradient to give to the optimizer. Methods"
        " with a weighting: mean, sum, constant, rlw, identity, mgda, mgda_ub, cagrad,"
        " pcgrad, gradvac, imtl_g, upgrad, dualproj, aligned_mtl, fairgrad, nash_mtl,"
        " conflict_free, nsgd, gradnorm, sdmgrad."
        f" Found {type(method).__name__}."
    )


def lean_grad(
    method: Any,
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    state: Any,
    has_aux: bool = False,
    chunk_size: int = 1,
    gramian: jax.Array | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any]:
    r"""A weighting method's update without holding the ``K`` task gradients.

    .. math::
      G = J J^\top, \qquad w, s' = \mathrm{weights}(G, s, L(\theta)), \qquad
      u = \nabla_\theta \sum_{k=1}^K \operatorname{sg}(w_k)\, L_k(\theta)
        = J^\top w

    where :math:`\operatorname{sg}` stops the gradient. The Gramian is
    computed by :func:`lean_gramian` (only when the weighting reads it) and
    the update by one VJP of the same linearization, so a step costs one
    forward pass, ``K`` VJPs and ``K`` JVPs, and holds ``chunk_size + 1``
    parameter-sized gradients whatever ``K``. ``u`` and ``s'`` equal, up to
    rounding, what the stacked path gives::

      losses, g = mtl_optax.task_grads(loss_fn, params, *args)
      u, s = method.update(g, state, params, value=losses)

    for the same ``state``: random methods (rlw, pcgrad, gradvac) draw from
    the key in the state, the same draws in both paths.

    Args:
      method: a method with a ``.weighting`` attribute (every method built by
        :func:`mtl_optax.from_weighting`, and sdmgrad), or a
        :class:`~mtl_optax.Weighting`. Not an ``optax.chain``: give the
        returned gradient to the optimizer.
      loss_fn: ``loss_fn(params, *args, **kwargs)`` returning the ``[K]``
        losses, or ``(losses, aux)`` when ``has_aux``.
      params: a pytree of floating-point arrays.
      *args: further positional arguments of ``loss_fn`` (a batch, ...).
      state: the method's state, ``method.init(params)`` at the start (or
        ``weighting.init()``).
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
      chunk_size: tasks per pass of the Gramian loop, see
        :func:`lean_gramian`.
      gramian: a ``[K, K]`` matrix to use instead of :math:`J J^\top` of this
        batch, e.g. SDMGrad's :math:`A` from :func:`lean_cross_gramian` (the
        stacked path's ``update(..., cross_gramian=A)``). Only for weightings
        that read a Gramian.
      **kwargs: further keyword arguments of ``loss_fn``.

    Returns:
      ``(losses, update, new_state)``, or ``((losses, aux), update,
      new_state)`` when ``has_aux``. ``update`` has the structure, shapes and
      dtypes of ``params`` (a descent direction is its negative, as for
      ``jax.grad``; optax optimizers take it as it is).

    Raises:
      TypeError: ``method`` has no weighting (its update is not a weighted sum
        of the task gradients; use the stacked path).
      ValueError: a parameter leaf is not floating point, ``loss_fn`` does not
        return a vector, ``K`` differs from the method's ``num_tasks``, or
        ``gramian`` is not a ``[K, K]`` floating-point array.

    Example:
      >>> import jax, jax.numpy as jnp, optax, mtl_optax, mtl_optax.lean
      >>> def losses(p, x):
      ...   return jnp.stack([jnp.sum((p - x) ** 2), jnp.sum((p + x) ** 2)])
      >>> method, opt = mtl_optax.mgda(num_tasks=2), optax.sgd(0.1)
      >>> p = jnp.array([1.0, 0.0]); x = jnp.array([1.0, 1.0])
      >>> mstate, ostate = method.init(p), opt.init(p)
      >>> @jax.jit
      ... def step(p, mstate, ostate, x):
      ...   l, g, mstate = mtl_optax.lean.lean_grad(method, losses, p, x, state=mstate)
      ...   u, ostate = opt.update(g, ostate, p)
      ...   return optax.apply_updates(p, u), mstate, ostate
      >>> p, mstate, ostate = step(p, mstate, ostate, x)
      >>> mstate.weights  # the same as mgda.update on the stacked gradients
      Array([0.75, 0.25], dtype=float32)
      >>> p  # p - 0.1 * (0.75 * (0, -2) + 0.25 * (4, 2))
      Array([0.9, 0.1], dtype=float32)

    References:
      Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
      <https://arxiv.org/abs/2406.16232>`_, 2024 (Section 6: the Gramian is
      a sufficient statistic, the update a backward pass of the weighted
      losses). TorchJD 0.18 ``torchjd.autogram.Engine``: ``compute_gramian``,
      a ``Weighting``, then ``losses.backward(weights)``.

    Differences from the references:
      TorchJD's engine accumulates the Gramian layer by layer from module
      hooks (``nn.Module`` layers that treat the batch independently, a second
      forward pass); here it comes from JVPs of one linearization, for any JAX
      function of any pytree, at the price of ``K`` VJPs and ``K`` JVPs. On
      the same MLP both give the same Gramian and, with IMTL-G, the same
      update (to 1e-9 in float64; ``tests/test_lean.py``).
    """
    weighting = _weighting_of(method)
    name = f"lean_grad({weighting.name})"
    chunk_size = _check_chunk_size(chunk_size, name)
    dtype = _accumulation_dtype(params, name)
    losses, aux, jvp, vjp = _linearize(loss_fn, params, args, kwargs, has_aux, name)
    k = losses.shape[0]
    if weighting.num_tasks is not None and k != weighting.num_tasks:
        raise ValueError(
            f"{name}: configured for num_tasks={weighting.num_tasks}, but loss_fn returned"
            f" losses of shape {losses.shape}; expected shape ({weighting.num_tasks},)."
        )
    if gramian is not None:
        if not weighting.needs_gramian:
            raise ValueError(f"{name}: gramian= was given, but {weighting.name} does not read one.")
        gramian = jnp.asarray(gramian)
        if gramian.shape != (k, k) or not jnp.issubdtype(gramian.dtype, jnp.floating):
            raise ValueError(
                f"{name}: gramian must be a floating-point array of shape ({k}, {k}) (K={k}"
                f" tasks); found shape {gramian.shape} and dtype {gramian.dtype}."
            )
        dtype = jnp.promote_types(dtype, engine.accumulation_dtype(gramian.dtype))
    elif weighting.needs_gramian:
        gramian = _gramian(vjp, jvp, k, losses.dtype, dtype, chunk_size)
    # The weighting's K x K work at full precision, as in every transformation;
    # the Gramian above comes through the user's model, at the user's precision.
    weights, new_state = engine.full_precision(weighting.weights)(
        gramian, state, losses, num_tasks=k, dtype=dtype
    )
    weights = jnp.asarray(weights)
    if weights.shape != (k,):
        raise ValueError(
            f"{name}: the weighting returned weights of shape {weights.shape}; expected ({k},)."
        )
    update = vjp(lax.stop_gradient(weights).astype(losses.dtype))
    return ((losses, aux), update, new_state) if has_aux else (losses, update, new_state)
