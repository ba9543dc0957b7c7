"""imtl_g: equal projections, invariances, degenerate inputs, state and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax._imtl import imtl_g_weights

PARAMS = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5,))}


def _grads(seed=0, k=3):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"a": jax.random.normal(keys[0], (k, 4, 3)), "b": jax.random.normal(keys[1], (k, 5))}


def _matrix(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1)


_weights = jax.jit(imtl_g_weights, static_argnames="rcond")


def _alpha(jac, **kwargs):
    jac = jnp.asarray(jac)
    return np.asarray(_weights(jac @ jac.T, **kwargs), np.float64)


_TX = mtl_optax.get("imtl_g")


@jax.jit
def _update_and_per_task(tree):
    update, state = _TX.update(tree, _TX.init(None))
    per_task, _ = _TX.per_task.update(tree, _TX.init(None))
    return update, per_task, state


def _projections(jac, d):
    norms = np.linalg.norm(jac, axis=1, keepdims=True)
    return (jac / norms) @ d


def test_doc_example_orthogonal_gradients():
    tx = mtl_optax.get("imtl_g")
    g = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    u, state = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(np.asarray(u["w"]), [0.75, 0.75], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.weights), [0.75, 0.25], rtol=1e-6)


@pytest.mark.parametrize(("k", "p"), [(2, 50), (3, 200), (10, 300), (20, 25)])
def test_equal_projections_onto_every_unit_gradient(x64, k, p):
    """The paper's guarantee on full-rank inputs: <u, g_k / ||g_k||> is the same for every k."""
    rng = np.random.default_rng(k * p)
    jac = rng.standard_normal((k, p)) * rng.uniform(0.01, 100, size=(k, 1))
    alpha = _alpha(jac)
    d = alpha @ jac
    proj = _projections(jac, d)
    np.testing.assert_allclose(proj, proj.mean(), rtol=1e-10)
    assert np.isclose(alpha.sum(), 1.0, rtol=0, atol=1e-12)
    # The common projection is 1 / (1^T G^-1 n) (n: the norms); its sign is not
    # guaranteed (it is negative here for K = 20, P = 25).
    norms = np.linalg.norm(jac, axis=1)
    common = 1 / np.sum(np.linalg.solve(jac @ jac.T, norms))
    np.testing.assert_allclose(proj.mean(), common, rtol=1e-9)
    # Same through the transformation, with a pytree and its per-task form.
    tree = {"x": jnp.asarray(jac[:, : p // 2]), "y": jnp.asarray(jac[:, p // 2 :])}
    update, per_task, state = _update_and_per_task(tree)
    # The Gramians differ in rounding (engine vs jac @ jac.T): 1e-10 relative.
    bound = 1e-10 * np.abs(alpha) @ np.abs(jac)
    ours = _matrix(jax.tree.map(lambda x: x[None], update))[0]
    assert np.all(np.abs(ours - d) <= bound)
    np.testing.assert_allclose(_matrix(per_task), alpha[:, None] * jac, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(state.weights), alpha, rtol=1e-6)


def test_direction_is_invariant_to_rescaling_any_task(x64):
    """Impartiality: scaling task k's gradient by c_k > 0 keeps the update's direction."""
    rng = np.random.default_rng(0)
    jac = rng.standard_normal((4, 60))
    d = _alpha(jac) @ jac
    scales = np.array([1e-3, 1.0, 50.0, 7.0])[:, None]
    d_scaled = _alpha(scales * jac) @ (scales * jac)
    cos = d @ d_scaled / (np.linalg.norm(d) * np.linalg.norm(d_scaled))
    assert cos > 1 - 1e-12
    # A common scale c scales the update by c and leaves the weights unchanged.
    np.testing.assert_allclose(_alpha(3.0 * jac), _alpha(jac), rtol=1e-12)


def test_update_is_invariant_to_the_task_order(x64):
    rng = np.random.default_rng(1)
    jac = rng.standard_normal((5, 30))
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(_alpha(jac[perm]), _alpha(jac)[perm], rtol=1e-11)


def test_degenerate_inputs_give_the_documented_finite_results(x64):
    rng = np.random.default_rng(2)
    g, h = rng.standard_normal(20), rng.standard_normal(20)
    # Identical and positively collinear: alpha = (1, 0, ..., 0).
    np.testing.assert_array_equal(_alpha(np.stack([g, g, g])), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(_alpha(np.stack([g, 2.5 * g, 0.3 * g])), [1.0, 0.0, 0.0])
    # A zero task: every projection must be 0, so the update is 0.
    for jac in (np.stack([g, 0 * g, h]), np.stack([0 * g, g, h]), np.stack([g, 0 * g])):
        alpha = _alpha(jac)
        assert np.all(np.isfinite(alpha))
        assert np.abs(alpha @ jac).max() < 1e-13
    # All zero, and K = 1.
    np.testing.assert_array_equal(_alpha(np.zeros((3, 20))), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(_alpha(g[None]), [1.0])
    # Anti-collinear: projections onto u and -u are equal only at 0.
    assert (
        np.abs(_alpha(np.stack([g, -2.0 * g, 0.5 * g])) @ np.stack([g, -2 * g, 0.5 * g])).max()
        < 1e-13
    )


def test_more_tasks_than_parameters_keeps_minimum_norm_weights(x64):
    """K - 1 > P: D U^T is rank deficient; the weights are the minimum-norm solution."""
    rng = np.random.default_rng(3)
    jac = rng.standard_normal((6, 3))
    alpha = _alpha(jac)
    # Reference: min-norm least squares of a (D U^T) = g_1 U^T in float64 numpy.
    u = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    dmat, umat = jac[0] - jac[1:], u[0] - u[1:]
    a = np.linalg.lstsq((dmat @ umat.T).T, umat @ jac[0], rcond=1e-12)[0]
    np.testing.assert_allclose(alpha[1:], a, rtol=1e-9, atol=1e-12)
    # Six generic directions in R^3: only u = 0 has equal projections on all of them.
    assert np.abs(alpha @ jac).max() < 1e-13 * np.abs(jac).max()


def test_rank_decision_ignores_the_tasks_scales(x64):
    """Norm ratios of 1e12 are not mistaken for rank deficiency."""
    rng = np.random.default_rng(4)
    jac = rng.standard_normal((3, 50)) * np.array([[1e-6], [1.0], [1e6]])
    proj = _projections(jac, _alpha(jac) @ jac)
    np.testing.assert_allclose(proj, proj.mean(), rtol=1e-6)


def test_float32_collinear_noise_is_cut():
    """float32 Gramian of c_k g with P = 1e5: D U^T is rounding noise, alpha = (1, 0, 0)."""
    g = jax.random.normal(jax.random.key(0), (100_000,))
    jac = jnp.stack([g, 2.5 * g, 0.3 * g])
    alpha = np.asarray(imtl_g_weights(mtl_optax.gramian({"x": jac})))
    np.testing.assert_array_equal(alpha, [1.0, 0.0, 0.0])


def test_rcond_sets_the_collinearity_threshold(x64):
    rng = np.random.default_rng(5)
    g, h = rng.standard_normal(40), rng.standard_normal(40)
    h = h - (h @ g) / (g @ g) * g
    jac = np.stack([g, 3.0 * (g + 1e-4 * np.linalg.norm(g) / np.linalg.norm(h) * h)])
    # Tiny rcond: the exact IMTL-G solution (equal projections).
    exact = _alpha(jac, rcond=1e-14)
    proj = _projections(jac, exact @ jac)
    np.testing.assert_allclose(proj, proj.mean(), rtol=1e-6)
    assert abs(exact[1]) > 0.1
    # Default sqrt(eps) = 1.5e-8: the 1e-4 rad angle (scaled singular value ~2.5e-9) counts as collinear.
    np.testing.assert_array_equal(_alpha(jac), [1.0, 0.0])


def test_gradients_through_the_update_are_finite():
    """Also on degenerate inputs: the pseudo-inverse is differentiated at fixed rank."""
    g = jax.random.normal(jax.random.key(3), (3, 12))
    cases = {
        "random": g,
        "zero_task": g.at[1].set(0.0),
        "identical": jnp.stack([g[0]] * 3),
        "collinear": jnp.stack([g[0], 2 * g[0], -g[0]]),
        "all_zero": jnp.zeros_like(g),
    }
    grad = jax.jit(jax.grad(lambda x: jnp.sum(_update_and_per_task({"x": x})[0]["x"] ** 2)))
    for name, jac in cases.items():
        assert bool(jnp.all(jnp.isfinite(grad(jac)))), name


def test_vmap_over_full_rank_and_degenerate_gramians_matches_one_by_one():
    """Batched, both rank branches run: the weights and their gradients stay those of each case."""
    g = jax.random.normal(jax.random.key(4), (3, 12))
    jacs = jnp.stack([g, g.at[1].set(0.0), jnp.stack([g[0]] * 3), jnp.zeros_like(g)])
    grams = jnp.einsum("bkp,blp->bkl", jacs, jacs)

    def loss(gram):
        return jnp.sum(imtl_g_weights(gram) * jnp.arange(1.0, 4.0))

    batched = jax.jit(jax.vmap(jax.value_and_grad(loss)))(grams)
    for i, gram in enumerate(grams):
        one = jax.jit(jax.value_and_grad(loss))(gram)
        assert bool(jnp.all(jnp.isfinite(batched[1][i]))), i
        np.testing.assert_allclose(batched[0][i], one[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched[1][i], one[1], rtol=1e-4, atol=1e-5)


def test_gradients_match_finite_differences(x64):
    """Full rank and rank deficient (K - 1 > P): the fixed-rank derivative is exact."""

    @jax.jit
    def weights_and_derivative(jac, direction):
        return jax.jvp(lambda x: imtl_g_weights(x @ x.T), (jac,), (direction,))

    for shape in ((3, 7), (6, 3)):
        jac = jax.random.normal(jax.random.key(shape[0]), shape, jnp.float64)
        direction = jax.random.normal(jax.random.key(9), shape, jnp.float64)
        _, derivative = weights_and_derivative(jac, direction)
        h = 1e-6
        plus, _ = weights_and_derivative(jac + h * direction, direction)
        minus, _ = weights_and_derivative(jac - h * direction, direction)
        np.testing.assert_allclose(derivative, (plus - minus) / (2 * h), rtol=1e-5, atol=1e-8)
        assert np.abs(np.asarray(derivative)).max() > 1e-3


def test_state_weights_and_shapes():
    tx = mtl_optax.get("imtl_g", num_tasks=3)
    s0 = tx.init(PARAMS)
    assert s0.weights.shape == (3,) and bool(jnp.all(jnp.isnan(s0.weights)))
    _, s1 = tx.update(_grads(), s0, PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)
    assert np.isclose(float(s1.weights.sum()), 1.0, atol=1e-5)
    tx = mtl_optax.get("imtl_g")
    assert tx.init(PARAMS).weights.shape == (0,)
    assert tx.weighting.name == "imtl_g" and tx.weighting.needs_gramian


def test_jits_in_a_chain_with_adam_and_scans():
    opt = optax.chain(mtl_optax.get("imtl_g", num_tasks=3), optax.adam(1e-2))

    def step(carry, i):
        params, state = carry
        u, state = opt.update(_grads(i), state, params)
        return (optax.apply_updates(params, u), state), None

    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(3)))(
        (PARAMS, opt.init(PARAMS))
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
    assert not np.allclose(np.asarray(params["a"]), 0.0)


def test_bfloat16_leaves_keep_their_dtype_and_direction():
    grads = _grads(4, k=4)
    tx = mtl_optax.get("imtl_g")
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    u16, _ = jax.jit(tx.update)(low, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(u16, params)
    u32, _ = tx.update(grads, tx.init(PARAMS))
    a = _matrix(jax.tree.map(lambda x: x[None], u16))[0]
    b = _matrix(jax.tree.map(lambda x: x[None], u32))[0]
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_errors():
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rcond"):
            mtl_optax.get("imtl_g", rcond=bad)
    tx = mtl_optax.get("imtl_g", num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks=2"):
        tx.update(_grads(k=3), tx.init(PARAMS))
    with pytest.raises(ValueError, match="task axis is missing"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS)
