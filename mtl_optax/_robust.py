r"""Byzantine-robust aggregators: ``krum`` and ``trimmed_mean``.

Both come from distributed learning, where some of the ``K`` rows may be
adversarial, and TorchJD offers them as aggregators of a Jacobian. Krum is a
:class:`~mtl_optax.base.Weighting` rule (its distances come from the Gramian:
:math:`\|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij}`); the trimmed mean works
coordinate by coordinate and sits beside the Gramian engine, as GradDrop does.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mtl_optax import engine
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    check_num_tasks,
    check_update_inputs,
    from_weighting,
    initial_weights,
)
from mtl_optax.registry import register

__all__ = [
    "KrumState",
    "TrimmedMeanState",
    "krum",
    "krum_weights",
    "trimmed_mean",
]


def _check_count(method: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | jnp.integer) or int(value) < minimum:
        kind = "a non-negative" if minimum == 0 else "a positive"
        raise ValueError(f"{method}: {name} must be {kind} int; found {value!r}.")
    return int(value)


def _check_krum_tasks(k: int, n_byzantine: int, n_selected: int) -> None:
    if k < n_byzantine + 3:
        raise ValueError(
            f"krum: needs at least n_byzantine + 3 = {n_byzantine + 3} tasks (each score"
            f" sums the distances to the K - n_byzantine - 2 closest other tasks); found"
            f" K={k}."
        )
    if k < n_selected:
        raise ValueError(f"krum: n_selected={n_selected} is more than the K={k} tasks.")


@engine.full_precision
def krum_weights(
    gramian: jax.typing.ArrayLike, *, n_byzantine: int, n_selected: int = 1
) -> jax.Array:
    r"""The (Multi-)Krum weights from the Gramian (see :func:`krum`).

    Args:
      gramian: the ``[K, K]`` Gramian, ``K >= n_byzantine + 3``.
      n_byzantine: :math:`f`, the number of rows that may be adversarial.
      n_selected: :math:`m`, the number of rows averaged (Multi-Krum).

    Returns:
      The ``[K]`` weights: :math:`1/m` on the selected tasks, 0 elsewhere, in
      the Gramian's dtype (float32 at least); NaN for a non-finite Gramian.

    Raises:
      ValueError: ``K < n_byzantine + 3`` or ``K < n_selected``.
    """
    n_byzantine = _check_count("krum", "n_byzantine", n_byzantine, 0)
    n_selected = _check_count("krum", "n_selected", n_selected, 1)
    return _krum_selection(gramian, n_byzantine, n_selected)[2]


def _krum_selection(
    gramian: jax.typing.ArrayLike, n_byzantine: int, n_selected: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(selected, finite, weights)``: the selected task indices, whether the
    Gramian is finite, and the weights (NaN where it is not)."""
    gramian = jnp.asarray(gramian)
    gramian = lax.stop_gradient(gramian.astype(jnp.promote_types(gramian.dtype, jnp.float32)))
    k = gramian.shape[0]
    _check_krum_tasks(k, n_byzantine, n_selected)
    # The selection does not depend on the Gramian's scale: the distances are
    # taken on G / max_k G_kk, so G_ii + G_jj cannot overflow.
    g, _ = engine.scale_by_largest_diagonal(gramian)
    norms = jnp.diagonal(g)
    distances = jnp.sqrt(jnp.maximum(norms[:, None] + norms[None, :] - 2 * g, 0))
    # The n_closest + 1 smallest distances of each row, ascending; the first is
    # the row's distance to itself (exactly 0), which the score leaves out.
    n_closest = k - n_byzantine - 2
    smallest = -lax.top_k(-distances, n_closest + 1)[0]
    scores = jnp.sum(smallest[:, 1:], axis=1)
    # lax.top_k is stable: of tied scores, the lowest task index is selected.
    selected = lax.top_k(-scores, n_selected)[1]
    weights = jnp.sum(jax.nn.one_hot(selected, k, dtype=gramian.dtype), axis=0) / n_selected
    finite = jnp.all(jnp.isfinite(gramian))
    return selected, finite, jnp.where(finite, weights, jnp.nan)


class KrumState(NamedTuple):
    """State of :func:`krum`."""

    weights: jax.Array  # [K] weights of the last step, for logging.


@register("krum")
def krum(
    n_byzantine: int, n_selected: int = 1, num_tasks: int | None = None
) -> WeightedTransformation:
    r"""(Multi-)Krum: the mean of the task gradients closest to their neighbours.

    Each task :math:`i` is scored by the sum of its distances to the
    :math:`K - f - 2` other tasks closest to it, with the distances taken from
    the Gramian; the :math:`m` tasks of lowest score are averaged:

    .. math::
      d_{ij} = \sqrt{G_{ii} + G_{jj} - 2 G_{ij}}, \qquad
      s_i = \sum_{j \in N_i} d_{ij}, \qquad
      u = \frac{1}{m} \sum_{i \in S} g_i

    where :math:`N_i` holds the :math:`K - f - 2` tasks :math:`j \ne i` of
    smallest :math:`d_{ij}` and :math:`S` the :math:`m` tasks of smallest
    score. With :math:`m = 1` this is Krum (Blanchard et al. 2017), with
    :math:`m > 1` Multi-Krum. The weights are :math:`1/m` on :math:`S` and 0
    elsewhere; they are constants under differentiation.

    Degenerate cases: tied scores (identical tasks, or three collinear tasks
    spaced evenly) select the lowest task indices, a choice among equally good
    ones (TorchJD's ``torch.topk`` leaves the order of ties unspecified); a
    zero Gramian gives tied scores of 0. The selection does not depend on the
    scale of the gradients (the distances are taken on :math:`G / \max_k
    G_{kk}`). As in TorchJD, a distance is computed from the Gramian, so two
    tasks closer than about :math:`\sqrt{\epsilon}` times their norm are at
    distance 0.

    Args:
      n_byzantine: :math:`f \ge 0`, the number of tasks that may be
        adversarial (required, as in TorchJD).
      n_selected: :math:`m \ge 1`, the number of tasks averaged (TorchJD's
        default 1).
      num_tasks: ``K``, recommended. When given, it is checked at every
        update and the state has its final shape from ``init`` on.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.base.WeightedTransformation`).

    Raises:
      ValueError: a negative ``n_byzantine``, a non-positive ``n_selected``; at
        update time (or at construction with ``num_tasks``), fewer than
        ``n_byzantine + 3`` or ``n_selected`` tasks.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.krum(n_byzantine=0, num_tasks=4)
      >>> g = {"w": jnp.array([[1.0, 0.0], [1.2, 0.0], [0.9, 0.1], [-50.0, 9.0]])}
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]
      Array([1., 0.], dtype=float32)
      >>> state.weights
      Array([1., 0., 0., 0.], dtype=float32)

    References:
      Blanchard, El Mhamdi, Guerraoui and Stainer, `Machine Learning with
      Adversaries: Byzantine Tolerant Gradient Descent
      <https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html>`_,
      NeurIPS 2017. Reference implementation: TorchJD ``Krum`` /
      ``KrumWeighting`` (live parity in float64 is tested).
    """
    n_byzantine = _check_count("krum", "n_byzantine", n_byzantine, 0)
    n_selected = _check_count("krum", "n_selected", n_selected, 1)
    k = check_num_tasks("krum", num_tasks)
    if k is not None:
        _check_krum_tasks(k, n_byzantine, n_selected)

    def weights(gramian: Any, state: Any, value: Any, *, num_tasks: int, dtype: Any):
        del state, value, num_tasks
        w = krum_weights(gramian.astype(dtype), n_byzantine=n_byzantine, n_selected=n_selected)
        return w, KrumState(weights=w.astype(jnp.float32))

    weighting = Weighting(
        name="krum",
        init=lambda: KrumState(weights=initial_weights(k)),
        weights=weights,
        num_tasks=k,
    )
    generic = from_weighting(weighting)

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: KrumState,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, KrumState]:
        # The weights are 1/m on m tasks: the update gathers those m rows
        # instead of combining all K (one pass over J fewer than the generic
        # weighted combination).
        del extra_args
        _, _, dtype = check_update_inputs(updates, params, value, num_tasks=k, method="krum")
        gram = engine.gramian(updates).astype(dtype)
        selected, finite, w = _krum_selection(gram, n_byzantine, n_selected)

        def one(leaf: jax.Array) -> jax.Array:
            picked = jnp.take(leaf, selected, axis=0).astype(engine.accumulation_dtype(leaf.dtype))
            mean = engine.sum_tasks(picked)
            if n_selected > 1:
                mean = mean / n_selected
            return jnp.where(finite, mean, jnp.nan).astype(leaf.dtype)

        return jax.tree_util.tree_map(one, updates), KrumState(weights=w.astype(jnp.float32))

    tx = WeightedTransformation(generic.init, update_fn)
    tx.weighting = weighting
    tx.per_task = generic.per_task
    return tx


# Up to this many tasks the rows are sorted by a comparator network fused into
# one elementwise pass; beyond it by XLA's sort.
_NETWORK_MAX_TASKS = 64


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    r"""Batcher's odd-even merge sort network on ``n`` wires, as ``(i, j)`` pairs, ``i < j``.

    Applying the comparators in order, each one putting the smaller of wires
    ``i`` and ``j`` on ``i`` and the larger on ``j``, sorts any ``n`` values
    ascending (for ``n`` not a power of two, the network of the next power of
    two restricted to its first ``n`` wires, which sorts as well since the
    missing wires can be taken as :math:`+\infty`). It has
    :math:`O(n \log^2 n)` comparators: 12 for 6 wires, 63 for 16, 543 for 64.
    """
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _trimmed_sum(x: jax.Array, trim: int, dtype: Any) -> jax.Array:
    """The sum over the leading axis of ``x`` without its ``trim`` largest and smallest."""
    k = x.shape[0]
    x = x.astype(dtype)
    if trim == 0:
        return engine.sum_tasks(x)  # non-finite values propagate
    if k <= _NETWORK_MAX_TASKS:
        # The K rows through a sorting network: elementwise minima and maxima
        # of whole rows, which XLA fuses into one pass over J (XLA's CPU sort
        # along the task axis took 52 ms for (10, 1e5) float32, this 0.45 ms).
        rows = [x[i] for i in range(k)]
        for i, j in sorting_network(k):
            rows[i], rows[j] = jnp.minimum(rows[i], rows[j]), jnp.maximum(rows[i], rows[j])
    else:
        rows = list(jnp.sort(x, axis=0))  # coordinate by coordinate, as torch.sort
    total = rows[trim]
    for row in rows[trim + 1 : k - trim]:
        total = total + row
    # A NaN spreads through the network's minima and maxima (and jnp.sort puts
    # it last); an infinity ends up first or last: a coordinate is finite iff
    # its extremes are.
    finite = jnp.isfinite(rows[0]) & jnp.isfinite(rows[k - 1])
    return jnp.where(finite, total, jnp.nan)


class TrimmedMeanState(NamedTuple):
    """State of :func:`trimmed_mean` (none: the method is stateless)."""


@register("trimmed_mean")
def trimmed_mean(
    trim_number: int, num_tasks: int | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""The coordinate-wise trimmed mean of the task gradients.

    For every coordinate :math:`p`, the :math:`t` largest and :math:`t`
    smallest of the :math:`K` values :math:`g_{1p}, \dots, g_{Kp}` are removed
    and the rest averaged:

    .. math::
      u_p = \frac{1}{K - 2t} \sum_{r = t + 1}^{K - t} g_{(r)p}

    where :math:`g_{(1)p} \le \dots \le g_{(K)p}` are the values sorted.
    :math:`t = 0` is the mean; :math:`t = (K - 1)/2` for odd :math:`K` the
    coordinate-wise median. It is not a weighting of the task gradients (each
    coordinate keeps different tasks) and does not use the Gramian; it is
    exact for any values, including zero, identical or opposite gradients.

    The values are sorted and summed in float32 at least (float64 for float64
    leaves); the update is returned in each leaf's dtype.

    Non-finite input: a coordinate where any task's value is NaN or
    :math:`\pm\infty` is NaN in the update, trimmed or not, as for every
    method of the library (so that :func:`mtl_optax.apply_if_finite` skips the
    step). TorchJD sorts NaN above :math:`+\infty` and trims it with the
    largest values, and trims infinities like any value.

    Args:
      trim_number: :math:`t \ge 0`, the number of largest and of smallest
        values removed per coordinate (required, as in TorchJD).
      num_tasks: ``K``, optional; when given it is checked at every update
        (and ``K >= 2t + 1`` at construction).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: a negative ``trim_number``; at update time (or at
        construction with ``num_tasks``), fewer than ``2 * trim_number + 1``
        tasks.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.trimmed_mean(trim_number=1)
      >>> g = {"w": jnp.array([[1.0, -4.0], [2.0, 0.0], [100.0, 1.0]])}
      >>> u, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> u["w"]  # the coordinate-wise median of 3 tasks
      Array([2., 0.], dtype=float32)

    References:
      Yin, Chen, Ramchandran and Bartlett, `Byzantine-Robust Distributed
      Learning: Towards Optimal Statistical Rates
      <https://proceedings.mlr.press/v80/yin18a.html>`_, ICML 2018 (Definition
      2). Reference implementation: TorchJD ``TrimmedMean`` (live parity in
      float64 is tested).
    """
    trim_number = _check_count("trimmed_mean", "trim_number", trim_number, 0)
    k_fixed = check_num_tasks("trimmed_mean", num_tasks)

    def check(k: int) -> None:
        if k < 2 * trim_number + 1:
            raise ValueError(
                f"trimmed_mean: needs at least 2 * trim_number + 1 = {2 * trim_number + 1}"
                f" tasks; found K={k}."
            )

    if k_fixed is not None:
        check(k_fixed)

    def init_fn(params: Any) -> TrimmedMeanState:
        del params
        return TrimmedMeanState()

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: TrimmedMeanState,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, TrimmedMeanState]:
        del extra_args
        k, _, _ = check_update_inputs(
            updates, params, value, num_tasks=k_fixed, method="trimmed_mean"
        )
        check(k)

        def one(leaf: jax.Array) -> jax.Array:
            dtype = engine.accumulation_dtype(leaf.dtype)
            total = _trimmed_sum(leaf, trim_number, dtype)
            return (total / (k - 2 * trim_number)).astype(leaf.dtype)

        return jax.tree_util.tree_map(one, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
