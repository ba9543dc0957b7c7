r"""Multi-task methods on the gradients of a shared representation.

Some methods act on the gradient each task sends back to a shared
representation :math:`z = \mathrm{enc}(\theta_{sh}, x)` instead of on the
parameter gradients: LibMTL with ``rep_grad=True``, vambn / impartial-vaes'
``MOOForLoop``, and Sener & Koltun's MGDA-UB. :func:`rep_grad` builds the step
that computes the ``K`` losses, the ``K`` representation gradients
:math:`\partial L_k / \partial z`, applies any mtl_optax method to them, and
back-propagates the combined gradient through the encoder with a single
vector-Jacobian product: one encoder backward pass, whatever ``K``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax._compose import _RESCALE_EPS, _safe_norm, _task_sum
from mtl_optax.engine import leaf_path as _path

__all__ = ["RepGrad", "RepGradState", "rep_grad"]

_NAME = "rep_grad"


def _check_combined(combined: Any, z: Any) -> None:
    """The method's update must have the representation's structure and shapes."""
    z_def = jax.tree_util.tree_structure(z)
    c_def = jax.tree_util.tree_structure(combined)
    if z_def != c_def:
        raise ValueError(
            f"{_NAME}: the method returned an update whose tree structure differs from"
            f" the representation's.\n  update:         {c_def}\n  representation: {z_def}"
        )
    for (path, c), zz in zip(
        jax.tree_util.tree_leaves_with_path(combined), jax.tree_util.tree_leaves(z), strict=True
    ):
        if jnp.shape(c) != jnp.shape(zz):
            raise ValueError(
                f"{_NAME}: leaf {_path(path)} of the method's update has shape"
                f" {jnp.shape(c)}; expected the representation's shape {jnp.shape(zz)}."
                " The method must combine the K task gradients into one (an mtl_optax"
                " method's update, not its per-task form)."
            )


class RepGradState(NamedTuple):
    """State of :func:`rep_grad`."""

    method: Any  # the state of the method applied to the representation gradients.


class RepGrad(NamedTuple):
    """The pair of pure functions returned by :func:`rep_grad`.

    Attributes:
      init: ``init(encoder_params, *batch) -> RepGradState``.
      step: ``step(state, encoder_params, heads_params, *batch, **extra_args)
        -> (losses, grads, new_state)``; see :func:`rep_grad`.
    """

    init: Callable[..., RepGradState]
    step: Callable[..., tuple[Any, Any, RepGradState]]


def rep_grad(
    method: optax.GradientTransformationExtraArgs,
    encoder_fn: Callable[..., Any],
    heads_fn: Callable[..., Any],
    *,
    rescale: Literal["none", "sum_norm"] = "none",
    has_aux: bool = False,
) -> RepGrad:
    r"""Applies a multi-task method to the gradients of a shared representation.

    For a model split into a shared encoder :math:`z = \mathrm{enc}(\theta_e,
    x)` (``z`` an array or a pytree) and heads :math:`L(\theta_h, z) \in
    \mathbb{R}^K`, one ``step`` computes

    .. math::
      r_k = \frac{\partial L_k}{\partial z}, \qquad
      c = s \cdot T(r_1, \dots, r_K), \qquad
      \nabla_{\theta_e} = \Big(\frac{\partial z}{\partial \theta_e}\Big)^{\!\top} c,
      \qquad
      \nabla_{\theta_h} = \frac{\partial}{\partial \theta_h} \sum_{k=1}^K L_k

    where :math:`T` is ``method``'s update on the stacked representation
    gradients (shape ``[K, *z.shape]`` per leaf, with ``params=z`` and
    ``value=`` the ``K`` losses), :math:`s = 1` for ``rescale="none"`` and,
    for ``rescale="sum_norm"`` (vambn's ``MOOForLoop``),

    .. math::
      s = \frac{\lVert \sum_k r_k \rVert}{\max(\lVert T(r) \rVert, 10^{-10})}.

    Cost: one encoder forward pass and **one** encoder backward pass (a single
    ``jax.vjp`` of the encoder, called once with :math:`c`), ``K`` backward
    passes through the heads (to get the :math:`r_k`, batched with ``vmap``)
    and one more for the heads' gradient. Compare with
    :func:`mtl_optax.task_grads` on all parameters: ``K`` backward passes
    through the encoder.

    The heads' gradient is the gradient of the plain sum of the losses, as in
    LibMTL with ``rep_grad=True`` (each task's loss backward reaches only its
    decoder and the detached representation), vambn's ``MOOForLoop`` (the hook
    only changes what reaches ``z``) and Sener & Koltun's Algorithm 2 (each
    head descends its own loss). When every head only reads its own
    parameters, this is task ``k``'s head receiving :math:`\nabla L_k`.

    Args:
      method: any ``optax.GradientTransformationExtraArgs`` that takes stacked
        task gradients: ``mtl_optax.mgda_ub()``, ``mtl_optax.graddrop(
        batch_axes=0)``, ``mtl_optax.compose(...)``, ``mtl_optax.mean()``...
        Its update must have the structure and shapes of ``z``.
      encoder_fn: ``encoder_fn(encoder_params, *batch) -> z``. For Flax, a
        Linen module's ``apply`` (``lambda p, x: encoder.apply(p, x)``) or an
        NNX module through ``graphdef, params = nnx.split(encoder)`` and
        ``lambda p, x: nnx.merge(graphdef, p)(x)``; the same for the heads.
      heads_fn: ``heads_fn(heads_params, z, *batch) -> losses`` of shape
        ``[K]``, or ``(losses, aux)`` when ``has_aux``.
      rescale: ``"none"`` (default; LibMTL) or ``"sum_norm"`` (vambn's
        ``MOOForLoop``), as in :func:`mtl_optax.compose`.
      has_aux: whether ``heads_fn`` returns ``(losses, aux)``.

    Returns:
      A :class:`RepGrad` ``(init, step)`` of pure functions, to be wrapped in
      ``jax.jit`` by the caller:

      * ``init(encoder_params, *batch) -> RepGradState``. With an example
        ``batch``, the method's ``init`` receives a zero representation of
        ``z``'s shapes (``jax.eval_shape``, nothing is computed): methods
        whose state takes the parameters' shapes (``m_conflict_free``) need
        it. Without, it receives ``None``.
      * ``step(state, encoder_params, heads_params, *batch, **extra_args) ->
        (losses, grads, new_state)``, with ``grads = {"encoder": ...,
        "heads": ...}`` (each with its parameters' structure), ready for any
        optax optimizer over ``{"encoder": encoder_params, "heads":
        heads_params}``; ``losses`` is ``(losses, aux)`` when ``has_aux``.
        ``extra_args`` are passed to the method's update (e.g.
        ``graddrop_uniforms=``).

    Raises:
      ValueError: ``rescale`` is not one of the above; at trace time,
        ``heads_fn`` does not return a vector of losses, the method's update
        does not have ``z``'s structure or shapes, or ``state`` is not a
        :class:`RepGradState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, mtl_optax
      >>> def encoder(w, x):
      ...   return jnp.tanh(x @ w)  # z: [B, 2]
      >>> def heads(h, z, x):
      ...   del x
      ...   return jnp.stack([jnp.mean((z @ h[0] - 1.0) ** 2), jnp.mean((z @ h[1] + 1.0) ** 2)])
      >>> rg = mtl_optax.rep_grad(mtl_optax.mgda_ub(num_tasks=2), encoder, heads)
      >>> x = jnp.ones((4, 3)); w = jnp.full((3, 2), 0.1); h = jnp.ones((2, 2))
      >>> state = rg.init(w, x)
      >>> losses, grads, state = jax.jit(rg.step)(state, w, h, x)
      >>> grads["encoder"].shape, grads["heads"].shape, state.method.weights.shape
      ((3, 2), (2, 2), (2,))
      >>> opt = optax.sgd(0.1); params = {"encoder": w, "heads": h}
      >>> updates, _ = opt.update(grads, opt.init(params))
      >>> params = optax.apply_updates(params, updates)

    References:
      Sener & Koltun, `Multi-Task Learning as Multi-Objective Optimization
      <https://arxiv.org/abs/1810.04650>`_, NeurIPS 2018 (MGDA-UB: the
      method on the gradients of the shared representation). LibMTL
      (``rep_grad=True``, ``AbsWeighting._get_grads`` and
      ``_backward_new_grads``), https://github.com/median-research-group/LibMTL.
      Javaloy et al., `Mitigating Modality Collapse in Multimodal VAEs via
      Impartial Optimization <https://arxiv.org/abs/2206.04496>`_, ICML 2022
      (``MOOForLoop`` in ``adrianjav/impartial-vaes`` and
      ``nfdi4health/docker-vambn``).

    Differences from the references:
      * LibMTL and vambn call ``backward`` once per task through the heads and
        keep the retained graph; here the ``K`` head backward passes are one
        ``vmap`` and the encoder's backward pass runs once.
      * LibMTL's ``rep_grad=True`` with one representation per task
        (``self.rep`` a dict) back-propagates each task's weighted share
        separately (``K`` encoder backward passes); the sum is the same.
      * Methods see the representation gradients as given: LibMTL's MGDA
        sums them over the batch before its solver; use
        ``mtl_optax.mgda_ub(batch_axes=0)`` for that statistic.
    """
    if rescale not in ("none", "sum_norm"):
        raise ValueError(f"{_NAME}: rescale must be 'none' or 'sum_norm'; found {rescale!r}.")

    def init_fn(encoder_params: Any, *batch: Any) -> RepGradState:
        if batch:
            shapes = jax.eval_shape(encoder_fn, encoder_params, *batch)
            z = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        else:
            z = None
        return RepGradState(method=method.init(z))

    def heads_losses(heads_params, z, batch):
        out = heads_fn(heads_params, z, *batch)
        losses, aux = out if has_aux else (out, None)
        losses = jnp.asarray(losses)
        if losses.ndim != 1 or losses.shape[0] == 0:
            raise ValueError(
                f"{_NAME}: heads_fn must return the K per-task losses as a vector of"
                f" shape (K,); it returned shape {losses.shape}."
                + (" With has_aux=True it must return (losses, aux)." if has_aux else "")
            )
        if not jnp.issubdtype(losses.dtype, jnp.floating):
            raise ValueError(f"{_NAME}: the losses must be floating point; found {losses.dtype}.")
        return losses, aux

    def step_fn(
        state: RepGradState,
        encoder_params: Any,
        heads_params: Any,
        *batch: Any,
        **extra_args: Any,
    ) -> tuple[Any, Any, RepGradState]:
        if not isinstance(state, RepGradState):
            raise ValueError(
                f"{_NAME}: state must be the RepGradState returned by init; found"
                f" {type(state).__name__}."
            )
        z, encoder_vjp = jax.vjp(lambda p: encoder_fn(p, *batch), encoder_params)
        losses, heads_vjp, aux = jax.vjp(
            lambda h, zz: heads_losses(h, zz, batch), heads_params, z, has_aux=True
        )
        k = losses.shape[0]
        # Row k of the identity pulls back task k's loss alone: dL_k/dz for every k.
        rep_grads = jax.vmap(lambda c: heads_vjp(c)[1])(jnp.eye(k, dtype=losses.dtype))
        heads_grads = heads_vjp(jnp.ones((k,), losses.dtype))[0]
        combined, method_state = method.update(
            rep_grads, state.method, z, value=losses, **extra_args
        )
        _check_combined(combined, z)
        if rescale == "sum_norm":
            plain = _safe_norm(_task_sum(rep_grads))
            scale = plain / jnp.maximum(_safe_norm(combined), _RESCALE_EPS)
            combined = jax.tree_util.tree_map(
                lambda c: scale.astype(jnp.promote_types(c.dtype, scale.dtype)) * c, combined
            )
        combined = jax.tree_util.tree_map(lambda c, zz: c.astype(zz.dtype), combined, z)
        (encoder_grads,) = encoder_vjp(combined)
        grads = {"encoder": encoder_grads, "heads": heads_grads}
        out = (losses, aux) if has_aux else losses
        return out, grads, RepGradState(method=method_state)

    return RepGrad(init=init_fn, step=step_fn)
