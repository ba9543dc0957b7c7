r"""ExcessMTL: task weights driven by estimates of each task's excess risk.

ExcessMTL (He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi and Zhao, ICML 2024)
keeps simplex weights :math:`\alpha` and moves them by an
exponentiated-gradient step towards the tasks that are furthest from their own
optimum, measured by an estimate of each task's
*excess risk* (its loss minus the best loss it could reach) rather than by the
loss itself, so that tasks with large irreducible noise do not take over. The
excess risk of task :math:`k` is estimated by a second-order Taylor expansion,
:math:`g_k^\top H_k^{-1} g_k`, with an AdaGrad-style diagonal estimate of the
Hessian :math:`H_k` built from the task's squared gradients.

The estimate reads every coordinate of every task gradient (not only the
Gramian) and the state holds ``K x P`` numbers (the inverse square roots of the
sums of squared task gradients), so the method is its own transformation beside
the Gramian engine, as M-ConFIG is.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import engine
from mtl_optax.base import check_num_tasks, check_update_inputs, initial_weights, is_traced
from mtl_optax.registry import register

__all__ = ["ExcessMTLState", "excess_mtl"]

# Added to the squared-gradient sums before the square root, and to the
# baseline before the division (the references' 1e-7, in both places).
_EPS = 1e-7


class ExcessMTLState(NamedTuple):
    """State of :func:`excess_mtl`."""

    weights: jax.Array  # [K] float32: the weights of the last step, for logging.
    alpha: jax.Array  # [K] the current simplex weights (from 1/K).
    # Q = (S + 1e-7) ** -0.5, S the sums of g**2: the params' tree, every leaf
    # (K, *param.shape). S itself is 1 / Q**2 - 1e-7.
    inv_sqrt_sum: Any
    warmup_sum: jax.Array  # [K] the sum of the excess risks over the warmup steps.
    baseline: jax.Array  # [K] the baseline excess risks (valid once has_baseline).
    has_baseline: jax.Array  # bool []: whether the baseline is set.
    count: jax.Array  # int32 []: the updates taken so far.


def _excess_risks(updates: Any, inv_sqrt_sums: Any, dtype: Any) -> tuple[jax.Array, Any]:
    r"""``(e, Q')``: the ``[K]`` excess risks and the new inverse square roots.

    The state keeps :math:`Q = (S + 10^{-7})^{-1/2}` rather than the sums
    :math:`S` themselves. Per leaf, in ``Q``'s dtype, with :math:`t = g Q`:

    .. math::
      Q' = (S + g^2 + 10^{-7})^{-1/2} = Q\,(1 + t^2)^{-1/2}, \qquad
      e_k = \sum_j g_{kj}\,(g_{kj}\, Q'_{kj}),

    summed over the leaves in ``dtype``. The terms are the references'
    :math:`g^2 / \sqrt{S' + 10^{-7}}`, a rounding apart, but the pass that
    writes :math:`Q'` has one reciprocal square root and no division, and
    the sums multiply only: XLA's CPU reduction, which recomputes its
    operands' elementwise producers, no longer runs the square root and the
    division itself (the update 1.1-1.4x faster on CPU; benchmarks/README,
    *PCD and ExcessMTL*).

    Range: where :math:`|t| > 2^{60}` (then :math:`1 + t^2 = t^2` in float32
    and float64) :math:`Q' = 1 / |g|`, taken as :math:`\mathrm{rsqrt}(|g|)^2`
    so that :math:`t^2` (or :math:`t` itself) overflowing does not matter: a
    term is then :math:`\approx |g|`, finite for every finite :math:`g`,
    where :math:`S` itself would overflow (float32: from :math:`|g| \approx
    1.8 \cdot 10^{19}`). :math:`Q` reaches 0 (the smallest normal float32 is
    about :math:`1.2 \cdot 10^{-38}`) only once :math:`S` exceeds about
    :math:`7 \cdot 10^{75}`; the terms then are 0.
    """
    leaves_g, treedef = jax.tree_util.tree_flatten(updates)
    leaves_q = treedef.flatten_up_to(inv_sqrt_sums)
    k = leaves_g[0].shape[0]
    e = jnp.zeros((k,), dtype)
    new_q = []
    for g, q in zip(leaves_g, leaves_q, strict=True):
        g = g.astype(q.dtype)
        t = g * q
        big = jnp.abs(t) > jnp.asarray(2.0**60, q.dtype)
        r = jax.lax.rsqrt(jnp.where(big, jnp.abs(g), 1.0 + t * t))
        q_new = jnp.where(big, r * r, q * r)
        new_q.append(q_new)
        if g.size == 0:
            continue
        terms = g * (g * q_new)
        e = e + jnp.sum(terms.astype(dtype), axis=tuple(range(1, g.ndim)))
    return e, treedef.unflatten(new_q)


@register("excess_mtl")
def excess_mtl(
    robust_step_size: float = 1.0,
    n_warmup_steps: int = 1,
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ExcessMTL: exponentiated-gradient task weights from estimated excess risks.

    At step :math:`t`, with :math:`g_{t,k}` the task gradients (all leaves
    flattened, :math:`j` running over the coordinates) and every operation on
    :math:`S` elementwise:

    .. math::
      S_t = S_{t-1} + g_t^{2}, \qquad
      e_{t,k} = \sum_j \frac{g_{t,kj}^2}{\sqrt{S_{t,kj} + 10^{-7}}}
      \quad (\approx g_k^\top H_k^{-1} g_k),

      \alpha_t = \mathrm{softmax}\Big(\log \alpha_{t-1}
      + \eta\, \frac{e_t}{b + 10^{-7}}\Big), \qquad
      u_t = \sum_{k=1}^K \alpha_{t,k}\, g_{t,k}, \qquad
      \alpha_0 = \tfrac1K \mathbf 1, \quad S_0 = 0

    (the division by :math:`b + 10^{-7}` entrywise; the softmax is the
    exponentiated-gradient step :math:`\alpha \propto \alpha\, e^{\eta \hat
    e}` in log space). :math:`e_t` is the paper's Taylor estimate of each
    task's excess risk (Equations 6-7, an AdaGrad diagonal for the Hessian)
    and the division by the baseline :math:`b` its scale processing (Section
    3.2), which makes tasks of different loss scales comparable:

    * during the first ``n_warmup_steps`` steps the weights stay
      :math:`\tfrac1K` (the update is the mean) and :math:`e_t` is summed;
      at the next step :math:`b` is their mean, and that step and every later
      one take the weight step above. With the default
      ``n_warmup_steps=1`` the first step sets :math:`b = e_1` and keeps the
      weights uniform, which is the scale processing applied from the first
      step on (:math:`e_1 / b = 1` for every task moves no weight) and what
      the official code and LibMTL do at their first call; the paper's
      Appendix C.1 suggests three epochs of warmup;
    * with ``n_warmup_steps=0`` (TorchJD 0.18's default) :math:`b = e_1`,
      and the first step takes :math:`\alpha_1 = \mathrm{softmax}(\log
      \alpha_0 + \eta\, e_1)` with :math:`e_1` *unscaled*; later steps divide
      by :math:`b`.

    From the step that sets :math:`b` on, scaling every gradient by
    :math:`c` scales :math:`e_t` and :math:`b` alike, so the weights do not
    depend on the gradients' scale and the update is positively homogeneous
    in them. TorchJD's first step is the exception: its weights depend on
    the scale (with unit rows :math:`e_1 \approx \|g_k\|_1`, and a large
    scale makes the softmax pick the largest task, whose weight the later
    steps then cannot take back when the others' underflow to 0).

    Edge cases (all finite for finite input): ``K = 1`` gives weight 1; a
    task whose baseline is 0 (its first gradients were zero) and whose
    gradient later becomes non-zero has :math:`e_t / 10^{-7}`, a huge step,
    and takes all the weight (the softmax saturates); a weight that underflows
    to 0 stays 0 (its logarithm is :math:`-\infty`), as in TorchJD; a step
    :math:`\eta\, e_t / (b + 10^{-7})` beyond the dtype's range is clipped to
    its largest finite number, so the softmax saturates instead of returning
    NaN (tasks whose steps are clipped alike tie). All-zero gradients leave
    the weights where they are.

    Non-finite input: a NaN or :math:`\pm\infty` in a task gradient makes the
    update non-finite (its excess risk is NaN, so every weight is), during the
    warmup too; the new state then holds NaN (in the weights or the warmup
    sum, and in :math:`Q` for a NaN gradient) and every later update from it
    is NaN. Wrap the chain in :func:`mtl_optax.apply_if_finite`, which skips
    such a step and keeps the previous state. The per-task losses
    (``value=``) are not read.

    Memory: the state holds one float per parameter and task (``K x P``,
    like the stacked task gradients themselves), in float32 for bfloat16 /
    float16 / float32 parameters and float64 for float64 ones, as TorchJD's
    and the official code's :math:`S`. It keeps :math:`Q = (S +
    10^{-7})^{-1/2}` (``inv_sqrt_sum``; :math:`S = Q^{-2} - 10^{-7}`)
    instead of :math:`S`, updated as :math:`Q' = Q (1 + (gQ)^2)^{-1/2}`,
    which makes the terms :math:`g (g Q')` products only (see
    ``_excess_risks``; the same numbers, a rounding apart, and a wider
    range: after 300 float32 steps :math:`Q` was within 1.1e-6 relative of
    :math:`(S + 10^{-7})^{-1/2}` from float64 sums, against 3e-7 for a
    float32 running sum :math:`S`). Donate the state to the jitted step
    (``jax.jit(..., donate_argnums=...)``) so that :math:`Q` is updated in
    place. The update reads the task gradients three times (the new
    :math:`Q`, the excess risks, then the combination).

    Args:
      robust_step_size: :math:`\eta > 0`, the weights' step size (default
        1.0, TorchJD's ``ExcessMTL`` default). May be scheduled with
        ``optax.inject_hyperparams``.
      n_warmup_steps: the number of warmup steps, an int ``>= 0`` (default 1:
        the first step sets the baseline and keeps the weights uniform, as
        the official code's and LibMTL's first call; 0 is TorchJD 0.18's
        default, whose first step moves the weights by the unscaled excess
        risks; see *Differences from the references*).
      num_tasks: ``K``, required: the state holds ``K x P`` numbers from
        ``init`` on.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``init(params)`` needs
      the params (the sums take their shapes); ``update(task_grads, state,
      params=None, **extra)``. The state's ``weights`` are the
      :math:`\alpha_t` of the last step (NaN before the first).

    Raises:
      ValueError: ``robust_step_size`` not positive and finite,
        ``n_warmup_steps`` not a non-negative int, ``num_tasks`` missing,
        ``init`` without params; at update time, bad task gradients (the
        message names the leaf, its shape and the shape expected).

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.excess_mtl(num_tasks=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> u, state = tx.update(g, state, params)
      >>> u["w"], state.weights  # the baseline e ~ (1, 2) is set: the mean
      (Array([0.5, 1. ], dtype=float32), Array([0.5, 0.5], dtype=float32))
      >>> u, state = tx.update(g, state, params)  # e = (1, 2) / sqrt(2): equal after scaling
      >>> [round(float(x), 4) for x in state.weights]
      [0.5, 0.5]
      >>> g = {"w": jnp.array([[3.0, 0.0], [0.0, 2.0]])}  # e / b = (9 / sqrt(11), 2 / sqrt(12))
      >>> u, state = tx.update(g, state, params)
      >>> [round(float(x), 4) for x in state.weights]
      [0.8944, 0.1056]
      >>> torchjd_rule = mtl_optax.excess_mtl(n_warmup_steps=0, num_tasks=2)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> u, s = torchjd_rule.update(g, torchjd_rule.init(params), params)
      >>> s.weights  # softmax(log(1/2) + e): the unscaled first step
      Array([0.26894143, 0.7310586 ], dtype=float32)

    References:
      He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi and Zhao, `Robust Multi-Task Learning with Excess Risks
      <https://proceedings.mlr.press/v235/he24n.html>`_, ICML 2024.
      Reference implementations: TorchJD 0.18 ``ExcessMTL`` /
      ``ExcessMTLWeighting`` (``torchjd/aggregation/_excess_mtl.py``; live
      parity in float64 is tested), the official code (`yifei-he/ExcessMTL
      <https://github.com/yifei-he/ExcessMTL>`_, a LibMTL weighting) and
      LibMTL's ``ExcessMTL`` (main branch, not in LibMTL 1.1.5).

    Differences from the references:
      For the same ``n_warmup_steps`` the rule is TorchJD's, but the
      default is 1 where TorchJD's is 0. TorchJD documents its 0 as the
      behaviour of the official implementation and LibMTL, but their first
      call only sets the baseline and leaves the weights unchanged, while
      TorchJD's takes a step with the unscaled excess risks. That step
      undoes the paper's scale processing where it matters: with tasks of
      different loss scales the softmax puts all the weight on the task of
      the largest gradients, and the others' weights, underflowed to 0,
      stay 0 (``examples/demo.py``, targets on scales 1, 10 and 0.1: the
      smallest task's test error ends at about 150 times its target's
      variance with ``n_warmup_steps=0``, 0.75 times with the default). So
      the default follows the paper and the official code, and
      ``n_warmup_steps=0`` gives TorchJD's default; both are tested live
      against TorchJD with the same ``n_warmup_steps``. The official code
      and LibMTL also start from weights 1 and renormalise them to sum to
      ``K`` (the update is then ``K`` times this one), have no warmup
      beyond that first call, and divide by the baseline without the
      :math:`10^{-7}`, which gives inf and NaN weights for a task whose
      first gradient is zero. They also read only the shared parameters'
      gradients (or the representation's, with LibMTL's ``rep_grad``); here
      every leaf of the task gradients counts. Numerics, where TorchJD would
      return NaN or inf: the state is :math:`Q = (S + 10^{-7})^{-1/2}` and
      the terms :math:`g (g Q')` (the same in exact arithmetic, a rounding
      apart), so a coordinate whose squared gradient overflows (float32:
      entries from about 1.8e19, where TorchJD's :math:`S` becomes inf and
      its term NaN) contributes about :math:`|g|`, its exact value, and the
      state stays finite; the weight step is clipped to the dtype's largest
      finite number (see above). Where TorchJD re-creates its state when
      ``K``, ``P`` or the dtype change, here they are fixed at ``init``.
    """
    method = "excess_mtl"
    if not is_traced(robust_step_size):
        eta = float(robust_step_size)
        if not (np.isfinite(eta) and eta > 0.0):
            raise ValueError(
                f"{method}: robust_step_size must be positive and finite; found"
                f" robust_step_size={robust_step_size!r}."
            )
        robust_step_size = eta
    if not is_traced(n_warmup_steps):
        n = n_warmup_steps
        if (
            isinstance(n, bool)
            or not isinstance(n, int | np.integer | np.ndarray | jax.Array)
            or np.ndim(n) != 0
            or not jnp.issubdtype(jnp.result_type(n), jnp.integer)
            or int(n) < 0
        ):
            raise ValueError(
                f"{method}: n_warmup_steps must be a non-negative int; found"
                f" n_warmup_steps={n_warmup_steps!r}."
            )
        n_warmup_steps = int(n)
    k = check_num_tasks(method, num_tasks)
    if k is None:
        raise ValueError(
            f"{method} needs num_tasks=K: its state holds K x P numbers (from the"
            " sums of squared task gradients), created at init."
        )

    def init_fn(params: Any) -> ExcessMTLState:
        if params is None:
            raise ValueError(
                f"{method}: init needs the params (the state's K x P numbers take their shapes)."
            )

        def initial_q(p: Any) -> jax.Array:
            # Q = (0 + 1e-7) ** -0.5. full_like keeps the parameters' sharding
            # (a mesh with Explicit axes refuses to mix sharded and replicated
            # operands).
            p = jnp.asarray(p)
            q = jnp.full_like(p, _EPS**-0.5, dtype=engine.accumulation_dtype(p.dtype))
            return jnp.broadcast_to(q, (k, *p.shape))

        dtype = engine.tree_accumulation_dtype(params)
        return ExcessMTLState(
            weights=initial_weights(k),
            alpha=jnp.full((k,), 1.0 / k, dtype),
            inv_sqrt_sum=jax.tree.map(initial_q, params),
            warmup_sum=jnp.zeros((k,), dtype),
            baseline=jnp.zeros((k,), dtype),
            has_baseline=jnp.zeros((), bool),
            count=jnp.zeros((), jnp.int32),
        )

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: ExcessMTLState,
        params: Any = None,
        *,
        value: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[Any, ExcessMTLState]:
        del extra_args
        _, _, grad_dtype = check_update_inputs(updates, params, value, num_tasks=k, method=method)
        if params is None:  # check against the state's shapes (those of the params).
            shapes = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), state.inv_sqrt_sum
            )
            engine.check_task_grads(updates, shapes, num_tasks=k, method=method)
        state_dtype = state.alpha.dtype
        dtype = jnp.result_type(grad_dtype, state_dtype)
        e, inv_sqrt_sum = _excess_risks(updates, state.inv_sqrt_sum, dtype)

        n = n_warmup_steps
        warming = ~state.has_baseline & (state.count < n)
        first = ~state.has_baseline & ~warming  # this step sets the baseline
        warmup_sum = state.warmup_sum.astype(dtype)
        warmup_mean = warmup_sum / (max(n, 1) if isinstance(n, int) else jnp.maximum(n, 1))
        baseline = jnp.where(first, jnp.where(n > 0, warmup_mean, e), state.baseline.astype(dtype))
        scaled = jnp.where(first & (n == 0), e, e / (baseline + jnp.asarray(_EPS, dtype)))
        # A step beyond the dtype's range (a zero baseline) saturates the
        # softmax instead of giving inf - inf = NaN; NaN passes through.
        top = jnp.finfo(dtype).max
        step = jnp.minimum(jnp.asarray(robust_step_size, dtype) * jnp.minimum(scaled, top), top)
        alpha = state.alpha.astype(dtype)
        alpha = jnp.where(warming, alpha, jax.nn.softmax(jnp.log(alpha) + step))

        update = engine.combine(updates, alpha)
        new_state = ExcessMTLState(
            weights=alpha.astype(jnp.float32),
            alpha=alpha.astype(state_dtype),
            inv_sqrt_sum=inv_sqrt_sum,
            warmup_sum=jnp.where(warming, warmup_sum + e, warmup_sum).astype(state_dtype),
            baseline=baseline.astype(state_dtype),
            has_baseline=state.has_baseline | first,
            count=state.count + 1,
        )
        return update, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
