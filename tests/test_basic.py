"""mean, sum, constant and rlw: their definitions, states and randomness."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

K = 3
PARAMS = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))}


def _grads(seed=0, k=K):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {
        "a": jax.random.normal(keys[0], (k, 4, 2)),
        "b": jax.random.normal(keys[1], (k, 5)),
    }


def _jac(tree):
    return np.concatenate(
        [
            np.asarray(x, np.float64).reshape(x.shape[0], -1)
            for x in jax.tree_util.tree_leaves(tree)
        ],
        1,
    )


@pytest.mark.parametrize(
    ("factory", "expected_weights"),
    [
        (mtl_optax.mean, np.full(K, 1 / K)),
        (mtl_optax.sum, np.ones(K)),
        (lambda: mtl_optax.constant([0.5, -1.0, 2.0]), np.array([0.5, -1.0, 2.0])),
    ],
    ids=["mean", "sum", "constant"],
)
def test_fixed_weightings_are_their_linear_combination(factory, expected_weights):
    tx = factory()
    grads = _grads()
    update, state = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(update, PARAMS)
    np.testing.assert_allclose(
        _jac(jax.tree.map(lambda x: x[None], update))[0],
        expected_weights @ _jac(grads),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(np.asarray(state.weights), expected_weights, rtol=1e-7)


def test_mean_equals_gradient_of_mean_loss():
    def losses(p):
        return jnp.stack(
            [jnp.sum(p["a"] ** 2), jnp.sum(jnp.sin(p["b"])), jnp.sum(p["a"]) * jnp.sum(p["b"])]
        )

    params = jax.tree.map(lambda x: x + 0.3, PARAMS)
    _, grads = mtl_optax.task_grads(losses, params)
    update, _ = mtl_optax.mean().update(grads, mtl_optax.mean().init(params), params)
    chex.assert_trees_all_close(update, jax.grad(lambda p: jnp.mean(losses(p)))(params), rtol=1e-6)


def test_initial_state_has_final_shape_when_num_tasks_given():
    for tx in (
        mtl_optax.mean(num_tasks=K),
        mtl_optax.sum(num_tasks=K),
        mtl_optax.rlw(0, num_tasks=K),
    ):
        s0 = tx.init(PARAMS)
        _, s1 = tx.update(_grads(), s0, PARAMS)
        chex.assert_trees_all_equal_shapes_and_dtypes(s0, s1)


def test_state_without_num_tasks_takes_its_shape_at_the_first_step():
    tx = mtl_optax.mean()
    s0 = tx.init(PARAMS)
    assert s0.weights.shape == (0,)
    _, s1 = tx.update(_grads(), s0)
    assert s1.weights.shape == (K,)


def test_rlw_weights_are_on_the_simplex_and_change_every_step():
    tx = mtl_optax.rlw(key=3)
    state = tx.init(PARAMS)
    update_fn = jax.jit(tx.update)
    seen = []
    for _ in range(5):
        grads = _grads()
        update, state = update_fn(grads, state)
        w = np.asarray(state.weights, np.float64)
        assert np.all(w > 0) and np.isclose(w.sum(), 1.0, atol=1e-6)
        np.testing.assert_allclose(
            _jac(jax.tree.map(lambda x: x[None], update))[0], w @ _jac(grads), rtol=1e-5, atol=1e-5
        )
        seen.append(w)
    assert len({tuple(np.round(w, 6)) for w in seen}) == 5


def test_rlw_same_key_same_sequence_different_key_different():
    def run(key):
        tx = mtl_optax.rlw(key=key)
        state = tx.init(PARAMS)
        out = []
        for _ in range(3):
            _, state = tx.update(_grads(), state)
            out.append(np.asarray(state.weights))
        return np.stack(out)

    np.testing.assert_array_equal(run(7), run(7))
    np.testing.assert_array_equal(run(7), run(jax.random.key(7)))
    assert not np.allclose(run(7), run(8))


def test_rlw_expectation_is_uniform():
    """E[softmax(z)] = 1/K by symmetry: a seeded Monte Carlo check (10 standard errors)."""
    tx = mtl_optax.rlw(key=0, num_tasks=4)
    eye = {"w": jnp.eye(4)}  # with J = I the update equals the weights

    def step(state, _):
        u, state = tx.update(eye, state)
        return state, u["w"]

    _, ws = jax.lax.scan(step, tx.init({"w": jnp.zeros(4)}), length=20_000)
    ws = np.asarray(ws, np.float64)
    se = ws.std(0) / np.sqrt(len(ws))
    assert np.all(np.abs(ws.mean(0) - 0.25) < 10 * se)


@pytest.mark.parametrize("name", ["mean", "sum", "rlw"])
def test_k_equals_one(name):
    tx = mtl_optax.get(name)
    g = {"a": jnp.ones((1, 4, 2)), "b": 2 * jnp.ones((1, 5))}
    u, _ = tx.update(g, tx.init(PARAMS))
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: x[0], g))


@pytest.mark.parametrize("name", ["mean", "sum", "rlw"])
def test_zero_task_gradient_gives_finite_update(name):
    tx = mtl_optax.get(name)
    g = _grads()
    g = jax.tree.map(lambda x: x.at[1].set(0.0), g)
    u, _ = tx.update(g, tx.init(PARAMS))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(u))


@pytest.mark.parametrize("name", ["mean", "sum", "rlw"])
def test_bfloat16_leaves_keep_their_dtype(name):
    tx = mtl_optax.get(name)
    g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads())
    p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    chex.assert_trees_all_equal_shapes_and_dtypes(u, p)


@pytest.mark.parametrize("name", ["mean", "sum", "constant", "rlw"])
def test_jits_in_a_chain_with_adam(name):
    hparams = {"constant": {"weights": [1.0, 2.0, 3.0]}}.get(name, {})
    opt = optax.chain(mtl_optax.get(name, **hparams), optax.adam(1e-3))
    state = opt.init(PARAMS)
    params = PARAMS
    step = jax.jit(lambda g, s, p: opt.update(g, s, p, value=jnp.ones(K)))
    for i in range(3):
        u, state = step(_grads(i), state, params)
        params = optax.apply_updates(params, u)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
    assert not np.allclose(np.asarray(params["a"]), 0.0)


def test_weighting_is_exposed_on_the_transformation():
    tx = mtl_optax.mean()
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert tx.weighting.name == "mean" and not tx.weighting.needs_gramian


@pytest.mark.parametrize("name", ["mean", "sum", "constant", "rlw"])
def test_every_method_scans_over_steps_with_num_tasks(name):
    """With num_tasks the state keeps one shape, so lax.scan can carry it."""
    hparams = {"constant": {"weights": [1.0, 2.0, 3.0]}}.get(name, {})
    opt = optax.chain(mtl_optax.get(name, num_tasks=K, **hparams), optax.sgd(0.1))

    def step(carry, i):
        params, state = carry
        u, state = opt.update(_grads(0), state, params)
        return (optax.apply_updates(params, u), state), None

    (params, _), _ = jax.lax.scan(step, (PARAMS, opt.init(PARAMS)), jnp.arange(3))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
