"""Gradient sign dropout: ``graddrop``.

GradDrop is elementwise, not a weighting: every coordinate of every task
gradient is kept or dropped according to a random draw compared with the
coordinate's *sign purity*, so the update is not a linear combination of the
task gradients with ``K`` weights and no Gramian is computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mtl_optax import _random, engine
from mtl_optax._random import threefry_2x32_bits
from mtl_optax.base import PerTaskTransformation, canonicalize_key
from mtl_optax.engine import leaf_path as _path
from mtl_optax.registry import register

__all__ = [
    "GradDropState",
    "GradDropTransformation",
    "apply_graddrop",
    "graddrop",
    "graddrop_uniforms",
]

_NAME = "graddrop"


def _normalize_batch_axes(batch_axes: int | Sequence[int] | None) -> tuple[int, ...]:
    if batch_axes is None:
        return ()
    if isinstance(batch_axes, (int, np.integer)):
        return (int(batch_axes),)
    axes = tuple(batch_axes)
    for axis in axes:
        if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
            raise ValueError(
                f"{_NAME}: batch_axes must be an int or a sequence of ints; found {batch_axes!r}."
            )
    return tuple(int(a) for a in axes)


def _leaf_axes(path: str, param_ndim: int, batch_axes: tuple[int, ...]) -> tuple[int, ...]:
    """``batch_axes`` (axes of the parameter, without the task axis) made non-negative."""
    out = []
    for axis in batch_axes:
        if not -param_ndim <= axis < param_ndim:
            raise ValueError(
                f"{_NAME}: batch_axes={batch_axes} names axis {axis}, but leaf {path} has"
                f" parameter shape of rank {param_ndim} (the leaf's shape without its"
                " leading task axis); batch axes count from the first axis after the"
                " task axis."
            )
        out.append(axis % param_ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{_NAME}: batch_axes={batch_axes} repeats an axis of leaf {path}.")
    return tuple(sorted(out))


def _stat_shape(param_shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if i in axes else s for i, s in enumerate(param_shape))


def _check_leakage(leakage: Any) -> np.ndarray:
    lk = np.asarray(leakage, dtype=np.float64)
    if lk.ndim > 1 or (lk.ndim == 1 and lk.shape[0] == 0):
        raise ValueError(
            f"{_NAME}: leakage must be a scalar or a vector of K per-task values; found"
            f" shape {lk.shape}."
        )
    if not np.all(np.isfinite(lk)) or np.any(lk < 0) or np.any(lk > 1):
        raise ValueError(f"{_NAME}: leakage must lie in [0, 1]; found {lk.tolist()}.")
    return lk


def graddrop_uniforms(
    key: jax.Array | int, task_grads: Any, *, batch_axes: int | Sequence[int] | None = None
) -> Any:
    """The uniform draws of one GradDrop step from ``key``.

    One independent ``U(0, 1)`` draw per coordinate of the sign statistic: for
    each leaf of ``task_grads`` (shape ``(K, *param_shape)``) an array of shape
    ``param_shape`` with the ``batch_axes`` set to 1, in the leaf's accumulation
    dtype (float32, or float64 for float64 leaves). The leaves use independent
    keys split from ``key``. :func:`graddrop` calls this with the draw key it
    splits from its state; use ``tx.uniforms(task_grads, state)`` to get the
    draws of the next update of a given state.

    Args:
      key: an int seed or a PRNG key.
      task_grads: stacked task gradients (only shapes and dtypes are read).
      batch_axes: see :func:`graddrop`.

    Returns:
      A pytree with the structure of ``task_grads``.
    """
    key = canonicalize_key(key)
    axes = _normalize_batch_axes(batch_axes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(task_grads)
    keys = _random.split(key, max(len(leaves), 1))
    out = []
    for (path, leaf), leaf_key in zip(leaves, keys, strict=False):
        shape = tuple(jnp.shape(leaf))[1:]
        leaf_axes = _leaf_axes(_path(path), len(shape), axes)
        dtype = engine.accumulation_dtype(jnp.result_type(leaf))
        out.append(_uniform(leaf_key, _stat_shape(shape, leaf_axes), dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Uniform draws in [0, 1).

    In float32: 24 random bits per draw, i.e. uniform on the grid ``{0,
    2**-24, ..., 1 - 2**-24}``. For a Threefry key the bits are
    ``jax.extend.random.threefry_2x32`` on the counters ``0 .. n-1`` (the
    generator of ``jax.random.bits`` before its partitionable form), one
    Threefry-2x32 evaluation per *two* draws, computed by
    :func:`mtl_optax._random.threefry_2x32_bits`: the same bits, written so
    that XLA fuses them into GradDrop's single pass over the task gradients
    (drawing the uniforms was the bulk of GradDrop's cost on CPU: at K = 2,
    P = 1e7, 61 ms with ``jax.random``'s kernel against 25 ms fused). Other key
    implementations use ``jax.random.bits``. In float64, ``jax.random.uniform``.
    """
    if jnp.dtype(dtype) != jnp.float32:
        return jax.random.uniform(_random.fused(key), shape, dtype)
    size = math.prod(shape)
    if _random._is_threefry(key) and 0 < size < 2**32:
        bits = threefry_2x32_bits(jax.random.key_data(key), size).reshape(shape)
    else:
        bits = jax.random.bits(key, shape, jnp.uint32)
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def apply_graddrop(
    task_grads: Any,
    uniforms: Any,
    *,
    leakage: Any = 0.0,
    batch_axes: int | Sequence[int] | None = None,
    f: Callable[[jax.Array], jax.Array] | None = None,
    per_task: bool = False,
    activations: Any = None,
) -> Any:
    r"""GradDrop with given uniform draws: the deterministic core of :func:`graddrop`.

    .. math::
      S_k = \sum_{\text{batch axes}} g_k, \quad
      P = \tfrac12\Big(1 + \frac{\sum_k S_k}{\sum_k |S_k|}\Big), \quad
      M_k = \mathbb{1}[f(P) > U]\,\mathbb{1}[S_k > 0]
          + \mathbb{1}[f(P) < U]\,\mathbb{1}[S_k < 0]

    and :math:`m_k = \ell_k + (1 - \ell_k) M_k`, broadcast over the batch axes.
    Where :math:`\sum_k |S_k| = 0` the purity is :math:`P = 1/2` (every
    :math:`S_k` is then zero, so every mask is :math:`\ell_k`).

    Args:
      task_grads: stacked task gradients, leaves of shape ``(K, *param_shape)``.
      uniforms: the draws :math:`U`: a pytree with the structure of
        ``task_grads`` whose leaves broadcast to ``param_shape`` with the batch
        axes set to 1 (e.g. the output of :func:`graddrop_uniforms`).
      leakage: :math:`\ell`, a scalar or ``K`` values in ``[0, 1]``.
      batch_axes: see :func:`graddrop`.
      f: the monotonically increasing map applied to the purity (identity when
        ``None``).
      per_task: return the ``K`` masked gradients :math:`m_k \odot g_k`
        (leading task axis kept) instead of their sum.
      activations: ``None``, or the activation :math:`A` whose gradients
        these are (the structure of the parameters, leaves of
        ``param_shape``): the statistic is then :math:`S_k = \sum_b
        \mathrm{sign}(A) \odot g_k` (the paper's); the masks still multiply
        :math:`g_k`.

    Returns:
      :math:`\sum_k m_k \odot g_k` with the parameters' structure and dtypes,
      or the per-task terms when ``per_task``.

    Raises:
      ValueError: on malformed task gradients, a ``uniforms`` tree of another
        structure or with a leaf that does not broadcast to its statistic's
        shape, bad ``batch_axes`` or ``leakage``.
    """
    k = engine.check_task_grads(task_grads, method=_NAME)
    axes = _normalize_batch_axes(batch_axes)
    lk = _check_leakage(leakage)
    if lk.ndim == 1 and lk.shape[0] != k:
        raise ValueError(
            f"{_NAME}: {lk.shape[0]} per-task leakage values were given, but the task"
            f" gradients have K={k} tasks."
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(task_grads)
    u_leaves, u_def = jax.tree_util.tree_flatten(uniforms)
    if u_def != treedef:
        raise ValueError(
            f"{_NAME}: the uniforms must have the tree structure of the task gradients."
            f"\n  task gradients: {treedef}\n  uniforms:       {u_def}"
        )
    if activations is None:
        a_leaves = [None] * len(leaves)
    else:
        a_leaves, a_def = jax.tree_util.tree_flatten(activations)
        if a_def != treedef:
            raise ValueError(
                f"{_NAME}: activation_sign=True needs params= the activation, with the tree"
                f" structure of the task gradients.\n  task gradients: {treedef}\n"
                f"  params:         {a_def}"
            )
    out = []
    for (path, leaf), u, act in zip(leaves, u_leaves, a_leaves, strict=True):
        name = _path(path)
        shape = tuple(leaf.shape)[1:]
        leaf_axes = _leaf_axes(name, len(shape), axes)
        stat_shape = _stat_shape(shape, leaf_axes)
        u = jnp.asarray(u)
        try:
            ok = np.broadcast_shapes(u.shape, stat_shape) == stat_shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{_NAME}: the uniforms for leaf {name} have shape {u.shape}, which does"
                f" not broadcast to the sign statistic's shape {stat_shape} (parameter"
                f" shape {shape} with batch axes {leaf_axes} set to 1)."
            )
        dtype = engine.accumulation_dtype(leaf.dtype)
        if act is not None and tuple(jnp.shape(act)) != shape:
            raise ValueError(
                f"{_NAME}: activation_sign=True: the activation (params) of leaf {name} has"
                f" shape {tuple(jnp.shape(act))}; expected {shape}, the task gradients'"
                " shape without the task axis."
            )
        if not per_task and not leaf_axes and act is None:
            out.append(_graddrop_sum(leaf, u, lk, f, dtype).astype(leaf.dtype))
            continue
        g = leaf.astype(dtype)
        signed = g if act is None else g * jnp.sign(jnp.asarray(act)).astype(dtype)
        stat = jnp.sum(signed, axis=tuple(a + 1 for a in leaf_axes), keepdims=True)
        total, mass = engine.sum_tasks(stat), engine.sum_tasks(jnp.abs(stat))
        safe = mass > 0
        ratio = jnp.where(safe, total / jnp.where(safe, mass, 1), 0)
        purity = 0.5 * (1 + ratio)
        if f is not None:
            purity = jnp.asarray(f(purity), dtype)
        # Materialise the purity: otherwise XLA may fuse its K-term sums into
        # each task's mask and recompute them K times (O(K^2) work; 0.9 s
        # instead of 30 ms at K=40, P=1e6 on CPU).
        purity = lax.optimization_barrier(purity)
        u = u.astype(dtype)
        keep = ((purity > u) & (stat > 0)) | ((purity < u) & (stat < 0))
        leak = jnp.asarray(lk, dtype).reshape((-1,) + (1,) * len(shape))
        mask = jnp.where(keep, jnp.ones((), dtype), leak)
        masked = mask * g
        out.append(
            masked.astype(leaf.dtype) if per_task else engine.sum_tasks(masked).astype(leaf.dtype)
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _graddrop_sum(leaf: jax.Array, u: jax.Array, lk: np.ndarray, f: Any, dtype: Any) -> jax.Array:
    r"""GradDrop's update of one leaf whose sign statistic is the gradient itself.

    With :math:`g_k^+ = \max(g_k, 0)` and :math:`g_k^- = \min(g_k, 0)`, one
    pass over the ``K`` task gradients accumulates :math:`\Sigma^\pm = \sum_k
    g_k^\pm` and :math:`\Lambda^\pm = \sum_k \ell_k g_k^\pm`. The purity is
    :math:`P = \tfrac12(1 + (\Sigma^+ + \Sigma^-) / (\Sigma^+ - \Sigma^-))`
    and, as the kept tasks are exactly those of one sign,

    .. math::
      \sum_k m_k g_k = \begin{cases}
        \Sigma^+ + \Lambda^- & f(P) > U \\
        \Sigma^- + \Lambda^+ & f(P) < U \\
        \Lambda^+ + \Lambda^- & f(P) = U.
      \end{cases}

    Equal to the masked sum of :func:`apply_graddrop` (the same sets of terms;
    bit for bit when :math:`\ell = 0`), without materialising ``K`` masks: the
    task gradients are read once.
    """
    scalar_leak = lk.ndim == 0
    leak = jnp.asarray(lk, dtype)

    def terms(row, index):
        g = row.astype(dtype)
        pos, neg = jnp.maximum(g, 0), jnp.minimum(g, 0)
        if scalar_leak:
            return pos, neg
        return pos, neg, leak[index] * pos, leak[index] * neg

    zero = jnp.zeros(leaf.shape[1:], dtype)
    sums = engine.fold_tasks(terms, leaf, (zero,) * (2 if scalar_leak else 4))
    pos, neg = sums[0], sums[1]
    lpos, lneg = (leak * pos, leak * neg) if scalar_leak else (sums[2], sums[3])
    total, mass = pos + neg, pos - neg
    safe = mass > 0
    purity = 0.5 * (1 + jnp.where(safe, total / jnp.where(safe, mass, 1), 0))
    if f is not None:
        purity = jnp.asarray(f(purity), dtype)
    u = jnp.asarray(u).astype(dtype)
    return jnp.where(purity > u, pos + lneg, jnp.where(purity < u, neg + lpos, lpos + lneg))


class GradDropState(NamedTuple):
    """State of :func:`graddrop`."""

    key: jax.Array  # PRNG key of the next step's draw.


class GradDropTransformation(optax.GradientTransformationExtraArgs):
    """The transformation returned by :func:`graddrop`.

    A plain ``optax.GradientTransformationExtraArgs`` with two extra attributes:
    ``per_task``, its :class:`~mtl_optax.base.PerTaskTransformation` form (the
    ``K`` masked task gradients :math:`m_k \\odot g_k`), and
    ``uniforms(task_grads, state)``, the draws that the next update from
    ``state`` will use.
    """

    per_task: PerTaskTransformation
    uniforms: Callable[[Any, GradDropState], Any]


@register("graddrop")
def graddrop(
    leakage: float | Sequence[float] | jax.typing.ArrayLike = 0.0,
    key: jax.Array | int = 0,
    num_tasks: int | None = None,
    *,
    batch_axes: int | Sequence[int] | None = None,
    f: Callable[[jax.Array], jax.Array] | None = None,
    activation_sign: bool = False,
) -> GradDropTransformation:
    r"""Gradient sign dropout: keeps, per coordinate, the gradients of one sign.

    .. math::
      P = \tfrac12\Big(1 + \frac{\sum_k S_k}{\sum_k |S_k|}\Big), \qquad
      U \sim \mathcal{U}(0, 1), \qquad
      M_k = \mathbb{1}[f(P) > U]\,\mathbb{1}[S_k > 0]
          + \mathbb{1}[f(P) < U]\,\mathbb{1}[S_k < 0]

    .. math::
      u = \sum_{k=1}^K \big(\ell_k + (1 - \ell_k) M_k\big) \odot g_k

    elementwise, with the sign statistic :math:`S_k = g_k` (or its sum over
    ``batch_axes``) and one uniform :math:`U` per coordinate of :math:`P`,
    shared by all tasks. :math:`P \in [0, 1]` is the *positive sign purity*:
    at a coordinate where every task's gradient is positive it is 1 and the
    positive gradients are always kept; where they disagree, the positive ones
    are kept with probability :math:`f(P)` and the negative ones otherwise.
    In expectation,

    .. math::
      \mathbb{E}[u] = \sum_k \big(\ell_k + (1-\ell_k)\,p_k\big) \odot g_k, \quad
      p_k = f(P) \text{ where } S_k > 0,\ 1 - f(P) \text{ where } S_k < 0,
      \ 0 \text{ where } S_k = 0.

    The key is split inside the state at every step: the same key gives the
    same sequence of masks, and a restored state continues it.

    Args:
      leakage: :math:`\ell`, the fraction of each task's gradient that passes
        through when its sign is dropped: a scalar or ``K`` per-task values in
        ``[0, 1]``. 0 (default, the paper's and TorchJD's) is pure GradDrop, 1
        is the plain sum. vambn's default is 0.2 for every task; LibMTL's
        ``leak`` defaults to 0.
      key: an int seed or a PRNG key (``jax.random.key``).
      num_tasks: ``K``, optional: checked at every update (the state does not
        depend on ``K``).
      batch_axes: axes of each parameter leaf (counted after the task axis,
        negative values allowed) over which the sign statistic is summed, the
        paper's *batch-separated* variant: :math:`S_k = \sum_b g_{k,b}`, one
        purity and one uniform per remaining coordinate, and the mask is shared
        along those axes. For stacked gradients of a ``[B, D]`` activation
        (shape ``[K, B, D]``) ``batch_axes=0`` is vambn's GradDrop. ``None``
        (default): every coordinate has its own statistic :math:`S_k = g_k`
        (the paper on non-batch-separated tensors, TorchJD on the Jacobian).
      f: the paper's monotonically increasing map
        :math:`f: [0, 1] \to [0, 1]` applied to :math:`P` (as TorchJD's
        ``f``); identity when ``None``.
      activation_sign: the paper's statistic for the gradients of an
        activation :math:`A` (a shared representation): :math:`S_k =
        \sum_b \mathrm{sign}(A) \odot g_k` (summed over ``batch_axes``),
        as LibMTL's ``GradDrop`` with ``rep_grad=True``. The activation is
        read from ``params=`` of the update, which :func:`mtl_optax.rep_grad`
        sets to the representation: ``mtl_optax.rep_grad(graddrop(
        batch_axes=0, activation_sign=True), encoder, heads)``. The masks
        multiply the gradients :math:`g_k` themselves. ``False`` (default):
        :math:`S_k = \sum_b g_k`, vambn's batched statistic.

    Returns:
      A :class:`GradDropTransformation`: an optax transformation with
      ``.per_task`` (returns :math:`m_k \odot g_k` for every task, the form
      that :func:`mtl_optax.compose` chains) and ``.uniforms(task_grads,
      state)``. Both ``update`` functions accept the extra keyword
      ``graddrop_uniforms=``: a pytree of draws (leaves broadcastable to the
      shapes of :func:`graddrop_uniforms`) used instead of the state's draw,
      for replaying a reference's randomness; the key still advances.

    Raises:
      ValueError: ``leakage`` outside ``[0, 1]`` or of a length other than
        ``num_tasks``; at update time, malformed task gradients or
        ``batch_axes`` that do not fit a leaf.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("graddrop", key=0)
      >>> g = {"w": jnp.array([[1.0, 2.0, -1.0], [3.0, -2.0, -1.0]])}  # K=2
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(3)}))
      >>> u["w"][0], u["w"][2]  # coordinates where the tasks agree are kept whole
      (Array(4., dtype=float32), Array(-2., dtype=float32))
      >>> bool(u["w"][1] == 2.0) or bool(u["w"][1] == -2.0)  # one sign survives
      True

    References:
      Chen et al., `Just Pick a Sign: Optimizing Deep Multitask Models with
      Gradient Sign Dropout <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020
      (Algorithm 1). TorchJD ``GradDrop`` (``f``, ``leak``; one statistic per
      coordinate of the Jacobian); LibMTL ``GradDrop`` (on representation
      gradients, statistic summed over the batch, scalar ``leak``); vambn /
      impartial-vaes ``GradDrop`` (representation gradients, statistic summed
      over the batch, per-task ``leakage``).

    Differences from the references:
      * No epsilon in the purity's denominator: where every statistic is zero
        the purity is defined as 1/2 (every mask is then :math:`\ell_k` and the
        update is 0 there). LibMTL adds 1e-7 and vambn 1e-15 to the
        denominator, which moves :math:`P` by about ``eps / sum |S|``; TorchJD
        divides by zero (NaN purity, all masks 0; the same update).
      * vambn clamps its purity to :math:`P \le 1/2`
        (``0.5 * clamp(1 + ratio, 0, 1)``), so coordinates where every task
        agrees on a positive sign are dropped half the time. This is a bug
        (the original impartial-vaes code has no clamp); we implement the paper.
        vambn's numbers are reproduced with ``f=lambda p: jnp.minimum(p, 0.5)``.
      * The paper (and LibMTL) compute the batch-separated statistic of an
        activation :math:`A` as :math:`\sum_b \mathrm{sign}(A) \odot
        \nabla_A L_k` (``activation_sign=True``); vambn drops the sign in its
        batched branch (``activation_sign=False``, the default, with
        ``batch_axes``). vambn's unbatched branch, whose statistic is
        :math:`\mathrm{sign}(A) \odot g_k` for a ``[K, D]`` input, is
        ``activation_sign=True`` without ``batch_axes``.
      * The mask is exactly 1 or :math:`\ell_k` (TorchJD's
        :math:`\ell + (1 - \ell) \cdot 1` may differ from 1 by an ulp; the
        original impartial-vaes code stores the leakage in float32).
    """
    lk = _check_leakage(leakage)
    if lk.ndim == 1 and num_tasks is not None and lk.shape[0] != num_tasks:
        raise ValueError(
            f"{_NAME}: {lk.shape[0]} per-task leakage values were given for num_tasks={num_tasks}."
        )
    if num_tasks is None and lk.ndim == 1:
        num_tasks = int(lk.shape[0])
    axes = _normalize_batch_axes(batch_axes)
    base_key = canonicalize_key(key)

    def init_fn(params: Any) -> GradDropState:
        del params
        return GradDropState(key=jnp.copy(base_key))

    def uniforms_fn(task_grads: Any, state: GradDropState) -> Any:
        return graddrop_uniforms(_random.split(state.key)[1], task_grads, batch_axes=axes)

    def step(updates, state, params, graddrop_uniforms_, per_task, value=None):
        k = engine.check_task_grads(updates, params, num_tasks=num_tasks, method=_NAME)
        if value is not None:  # not read, but a mis-shaped value is a caller's bug
            engine.check_value(value, k, method=_NAME)
        next_key, draw_key = _random.split(state.key)
        if graddrop_uniforms_ is None:
            u = graddrop_uniforms(draw_key, updates, batch_axes=axes)
        else:
            u = graddrop_uniforms_
        if activation_sign and params is None:
            raise ValueError(
                f"{_NAME}: activation_sign=True needs params= the activation A whose"
                " gradients are given (mtl_optax.rep_grad passes it)."
            )
        out = apply_graddrop(
            updates,
            u,
            leakage=lk,
            batch_axes=axes,
            f=f,
            per_task=per_task,
            activations=params if activation_sign else None,
        )
        return out, GradDropState(key=next_key)

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: GradDropState,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        graddrop_uniforms: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, GradDropState]:
        del extra_args
        return step(updates, state, params, graddrop_uniforms, per_task=False, value=value)

    @engine.full_precision
    def per_task_update_fn(
        updates: Any,
        state: GradDropState,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        graddrop_uniforms: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, GradDropState]:
        del extra_args
        return step(updates, state, params, graddrop_uniforms, per_task=True, value=value)

    tx = GradDropTransformation(init_fn, update_fn)
    tx.per_task = PerTaskTransformation(_NAME, init_fn, per_task_update_fn)
    tx.uniforms = uniforms_fn
    return tx
