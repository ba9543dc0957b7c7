"""Property-based tests (hypothesis) over every registered method.

Inputs: stacked task gradients drawn from a small pool of fixed templates (tree
structure, leaf shapes and dtypes, ``K``), so that each method compiles a few
times and the jit cache serves every other example; the numbers vary: each
task's row is random, zero, a duplicate of an earlier row or its opposite, and
is scaled by ``10**e``.

Properties, for every method in ``mtl_optax.available(aliases=False)``:

* the update is finite whenever the task gradients and losses are finite, and
  has the params' tree structure, shapes and dtypes (two steps, so stateful
  methods also use their state);
* the jitted update is bitwise reproducible, and agrees with the update of an
  independently built transformation (same key) run without ``jax.jit`` (on
  the first well-conditioned float64 example of each method: an update without
  ``jax.jit`` costs about a second; ``test_all_methods`` compares them in
  float32 in a chain);

and the guarantees of the methods that have one (each test states the
condition under which the paper guarantees it):

* MGDA: :math:`\\langle u, g_k\\rangle \\ge 0` for every task, on any input;
* CAGrad: :math:`\\min_k \\langle g_k, u\\rangle \\ge s\\,\\min_k \\langle g_k,
  g_0\\rangle` (its docstring's safeguard), on any input;
* both again in float32, jitted, for the largest task-gradient norm from 1e17
  to 1.5e19 (the top of float32's Gramian range);
* ConFIG: equal cosines with every task gradient, all positive, when the task
  gradients are linearly independent;
* IMTL-G: equal projections on every unit task gradient when the task
  gradients are linearly independent (the paper fixes their sum, not their
  sign: a positive projection is *not* guaranteed, see :func:`mtl_optax.imtl_g`).
* UPGrad and DualProj: :math:`\\langle u, g_k\\rangle \\ge 0` for every task
  (the update lies in the dual cone), on any input, in float64 and in float32
  up to norms of 1.5e19.

Magnitude ranges (why the strategy is restricted): the Gramian is accumulated in
float32 for bfloat16, float16 and float32 leaves, so the squared norms must stay
below float32's 3.4e38: row scales are drawn from 1e-30 to 1e30 for
float64 templates but 1e-30 to 1e17 for float32 and bfloat16 ones (task
gradient norms up to about 1e18; with scales up to 1e19 the Gramian overflows
and the test fails, as the README's "Degenerate gradients" says). Float16
leaves hold at most 65504, and a method's update (e.g. a sum over K tasks) is
returned in the leaf's dtype, so the template mixing float16 and bfloat16
leaves draws scales from 1e-30 to 1e2 (small values flush to zero: those rows
become zero rows, which is one of the drawn cases).

Hypothesis profile: ``mtl_optax_ci`` (100 examples per method,
derandomized) when ``CI=true``, ``mtl_optax_dev`` (25) otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtl_optax

from .methods import hparams, min_tasks

settings.register_profile(
    "mtl_optax_ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "mtl_optax_dev",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(
    "mtl_optax_ci" if os.environ.get("CI", "").lower() == "true" else "mtl_optax_dev"
)
# The guarantee tests run on one method each: fewer examples suffice.
GUARANTEE_PROFILE = settings(PROFILE, max_examples=max(PROFILE.max_examples // 2, 10))

METHODS = mtl_optax.available(aliases=False)
# Without jax.jit, an update runs op by op and costs about a second on the first
# call: the comparison runs on the first well-conditioned float64 example of each
# method.
MAX_EAGER_CHECKS = 1
_EAGER_CHECKS: dict[str, int] = collections.defaultdict(int)


@contextlib.contextmanager
def x64_mode(enabled: bool):
    """Sets ``jax_enable_x64`` for the block, restoring the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


class Template(NamedTuple):
    """A fixed input layout: the params' tree (leaf shapes and dtype names) and K."""

    k: int
    params: Any  # pytree of (shape, dtype name)
    x64: bool
    max_exp: int  # row scales are 10**e with e in [-30, max_exp]


_IS_SPEC = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str)

TEMPLATES = {
    # K = 1, a single float32 leaf.
    "k1_f32": Template(1, {"w": ((3,), "float32")}, False, 17),
    # A list/tuple tree of half-precision leaves (P = 10): float32 computation.
    "k3_half": Template(3, [((4,), "bfloat16"), (((2, 3), "float16"),)], False, 2),
    # bfloat16 leaves only (P = 12): float32's exponent range, float32 computation.
    "k4_bf16": Template(4, {"w": ((4, 3), "bfloat16")}, False, 17),
    # K = 64 on P = 81 (more parameters than tasks), float32.
    "k64_f32": Template(
        64, {"dense": {"w": ((8, 9), "float32"), "b": ((9,), "float32")}}, False, 17
    ),
    # Float64 leaves (a float32 leaf would be accumulated in float32, see engine.gramian).
    "k5_f64": Template(5, {"x": ((3, 2), "float64"), "y": ((4,), "float64")}, True, 30),
}


def _params(template: Template) -> Any:
    return jax.tree.map(lambda spec: jnp.zeros(spec[0], spec[1]), template.params, is_leaf=_IS_SPEC)


def _split(matrix: np.ndarray, params: Any) -> Any:
    """Splits a (K, P) float64 matrix into task gradients shaped like ``params``.

    The leaves are numpy arrays (of the params' dtypes, bfloat16 included): no
    eager JAX op per example.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out, start = [], 0
    for leaf in leaves:
        size = leaf.size
        block = matrix[:, start : start + size].reshape((matrix.shape[0], *leaf.shape))
        out.append(block.astype(leaf.dtype))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


@st.composite
def task_matrices(draw, k: int, p: int, max_exp: int, min_exp: int = -30) -> np.ndarray:
    """A (K, P) matrix whose rows are random, zero, duplicated or opposite, each scaled.

    Hypothesis draws a seed, how many rows are zero, duplicates of an earlier row
    or opposites of one, and the range of the scale exponents; numpy draws the
    rest (cheap to generate for K = 64).
    """
    seed = draw(st.integers(0, 2**32 - 1))
    n_special = draw(st.lists(st.integers(0, k), min_size=3, max_size=3))
    lo = draw(st.integers(min_exp, max_exp))
    hi = draw(st.integers(lo, max_exp))
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((k, p)) * 10.0 ** rng.integers(lo, hi + 1, size=(k, 1))
    for kind, count in zip(("zero", "duplicate", "opposite"), n_special, strict=True):
        for i in rng.choice(k, size=min(count, k), replace=False):
            if kind == "zero":
                rows[i] = 0.0
            elif i > 0:
                rows[i] = rows[rng.integers(0, i)] * (1.0 if kind == "duplicate" else -1.0)
    return rows


@functools.cache
def _setup(name: str, template_name: str):
    """The method, its jitted update, the params, the initial state, and a twin.

    The twin is a second, independently built copy of the method (same key).
    Built once per method and template (inside the template's x64 mode).
    """
    template = TEMPLATES[template_name]
    tx = mtl_optax.get(name, **hparams(name, template.k))
    twin = mtl_optax.get(name, **hparams(name, template.k))
    params = _params(template)
    return tx, jax.jit(tx.update), params, tx.init(params), twin


def _finite(tree: Any) -> bool:
    return all(
        np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree_util.tree_leaves(tree)
    )


def _assert_like_params(update: Any, params: Any) -> None:
    """The update has the params' tree structure, leaf shapes and dtypes."""
    assert jax.tree.structure(update) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(update), jax.tree.leaves(params), strict=True):
        assert (u.shape, u.dtype) == (p.shape, p.dtype), (u.shape, u.dtype, p.shape, p.dtype)


def _as_f64(tree: Any) -> np.ndarray:
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)]
    )


@st.composite
def cases(draw):
    # K = 64 (the slowest to run) on one example in six.
    template_name = draw(
        st.sampled_from(["k1_f32", "k3_half", "k4_bf16", "k5_f64", "k5_f64", "k64_f32"])
    )
    template = TEMPLATES[template_name]
    p = sum(
        int(np.prod(spec[0]))
        for spec in jax.tree_util.tree_leaves(template.params, is_leaf=_IS_SPEC)
    )
    matrix = draw(task_matrices(template.k, p, template.max_exp))
    # Positive finite losses from 1e-3 to 1e3.
    value = 10.0 ** np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(
        -3, 3, template.k
    )
    return template_name, matrix, value


@pytest.mark.parametrize("name", METHODS)
@PROFILE
@given(case=cases())
def test_update_is_finite_typed_reproducible_and_jit_invariant(name, case):
    template_name, matrix, value = case
    template = TEMPLATES[template_name]
    if template.k < min_tasks(name):  # krum: a clear error at construction
        with pytest.raises(ValueError, match="at least"):
            mtl_optax.get(name, **hparams(name, template.k))
        return
    with x64_mode(template.x64):
        _, update, params, state, twin = _setup(name, template_name)
        grads = _split(matrix, params)
        losses = value.astype(np.float32)
        # Two steps: the second one reads the state the first one wrote.
        u1, state1 = update(grads, state, params, value=losses)
        u2, _ = update(grads, state1, params, value=losses)
        for u in (u1, u2):
            _assert_like_params(u, params)
            assert _finite(u), (name, template_name, u)
        # The same inputs give the same bits.
        again, _ = update(grads, state, params, value=losses)
        np.testing.assert_array_equal(_as_f64(again), _as_f64(u1))
        if template.x64 and _EAGER_CHECKS[name] < MAX_EAGER_CHECKS and np.linalg.cond(matrix) < 1e6:
            # An independently built copy (same key), without jax.jit, on a
            # well-conditioned input (full-rank task gradients): on degenerate
            # ones the update can be rounding noise (e.g. CAGrad's g_w = 0),
            # which jit and op-by-op execution round differently.
            _EAGER_CHECKS[name] += 1
            eager, _ = twin.update(grads, twin.init(params), params, value=losses)
            a, b = _as_f64(u1), _as_f64(eager)
            scale = max(np.max(np.abs(a)), np.max(np.abs(b)), np.finfo(np.float64).tiny)
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale)


# ---------------------------------------------------------------------------
# Guarantees. In float64 (x64), on a (K, P) matrix with K in 2, 3 or 8 and P = 12,
# built from one fixed template so the jit cache serves every example; MGDA's and
# CAGrad's also in float32 near the top of its range.
# ---------------------------------------------------------------------------

GUARANTEE_P = 12


def _guarantee_update(name: str, matrix: np.ndarray, **kwargs):
    """The method's update (and state) on ``matrix`` as a single float64 leaf."""
    k = matrix.shape[0]
    tx, update, _ = _guarantee_method(name, k, tuple(sorted(kwargs.items())))
    params = {"w": jnp.zeros((GUARANTEE_P,), jnp.float64)}
    u, state = update({"w": jnp.asarray(matrix)}, tx.init(params), params)
    return np.asarray(u["w"]), state


@functools.cache
def _guarantee_method(name, k, kwargs):
    tx = mtl_optax.get(name, num_tasks=k, **dict(kwargs))
    return tx, jax.jit(tx.update), None


_GUARANTEE_K = st.sampled_from([2, 3, 8])


@GUARANTEE_PROFILE
@given(k=_GUARANTEE_K, data=st.data())
def test_mgda_update_conflicts_with_no_task(k, data):
    # Any input, zero / duplicated / opposite rows included: the min-norm point d
    # of the hull satisfies <d, g_k> >= ||d||^2 >= 0 (docstring: up to tol and
    # rounding).
    matrix = data.draw(task_matrices(k, GUARANTEE_P, max_exp=30))
    with x64_mode(True):
        u, state = _guarantee_update("mgda", matrix)
    w = np.asarray(state.weights)
    norms = np.linalg.norm(matrix, axis=1)
    inner = matrix @ u
    # The duality gap solvers.solve_min_norm stops at (its docstring): the relative
    # tolerance 1e-6 plus the rounding level 4 K eps (w^T |G| w + max_k (|G| w)_k),
    # which matters where 0 is in the hull and a weight of rounding size sits on a
    # much larger gradient (1e-17 on a norm of 1e9 gives d of norm 1e-8).
    gram = matrix @ matrix.T
    spread = np.abs(gram) @ w
    eps = np.finfo(np.float64).eps
    gap = 1e-6 * (w @ gram @ w) + 4 * k * eps * (w @ spread + np.max(spread))
    tol = gap + 1e-9 * norms * np.linalg.norm(u) + 1e-6 * np.linalg.norm(u) ** 2
    assert np.all(inner >= np.linalg.norm(u) ** 2 - tol), (inner, tol)


@functools.cache
def _float32_update(name, k):
    tx = mtl_optax.get(name, num_tasks=k)
    params = {"w": jnp.zeros((GUARANTEE_P,), jnp.float32)}
    return jax.jit(lambda g: tx.update({"w": g}, tx.init(params), params))


def _float32_update_near_the_top(name, k, log_top, data):
    """The jitted float32 update on drawn task gradients whose largest norm is 10**log_top.

    Returns the matrix and the update in float64, and the state.
    """
    matrix = data.draw(task_matrices(k, GUARANTEE_P, max_exp=0, min_exp=-6))
    top = np.max(np.linalg.norm(matrix, axis=1))
    if top > 0:
        matrix = matrix * (10.0**log_top / top)
    matrix = matrix.astype(np.float32)
    u, state = _float32_update(name, k)(jnp.asarray(matrix))
    return matrix.astype(np.float64), np.asarray(u["w"], np.float64), state


@GUARANTEE_PROFILE
@given(k=_GUARANTEE_K, log_top=st.floats(17.0, 19.17), data=st.data())
def test_mgda_update_conflicts_with_no_task_in_float32_up_to_norms_of_1_5e19(k, log_top, data):
    # The same guarantee for float32 task gradients, jitted as in training, the
    # largest norm drawn from 1e17 to 1.5e19 (its square, 2.25e38, still fits
    # float32; the float64 test above covers the other magnitudes).
    # MGDA broke it from norms of about 9.2e18: XLA turned the solver's G / max_k G_kk
    # into G * (1 / max_k G_kk), and that reciprocal (below 2^-126) was flushed to 0.
    matrix, u, state = _float32_update_near_the_top("mgda", k, log_top, data)
    w = np.asarray(state.weights, np.float64)
    norms = np.linalg.norm(matrix, axis=1)
    inner = matrix @ u
    # As in float64 (above) with float32's eps, plus the rounding of the float32
    # combination u = sum_k w_k g_k (about K eps sum_k w_k ||g_k|| per task).
    gram = matrix @ matrix.T
    spread = np.abs(gram) @ w
    eps = float(np.finfo(np.float32).eps)
    gap = 1e-6 * (w @ gram @ w) + 4 * k * eps * (w @ spread + np.max(spread))
    tol = gap + 4 * k * eps * norms * (w @ norms) + 1e-6 * np.linalg.norm(u) ** 2
    assert np.all(inner >= np.linalg.norm(u) ** 2 - tol), (inner, np.linalg.norm(u) ** 2, tol)


@GUARANTEE_PROFILE
@given(k=_GUARANTEE_K, alpha=st.sampled_from([0.5, 2.0]), data=st.data())
def test_cagrad_worst_case_improvement_is_at_least_the_mean_gradients(k, alpha, data):
    # Any input: min_k <g_k, u> >= s * min_k <g_k, g_0>, s = 1 / (1 + alpha^2)
    # for rescale=1 (the docstring's safeguard, "up to rounding").
    matrix = data.draw(task_matrices(k, GUARANTEE_P, max_exp=30))
    with x64_mode(True):
        u, _ = _guarantee_update("cagrad", matrix, alpha=alpha)
    g0 = matrix.mean(axis=0)
    s = 1.0 / (1.0 + alpha**2)
    worst_u, worst_g0 = np.min(matrix @ u), np.min(matrix @ g0)
    tol = 1e-7 * np.max(np.linalg.norm(matrix, axis=1)) ** 2
    assert worst_u >= s * worst_g0 - tol, (worst_u, s * worst_g0, tol)


@GUARANTEE_PROFILE
@given(k=_GUARANTEE_K, log_top=st.floats(17.0, 19.17), data=st.data())
def test_cagrad_worst_case_improvement_in_float32_up_to_norms_of_1_5e19(k, log_top, data):
    # The same bound for float32 task gradients of norms from 1e17 to 1.5e19,
    # jitted, with CAGrad's defaults (alpha = 0.5, rescale = 1). CAGrad broke it
    # from there: its mean squared norm trace(G) / K overflowed once the K squared
    # norms summed past 3.4e38, and XLA turned G / s into G * (1 / s), flushed to
    # zero for s > 2^126. The tolerance is the float32 solver's (1e-5, relative).
    matrix, u, _ = _float32_update_near_the_top("cagrad", k, log_top, data)
    g0 = matrix.mean(axis=0)
    s = 1.0 / (1.0 + 0.5**2)
    worst_u, worst_g0 = np.min(matrix @ u), np.min(matrix @ g0)
    tol = 1e-5 * np.max(np.linalg.norm(matrix, axis=1)) ** 2
    assert worst_u >= s * worst_g0 - tol, (worst_u, s * worst_g0, tol)


@st.composite
def independent_matrices(draw, k: int):
    """Linearly independent rows, well conditioned, with scales from 1e-3 to 1e3.

    Rows are random Gaussian directions (independent with probability one; K <= 8
    rows in P = 12 dimensions keeps the smallest singular value of the unit-row
    matrix away from zero), possibly conflicting (pairwise obtuse angles are
    common), each with its own scale.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = rng.standard_normal((k, GUARANTEE_P))
    exps = np.asarray(draw(st.lists(st.integers(-3, 3), min_size=k, max_size=k)))
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    # Condition: the unit gradients are linearly independent, with margin.
    sv = np.linalg.svd(unit, compute_uv=False)
    if sv[-1] < 1e-2:
        rows = np.eye(k, GUARANTEE_P) + 0.1 * rows
    return rows * 10.0 ** exps[:, None]


@GUARANTEE_PROFILE
@given(k=_GUARANTEE_K, data=st.data())
def test_conflict_free_has_equal_positive_cosines_on_independent_gradients(k, data):
    # ConFIG (equal weights): for linearly independent task gradients, the update's
    # cosine to every task gradient is the same and positive (no conflict).
    matrix = data.draw(independent_matrices(k))
    with x64_mode(True):
        u, _ = _guarantee_update("conflict_free", matrix)
    cos = matrix @ u / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(u))
    assert np.all(cos > 0), cos
    np.testing.assert_allclose(cos, np.full(k, cos.mean()), rtol=1e-6)


@GUARANTEE_PROFILE
@given(k=_GUARANTEE_K, data=st.data())
def test_imtl_g_has_equal_projections_on_independent_gradients(k, data):
    # IMTL-G: for linearly independent task gradients, <u, g_k / ||g_k||> is the
    # same for every task and the weights sum to 1. (Its sign is not guaranteed:
    # see mtl_optax.imtl_g.)
    matrix = data.draw(independent_matrices(k))
    with x64_mode(True):
        u, state = _guarantee_update("imtl_g", matrix)
    proj = matrix @ u / np.linalg.norm(matrix, axis=1)
    scale = np.max(np.linalg.norm(matrix, axis=1))
    np.testing.assert_allclose(proj, np.full(k, proj.mean()), atol=1e-7 * scale)
    np.testing.assert_allclose(float(np.sum(state.weights)), 1.0, rtol=1e-5)


def _dual_cone_tolerance(matrix, weights, eps):
    """Rounding bound on ``<u, g_k>`` for ``u = sum_j v_j g_j`` at a KKT point of the solver.

    The solver stops at ``G v >= -4 K eps max(|G| |v|)`` and its solves are
    backward stable; ``(|G| |v|)_k <= ||g_k|| sum_j |v_j| ||g_j||``, and the
    combination adds ``K eps`` of the same. 32 K eps of that bound: a real
    conflict is of the order of ``||g_k|| ||u||``.
    """
    k = matrix.shape[0]
    norms = np.linalg.norm(matrix, axis=1)
    return 32 * k * eps * norms * (np.abs(weights) @ norms)


@GUARANTEE_PROFILE
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@given(k=_GUARANTEE_K, data=st.data())
def test_dual_cone_updates_conflict_with_no_task(name, k, data):
    # UPGrad and DualProj (exact projections, the defaults): the update lies in the
    # dual cone {x : J x >= 0}, on any input (zero / duplicated / opposite rows,
    # scales from 1e-30 to 1e30).
    matrix = data.draw(task_matrices(k, GUARANTEE_P, max_exp=30))
    with x64_mode(True):
        u, state = _guarantee_update(name, matrix)
    tol = _dual_cone_tolerance(matrix, np.asarray(state.weights), np.finfo(np.float64).eps)
    assert np.all(matrix @ u >= -tol), (matrix @ u, tol)


@GUARANTEE_PROFILE
@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@given(k=_GUARANTEE_K, log_top=st.floats(17.0, 19.17), data=st.data())
def test_dual_cone_updates_conflict_with_no_task_in_float32_up_to_norms_of_1_5e19(
    name, k, log_top, data
):
    # The same in float32, jitted, the largest norm from 1e17 to 1.5e19 (the solver
    # scales the Gramian by its largest diagonal entry with divide_by_scalar).
    matrix, u, state = _float32_update_near_the_top(name, k, log_top, data)
    weights = np.asarray(state.weights, np.float64)
    assert np.all(np.isfinite(u))
    tol = _dual_cone_tolerance(matrix, weights, float(np.finfo(np.float32).eps))
    assert np.all(matrix @ u >= -tol), (matrix @ u, tol)
