"""Projection-based methods: ``pcgrad`` (gradient surgery) and ``gradvac``.

Both methods modify every task gradient :math:`g_i` in turn against the other
tasks' *original* gradients :math:`g_j`, visited in a random order, and sum the
modified gradients :math:`g_i'`. Each modification adds a multiple of some
:math:`g_j` to :math:`g_i'`, so the modified gradients stay linear combinations
of the original ones,

.. math::
  g_i' = \\sum_{j=1}^K C_{ij}\\, g_j, \\qquad
  u = \\sum_{i=1}^K g_i' = \\sum_{j=1}^K \\Big(\\sum_{i=1}^K C_{ij}\\Big) g_j,

and every inner product and norm the methods need is a quadratic form in the
Gramian :math:`G = J J^\\top`:
:math:`\\langle g_i', g_j\\rangle = (C G)_{ij}` and
:math:`\\|g_i'\\|^2 = (C G C^\\top)_{ii}`. Both methods are therefore written
as weightings in the ``K x K`` world (as TorchJD's ``PCGradWeighting`` and
``GradVacWeighting``): one pass over the leaves for the Gramian, a
``lax.scan`` over the ``K - 1`` comparisons (``vmap``-ed over the ``K`` tasks,
which are independent of each other), and one pass to combine. Their
``per_task`` form returns the modified gradients :math:`g_i' = (C J)_i`.

Random orders: for every task ``i`` an independent uniformly random order of
the other ``K - 1`` tasks, drawn from the key carried in the state (the key is
split at every step). The references draw the same law, see :func:`pcgrad`.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mtl_optax import _random, engine
from mtl_optax.base import (
    PerTaskTransformation,
    WeightedTransformation,
    Weighting,
    canonicalize_key,
    from_weighting,
    initial_weights,
    is_traced,
)
from mtl_optax.registry import register

__all__ = [
    "GradVacState",
    "PCGradState",
    "gradvac",
    "pcgrad",
]


# ---------------------------------------------------------------------------
# Shared machinery.
# ---------------------------------------------------------------------------


def _draw_orders(key: jax.Array, num_tasks: int) -> jax.Array:
    """``[K, K-1]`` int32: row ``i`` is a uniformly random order of the tasks ``j != i``.

    The rows are independent. Each row sorts ``0..K-2`` by 64 random bits (two
    ``uint32`` sort keys, so a tie has probability below ``K^3 2^-65`` per step) and
    maps the permutation ``p`` to the task indices other than ``i``
    (``j = p + (p >= i)``).
    """
    shape = (num_tasks, num_tasks - 1)
    # One flat draw (XLA compiles threefry on a 1-d shape several times faster).
    bits = jax.random.bits(_random.fused(key), (2 * num_tasks * (num_tasks - 1),), jnp.uint32)
    high, low = bits.reshape(2, *shape)
    positions = lax.broadcasted_iota(jnp.int32, shape, 1)
    perms = lax.sort((high, low, positions), dimension=1, num_keys=2)[2]
    rows = lax.broadcasted_iota(jnp.int32, shape, 0)
    return perms + (perms >= rows).astype(jnp.int32)


# The loops below are jitted on their own so that eager updates, and every instance
# of a method, share one compilation per (K, dtype).


@functools.partial(jax.jit, static_argnums=1)
def _next_orders(key: jax.Array, num_tasks: int) -> tuple[jax.Array, jax.Array]:
    """``(next_key, orders)``: the orders a step draws from the state's ``key``.

    This is exactly what :func:`pcgrad` and :func:`gradvac` do at every step, so
    ``_next_orders(state.key, K)[1]`` are the orders the next update will use
    (tests replay them through the references).
    """
    next_key, draw_key = _random.split(key)
    return next_key, _draw_orders(draw_key, num_tasks)


def _check_orders(orders: jax.Array, num_tasks: int) -> jax.Array:
    orders = jnp.asarray(orders)
    if orders.shape != (num_tasks, num_tasks - 1):
        raise ValueError(
            f"orders must have shape ({num_tasks}, {num_tasks - 1}) (row i: the other"
            f" tasks in the order task i visits them); found shape {orders.shape}."
        )
    if not jnp.issubdtype(orders.dtype, jnp.integer):
        raise ValueError(f"orders must be integers; found dtype {orders.dtype}.")
    return orders


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` with a finite derivative everywhere (double where)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


def _safe_div(num: jax.Array, den: jax.Array, ok: jax.Array) -> jax.Array:
    """``num / den`` where ``ok``, else 0, without evaluating a division by zero."""
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _mix_rows(task_grads: Any, matrix: jax.Array) -> Any:
    """Per-task outputs :math:`g_i' = \\sum_j M_{ij} g_j` (``M @ J``), leafwise.

    Each leaf is contracted in its accumulation dtype (at least float32) and
    returned in its own dtype, as :func:`mtl_optax.engine.combine` does.
    """

    def one(leaf):
        dtype = jnp.promote_types(engine.accumulation_dtype(leaf.dtype), matrix.dtype)
        out = jnp.tensordot(matrix.astype(dtype), leaf.astype(dtype), axes=1)
        return out.astype(leaf.dtype)

    return jax.tree_util.tree_map(one, task_grads)


def _transformation(name: str, init, rule, num_tasks: int | None) -> WeightedTransformation:
    """A transformation from ``rule(gram, state, num_tasks=, dtype=) -> (M, new_state)``.

    ``M`` is the ``[K, K]`` matrix with :math:`g_i' = \\sum_j M_{ij} g_j` (the
    reduction already applied). The update is :math:`\\sum_i g_i'`, i.e. the
    weights are the column sums of ``M`` (built with :func:`from_weighting`);
    ``per_task`` returns ``M @ J``.
    """

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del value
        matrix, new_state = rule(gramian, state, num_tasks=num_tasks, dtype=dtype)
        return matrix.sum(axis=0), new_state

    weighting = Weighting(name=name, init=init, weights=weights_fn, num_tasks=num_tasks)
    tx = from_weighting(weighting)

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
        k = engine.check_task_grads(updates, params, num_tasks=num_tasks, method=name)
        if value is not None:
            engine.check_value(value, k, method=name)
        dtype = engine.tree_accumulation_dtype(updates)
        matrix, new_state = rule(engine.gramian(updates), state, num_tasks=k, dtype=dtype)
        return _mix_rows(updates, matrix), new_state

    tx.per_task = PerTaskTransformation(name, tx.init, per_task_update_fn)
    return tx


# ---------------------------------------------------------------------------
# PCGrad.
# ---------------------------------------------------------------------------


@jax.jit
def _pcgrad_matrix(gram: jax.Array, orders: jax.Array) -> jax.Array:
    """PCGrad's coefficient matrix ``C`` (``g_i' = sum_j C_ij g_j``) for given orders.

    Args:
      gram: ``[K, K]`` Gramian, in the dtype to compute in.
      orders: ``[K, K-1]`` integers; row ``i`` lists the tasks ``j != i`` in the
        order task ``i`` is projected against them.

    Returns:
      ``C``, ``[K, K]`` in the Gramian's dtype (sum reduction).
    """
    k = gram.shape[0]
    orders = _check_orders(orders, k)
    diag = jnp.diagonal(gram)

    def row(i, order):
        def step(c, j):
            inner = gram[j] @ c  # <g_i', g_j>
            project = (inner < 0) & (diag[j] > 0)
            return c.at[j].add(-_safe_div(inner, diag[j], project)), None

        c, _ = lax.scan(step, jax.nn.one_hot(i, k, dtype=gram.dtype), order)
        return c

    return jax.vmap(row)(jnp.arange(k), orders)


class PCGradState(NamedTuple):
    """State of :func:`pcgrad`."""

    weights: jax.Array  # [K] weights of the last step (column sums of C), for logging.
    key: jax.Array  # PRNG key for the next step's orders.


@register("pcgrad")
def pcgrad(
    key: jax.Array | int = 0,
    reduction: Literal["sum", "mean"] = "sum",
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""Projecting conflicting gradients (PCGrad, gradient surgery).

    For every task :math:`i`, starting from :math:`g_i' = g_i`, and for the
    other tasks :math:`j` in a random order:

    .. math::
      \text{if } \langle g_i', g_j\rangle < 0: \quad
      g_i' \leftarrow g_i' - \frac{\langle g_i', g_j\rangle}{\|g_j\|^2}\, g_j,
      \qquad u = \sum_{i=1}^K g_i' \quad (\text{or } \tfrac1K \sum_i g_i')

    where :math:`g_j` is always the *original* gradient of task :math:`j`. With
    two tasks the update never conflicts with either of them.

    The computation runs on the ``K x K`` Gramian (see the module docstring):
    :math:`g_i' = \sum_j C_{ij} g_j` and :math:`u = \sum_j (\sum_i C_{ij}) g_j`.
    ``tx.per_task`` returns the projected gradients :math:`g_i'` themselves
    (divided by ``K`` for ``reduction="mean"``), whose sum over tasks is the
    update.

    Every step draws, for every task, an independent uniformly random order of
    the other tasks, from a key split inside the state: the same key gives the
    same sequence of updates.

    Args:
      key: an int seed or a PRNG key (``jax.random.key``).
      reduction: ``"sum"`` (default, as in the paper and all the references)
        or ``"mean"`` (the update divided by ``K``).
      num_tasks: ``K``, recommended. When given, it is checked at every update
        and the state has its final shape from ``init`` on; without it the
        state's ``weights`` change shape at the first update.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.WeightedTransformation` with ``.per_task``).

    Raises:
      ValueError: ``reduction`` is not ``"sum"`` or ``"mean"``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("pcgrad")
      >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # <g_1, g_2> = -1
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # [0.5, 0.5] + [0., 1.]
      Array([0.5, 1.5], dtype=float32)
      >>> tx.per_task.update(g, tx.init({"w": jnp.zeros(2)}))[0]["w"]
      Array([[0.5, 0.5],
             [0. , 1. ]], dtype=float32)
      >>> state.weights  # u = (g_1 + 0.5 g_2) + (g_2 + g_1)
      Array([2. , 1.5], dtype=float32)

    References:
      Yu et al., `Gradient Surgery for Multi-Task Learning
      <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020 (Algorithm 1).
      Reference implementations: TorchJD ``PCGrad`` (``PCGradWeighting``),
      LibMTL ``PCGrad``, conflictfree ``PCGradOperator``, vambn ``PCGrad``.

    Differences from the references:
      * Random orders. TorchJD draws ``torch.randperm(K)`` for every task and
        skips ``i``; vambn draws ``np.random.permutation(K)`` for every task
        (and skips ``i``); LibMTL calls ``random.shuffle`` on ``[0..K-1]`` for
        every task; conflictfree uses the fixed order ``0..K-1`` (no
        randomness). All the random ones draw one independent order per task,
        as here (the same law for TorchJD and vambn).
      * LibMTL does not skip ``j = i``: when task ``i`` comes after other
        tasks in its own order and :math:`\langle g_i', g_i\rangle < 0`, it
        also projects :math:`g_i'` onto the normal plane of :math:`g_i`. The
        paper (and TorchJD, vambn, conflictfree) compare task ``i`` with the
        other tasks only; we follow the paper. LibMTL agrees with it whenever
        ``i`` comes first in its own order.
      * A zero :math:`g_j` is skipped (its inner products are zero, so no
        reference projects onto it either); no division by zero is evaluated.
      * vambn tests the sign of a cosine with norms clamped at 1e-8 and clamps
        :math:`\|g_j\|^2` at 1e-15: the same decisions and the same numbers
        for any gradient with :math:`\|g_j\|^2 > 10^{-15}`.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"pcgrad: reduction must be 'sum' or 'mean'; found {reduction!r}.")
    base_key = canonicalize_key(key)

    def rule(gram, state, *, num_tasks, dtype):
        next_key, orders = _next_orders(state.key, num_tasks)
        matrix = _pcgrad_matrix(gram.astype(dtype), orders)
        if reduction == "mean":
            matrix = matrix / num_tasks
        new_state = PCGradState(weights=matrix.sum(axis=0).astype(jnp.float32), key=next_key)
        return matrix, new_state

    return _transformation(
        "pcgrad",
        lambda: PCGradState(weights=initial_weights(num_tasks), key=jnp.copy(base_key)),
        rule,
        num_tasks,
    )


# ---------------------------------------------------------------------------
# GradVac.
# ---------------------------------------------------------------------------


@jax.jit
def _gradvac_matrix(
    gram: jax.Array, phi_hat: jax.Array, orders: jax.Array, beta: float
) -> tuple[jax.Array, jax.Array]:
    """GradVac's coefficient matrix ``C`` and updated EMA targets, for given orders.

    Args:
      gram: ``[K, K]`` Gramian, in the dtype to compute in.
      phi_hat: ``[K, K]`` EMA targets before the step.
      orders: ``[K, K-1]`` integers; row ``i`` lists the tasks ``j != i`` in the
        order task ``i`` is compared with them.
      beta: the EMA rate.

    Returns:
      ``(C, new_phi_hat)``, both ``[K, K]`` in the Gramian's dtype.
    """
    k = gram.shape[0]
    orders = _check_orders(orders, k)
    if phi_hat.shape != (k, k):
        raise ValueError(f"phi_hat must have shape ({k}, {k}); found {phi_hat.shape}.")
    dtype = gram.dtype
    phi_hat = phi_hat.astype(dtype)
    norms = _safe_sqrt(jnp.diagonal(gram))
    beta = jnp.asarray(beta, dtype)
    snap = 4 * jnp.finfo(dtype).eps

    def row(i, order, targets):
        def step(carry, j):
            c, cg, norm_i, targets = carry  # cg = C_i G: <g_i', g_l> for every l.
            norm_j = norms[j]
            den = norm_i * norm_j
            cos = _safe_div(cg[j], den, den > 0)
            # Within rounding of +-1 (anti-)collinear: exactly +-1, so that the
            # sine below is exactly 0 rather than sqrt(eps) of noise.
            cos = jnp.where(jnp.abs(cos) >= 1 - snap, jnp.sign(cos), cos)
            target = targets[j]
            sin_cos = _safe_sqrt(1 - cos * cos)
            sin_target = _safe_sqrt(1 - target * target)
            den_w = norm_j * sin_target
            correct = (cos < target) & (den_w > 0)
            w = _safe_div(norm_i * (target * sin_cos - cos * sin_target), den_w, correct)
            c = c.at[j].add(w)
            cg = cg + w * gram[j]
            # Adding w g_j keeps the component of g_i' orthogonal to g_j,
            # ||g_i'|| sin(phi), and sets the cosine to the target: the new norm in
            # closed form, exact (0) when g_i' cancels (a quadratic form in G
            # would leave sqrt(eps)-sized noise there).
            norm_i = jnp.where(correct, norm_i * _safe_div(sin_cos, sin_target, correct), norm_i)
            targets = targets.at[j].set((1 - beta) * target + beta * cos)
            return (c, cg, norm_i, targets), None

        c0 = jax.nn.one_hot(i, k, dtype=dtype)
        (c, _, _, targets), _ = lax.scan(step, (c0, gram[i], norms[i], targets), order)
        return c, targets

    return jax.vmap(row)(jnp.arange(k), orders, phi_hat)


class GradVacState(NamedTuple):
    """State of :func:`gradvac`."""

    weights: jax.Array  # [K] weights of the last step (column sums of C), for logging.
    phi_hat: jax.Array  # [K, K] EMA cosine targets: row i, column j is phi_hat_ij.
    key: jax.Array  # PRNG key for the next step's orders.


@register("gradvac")
def gradvac(
    beta: float = 0.5,
    key: jax.Array | int = 0,
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""Gradient Vaccine: raise each pair's cosine to an adaptive target.

    For every task :math:`i`, starting from :math:`g_i' = g_i`, and for the
    other tasks :math:`j` in a random order, with
    :math:`\phi_{ij} = \cos(g_i', g_j)` and the EMA target
    :math:`\hat\phi_{ij}` (zero at the start of training):

    .. math::
      \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
      g_i' \leftarrow g_i' + \frac{\|g_i'\| \big(\hat\phi_{ij}
      \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\big)}
      {\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}}\, g_j, \qquad
      \hat\phi_{ij} \leftarrow (1 - \beta)\, \hat\phi_{ij} + \beta\, \phi_{ij},

    and :math:`u = \sum_i g_i'`. The correction makes
    :math:`\cos(g_i', g_j) = \hat\phi_{ij}` exactly. The target is updated
    after every comparison, with the cosine :math:`\phi_{ij}` measured *before*
    the correction; :math:`g_j` is always the original gradient. With the
    initial targets of zero, the first step is PCGrad's (a correction is then
    the projection onto the normal plane of :math:`g_j`).

    The computation runs on the ``K x K`` Gramian, as :func:`pcgrad`;
    ``tx.per_task`` returns the corrected gradients :math:`g_i'`. Orders are
    drawn as in :func:`pcgrad` (one independent random order per task and
    step).

    Args:
      beta: EMA rate :math:`\beta \in [0, 1]` of the targets (default 0.5, the
        default of TorchJD and of LibMTL's command line; vambn's ``decay``).
      key: an int seed or a PRNG key (``jax.random.key``).
      num_tasks: ``K``, required: the state holds the ``[K, K]`` targets.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.WeightedTransformation` with ``.per_task``). Its
      state's ``phi_hat`` is float64 when ``jax_enable_x64`` is on at ``init``,
      else float32.

    Raises:
      ValueError: ``num_tasks`` is missing or not positive, or ``beta`` is not
        in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("gradvac", beta=0.5, num_tasks=2)
      >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # cosine -0.7071
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u, state = tx.update(g, state)  # targets 0: PCGrad's projections
      >>> u["w"]
      Array([0.5, 1.5], dtype=float32)
      >>> state.phi_hat  # 0.5 * 0 + 0.5 * (-0.7071)
      Array([[ 0.        , -0.35355338],
             [-0.35355338,  0.        ]], dtype=float32)
      >>> u, state = tx.update(g, state)  # now only up to cosine -0.3536
      >>> u["w"]  # (g_1 + 0.311 g_2) + (g_2 + 0.622 g_1)
      Array([0.31101775, 1.3110178 ], dtype=float32)

    References:
      Wang et al., `Gradient Vaccine: Investigating and Improving Multi-task
      Optimization in Massively Multilingual Models
      <https://arxiv.org/abs/2010.05874>`_, ICLR 2021 (Algorithm 1).
      Reference implementations: TorchJD ``GradVac`` (``GradVacWeighting``),
      LibMTL ``GradVac``, vambn ``GradVac``.

    Differences from the references:
      * EMA. As TorchJD, the target :math:`\hat\phi_{ij}` is updated after
        every comparison and kept across steps in the state. LibMTL 1.1.5
        updates it only when a correction was made (the update sits inside its
        ``if``), and keeps it in float32. vambn re-creates the targets as zeros
        at every call (so its ``decay`` has no effect and every call equals
        PCGrad): it agrees with this method on the first step only.
      * Rounding. A cosine within 4 ulps of :math:`\pm 1` (the rounding error
        of a cosine computed from inner products) is taken as exactly
        :math:`\pm 1`: anti-collinear gradients then cancel exactly, as in
        exact arithmetic, instead of leaving :math:`\sqrt{\epsilon}`-sized
        noise through :math:`\sqrt{1 - \phi^2}`. So the cosine never leaves
        :math:`[-1, 1]` (vambn raises a ``math domain error`` when the cosine
        of anti-collinear gradients rounds below -1; LibMTL returns NaN).
      * Degenerate pairs. The cosine with a zero :math:`g_i'` or :math:`g_j` is
        taken as 0 (as TorchJD and vambn, whose eps give 0 there; LibMTL gives
        NaN and skips). No correction is made when the denominator
        :math:`\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}` is zero: a zero :math:`g_j`
        (nothing to add), or a target of exactly 1 (which no finite correction
        reaches; TorchJD's eps then gives a huge finite step). TorchJD adds
        ``eps=1e-8`` to both denominators; we add nothing, so the numbers agree
        with ``GradVac(eps=0)`` to rounding and with the default TorchJD to about
        ``1e-8 / (\|g_i'\| \|g_j\|)`` relative (not at all for gradients with
        norms near 1e-4 or below, where TorchJD's eps dominates).
      * :math:`\|g_i'\|` is updated in closed form after a correction
        (:math:`\|g_i'\| \sin\phi_{ij} / \sin\hat\phi_{ij}`: the component
        orthogonal to :math:`g_j` is unchanged) instead of being recomputed
        from the Gramian as TorchJD does; the same number up to rounding, but
        exactly 0 when :math:`g_i'` cancels (anti-collinear gradients), where
        the recomputed norm is rounding noise amplified to
        :math:`\sqrt{\epsilon}` relative.
    """
    if num_tasks is None:
        raise ValueError(
            "gradvac: num_tasks is required (the state holds the [K, K] matrix of"
            " EMA cosine targets); e.g. mtl_optax.gradvac(num_tasks=3)."
        )
    if int(num_tasks) != num_tasks or num_tasks < 1:
        raise ValueError(f"gradvac: num_tasks must be a positive integer; found {num_tasks!r}.")
    num_tasks = int(num_tasks)
    if not is_traced(beta) and not 0.0 <= beta <= 1.0:
        raise ValueError(f"gradvac: beta must be in [0, 1]; found {beta!r}.")
    base_key = canonicalize_key(key)

    def init():
        phi_dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64.
        return GradVacState(
            weights=initial_weights(num_tasks),
            phi_hat=jnp.zeros((num_tasks, num_tasks), phi_dtype),
            key=jnp.copy(base_key),
        )

    def rule(gram, state, *, num_tasks, dtype):
        next_key, orders = _next_orders(state.key, num_tasks)
        matrix, phi_hat = _gradvac_matrix(gram.astype(dtype), state.phi_hat, orders, beta)
        new_state = GradVacState(
            weights=matrix.sum(axis=0).astype(jnp.float32),
            phi_hat=phi_hat.astype(state.phi_hat.dtype),
            key=next_key,
        )
        return matrix, new_state

    return _transformation("gradvac", init, rule, num_tasks)
