"""ConFIG and M-ConFIG: conflict-free updates with equal (or chosen) cosines.

ConFIG (Liu et al., ICLR 2025) looks for the direction whose projections on the
*unit* task gradients equal prescribed weights (all equal by default), so that
the update makes the same angle with every task gradient and conflicts with
none of them. M-ConFIG, from the same paper, applies the ConFIG step to
per-task momenta, so that each step may compute the gradients of only a subset
of the tasks.

Both work in the ``K x K`` world: with :math:`D = \\mathrm{diag}(\\|g_k\\|)`,
the cosine matrix :math:`\\hat G = D^{-1} G D^{-1}` of the Gramian
:math:`G = J J^\\top` gives every quantity the method needs, and the update is
a linear combination :math:`\\sum_k \\omega_k g_k` of the task gradients.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import engine
from mtl_optax.base import (
    WeightedTransformation,
    Weighting,
    from_weighting,
    initial_weights,
)
from mtl_optax.registry import register

__all__ = [
    "LENGTH_MODELS",
    "ConflictFreeState",
    "MConflictFreeState",
    "conflict_free",
    "conflict_free_coefficients",
    "m_conflict_free",
]

LengthModel = Literal[
    "projection",
    "track_min",
    "track_max",
    "track_harmonic",
    "track_arithmetic",
    "track_geometric",
    "track_specific",
]
LENGTH_MODELS: tuple[str, ...] = (
    "projection",
    "track_min",
    "track_max",
    "track_harmonic",
    "track_arithmetic",
    "track_geometric",
    "track_specific",
)
_SOLVERS = ("lstsq", "pinv")


def _default_rcond(num_tasks: int, dtype: Any) -> float:
    """The default cut-off on the eigenvalues of the cosine matrix: ``10 max(K, 10) eps``."""
    return 10.0 * max(num_tasks, 10) * float(jnp.finfo(dtype).eps)


def _check_options(
    method: str,
    length_model: str,
    track_id: int | None,
    solver: str,
    rcond: float | None,
) -> None:
    if length_model not in LENGTH_MODELS:
        raise ValueError(
            f"{method}: unknown length_model {length_model!r}; expected one of"
            f" {', '.join(map(repr, LENGTH_MODELS))}."
        )
    if length_model == "track_specific":
        if (
            track_id is None
            or isinstance(track_id, bool)
            or not isinstance(track_id, int | np.integer)
        ):
            raise ValueError(
                f"{method}: length_model='track_specific' needs track_id=<int>, the task"
                f" whose gradient length the update tracks; found track_id={track_id!r}."
            )
    elif track_id is not None:
        raise ValueError(
            f"{method}: track_id={track_id!r} is only used with"
            f" length_model='track_specific' (found length_model={length_model!r})."
        )
    if solver not in _SOLVERS:
        raise ValueError(f"{method}: unknown solver {solver!r}; expected 'lstsq' or 'pinv'.")
    if rcond is not None and not (np.isfinite(rcond) and 0.0 <= rcond < 1.0):
        raise ValueError(f"{method}: rcond must be in [0, 1); found {rcond!r}.")


def _check_preference(
    method: str, weights: Any, num_tasks: int | None
) -> tuple[np.ndarray | None, int | None]:
    if weights is None:
        return None, num_tasks
    pref = np.asarray(weights, dtype=np.float64)
    if pref.ndim != 1 or pref.shape[0] == 0:
        raise ValueError(f"{method}: weights must be a non-empty vector; found shape {pref.shape}.")
    if not np.all(np.isfinite(pref)) or np.any(pref < 0) or not np.any(pref > 0):
        raise ValueError(
            f"{method}: weights must be finite, non-negative and not all zero; found"
            f" {pref.tolist()}."
        )
    if num_tasks is not None and num_tasks != pref.shape[0]:
        raise ValueError(f"{method}: num_tasks={num_tasks} but {pref.shape[0]} weights were given.")
    return pref, pref.shape[0]


def _min_norm_solve(cos: jax.Array, pref: jax.Array, rcond: float, solver: str):
    """``(c, r)``: ``c = cos⁺ pref`` (cut-off ``rcond``) and ``r = cos c``, the projection of
    ``pref`` on the range of ``cos``.

    ``"lstsq"`` takes the minimum-norm least-squares solution from an SVD of
    ``cos`` (what LAPACK's ``gelsd`` computes), ``"pinv"`` the pseudo-inverse
    from its symmetric eigendecomposition. Both go through ``jnp.linalg.pinv``,
    whose derivative rule stays finite when singular values repeat (a plain
    SVD's does not: two orthogonal gradients of equal norm give NaN).
    """
    c = jnp.linalg.pinv(cos, rtol=rcond, hermitian=solver == "pinv") @ pref
    return c, cos @ c


@engine.full_precision
def conflict_free_coefficients(
    gramian: jax.Array,
    weights: jax.Array | None = None,
    *,
    length_model: str = "projection",
    track_id: int | None = None,
    solver: str = "lstsq",
    rcond: float | None = None,
    two_task_closed_form: bool = True,
) -> jax.Array:
    r"""The ConFIG update's coefficients :math:`\omega` from the Gramian: :math:`u = \sum_k \omega_k g_k`.

    The ``K x K`` core of :func:`conflict_free` (and of :func:`m_conflict_free`
    on the momenta); see :func:`conflict_free` for the rule and the options.
    Computed in ``gramian.dtype``.

    Args:
      gramian: the ``[K, K]`` Gramian :math:`G = J J^\top`.
      weights: the ``[K]`` preference weights :math:`w` (ones when ``None``).
      length_model: see :func:`conflict_free`.
      track_id: see :func:`conflict_free`.
      solver: see :func:`conflict_free`.
      rcond: see :func:`conflict_free`.
      two_task_closed_form: see :func:`conflict_free`.

    Returns:
      The ``[K]`` coefficients :math:`\omega`.

    Raises:
      ValueError: invalid options (see :func:`conflict_free`) or a ``track_id``
        out of range for ``K``.
    """
    method = "conflict_free"
    _check_options(method, length_model, track_id, solver, rcond)
    gramian = jnp.asarray(gramian)
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"{method}: the Gramian must be square; found shape {gramian.shape}.")
    k = gramian.shape[0]
    dtype = gramian.dtype
    pref = jnp.ones((k,), dtype) if weights is None else jnp.asarray(weights, dtype)
    if pref.shape != (k,):
        raise ValueError(f"{method}: {pref.shape} weights for K={k} tasks; expected ({k},).")
    track = 0
    if length_model == "track_specific":
        if not -k <= int(track_id) < k:
            raise ValueError(f"{method}: track_id={track_id} is out of range for K={k} tasks.")
        track = int(track_id) % k
    rc = _default_rcond(k, dtype) if rcond is None else float(rcond)
    return _coefficients(
        gramian,
        pref,
        jnp.asarray(LENGTH_MODELS.index(length_model), jnp.int32),
        jnp.asarray(track, jnp.int32),
        rcond=rc,
        solver=solver,
        closed_form=two_task_closed_form,
    )


@functools.partial(jax.jit, static_argnames=("rcond", "solver", "closed_form"))
def _coefficients(gramian, pref, model, track, *, rcond, solver, closed_form):
    """:func:`conflict_free_coefficients` after validation. The length model and the
    tracked task are traced, so that they share one compilation; the cut-off is
    static (``jnp.linalg.pinv``'s derivative rule needs a concrete tolerance)."""
    k = gramian.shape[0]
    dtype = gramian.dtype
    sq = jnp.diagonal(gramian)
    nonzero = sq > 0
    safe_sq = jnp.where(nonzero, sq, 1.0)
    norms = jnp.where(nonzero, jnp.sqrt(safe_sq), 0.0)
    inv_norms = jnp.where(nonzero, 1.0 / jnp.sqrt(safe_sq), 0.0)
    # The cosine matrix; a zero task has a zero row and column.
    cos = jnp.clip(gramian * inv_norms[:, None] * inv_norms[None, :], -1.0, 1.0)
    cos = jnp.where(jnp.eye(k, dtype=bool), nonzero.astype(dtype), cos)

    c_hat, proj = _min_norm_solve(cos, pref, rcond, solver)
    if k == 2 and closed_form:
        # Inverse of [[1, rho], [rho, 1]] applied to the weights. Used when the
        # general path keeps both eigenvalues 1 -+ |rho| (so that both paths define
        # the same direction). The factor 1 / (1 - rho^2) does not change the
        # direction, but without it the projection cos @ closed = (1 - rho^2) pref
        # would fail the zero test below for nearly parallel gradients.
        rho = cos[0, 1]
        regular = jnp.all(nonzero) & (1.0 - jnp.abs(rho) > rcond * (1.0 + jnp.abs(rho)))
        det = jnp.where(regular, 1.0 - rho * rho, 1.0)
        closed = jnp.stack([pref[0] - rho * pref[1], pref[1] - rho * pref[0]]) / det
        c_hat = jnp.where(regular, closed, c_hat)
        proj = jnp.where(regular, cos @ closed, proj)
    # ||U^T c_hat||^2, the squared norm of the (unnormalised) direction.
    dir_sq = jnp.dot(c_hat, proj)
    # The direction is zero when the weights are (numerically) orthogonal to the
    # range of the cosine matrix, i.e. sum_k w_k g_k / ||g_k|| = 0.
    zero = (jnp.dot(proj, proj) <= rcond * jnp.dot(pref, pref)) | ~(dir_sq > 0)

    # Length: sum_k <b_k g_k / ||g_k||, d / ||d||>, with b_k = ||g_k|| (projection)
    # or the tracked length tau (track_*). Zero tasks contribute nothing.
    all_nonzero = jnp.all(nonzero)
    safe_norms = jnp.where(nonzero, norms, 1.0)
    tracked = jnp.stack(
        [
            jnp.zeros((), dtype),  # projection: unused.
            jnp.min(norms),
            jnp.max(norms),
            jnp.where(all_nonzero, k / jnp.sum(1.0 / safe_norms), 0.0),  # harmonic
            jnp.mean(norms),
            jnp.where(all_nonzero, jnp.exp(jnp.mean(jnp.log(safe_norms))), 0.0),  # geometric
            norms[track],
        ]
    )[model]
    b = jnp.where(model == 0, norms, jnp.where(nonzero, tracked, 0.0))
    scale = jnp.dot(b, proj) / jnp.where(zero, 1.0, dir_sq)
    return jnp.where(zero, 0.0, scale * inv_norms * c_hat)


class ConflictFreeState(NamedTuple):
    """State of :func:`conflict_free`."""

    weights: jax.Array  # [K] coefficients omega of the last step, for logging.


@register("conflict_free", "config")
def conflict_free(
    weights: jax.typing.ArrayLike | None = None,
    length_model: LengthModel = "projection",
    *,
    track_id: int | None = None,
    solver: Literal["lstsq", "pinv"] = "lstsq",
    rcond: float | None = None,
    two_task_closed_form: bool = True,
    num_tasks: int | None = None,
) -> WeightedTransformation:
    r"""ConFIG: the direction with prescribed projections on the unit task gradients.

    .. math::
      U = D^{-1} J,\quad D = \mathrm{diag}(\|g_k\|), \qquad
      d = U^{+} w = J^\top D^{-1} \hat G^{+} w,\quad \hat G = D^{-1} G D^{-1},

      u = \ell\, \frac{d}{\|d\|}, \qquad
      \ell = \sum_{k=1}^K b_k \Big\langle \frac{g_k}{\|g_k\|},
      \frac{d}{\|d\|} \Big\rangle

    ``d`` is the minimum-norm least-squares solution of
    :math:`\langle g_k / \|g_k\|, d\rangle = w_k` for every task: with full-rank
    task gradients (independent, ``K <= P``) the update's cosine to each
    :math:`g_k` is proportional to :math:`w_k`, so with equal weights it makes
    the same angle with every task gradient and conflicts with none of them.
    All of it is computed from the Gramian, so the update is the combination
    :math:`u = \sum_k \omega_k g_k` (exposed as ``state.weights``).

    The length :math:`\ell` is chosen by ``length_model`` (conflictfree's
    ``length_model.py``): ``"projection"`` (:math:`b_k = \|g_k\|`: the sum of
    the projections of the task gradients on the direction) or
    ``"track_*"`` (:math:`b_k = \tau` for all ``k``: every unit gradient
    rescaled to a tracked length :math:`\tau` before projection), with
    :math:`\tau` the ``min``, ``max``, ``harmonic`` mean
    (:math:`K / \sum_k 1/\|g_k\|`), ``arithmetic`` mean, ``geometric`` mean
    of the gradient norms, or the norm of task ``track_id``
    (``"track_specific"``).

    Args:
      weights: the ``[K]`` preference weights :math:`w` (finite, non-negative,
        not all zero); their scale does not matter. ``None`` (the references'
        default, conflictfree ``EqualWeight`` and torchjd's ones): equal.
      length_model: ``"projection"`` (the references' default),
        ``"track_min"``, ``"track_max"``, ``"track_harmonic"``,
        ``"track_arithmetic"``, ``"track_geometric"`` or ``"track_specific"``.
      track_id: the task tracked by ``"track_specific"`` (negative values count
        from the end, as in conflictfree's ``TrackSpecific``).
      solver: how :math:`\hat G^{+} w` is computed: ``"lstsq"`` (default, as
        conflictfree's ``use_least_square=True``): the minimum-norm
        least-squares solution from an SVD of :math:`\hat G`; ``"pinv"`` (as
        torchjd and ``use_least_square=False``): the pseudo-inverse from the
        symmetric eigendecomposition of :math:`\hat G`. Both give the same
        result to rounding, and both are differentiable with finite
        derivatives (through ``jnp.linalg.pinv``'s derivative rule, also when
        singular values repeat).
      rcond: the cut-off: eigenvalues of :math:`\hat G` (squared singular
        values of :math:`U`) at most ``rcond`` times the largest are treated
        as zero. ``None``: :math:`10 \max(K, 10)\, \epsilon` of the
        computation dtype (1.2e-5 in float32, 2.2e-14 in float64 for
        ``K <= 10``). It also decides when the direction is zero (see the
        differences below).
      two_task_closed_form: for ``K = 2``, use the closed form of conflictfree's
        ``ConFIG_update_double`` (:math:`\hat G^{-1} w \propto (w_1 - \rho
        w_2, w_2 - \rho w_1)`, :math:`\rho` the cosine of the two gradients)
        when both gradients are non-zero and not collinear to the cut-off;
        the general path otherwise. Both agree to rounding.
      num_tasks: ``K``, recommended (taken from ``weights`` when given): it is
        checked at every update, and the state has its final shape from
        ``init`` on.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (a
      :class:`~mtl_optax.WeightedTransformation`; its ``per_task`` form returns
      :math:`\omega_k g_k`).

    Raises:
      ValueError: unknown ``length_model`` or ``solver``, a missing or unused
        ``track_id``, ``track_id`` out of range for ``K``, invalid ``weights``
        or ``rcond``, or ``num_tasks`` different from ``len(weights)``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("conflict_free")
      >>> g = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # conflicting tasks
      >>> u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(x), 5) for x in u["w"]]  # (sqrt(2), 2 + sqrt(2)) / 4
      [0.35355, 0.85355]
      >>> cosines = g["w"] @ u["w"] / jnp.linalg.norm(g["w"], axis=1) / jnp.linalg.norm(u["w"])
      >>> jnp.round(cosines, 4)  # the same angle with both task gradients
      Array([0.3827, 0.3827], dtype=float32)

    References:
      Liu, Chu and Thuerey, `ConFIG: Towards Conflict-free Training of Physics
      Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025
      (Eq. 2, and its closed form for two tasks).
      conflictfree 0.1.8 (``ConFIG_update``, ``ConFIG_update_double``,
      ``length_model.py``; https://github.com/tum-pbs/ConFIG);
      torchjd 0.18 ``ConFIG`` (projection length, pseudo-inverse).

    Differences from the references:
      The references solve the least-squares problem on the ``K x P`` matrix
      of unit gradients, with a cut-off of ``eps * max(K, P)`` relative to the
      largest singular value. That tolerance grows with ``P``: in float32 at
      ``P = 1e7`` it exceeds 1, so torchjd's ``pinv`` discards every singular
      value and returns zero, and conflictfree's ``lstsq`` general path gives
      a wrong direction at ``P >= 1e6`` (REFERENCE_QUIRKS.md). Here the problem
      is solved in the ``K x K`` world with a cut-off (``rcond``) that does not
      depend on ``P``; the price is that singular-value ratios of ``U`` below
      about :math:`\sqrt{\epsilon}` are not resolved (the Gramian squares
      them). Zero-norm task gradients get a zero unit vector (as the
      references' ``nan_to_num``) and contribute nothing. The update is exactly
      zero when the direction is zero, i.e. when the part of :math:`w` in the
      range of :math:`\hat G` has squared norm at most ``rcond`` times
      :math:`\|w\|^2` (:math:`\sum_k w_k g_k / \|g_k\| = 0`, e.g. two
      opposite gradients with equal weights): there conflictfree may normalise
      rounding noise into a full-length update (for ``g, -3g`` it returns
      :math:`\pm 2g`) and torchjd returns a tiny one. The ``track_*`` models
      stay finite with zero tasks, where conflictfree divides by the zero norm
      (NaN): those tasks contribute nothing, and the tracked minimum, harmonic
      or geometric mean (or the tracked task's norm) is then zero, and so is the
      update. The geometric mean is computed in log space (conflictfree's
      product of ``K`` norms can overflow). The two-task closed form is used
      only for non-zero, non-collinear pairs, where it equals the general path;
      conflictfree's ``ConFIG_update_double`` normalises rounding noise for
      identical gradients and returns NaN for a zero one.
    """
    _check_options("conflict_free", length_model, track_id, solver, rcond)
    pref, num_tasks = _check_preference("conflict_free", weights, num_tasks)

    def weights_fn(gramian, state, value, *, num_tasks, dtype):
        del state, value, num_tasks
        omega = conflict_free_coefficients(
            gramian.astype(dtype),
            None if pref is None else jnp.asarray(pref, dtype),
            length_model=length_model,
            track_id=track_id,
            solver=solver,
            rcond=rcond,
            two_task_closed_form=two_task_closed_form,
        )
        return omega, ConflictFreeState(weights=omega.astype(jnp.float32))

    return from_weighting(
        Weighting(
            name="conflict_free",
            init=lambda: ConflictFreeState(weights=initial_weights(num_tasks)),
            weights=weights_fn,
            num_tasks=num_tasks,
        )
    )


class MConflictFreeState(NamedTuple):
    """State of :func:`m_conflict_free`."""

    mu: Any  # per-task first moments m_k: the params' tree, every leaf with a leading K axis.
    nu: Any  # second moment s of the pseudo-gradient (the params' tree).
    pseudo_mu: Any  # the last pseudo first moment (conflictfree's fake_m).
    count: jax.Array  # int32 [], steps taken since every task had a gradient (t).
    task_counts: jax.Array  # int32 [K], gradients received per task (t_k).
    weights: jax.Array  # [K] ConFIG coefficients on the bias-corrected momenta, last step.


def _one_minus_power(beta: float, t: jax.Array, dtype: Any) -> jax.Array:
    """``1 - beta**t`` to the precision of ``dtype``, from ``1 - beta`` taken in float64.

    Rounding ``beta`` to float32 first would change ``1 - beta`` by up to 1e-5
    relative for ``beta = 0.999``.
    """
    if beta == 0:
        return jnp.where(t > 0, 1.0, 0.0).astype(dtype)
    log_beta = float(np.log1p(-(1.0 - beta)))
    return -jnp.expm1(t.astype(dtype) * jnp.asarray(log_beta, dtype))


def _task_mask(task_mask: Any, task_indices: Any, k: int) -> jax.Array:
    if task_mask is not None and task_indices is not None:
        raise ValueError("m_conflict_free: pass task_mask or task_indices, not both.")
    if task_indices is not None:
        idx = jnp.asarray(task_indices)
        if not jnp.issubdtype(idx.dtype, jnp.integer) or idx.ndim > 1:
            raise ValueError(
                "m_conflict_free: task_indices must be an integer scalar or vector; found"
                f" dtype {idx.dtype} and shape {idx.shape}."
            )
        return jnp.zeros((k,), bool).at[idx].set(True, mode="drop")
    if task_mask is None:
        return jnp.ones((k,), bool)
    mask = jnp.asarray(task_mask)
    if mask.shape != (k,) or not (mask.dtype == bool or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(
            f"m_conflict_free: task_mask must be a boolean vector of shape ({k},); found"
            f" dtype {mask.dtype} and shape {mask.shape}."
        )
    return mask.astype(bool)


@register("m_conflict_free")
def m_conflict_free(
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    *,
    num_tasks: int | None = None,
    eps: float = 1e-8,
    weights: jax.typing.ArrayLike | None = None,
    length_model: LengthModel = "projection",
    track_id: int | None = None,
    solver: Literal["lstsq", "pinv"] = "lstsq",
    rcond: float | None = None,
    two_task_closed_form: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""M-ConFIG: ConFIG on per-task momenta, updated by the tasks of each step.

    At each step the tasks :math:`k \in S` (``task_mask`` or ``task_indices``;
    all tasks by default) update their momenta and counters; once every task
    has had at least one gradient, with :math:`t` the number of such steps:

    .. math::
      m_k \leftarrow \beta_1 m_k + (1 - \beta_1) g_k,\quad t_k \leftarrow t_k + 1
      \quad (k \in S), \qquad \hat m_k = \frac{m_k}{1 - \beta_1^{t_k}},

      c = \mathrm{ConFIG}(\hat m_1, \dots, \hat m_K), \qquad
      \tilde m = (1 - \beta_1^{t})\, c, \qquad
      \tilde g = \frac{\tilde m - \beta_1 \tilde m_{\mathrm{prev}}}{1 - \beta_1},

      s \leftarrow \beta_2 s + (1 - \beta_2)\, \tilde g^2, \qquad
      u = \frac{c}{\sqrt{s / (1 - \beta_2^{t})} + \epsilon}

    (elementwise). :math:`\tilde g` is the pseudo-gradient whose momentum
    would be the ConFIG direction, and :math:`s` its second moment, so the
    update is Adam-like normalised: chain it with ``optax.sgd``, not Adam (as
    the reference recommends). Before every task has had a gradient the
    update is zero (the momenta and counters still advance).

    Call ``update(task_grads, state, params=None, *, task_mask=None,
    task_indices=None)``: ``task_mask`` is a ``[K]`` boolean mask of the tasks
    whose gradients are in ``task_grads`` (the other rows may hold anything,
    e.g. zeros: they are not read); ``task_indices`` (an integer or a vector
    of integers) gives them by index instead, e.g. ``step % K``; repeated
    indices count once, negative ones count from the end and those outside
    ``[-K, K)`` are ignored. With no task selected the step re-applies the
    rule to the unchanged momenta (the reference needs at least one task).

    Args:
      beta_1: decay of the per-task first moments (reference default 0.9).
      beta_2: decay of the pseudo-gradient's second moment (reference default
        0.999).
      num_tasks: ``K``, required (the state holds ``K`` momenta).
      eps: added to the denominator (reference: 1e-8); must be positive.
      weights: ConFIG preference weights, see :func:`conflict_free`.
      length_model: see :func:`conflict_free` (reference default
        ``"projection"``).
      track_id: see :func:`conflict_free`.
      solver: see :func:`conflict_free`.
      rcond: see :func:`conflict_free`.
      two_task_closed_form: see :func:`conflict_free` (the reference's
        ``ConFIGOperator`` uses the closed form for ``K = 2``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its state holds ``K``
      first moments of the parameters' size (and two more moments): memory
      ``(K + 2) P``, in float32 for half-precision parameters. Donate the
      state to the jitted step (``jax.jit(..., donate_argnums=...)``, as usual
      for optimizer states) so that the momenta are updated in place: without
      it every step allocates a new ``K x P`` buffer (at K = 10, P = 1e6 on
      CPU, 37 ms per step instead of 15 ms).

    Raises:
      ValueError: ``num_tasks`` missing, betas outside ``[0, 1)``,
        non-positive ``eps``, the ConFIG options invalid (see
        :func:`conflict_free`), ``init`` without ``params``, or a bad
        ``task_mask`` / ``task_indices``.

    Example:
      >>> import jax.numpy as jnp, mtl_optax
      >>> tx = mtl_optax.get("m_conflict_free", num_tasks=2)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 0.0]])}  # only task 0's gradient
      >>> u, state = tx.update(g, state, params, task_indices=0)
      >>> u["w"]  # task 1 has no momentum yet
      Array([0., 0.], dtype=float32)
      >>> g = {"w": jnp.array([[0.0, 0.0], [-1.0, 1.0]])}  # only task 1's gradient
      >>> u, state = tx.update(g, state, params, task_indices=1)
      >>> [round(float(x), 4) for x in u["w"]]  # first step: c / (|c| + eps), c = ConFIG(m)
      [1.0, 1.0]
      >>> state.task_counts, state.count
      (Array([1, 1], dtype=int32), Array(1, dtype=int32))

    References:
      Liu, Chu and Thuerey, `ConFIG: Towards Conflict-free Training of Physics
      Informed Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025
      (the momentum variant, M-ConFIG). conflictfree 0.1.8 ``PseudoMomentumOperator``
      with its default ``ConFIGOperator``
      (``momentum_operator.py``; https://github.com/tum-pbs/ConFIG).

    Differences from the references:
      The rule above is the reference's. The reference takes a list of
      indices and the gradients of those tasks only; here ``task_grads``
      always has ``K`` rows and the mask selects the ones read, and a task
      repeated in ``task_indices`` is updated once (the reference updates its
      momentum twice). The moments are kept in the accumulation dtype (float32
      for bfloat16 / float16 parameters). The ConFIG step on the momenta is
      :func:`conflict_free`'s, with its handling of zero and collinear vectors.
    """
    method = "m_conflict_free"
    if num_tasks is None:
        raise ValueError(
            f"{method} needs num_tasks=K: its state holds one momentum per task, created at init."
        )
    if not (isinstance(num_tasks, int | np.integer) and num_tasks >= 1):
        raise ValueError(f"{method}: num_tasks must be a positive int; found {num_tasks!r}.")
    num_tasks = int(num_tasks)
    for name, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
        if not (np.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"{method}: {name} must be in [0, 1); found {beta!r}.")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"{method}: eps must be positive; found {eps!r}.")
    _check_options(method, length_model, track_id, solver, rcond)
    pref, _ = _check_preference(method, weights, num_tasks)
    if length_model == "track_specific" and not -num_tasks <= int(track_id) < num_tasks:
        raise ValueError(f"{method}: track_id={track_id} is out of range for K={num_tasks} tasks.")
    k = num_tasks

    def init_fn(params: Any) -> MConflictFreeState:
        if params is None:
            raise ValueError(f"{method}: init needs the params (the momenta take their shapes).")

        def zeros(p, lead=()):
            # zeros_like keeps the parameters' sharding (a sharded mesh with
            # Explicit axes refuses to mix sharded and replicated operands).
            p = jnp.asarray(p)
            z = jnp.zeros_like(p, dtype=engine.accumulation_dtype(p.dtype))
            return jnp.broadcast_to(z, lead + p.shape) if lead else z

        return MConflictFreeState(
            mu=jax.tree.map(lambda p: zeros(p, (k,)), params),
            nu=jax.tree.map(zeros, params),
            pseudo_mu=jax.tree.map(zeros, params),
            count=jnp.zeros([], jnp.int32),
            task_counts=jnp.zeros((k,), jnp.int32),
            weights=initial_weights(k),
        )

    @engine.full_precision
    def update_fn(
        updates: Any,
        state: MConflictFreeState,
        params: Any = None,
        *,
        task_mask: Any = None,
        task_indices: Any = None,
        **extra_args: Any,
    ) -> tuple[Any, MConflictFreeState]:
        engine.check_task_grads(updates, params, num_tasks=k, method=method)
        if extra_args.get("value") is not None:  # not read, but checked like elsewhere
            engine.check_value(extra_args["value"], k, method=method)
        del extra_args
        if params is None:  # check against the state's shapes (those of the params).
            engine.check_task_grads(updates, state.nu, num_tasks=k, method=method)
        mask = _task_mask(task_mask, task_indices, k)
        counts = state.task_counts + mask.astype(jnp.int32)
        ready = jnp.all(counts > 0)
        count = state.count + ready.astype(jnp.int32)

        def new_mu(g, m):
            b = mask.reshape((k,) + (1,) * (m.ndim - 1))
            return jnp.where(b, beta_1 * m + (1 - beta_1) * g.astype(m.dtype), m)

        mu = jax.tree.map(new_mu, updates, state.mu)
        dtype = jnp.result_type(*(x.dtype for x in jax.tree_util.tree_leaves(mu)))
        bias1 = jnp.where(counts > 0, _one_minus_power(beta_1, counts, dtype), 1.0)
        # The bias-corrected momenta mu_hat_k = mu_k / bias1_k are never formed:
        # their Gramian is D G(mu) D and their combination with omega is the
        # combination of mu with omega / bias1 (two passes over K x P fewer).
        gram_mu = engine.gramian(mu)
        inv_bias1 = (1 / bias1).astype(gram_mu.dtype)
        omega = conflict_free_coefficients(
            gram_mu * inv_bias1[:, None] * inv_bias1[None, :],
            None if pref is None else jnp.asarray(pref, dtype),
            length_model=length_model,
            track_id=track_id,
            solver=solver,
            rcond=rcond,
            two_task_closed_form=two_task_closed_form,
        )
        coef = omega * inv_bias1.astype(omega.dtype)
        bias1_t = _one_minus_power(beta_1, count, dtype)
        bias2_t = jnp.where(ready, _one_minus_power(beta_2, count, dtype), 1.0)
        # The new pseudo first moment (1 - beta_1^t) c is the combination itself,
        # written once into the new state (zero until the step is ready): the
        # direction c is never stored, the two elementwise passes below read
        # the moment and take c = moment / (1 - beta_1^t) on the fly. (XLA's CPU
        # backend has no multi-output fusion: each output is a pass of its own,
        # and a combination fused into its consumers would be recomputed from
        # the K x P momenta by each.)
        pseudo_mu = engine.combine(mu, jnp.where(ready, coef * bias1_t, 0).astype(dtype))
        inv_bias1_t = 1 / jnp.where(ready, bias1_t, 1)  # the update is 0 until ready

        def step(pm_new, pm, s, out_dtype):
            pseudo_grad = (pm_new - beta_1 * pm) / (1 - beta_1)
            s_new = beta_2 * s + (1 - beta_2) * pseudo_grad**2
            s_out = jnp.where(ready, s_new, s)
            c = pm_new * inv_bias1_t.astype(pm_new.dtype)
            # The old pseudo_mu and nu are read by the pass that writes nu only
            # (in place, into a donated buffer); u reads the new nu.
            u = c / (jnp.sqrt(s_out / bias2_t.astype(c.dtype)) + eps)
            return jnp.where(ready, u, 0.0).astype(out_dtype), s_out

        leaves_pm, treedef = jax.tree_util.tree_flatten(pseudo_mu)
        results = [
            step(pm_new, pm, s, out_dtype)
            for pm_new, pm, s, out_dtype in zip(
                leaves_pm,
                treedef.flatten_up_to(state.pseudo_mu),
                treedef.flatten_up_to(state.nu),
                [x.dtype for x in treedef.flatten_up_to(updates)],
                strict=True,
            )
        ]
        out = treedef.unflatten([r[0] for r in results])
        new_state = MConflictFreeState(
            mu=mu,
            nu=treedef.unflatten([r[1] for r in results]),
            pseudo_mu=pseudo_mu,
            count=count,
            task_counts=counts,
            weights=jnp.where(ready, omega.astype(jnp.float32), state.weights),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
