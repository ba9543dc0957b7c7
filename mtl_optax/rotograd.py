"""RotoGrad: per-task rotations of a shared representation (Flax / JAX).

RotoGrad (Javaloy & Valera, ICLR 2022) inserts one learnable rotation
:math:`R_k \\in SO(n)` per task between a shared backbone and the task heads:
head :math:`k` sees :math:`z_k = R_k z`. The rotations are trained with their
own loss, which pulls every rotated task gradient towards a common direction,
and the backbone receives a combination of the ``K`` task gradients with
respect to the shared representation :math:`z` (a representation-gradient
method: the ``K`` gradients w.r.t. :math:`z` are combined, then there is ONE
vector-Jacobian product through the backbone).

Three variants, as in the reference package ``rotograd==0.1.6``:

* ``rotate_only``: rotations only; the backbone receives :math:`\\sum_k g_k`.
* ``rotograd``: rotations plus magnitude scaling by convergence ratios.
* ``rotograd_norm``: rotations plus learned GradNorm weights.

The core is pure-functional: a :class:`RotoGradMethod` (built by the factories
above) holds the static hyperparameters and maps ``(params, state)`` to the
rotated representations and to the gradients; :func:`value_and_grad` builds a
jittable training gradient for plain functions. :class:`RotateOnly`,
:class:`RotoGrad` and :class:`RotoGradNorm` are thin Flax NNX modules over it.

The rotations follow geotorch 0.3.0's ``orthogonal(..., triv="expm")``
parametrisation exactly (see :func:`rotation_matrices`), so identical initial
weights give identical trajectories (checked in float64 against the
reference in ``tests/parity/test_rotograd_parity.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from flax import nnx

from mtl_optax import engine

__all__ = [
    "RotateOnly",
    "RotoGrad",
    "RotoGradMethod",
    "RotoGradNorm",
    "RotoGradState",
    "RotoGradStats",
    "rotate",
    "rotate_only",
    "rotation_matrices",
    "rotograd",
    "rotograd_norm",
    "uniform_rotations",
    "value_and_grad",
]

# Floors of the reference (rotograd 0.1.6): ``divide``'s epsilon, the norm clamp
# of RotoGrad and the offset of RotoGradNorm's weights.
_EPS = 1e-15

Variant = Literal["rotate_only", "rotograd", "rotograd_norm"]
Params = dict[str, jax.Array]


# ---------------------------------------------------------------------------
# Rotations.
# ---------------------------------------------------------------------------


@engine.full_precision
def uniform_rotations(key: jax.Array, num: int, n: int, dtype: Any = None) -> jax.Array:
    """``num`` random ``n x n`` rotations (determinant +1), Haar-distributed.

    The construction of geotorch's ``uniform_init_``: the ``Q`` factor of a
    Gaussian matrix with the signs of ``diag(R)`` folded in, and its first
    column negated where the determinant is negative.

    Args:
      key: a PRNG key.
      num: number of matrices.
      n: their size.
      dtype: float dtype (default: JAX's default float).

    Returns:
      An array ``[num, n, n]`` of orthogonal matrices with determinant 1.
    """
    dtype = jnp.zeros((), dtype).dtype if dtype is not None else jnp.zeros(()).dtype
    x = jax.random.normal(key, (num, n, n), dtype)
    q, r = jnp.linalg.qr(x)
    d = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
    q = q * jnp.where(d == 0, 1.0, d)[..., None, :]
    flip = jnp.where(jnp.linalg.det(q) >= 0, 1.0, -1.0).astype(dtype)
    return q.at[..., :, 0].multiply(flip[:, None])


@engine.full_precision
def rotation_matrices(rotation: jax.Array, base: jax.Array) -> jax.Array:
    r"""The rotations :math:`R_k = B_k \exp(A_k)` from unconstrained parameters.

    .. math::
      S_k = \operatorname{tril}(P_k, -1) - \operatorname{tril}(P_k, -1)^\top,
      \qquad R_k = B_k \exp(S_k)

    with :math:`P_k` the trainable ``[n, n]`` matrix (only its strictly lower
    triangle is used; the rest gets zero gradient) and :math:`B_k` a fixed
    rotation. This is geotorch 0.3.0's ``orthogonal(..., triv="expm")`` for a
    square matrix (``Stiefel`` -> ``SO.forward``: ``base @ expm(Skew.frame(X))``),
    where ``base`` is the Haar-random rotation sampled at registration and the
    parameter starts at zero.

    Args:
      rotation: ``[K, n, n]`` parameters :math:`P`.
      base: ``[K, n, n]`` fixed rotations :math:`B`.

    Returns:
      ``[K, n, n]`` orthogonal matrices.
    """
    lower = jnp.tril(rotation, -1)
    skew = lower - jnp.swapaxes(lower, -1, -2)
    return jnp.matmul(base, jax.vmap(jsl.expm)(skew))


def _as_shape(shape: int | Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as err:
        raise ValueError(
            f"rotograd: {name} must be an int or a sequence of ints; found {shape!r}."
        ) from err
    if any(s < 1 for s in out):
        raise ValueError(f"rotograd: {name} must have positive sizes; found {out}.")
    return out


def _split_shape(
    shape: tuple[int, ...], rotation_shape: tuple[int, ...], post_shape: tuple[int, ...], what: str
) -> tuple[tuple[int, ...], int, int]:
    """``(leading shape, n, p)`` of ``shape = leading + rotation_shape + post_shape``."""
    tail = rotation_shape + post_shape
    if len(shape) < len(tail) or tuple(shape[len(shape) - len(tail) :]) != tail:
        raise ValueError(
            f"rotograd: {what} has shape {tuple(shape)}; expected (..., *rotation_shape,"
            f" *post_shape) = (..., {', '.join(map(str, tail))})."
        )
    lead = tuple(shape[: len(shape) - len(tail)])
    return lead, math.prod(rotation_shape), math.prod(post_shape)


@engine.full_precision
def rotate(
    z: jax.Array,
    rotations: jax.Array,
    rotation_shape: int | Sequence[int],
    post_shape: Sequence[int] = (),
) -> jax.Array:
    r"""The ``K`` rotated copies :math:`z_k = R_k z` of a representation.

    ``z`` has shape ``(..., *rotation_shape, *post_shape)``; it is viewed as
    ``(..., n, p)`` (``n = prod(rotation_shape)``, ``p = prod(post_shape)``)
    and every ``[n, p]`` block is multiplied on the left by :math:`R_k`.

    Args:
      z: the shared representation.
      rotations: ``[K, n, n]``.
      rotation_shape: the rotated trailing shape.
      post_shape: the trailing shape after it, left as is.

    Returns:
      ``[K, *z.shape]``.
    """
    rotation_shape = _as_shape(rotation_shape, "rotation_shape")
    post_shape = tuple(post_shape)
    lead, n, p = _split_shape(z.shape, rotation_shape, post_shape, "the representation z")
    if rotations.ndim != 3 or rotations.shape[1:] != (n, n):
        raise ValueError(
            f"rotograd: rotations have shape {rotations.shape}; expected (K, {n}, {n})."
        )
    flat = z.reshape((*lead, n, p))
    out = jnp.einsum("kij,...jp->k...ip", rotations.astype(z.dtype), flat)
    return out.reshape((rotations.shape[0], *z.shape))


# ---------------------------------------------------------------------------
# Functional core.
# ---------------------------------------------------------------------------


class RotoGradState(NamedTuple):
    """Non-trainable state of a :class:`RotoGradMethod`."""

    base: jax.Array  # [K, n, n] fixed rotations B_k (geotorch's ``base`` buffer).
    count: jax.Array  # int32: number of training steps done so far.
    initial_losses: jax.Array  # [K] losses L_k(t0) of the last reset (ones before the first).
    initial_grad_norms: jax.Array  # [K] gradient norms at the last reset (RotoGrad).


@dataclasses.dataclass(frozen=True)
class RotoGradMethod:
    """Static hyperparameters and pure functions of a RotoGrad variant.

    Build it with :func:`rotate_only`, :func:`rotograd` or :func:`rotograd_norm`.
    The trainable parameters are a dict ``{"rotation": [K, n, n]}`` plus
    ``"weight": [K]`` for ``rotograd_norm``; the rest is a :class:`RotoGradState`.
    A training step is :meth:`rotate`, then :meth:`loss_scales` on the ``K``
    losses, then :meth:`update` on the gradients w.r.t. the rotated
    representations (:func:`value_and_grad` chains them).
    """

    variant: Variant
    num_tasks: int
    rotation_shape: tuple[int, ...]
    post_shape: tuple[int, ...] = ()
    normalize_losses: bool = False
    burn_in_period: int = 20
    alpha: float | None = None
    init_rotations: Literal["uniform", "identity"] = "uniform"

    @property
    def rotation_size(self) -> int:
        """``n = prod(rotation_shape)``."""
        return math.prod(self.rotation_shape)

    def init(self, key: jax.Array | int, dtype: Any = None) -> tuple[Params, RotoGradState]:
        """Initial ``(params, state)``: zero parameters, Haar-random (or identity) bases.

        As in the reference, the rotation parameters start at zero, so the initial
        rotations are the bases, and RotoGradNorm's raw weights start at one.
        """
        if isinstance(key, int):
            key = jax.random.key(key)
        dtype = jnp.zeros((), dtype).dtype if dtype is not None else jnp.zeros(()).dtype
        k, n = self.num_tasks, self.rotation_size
        if self.init_rotations == "uniform":
            base = uniform_rotations(key, k, n, dtype)
        else:
            base = jnp.broadcast_to(jnp.eye(n, dtype=dtype), (k, n, n))
        params: Params = {"rotation": jnp.zeros((k, n, n), dtype)}
        if self.variant == "rotograd_norm":
            params["weight"] = jnp.ones((k,), dtype)
        state = RotoGradState(
            base=base,
            count=jnp.zeros((), jnp.int32),
            initial_losses=jnp.ones((k,), dtype),
            initial_grad_norms=jnp.ones((k,), dtype),
        )
        return params, state

    def _check_params(self, params: Params) -> None:
        k, n = self.num_tasks, self.rotation_size
        expected = {"rotation": (k, n, n)}
        if self.variant == "rotograd_norm":
            expected["weight"] = (k,)
        if not isinstance(params, dict) or set(params) != set(expected):
            found = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(
                f"rotograd: params must be a dict with keys {sorted(expected)}; found {found}."
            )
        for name, shape in expected.items():
            if jnp.shape(params[name]) != shape:
                raise ValueError(
                    f"rotograd: params[{name!r}] has shape {jnp.shape(params[name])};"
                    f" expected {shape}."
                )

    def rotations(self, params: Params, state: RotoGradState) -> jax.Array:
        """The ``[K, n, n]`` rotation matrices (differentiable in ``params``)."""
        self._check_params(params)
        return rotation_matrices(params["rotation"], state.base)

    def rotate(self, params: Params, state: RotoGradState, z: jax.Array) -> jax.Array:
        """``[K, *z.shape]``: the input of every head, :math:`R_k z`.

        The rotations are under ``stop_gradient``, as in the reference: the task
        losses do not train them, only the rotation loss of :meth:`update` does.
        """
        r = jax.lax.stop_gradient(self.rotations(params, state))
        return rotate(z, r, self.rotation_shape, self.post_shape)

    def weights(self, params: Params) -> jax.Array:
        r"""RotoGradNorm's task weights :math:`w = K \tilde w / \sum_j \tilde w_j`,
        :math:`\tilde w_k = e^{v_k} + 10^{-15}` (all ones for the other variants)."""
        if self.variant != "rotograd_norm":
            return jnp.ones((self.num_tasks,), params["rotation"].dtype)
        raw = jnp.exp(params["weight"]) + _EPS
        return raw * (self.num_tasks / jnp.sum(raw))

    def loss_scales(
        self, state: RotoGradState, losses: jax.Array
    ) -> tuple[jax.Array, RotoGradState]:
        """Burn-in reset of the initial losses, and the scales of the task losses.

        At steps ``0`` and ``burn_in_period`` the current losses become the
        initial losses :math:`L_k(t_0)`. Returns the ``[K]`` factors by which
        the task losses are back-propagated (``1 / L_k(t_0)`` with
        ``normalize_losses``, else ones) and the state with the new initial
        losses (``count`` is advanced by :meth:`update`).
        """
        losses = jax.lax.stop_gradient(jnp.asarray(losses))
        if losses.shape != (self.num_tasks,):
            raise ValueError(
                f"rotograd: losses has shape {losses.shape}; expected ({self.num_tasks},)."
            )
        reset = (state.count == 0) | (state.count == self.burn_in_period)
        initial = jnp.where(reset, losses.astype(state.initial_losses.dtype), state.initial_losses)
        state = state._replace(initial_losses=initial)
        if self.normalize_losses:
            scales = 1.0 / _nonzero(initial)
        else:
            scales = jnp.ones_like(initial)
        return scales.astype(losses.dtype), state

    @engine.full_precision
    def update(
        self,
        params: Params,
        state: RotoGradState,
        rotated_grads: jax.Array,
        losses: jax.Array,
    ) -> tuple[jax.Array, Params, RotoGradState]:
        r"""The gradient for the backbone, the parameter gradients, the next state.

        Args:
          params: the trainable parameters.
          state: the state returned by :meth:`loss_scales` for this step.
          rotated_grads: ``[K, *z.shape]``, :math:`\tilde g_k`, the gradient of
            (the scaled) task loss ``k`` w.r.t. its head input :math:`R_k z`.
          losses: the ``[K]`` task losses of this step (unscaled).

        Returns:
          ``(rep_grad, param_grads, state)``: the cotangent of :math:`z` for the
          backbone's VJP, the gradients of ``params`` (same structure) and the
          state with ``count`` advanced.
        """
        self._check_params(params)
        k = self.num_tasks
        rotated_grads = jax.lax.stop_gradient(rotated_grads)
        if rotated_grads.ndim < 1 or rotated_grads.shape[0] != k:
            raise ValueError(
                f"rotograd: rotated_grads has shape {rotated_grads.shape}; expected"
                f" ({k}, *z.shape)."
            )
        zshape = rotated_grads.shape[1:]
        lead, n, p = _split_shape(zshape, self.rotation_shape, self.post_shape, "rotated_grads[k]")
        losses = jax.lax.stop_gradient(jnp.asarray(losses))
        if losses.shape != (k,):
            raise ValueError(f"rotograd: losses has shape {losses.shape}; expected ({k},).")
        dtype = rotated_grads.dtype
        r = jax.lax.stop_gradient(self.rotations(params, state)).astype(dtype)

        # g_k = R_k^T g~_k: the task gradients w.r.t. the shared z.
        tilde = rotated_grads.reshape((k, *lead, n, p))
        grads = jnp.einsum("kji,k...jp->k...ip", r, tilde)
        norms = _norm(grads)  # [K]

        # Rotation loss: every R_k m (m the mean of the gradients rescaled to the
        # norm of their mean) is pulled to g~_k. The reference averages the squared
        # errors over the leading axes when post_shape is set and sums them when
        # it is empty (its reshapes leave no per-row axis then); reproduced here.
        mean_norm = _norm(jnp.mean(grads, axis=0)[None])[0]
        ratio = jnp.where((mean_norm > 0) & (norms > 0), (mean_norm + _EPS) / (norms + _EPS), 0.0)
        target = jnp.mean(grads * _bcast(ratio, grads), axis=0)  # [..., n, p]

        def rotation_loss(rotation: jax.Array) -> jax.Array:
            rot = rotation_matrices(rotation, state.base).astype(dtype)
            diff = jnp.einsum("kij,...jp->k...ip", rot, target) - tilde
            per_row = jnp.sum(diff * diff, axis=(-2, -1)).reshape(k, -1)  # [K, prod(lead)]
            reduce = jnp.mean if self.post_shape else jnp.sum
            return jnp.sum(reduce(per_row, axis=1))

        param_grads: Params = {"rotation": jax.grad(rotation_loss)(params["rotation"])}

        reset = (state.count == 0) | (state.count == self.burn_in_period)
        clamped = jnp.maximum(norms, _EPS)
        initial_norms = jnp.where(reset, clamped, state.initial_grad_norms.astype(dtype))
        state = state._replace(
            count=state.count + 1,
            initial_grad_norms=initial_norms.astype(state.initial_grad_norms.dtype),
        )

        if self.variant == "rotate_only":
            rep = jnp.sum(grads, axis=0)
        elif self.variant == "rotograd":
            conv = clamped / initial_norms
            a = conv / jnp.maximum(jnp.sum(conv), _EPS)
            nu = jnp.sum(a * clamped)
            rep = jnp.sum(grads * _bcast(nu / clamped, grads), axis=0)
        else:
            w = self.weights(params).astype(dtype)
            mean_w = _norm(jnp.mean(grads * _bcast(w, grads), axis=0)[None])[0]
            rel = losses.astype(dtype) / _nonzero(state.initial_losses.astype(dtype))
            mean_rel = jnp.mean(rel)
            inverse = jnp.where(mean_rel == 0, 1.0, rel / _nonzero(mean_rel)) ** self.alpha
            goal = mean_w * inverse

            def gradnorm_loss(v: jax.Array) -> jax.Array:
                wv = self.weights({"rotation": params["rotation"], "weight": v}).astype(dtype)
                return jnp.sum(jnp.abs(norms * wv - goal))

            param_grads["weight"] = jax.grad(gradnorm_loss)(params["weight"])
            rep = jnp.sum(grads * _bcast(w, grads), axis=0)
        return rep.reshape(zshape), param_grads, state


def _nonzero(x: jax.Array) -> jax.Array:
    """``x`` with exact zeros replaced by ones (guards a division)."""
    return jnp.where(x == 0, jnp.ones_like(x), x)


def _norm(x: jax.Array) -> jax.Array:
    """Frobenius norm of every ``x[k]``."""
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (like.ndim - 1)).astype(like.dtype)


def _check_common(num_tasks: int, burn_in_period: int, init_rotations: str) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"rotograd: num_tasks must be a positive int; found {num_tasks!r}.")
    if (
        isinstance(burn_in_period, bool)
        or not isinstance(burn_in_period, int)
        or burn_in_period < 0
    ):
        raise ValueError(
            f"rotograd: burn_in_period must be a non-negative int; found {burn_in_period!r}."
        )
    if init_rotations not in ("uniform", "identity"):
        raise ValueError(
            f"rotograd: init_rotations must be 'uniform' or 'identity'; found {init_rotations!r}."
        )


def _method(
    variant: Variant,
    num_tasks: int,
    rotation_shape: int | Sequence[int],
    post_shape: int | Sequence[int],
    normalize_losses: bool,
    burn_in_period: int,
    alpha: float | None,
    init_rotations: Literal["uniform", "identity"],
) -> RotoGradMethod:
    _check_common(num_tasks, burn_in_period, init_rotations)
    return RotoGradMethod(
        variant=variant,
        num_tasks=num_tasks,
        rotation_shape=_as_shape(rotation_shape, "rotation_shape"),
        post_shape=_as_shape(post_shape, "post_shape"),
        normalize_losses=bool(normalize_losses),
        burn_in_period=burn_in_period,
        alpha=alpha,
        init_rotations=init_rotations,
    )


def rotate_only(
    num_tasks: int,
    rotation_shape: int | Sequence[int],
    *,
    post_shape: Sequence[int] = (),
    normalize_losses: bool = False,
    burn_in_period: int = 20,
    init_rotations: Literal["uniform", "identity"] = "uniform",
) -> RotoGradMethod:
    r"""RotoGrad's rotations alone (rotograd's ``RotateOnly``).

    With :math:`\tilde g_k` the gradient of task loss :math:`k` w.r.t. its head
    input :math:`R_k z` and :math:`g_k = R_k^\top \tilde g_k` the gradient
    w.r.t. the shared :math:`z`:

    .. math::
      m = \frac{1}{K} \sum_k \frac{\lVert \bar g \rVert}{\lVert g_k \rVert}\, g_k,
      \quad \bar g = \frac{1}{K}\sum_k g_k, \qquad
      \mathcal{L}_{\mathrm{rot}} = \sum_k \operatorname{mean}_b
        \lVert R_k m_b - \tilde g_{k,b} \rVert^2, \qquad
      \nabla_z = \sum_k g_k

    (norms over the whole array, :math:`b` over the leading axes of
    :math:`z` (e.g. the batch), :math:`m` and :math:`\tilde g` held constant;
    as in the reference, :math:`\operatorname{mean}_b` becomes a sum over
    :math:`b` when ``post_shape`` is empty). The rotation
    parameters are trained on :math:`\mathcal{L}_{\mathrm{rot}}`, the heads on
    the task losses, the backbone on :math:`\nabla_z`. Each task loss is
    divided by its value :math:`L_k(t_0)` at step 0, then again at step
    ``burn_in_period`` (the burn-in reset); that only changes the gradients
    when ``normalize_losses`` is set (and the GradNorm targets of
    :func:`rotograd_norm`).

    Args:
      num_tasks: ``K``.
      rotation_shape: trailing shape of the representation that is rotated
        (``n = prod(rotation_shape)``; the rotations are ``n x n``).
      post_shape: trailing shape after ``rotation_shape``, left unrotated
        (e.g. to rotate only the channels of an image).
      normalize_losses: back-propagate :math:`L_k / L_k(t_0)` (to the heads as
        well) instead of :math:`L_k`.
      burn_in_period: step at which the initial losses (and RotoGrad's initial
        gradient norms) are captured again.
      init_rotations: ``"uniform"`` (Haar-random bases, as geotorch) or
        ``"identity"``.

    Returns:
      A :class:`RotoGradMethod`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtl_optax import rotograd as rg
      >>> method = rg.rotate_only(2, 3, init_rotations="identity")
      >>> params, state = method.init(jax.random.key(0))
      >>> z = jnp.ones((4, 3))
      >>> method.rotate(params, state, z).shape  # identity rotations at first
      (2, 4, 3)
      >>> bool(jnp.allclose(method.rotate(params, state, z), z))
      True
      >>> losses = jnp.array([1.0, 2.0])
      >>> scales, state = method.loss_scales(state, losses)
      >>> rep_grad, grads, state = method.update(params, state, jnp.ones((2, 4, 3)), losses)
      >>> rep_grad[0], grads["rotation"].shape, int(state.count)
      (Array([2., 2., 2.], dtype=float32), (2, 3, 3), 1)

    References:
      Javaloy & Valera, `RotoGrad: Gradient Homogenization in Multitask
      Learning <https://openreview.net/forum?id=T8wHz4rnuGL>`_, ICLR 2022.
      Reference implementation: ``rotograd==0.1.6`` (``RotateOnly``) with
      ``geotorch==0.3.0``.

    Differences from the reference: the same rule and floors. The reference
    keeps its state in the module and reads it through autograd hooks; here
    it is explicit (:class:`RotoGradState`). Its ``backbone_loss`` argument is
    not supported (add such a term to the backbone's gradient yourself). A
    zero initial loss is treated as 1 (the reference divides by zero).
    """
    return _method(
        "rotate_only",
        num_tasks,
        rotation_shape,
        post_shape,
        normalize_losses,
        burn_in_period,
        None,
        init_rotations,
    )


def rotograd(
    num_tasks: int,
    rotation_shape: int | Sequence[int],
    *,
    post_shape: Sequence[int] = (),
    normalize_losses: bool = False,
    burn_in_period: int = 20,
    init_rotations: Literal["uniform", "identity"] = "uniform",
) -> RotoGradMethod:
    r"""RotoGrad: rotations plus magnitude scaling (rotograd's ``RotoGrad``).

    The rotations are trained as in :func:`rotate_only`; the backbone receives
    the task gradients rescaled to one common norm :math:`\nu`, a mean of the
    current norms weighted by the convergence ratios:

    .. math::
      n_k = \max(\lVert g_k \rVert, 10^{-15}), \quad
      r_k = \frac{n_k}{n_k(t_0)}, \quad
      a_k = \frac{r_k}{\max(\sum_j r_j, 10^{-15})}, \quad
      \nu = \sum_k a_k n_k, \qquad
      \nabla_z = \sum_k \frac{\nu}{n_k}\, g_k

    with :math:`n_k(t_0)` the norms at step 0, then at step ``burn_in_period``.

    Args:
      num_tasks: ``K``.
      rotation_shape: see :func:`rotate_only`.
      post_shape: see :func:`rotate_only`.
      normalize_losses: see :func:`rotate_only`.
      burn_in_period: see :func:`rotate_only`.
      init_rotations: see :func:`rotate_only`.

    Returns:
      A :class:`RotoGradMethod`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtl_optax import rotograd as rg
      >>> method = rg.rotograd(2, 2, init_rotations="identity")
      >>> params, state = method.init(0)
      >>> losses = jnp.array([1.0, 1.0])
      >>> _, state = method.loss_scales(state, losses)
      >>> g = jnp.array([[[3.0, 0.0]], [[0.0, 1.0]]])  # norms 3 and 1
      >>> rep_grad, _, state = method.update(params, state, g, losses)
      >>> rep_grad  # at a reset all ratios are 1: both rescaled to nu = (3 + 1) / 2
      Array([[2., 2.]], dtype=float32)

    References:
      Javaloy & Valera, `RotoGrad: Gradient Homogenization in Multitask
      Learning <https://openreview.net/forum?id=T8wHz4rnuGL>`_, ICLR 2022.
      Reference implementation: ``rotograd==0.1.6`` (``RotoGrad``).

    Differences from the reference: as :func:`rotate_only`.
    """
    return _method(
        "rotograd",
        num_tasks,
        rotation_shape,
        post_shape,
        normalize_losses,
        burn_in_period,
        None,
        init_rotations,
    )


def rotograd_norm(
    num_tasks: int,
    rotation_shape: int | Sequence[int],
    *,
    alpha: float,
    post_shape: Sequence[int] = (),
    normalize_losses: bool = False,
    burn_in_period: int = 20,
    init_rotations: Literal["uniform", "identity"] = "uniform",
) -> RotoGradMethod:
    r"""RotoGrad with GradNorm weights (rotograd's ``RotoGradNorm``).

    The rotations are trained as in :func:`rotate_only`; the backbone receives
    :math:`\nabla_z = \sum_k w_k g_k` with learned weights
    :math:`w = K \tilde w / \sum_j \tilde w_j`, :math:`\tilde w_k = e^{v_k} +
    10^{-15}` (raw parameters :math:`v`, initialised to one), trained on the
    GradNorm loss

    .. math::
      \mathcal{L}_{\mathrm{gn}}(v) = \sum_k \Bigl| w_k \lVert g_k \rVert
        - \Bigl\lVert \tfrac{1}{K}\textstyle\sum_j w_j g_j \Bigr\rVert
          \Bigl(\frac{\tilde L_k}{\operatorname{mean}_j \tilde L_j}\Bigr)^{\alpha}
        \Bigr|,
      \qquad \tilde L_k = \frac{L_k}{L_k(t_0)}

    where the target (the second term) is held constant.

    Args:
      num_tasks: ``K``.
      rotation_shape: see :func:`rotate_only`.
      alpha: GradNorm's :math:`\alpha` (required, as in the reference).
      post_shape: see :func:`rotate_only`.
      normalize_losses: see :func:`rotate_only`.
      burn_in_period: see :func:`rotate_only`.
      init_rotations: see :func:`rotate_only`.

    Returns:
      A :class:`RotoGradMethod` whose params have a ``"weight"`` entry.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from mtl_optax import rotograd as rg
      >>> method = rg.rotograd_norm(2, 2, alpha=1.0, init_rotations="identity")
      >>> params, state = method.init(0)
      >>> method.weights(params)  # equal raw weights: w = 1
      Array([1., 1.], dtype=float32)
      >>> losses = jnp.array([1.0, 1.0])
      >>> _, state = method.loss_scales(state, losses)
      >>> g = jnp.array([[[3.0, 0.0]], [[0.0, 1.0]]])
      >>> rep_grad, grads, state = method.update(params, state, g, losses)
      >>> rep_grad  # sum_k w_k g_k with w = (1, 1)
      Array([[3., 1.]], dtype=float32)
      >>> grads["weight"]  # descent lowers the weight of the larger gradient
      Array([ 2., -2.], dtype=float32)

    References:
      Javaloy & Valera, `RotoGrad: Gradient Homogenization in Multitask
      Learning <https://openreview.net/forum?id=T8wHz4rnuGL>`_, ICLR 2022.
      Chen et al., `GradNorm: Gradient Normalization for Adaptive Loss
      Balancing in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_,
      ICML 2018. Reference implementation: ``rotograd==0.1.6`` (``RotoGradNorm``).

    Differences from the reference: as :func:`rotate_only`; in addition, when
    the mean normalised loss is zero the loss ratios are taken as one (the
    reference raises ``ZeroDivisionError``).
    """
    if alpha is None:
        raise ValueError("rotograd_norm: alpha is required.")
    return _method(
        "rotograd_norm",
        num_tasks,
        rotation_shape,
        post_shape,
        normalize_losses,
        burn_in_period,
        float(alpha),
        init_rotations,
    )


# ---------------------------------------------------------------------------
# A training gradient for plain functions.
# ---------------------------------------------------------------------------


def value_and_grad(
    method: RotoGradMethod,
    backbone_fn: Callable[..., jax.Array],
    heads_fn: Callable[..., jax.Array],
) -> Callable[..., tuple[jax.Array, tuple[Any, Any, Params], RotoGradState]]:
    r"""A function computing the losses and every gradient of a RotoGrad step.

    The returned function ``f(backbone_params, head_params, params, state,
    inputs, *head_args)``:

    1. ``z = backbone_fn(backbone_params, inputs)`` (with its VJP kept);
    2. ``zs = method.rotate(params, state, z)`` (``[K, *z.shape]``);
    3. ``losses = heads_fn(head_params, zs, *head_args)``, shape ``[K]``, loss
       ``k`` depending on ``zs[k]`` only;
    4. the burn-in reset and loss scales (:meth:`RotoGradMethod.loss_scales`),
       one VJP through the heads with the scales as cotangent, giving the head
       gradients and the ``K`` gradients w.r.t. the rotated representations;
    5. :meth:`RotoGradMethod.update` combines them into the gradient w.r.t.
       ``z``, and ONE VJP through the backbone gives its gradient.

    It returns ``(losses, (backbone_grads, head_grads, param_grads), state)``
    and jits. Update ``params`` with an optimizer of their own (the reference
    recommends a separate learning rate for the rotations).

    Args:
      method: a :class:`RotoGradMethod`.
      backbone_fn: ``(backbone_params, inputs) -> z``.
      heads_fn: ``(head_params, zs, *head_args) -> [K]`` losses.

    Returns:
      The function described above.
    """

    def fn(
        backbone_params: Any,
        head_params: Any,
        params: Params,
        state: RotoGradState,
        inputs: Any,
        *head_args: Any,
    ) -> tuple[jax.Array, tuple[Any, Any, Params], RotoGradState]:
        z, backbone_vjp = jax.vjp(lambda bp: backbone_fn(bp, inputs), backbone_params)
        if not isinstance(z, jax.Array):
            raise ValueError(
                f"rotograd: backbone_fn must return one array; found {type(z).__name__}."
            )
        zs = method.rotate(params, state, z)
        losses, heads_vjp = jax.vjp(lambda hp, r: heads_fn(hp, r, *head_args), head_params, zs)
        scales, state = method.loss_scales(state, losses)
        head_grads, rotated_grads = heads_vjp(scales.astype(losses.dtype))
        rep_grad, param_grads, state = method.update(params, state, rotated_grads, losses)
        (backbone_grads,) = backbone_vjp(rep_grad.astype(z.dtype))
        return losses, (backbone_grads, head_grads, param_grads), state

    return fn


# ---------------------------------------------------------------------------
# Flax NNX modules.
# ---------------------------------------------------------------------------


class RotoGradStats(nnx.Variable):
    """Non-trainable RotoGrad state: fixed bases, step count, initial losses and norms."""


class _RotoGradModule(nnx.Module):
    """Shared implementation of :class:`RotateOnly`, :class:`RotoGrad`, :class:`RotoGradNorm`."""

    def _setup(self, method: RotoGradMethod, rngs: nnx.Rngs, dtype: Any) -> None:
        self.method = method
        params, state = method.init(rngs.params(), dtype)
        self.rotation = nnx.Param(params["rotation"])
        if "weight" in params:
            self.weight = nnx.Param(params["weight"])
        self.base = RotoGradStats(state.base)
        self.count = RotoGradStats(state.count)
        self.initial_losses = RotoGradStats(state.initial_losses)
        self.initial_grad_norms = RotoGradStats(state.initial_grad_norms)

    def params(self) -> Params:
        """The trainable parameters as the functional core's dict."""
        out = {"rotation": self.rotation[...]}
        if self.method.variant == "rotograd_norm":
            out["weight"] = self.weight[...]
        return out

    def state(self) -> RotoGradState:
        """The non-trainable state as a :class:`RotoGradState`."""
        return RotoGradState(
            base=self.base[...],
            count=self.count[...],
            initial_losses=self.initial_losses[...],
            initial_grad_norms=self.initial_grad_norms[...],
        )

    def _set_state(self, state: RotoGradState) -> None:
        self.count[...] = state.count
        self.initial_losses[...] = state.initial_losses
        self.initial_grad_norms[...] = state.initial_grad_norms

    def rotations(self) -> jax.Array:
        """The ``[K, n, n]`` rotation matrices."""
        return self.method.rotations(self.params(), self.state())

    def __call__(self, z: jax.Array) -> jax.Array:
        """``[K, *z.shape]``: the rotated representations (rotations under stop_gradient)."""
        return self.method.rotate(self.params(), self.state(), z)

    def value_and_grad(
        self,
        backbone: nnx.Module,
        heads: nnx.Module,
        heads_loss_fn: Callable[..., jax.Array],
        inputs: Any,
        *args: Any,
    ) -> tuple[jax.Array, nnx.State, nnx.State, nnx.State]:
        """Losses and gradients of one training step; advances this module's state.

        Args:
          backbone: the shared module, ``backbone(inputs) -> z``.
          heads: the task-specific module(s) (any NNX module or graph node).
          heads_loss_fn: ``(heads, zs, *args) -> [K]`` losses, ``zs`` the
            ``[K, *z.shape]`` rotated representations.
          inputs: the backbone's input.
          *args: passed to ``heads_loss_fn`` (e.g. targets).

        Returns:
          ``(losses, backbone_grads, heads_grads, rotograd_grads)``, the
          gradients as ``nnx.State`` of the ``nnx.Param`` of each module, ready
          for ``nnx.Optimizer.update``. The step count and the initial losses
          and norms of this module are updated in place (it works under
          ``nnx.jit``). Non-parameter state of ``backbone`` and ``heads``
          (e.g. batch statistics) is not updated.
        """
        bb_def, bb_params, bb_rest = nnx.split(backbone, nnx.Param, ...)
        hd_def, hd_params, hd_rest = nnx.split(heads, nnx.Param, ...)

        def backbone_fn(p: nnx.State, x: Any) -> jax.Array:
            return nnx.merge(bb_def, p, bb_rest)(x)

        def heads_fn(p: nnx.State, zs: jax.Array, *a: Any) -> jax.Array:
            return heads_loss_fn(nnx.merge(hd_def, p, hd_rest), zs, *a)

        fn = value_and_grad(self.method, backbone_fn, heads_fn)
        losses, (bb_grads, hd_grads, grads), state = fn(
            bb_params, hd_params, self.params(), self.state(), inputs, *args
        )
        self._set_state(state)
        own = nnx.state(self, nnx.Param)
        own_grads = jax.tree_util.tree_map_with_path(lambda path, _: grads[path[0].key], own)
        return losses, bb_grads, hd_grads, own_grads


class RotateOnly(_RotoGradModule):
    """Flax NNX module of :func:`rotate_only` (rotograd's ``RotateOnly``).

    It holds the rotation parameters (``nnx.Param``) and the state
    (:class:`RotoGradStats`); ``module(z)`` returns the ``K`` rotated
    representations and :meth:`value_and_grad` a whole training step's
    gradients. Arguments as :func:`rotate_only`, plus ``rngs`` (for the random
    bases) and ``dtype``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from mtl_optax import rotograd as rg
      >>> backbone = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> heads = nnx.Linear(4, 1, rngs=nnx.Rngs(1))  # one head shared by both tasks
      >>> roto = rg.RotateOnly(2, 4, rngs=nnx.Rngs(2))
      >>> def heads_loss(h, zs, y):
      ...   return jnp.mean((h(zs)[..., 0] - y) ** 2, axis=-1)
      >>> x, y = jnp.ones((5, 3)), jnp.zeros((2, 5))
      >>> losses, g_backbone, g_heads, g_roto = roto.value_and_grad(
      ...     backbone, heads, heads_loss, x, y)
      >>> opt = nnx.Optimizer(roto, optax.adam(1e-2), wrt=nnx.Param)
      >>> _ = opt.update(roto, g_roto)
      >>> losses.shape, int(roto.count[...])
      ((2,), 1)
    """

    def __init__(
        self,
        num_tasks: int,
        rotation_shape: int | Sequence[int],
        *,
        post_shape: Sequence[int] = (),
        normalize_losses: bool = False,
        burn_in_period: int = 20,
        init_rotations: Literal["uniform", "identity"] = "uniform",
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        method = rotate_only(
            num_tasks,
            rotation_shape,
            post_shape=post_shape,
            normalize_losses=normalize_losses,
            burn_in_period=burn_in_period,
            init_rotations=init_rotations,
        )
        self._setup(method, rngs, dtype)


class RotoGrad(_RotoGradModule):
    """Flax NNX module of :func:`rotograd` (rotograd's ``RotoGrad``).

    As :class:`RotateOnly`, with the magnitude scaling of :func:`rotograd`.
    """

    def __init__(
        self,
        num_tasks: int,
        rotation_shape: int | Sequence[int],
        *,
        post_shape: Sequence[int] = (),
        normalize_losses: bool = False,
        burn_in_period: int = 20,
        init_rotations: Literal["uniform", "identity"] = "uniform",
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        method = rotograd(
            num_tasks,
            rotation_shape,
            post_shape=post_shape,
            normalize_losses=normalize_losses,
            burn_in_period=burn_in_period,
            init_rotations=init_rotations,
        )
        self._setup(method, rngs, dtype)


class RotoGradNorm(_RotoGradModule):
    """Flax NNX module of :func:`rotograd_norm` (rotograd's ``RotoGradNorm``).

    As :class:`RotateOnly`, with the learned GradNorm weights of
    :func:`rotograd_norm` (the ``nnx.Param`` ``weight``, trained by the same
    optimizer as the rotations).
    """

    def __init__(
        self,
        num_tasks: int,
        rotation_shape: int | Sequence[int],
        *,
        alpha: float,
        post_shape: Sequence[int] = (),
        normalize_losses: bool = False,
        burn_in_period: int = 20,
        init_rotations: Literal["uniform", "identity"] = "uniform",
        rngs: nnx.Rngs,
        dtype: Any = None,
    ) -> None:
        method = rotograd_norm(
            num_tasks,
            rotation_shape,
            alpha=alpha,
            post_shape=post_shape,
            normalize_losses=normalize_losses,
            burn_in_period=burn_in_period,
            init_rotations=init_rotations,
        )
        self._setup(method, rngs, dtype)
