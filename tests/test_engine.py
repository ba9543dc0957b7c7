"""The engine (Gramian, combination) against numpy on mixed pytrees."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mtl_optax
from mtl_optax import engine

SHAPES = {"conv": (3, 3, 2, 4), "bias": (4,), "dense": {"w": (5, 7), "b": (7,)}, "scalar": ()}


def _tree(k, dtypes, seed=0):
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten(SHAPES, is_leaf=lambda s: isinstance(s, tuple))
    arrays = [
        rng.standard_normal((k, *shape)).astype(dtype)
        for shape, dtype in zip(leaves, dtypes, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def _as_matrix(tree, k):
    """The numpy float64 Jacobian (K, P) of a stacked pytree (leaves concatenated)."""
    return np.concatenate(
        [np.asarray(x, np.float64).reshape(k, -1) for x in jax.tree_util.tree_leaves(tree)], axis=1
    )


DTYPE_MIXES = {
    "float32": [np.float32] * 5,
    "bfloat16+float32": [
        ml_dtypes.bfloat16,
        np.float32,
        ml_dtypes.bfloat16,
        np.float32,
        np.float32,
    ],
    "float16+bfloat16": [
        np.float16,
        ml_dtypes.bfloat16,
        np.float16,
        ml_dtypes.bfloat16,
        np.float16,
    ],
}


@pytest.mark.parametrize("mix", DTYPE_MIXES)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_gramian_matches_numpy_on_mixed_pytree(mix, k):
    tree = _tree(k, DTYPE_MIXES[mix], seed=k)
    jac = _as_matrix(tree, k)  # exact values of the (possibly low-precision) leaves
    got = jax.jit(mtl_optax.gramian)(jax.tree.map(jnp.asarray, tree))
    assert got.dtype == jnp.float32  # accumulation is float32 even for bf16/f16 leaves
    # float32 accumulation of exact low-precision products: relative error ~1e-6.
    np.testing.assert_allclose(np.asarray(got), jac @ jac.T, rtol=1e-5, atol=1e-5)


def test_gramian_accumulates_low_precision_in_float32():
    """Summing 4096 bf16 products in bf16 would lose ~3 digits; float32 does not."""
    x = jnp.full((2, 4096), 1.0 + 2.0**-7, jnp.bfloat16)  # exactly representable
    exact = 4096 * (1.0 + 2.0**-7) ** 2
    np.testing.assert_allclose(
        np.asarray(mtl_optax.gramian({"x": x})), np.full((2, 2), exact), rtol=1e-6
    )


def test_gramian_float64_leaves_stay_float64(x64):
    tree = _tree(3, [np.float64] * 5, seed=1)
    got = mtl_optax.gramian(jax.tree.map(jnp.asarray, tree))
    assert got.dtype == jnp.float64
    jac = _as_matrix(tree, 3)
    np.testing.assert_allclose(np.asarray(got), jac @ jac.T, rtol=1e-13)


@pytest.mark.parametrize("k", [1, 2, engine._CPU_LANE_MAX_TASKS, 5, engine._CPU_FEW_TASKS, 9, 40])
@pytest.mark.parametrize(
    "columns",
    [
        engine._CPU_BLOCKED_MIN_COLUMNS + 12_345,
        engine._CPU_DOT_BLOCKED_MIN_COLUMNS + 3 * engine._CPU_BLOCK_COLUMNS + 5,
    ],
)
def test_gramian_blocked_path_matches_numpy(k, columns):
    """Long leaves take a blocked path on CPU (2 tasks: row products, up to 4: lane reduction, dots beyond).

    The column counts leave whole blocks after the last loop step (fewer
    blocks per step at 40 tasks), a ragged remainder and one that is not a
    multiple of the 8 lanes; the second is blocked only beyond 6 tasks.
    """
    rng = np.random.default_rng(k)
    x = rng.standard_normal((k, columns)).astype(np.float32)
    got = mtl_optax.gramian({"x": jnp.asarray(x)})
    ref = x.astype(np.float64) @ x.T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-1)
    assert np.array_equal(np.asarray(got), np.asarray(got).T)  # the symmetric path


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
@pytest.mark.parametrize(
    "columns",
    [
        2 * engine._CPU_VDOT_BLOCK_COLUMNS - 7,
        2 * engine._CPU_VDOT_BLOCK_COLUMNS + 12_345,
        3 * engine._CPU_VDOT_BLOCK_COLUMNS,
        engine._CPU_ROWS_MAX_COLUMNS + engine._CPU_VDOT_BLOCK_COLUMNS + 5,
    ],
)
@pytest.mark.parametrize("k", [1, engine._CPU_VDOT_MAX_TASKS])
def test_gramian_of_one_or_two_long_rows_matches_numpy(k, columns, dtype, x64, monkeypatch):
    """One or two long rows on CPU: the paths of ``_cpu_row_gramian`` and ``_cpu_vdot_gramian``.

    For two rows, the first three column counts take the squared norms over
    the whole leaf and the cross term in blocks (one loop step and a ragged
    remainder, two steps and a remainder, three steps and none); the last,
    beyond ``_CPU_ROWS_MAX_COLUMNS``, takes the blocked vector dots. One row
    is one dot at any length. Accumulated in float32 for bfloat16 leaves, in
    float64 for float64 ones.
    """
    calls = []
    for name in ("_cpu_row_gramian", "_cpu_vdot_gramian"):
        fn = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    rng = np.random.default_rng(columns)
    x = jnp.asarray(rng.standard_normal((k, columns)), dtype)
    got = mtl_optax.gramian({"x": x})
    rows = columns <= engine._CPU_ROWS_MAX_COLUMNS
    expected = [] if k == 1 else ["_cpu_row_gramian"] if rows else ["_cpu_vdot_gramian"]
    if jax.default_backend() != "cpu":
        expected = []  # other backends take the plain contraction
    assert sorted(set(calls)) == expected
    assert got.dtype == engine.accumulation_dtype(x.dtype)
    ref = np.asarray(x, np.float64) @ np.asarray(x, np.float64).T
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol, atol=tol * columns)
    assert np.array_equal(np.asarray(got), np.asarray(got).T)


_GPU_TEST_MIN_COLUMNS = 1 << 16


@pytest.mark.parametrize(
    ("k", "dtype"),
    [
        (1, np.float32),
        (2, np.float32),
        (4, np.float32),
        (5, np.float32),
        (3, np.float64),
        (3, jnp.bfloat16),
    ],
)
@pytest.mark.parametrize("columns", [_GPU_TEST_MIN_COLUMNS - 1, _GPU_TEST_MIN_COLUMNS + 3])
@pytest.mark.parametrize("symmetric", [True, False], ids=["gramian", "cross"])
def test_few_long_rows_on_a_gpu_take_one_multi_output_reduction(
    symmetric, columns, k, dtype, x64, monkeypatch
):
    """``_gpu_row_cross``: on a GPU, up to 4 rows of at least ``_GPU_ROWS_MIN_COLUMNS``.

    The path is chosen at trace time from ``jax.default_backend()``, which is
    patched here to ``"gpu"`` so that the choice is checked on any machine
    (the arithmetic is plain JAX and runs on the CPU). Shorter leaves and more
    tasks keep XLA's dot; a cross product of two different leaves checks that
    no pair is taken from the wrong place.
    """
    on_gpu = jax.default_backend() == "gpu"
    calls = []
    fn = engine._gpu_row_cross
    monkeypatch.setattr(engine, "_gpu_row_cross", lambda *a, **kw: calls.append(1) or fn(*a, **kw))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    # A threshold of 64k columns instead of 2M keeps the arrays small.
    monkeypatch.setattr(engine, "_GPU_ROWS_MIN_COLUMNS", _GPU_TEST_MIN_COLUMNS)
    rng = np.random.default_rng(columns + k)
    # Correlated rows of unequal norms: every entry of the Gramian is of the
    # order of its scale, so a pair taken from the wrong place shows.
    mix0 = np.tril(rng.uniform(0.5, 1.5, (k, k))) * np.arange(1, k + 1)[:, None]
    x = jnp.asarray(mix0 @ rng.standard_normal((k, columns)), dtype)
    acc = engine.accumulation_dtype(x.dtype)
    if symmetric:
        y = x
        got = mtl_optax.gramian({"x": x})
    else:
        mix = rng.standard_normal((k, k)) + 2 * np.eye(k)
        y = jnp.asarray(mix @ np.asarray(x, np.float64) + 0.1, dtype)
        got = jax.jit(engine.leaf_cross, static_argnums=2)(x, y, acc)
    taken = k <= engine._GPU_ROWS_MAX_TASKS and columns >= _GPU_TEST_MIN_COLUMNS
    assert len(calls) == int(taken)
    assert got.dtype == acc and got.shape == (k, k)
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ref = xs @ ys.T
    scale = np.outer(np.linalg.norm(xs, axis=1), np.linalg.norm(ys, axis=1))
    # In float32 a GPU reduces in a tree (errors about 1e-7 of the scale on an
    # H100; XLA's dot of bfloat16 rows accumulated in float32 on the path
    # below the threshold 1.3e-5); XLA's CPU reduction accumulates
    # sequentially (about 1e-3 here), which only the float64 case checks
    # tightly when this runs on a CPU.
    tol = 1e-12 if dtype == np.float64 else (2e-6 if dtype == np.float32 else 5e-5)
    if not on_gpu and dtype != np.float64:
        tol = 1e-2
    assert np.max(np.abs(np.asarray(got, np.float64) - ref) / scale) < tol
    if symmetric:
        assert np.array_equal(np.asarray(got), np.asarray(got).T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
@pytest.mark.parametrize(
    "columns",
    [
        engine._CPU_SPLIT_MIN_COLUMNS - 2,  # too short: the plain dot
        engine._CPU_SPLIT_MIN_COLUMNS,
        100_000,
        engine._CPU_BLOCKED_MIN_COLUMNS - 2,
        100_001,  # odd: the plain dot
    ],
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["gramian", "cross"])
def test_two_rows_of_even_length_take_one_dot_of_their_half_rows(
    symmetric, columns, dtype, x64, monkeypatch
):
    """``_cpu_split_cross``: two rows of an even length below the blocked paths.

    The four half rows' ``4 x 4`` products, diagonal blocks added, equal
    ``x @ y.T`` for a Gramian and for a cross product of two different leaves
    (not symmetric, so a block taken from the wrong place would show); too
    short or odd leaves keep XLA's plain dot.
    """
    calls = []
    fn = engine._cpu_split_cross
    monkeypatch.setattr(engine, "_cpu_split_cross", lambda *a: calls.append(1) or fn(*a))
    rng = np.random.default_rng(columns)
    x = jnp.asarray(rng.standard_normal((2, columns)), dtype)
    acc = engine.accumulation_dtype(x.dtype)
    if symmetric:
        y = x
        got = mtl_optax.gramian({"x": x})
    else:  # a second leaf correlated with x: large, unequal cross products
        mix = np.array([[1.0, 0.5], [-2.0, 1.0]])
        y = jnp.asarray(mix @ np.asarray(x, np.float64) + 0.1, dtype)
        got = jax.jit(engine.leaf_cross, static_argnums=2)(x, y, acc)
    split = columns % 2 == 0 and columns >= engine._CPU_SPLIT_MIN_COLUMNS
    assert len(calls) == (1 if split and jax.default_backend() == "cpu" else 0)
    assert got.dtype == acc
    ref = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol, atol=tol * columns)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
@pytest.mark.parametrize("k", [2, 5, 9])
def test_leaf_cross_of_two_long_leaves_matches_numpy(k, dtype, x64):
    """The blocked paths on two different leaves (``cross_gramian``) in every dtype."""
    columns = engine._CPU_BLOCKED_MIN_COLUMNS + 12_347
    rng = np.random.default_rng(k)
    x, y = (jnp.asarray(rng.standard_normal((k, columns)), dtype) for _ in range(2))
    acc = engine.accumulation_dtype(x.dtype)
    got = jax.jit(engine.leaf_cross, static_argnums=2)(x, y, acc)
    assert got.dtype == acc
    ref = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=tol, atol=tol * 1e3)


def test_gramian_is_symmetric_psd():
    tree = jax.tree.map(jnp.asarray, _tree(6, [np.float32] * 5, seed=3))
    g = np.asarray(mtl_optax.gramian(tree), np.float64)
    np.testing.assert_allclose(g, g.T, rtol=1e-6)
    assert np.linalg.eigvalsh(g).min() > -1e-3 * np.abs(g).max()


@pytest.mark.parametrize("mix", DTYPE_MIXES)
def test_combine_matches_numpy_and_keeps_leaf_dtypes(mix):
    k = 4
    tree = _tree(k, DTYPE_MIXES[mix], seed=7)
    w = np.array([0.1, -2.0, 0.7, 3.0], np.float32)
    got = jax.jit(mtl_optax.combine)(jax.tree.map(jnp.asarray, tree), jnp.asarray(w))
    for leaf, out in zip(
        jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(got), strict=True
    ):
        assert out.dtype == leaf.dtype
        assert out.shape == leaf.shape[1:]
        ref = np.tensordot(w.astype(np.float64), np.asarray(leaf, np.float64), axes=1)
        # The float32 accumulation is exact to ~1e-7; the result is then rounded once
        # to the leaf's dtype (bf16: 8 bits, f16: 11 bits of mantissa).
        eps = float(jnp.finfo(leaf.dtype).eps)
        np.testing.assert_allclose(
            np.asarray(out, np.float64), ref, rtol=eps, atol=eps * np.abs(ref).max()
        )
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
        jax.tree.map(lambda x: x[0], tree)
    )


def test_combine_float64(x64):
    tree = jax.tree.map(jnp.asarray, _tree(3, [np.float64] * 5, seed=2))
    w = jnp.array([1 / 3, 2 / 3, -1.0])
    got = mtl_optax.combine(tree, w)
    ref = np.asarray(w) @ _as_matrix(tree, 3)
    np.testing.assert_allclose(
        _as_matrix(jax.tree.map(lambda x: x[None], got), 1)[0], ref, rtol=1e-14
    )


def test_combine_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\); found \(3,\)"):
        mtl_optax.combine({"a": jnp.ones((2, 3))}, jnp.ones(3))


def test_gramian_and_combine_trace_under_jit_and_vmap():
    tree = jax.tree.map(jnp.asarray, _tree(3, [np.float32] * 5))
    batched = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), tree)
    g = jax.vmap(mtl_optax.gramian)(batched)
    np.testing.assert_allclose(np.asarray(g[1]), 4 * np.asarray(g[0]), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 64, 65])  # the unrolled path and the contraction path
def test_sum_tasks_equals_sum_over_the_leading_axis(k):
    x = jax.random.normal(jax.random.key(k), (k, 7, 3))
    np.testing.assert_allclose(
        np.asarray(engine.sum_tasks(x)), np.asarray(x, np.float64).sum(0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("k", [1, 8, 9, 17, 40])  # unrolled; chunks of 8 in a loop plus a remainder
def test_fold_tasks_accumulates_each_tasks_terms_in_order(k):
    x = jax.random.normal(jax.random.key(k), (k, 5, 3))
    weights = jnp.arange(1.0, k + 1.0)
    init = (jnp.full((5, 3), 2.0), jnp.zeros((5, 3)))
    total, weighted = engine.fold_tasks(lambda row, i: (row, weights[i] * row), x, init)
    xs = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(total), 2.0 + xs.sum(0), rtol=1e-5, atol=1e-5)
    expected = (np.arange(1.0, k + 1.0)[:, None, None] * xs).sum(0)
    np.testing.assert_allclose(np.asarray(weighted), expected, rtol=1e-5, atol=1e-4)


def test_mixed_float32_float64_tree_accumulates_in_float64(x64):
    # A float32 leaf of magnitude 1e20: its squares overflow float32 (max ~3.4e38), not float64.
    big = jnp.full((2, 3), 1e20, jnp.float32).at[1].multiply(-1)
    tree = {"a": big, "b": jnp.ones((2, 4), jnp.float64)}
    g = mtl_optax.gramian(tree)
    assert g.dtype == jnp.float64 and bool(jnp.all(jnp.isfinite(g)))
    expected = np.asarray(big, np.float64) @ np.asarray(big, np.float64).T + 4.0
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-12)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU layout assignment")
@pytest.mark.parametrize("k", [2, 3, 10])
def test_gramian_stays_row_major_when_feeding_lapack(k):
    """A LAPACK consumer (here an SVD) must not push its column-major layout into the dot.

    XLA's CPU backend gives a contraction with a column-major output a slow
    kernel (9x slower for 3 x 2e5 float32); ``engine._row_major`` keeps the
    Gramian's contraction row-major and transposes the small result instead.
    """
    tree = {"a": jnp.ones((k, 1000), jnp.float32), "b": jnp.ones((k, 7, 3), jnp.float32)}

    def f(tree):
        return jnp.linalg.svd(mtl_optax.gramian(tree), compute_uv=False)

    hlo = jax.jit(f).lower(tree).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots, hlo
    for line in dots:
        assert f"f32[{k},{k}]{{1,0}} dot(" in line, line
    np.testing.assert_allclose(
        f(tree), jnp.linalg.svd(jnp.full((k, k), 1021.0), compute_uv=False), rtol=1e-5, atol=1e-3
    )


@pytest.mark.parametrize("s", [3.0e38, 1.0e38, 8.6e37, 2.5e37, 1.0, 3e-5, 1e-30])
def test_divide_by_scalar_is_the_rounded_quotient_where_the_reciprocal_underflows(s):
    """Jitted, within two float32 roundings of the float64 quotient, whatever the scale.

    (For ``s > 2^126`` the plain ``x / s`` is all zeros under ``jit`` with
    jax 0.10 on CPU: XLA multiplies by ``1 / s``, which is flushed to zero.)
    """
    rng = np.random.default_rng(0)
    x = (rng.uniform(-1, 1, (5, 5)) * s).astype(np.float32)
    s32 = np.float32(s)
    out = jax.jit(engine.divide_by_scalar)(jnp.asarray(x), jnp.asarray(s32))
    expected = x.astype(np.float64) / np.float64(s32)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2.4e-7, atol=0)
