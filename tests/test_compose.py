"""identity and compose: per-task chaining, the sum_norm rescaling, states and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax._compose import ComposedTransformation, compose, identity
from mtl_optax._normalization import gradnorm, nsgd
from mtl_optax.base import PerTaskTransformation

PARAMS = {"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))}


def _grads(seed=0, k=3):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"a": jax.random.normal(keys[0], (k, 4, 2)), "b": jax.random.normal(keys[1], (k, 5))}


def _jac(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1)


def _vec(update):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(update)]
    )


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def test_identity_per_task_returns_the_task_gradients_and_update_is_their_sum():
    g = _grads()
    tx = identity(num_tasks=3)
    out, _ = tx.per_task.update(g, tx.per_task.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal(out, g)
    update, state = tx.update(g, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(_vec(update), _jac(g).sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.weights), np.ones(3))


def test_compose_without_methods_is_identity():
    g = _grads(1)
    tx = compose()
    assert isinstance(tx, ComposedTransformation) and tx.methods == ()
    update, state = tx.update(g, tx.init(PARAMS), PARAMS)
    assert state == ()
    np.testing.assert_allclose(_vec(update), _jac(g).sum(0), rtol=1e-6, atol=1e-6)
    out, _ = tx.per_task.update(g, (), PARAMS)
    chex.assert_trees_all_equal(out, g)


def test_compose_applies_the_per_task_forms_in_sequence():
    """compose(a, b) = sum_k b.per_task(a.per_task(g))_k, with the tuple of states."""
    g = _grads(2)
    a = mtl_optax.constant([0.1, 1.0, 5.0])
    b = nsgd(update_at=0, num_tasks=3)
    tx = compose(a, b)
    state = tx.init(PARAMS)
    assert len(state) == 2
    update, state = tx.update(g, state, PARAMS)
    mid, _ = a.per_task.update(g, a.per_task.init(PARAMS), PARAMS)
    expected, b_state = b.per_task.update(mid, b.per_task.init(PARAMS), PARAMS)
    np.testing.assert_allclose(_vec(update), _jac(expected).sum(0), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state[1], b_state)
    assert int(state[1].count) == 1
    # The order matters: nsgd then constant keeps the constant's relative weights.
    swapped, _ = compose(b, a).update(g, compose(b, a).init(PARAMS), PARAMS)
    assert not np.allclose(_vec(swapped), _vec(update), rtol=1e-3)
    norms = np.linalg.norm(_jac(g), axis=1)
    nu = norms.mean()  # nsgd at its capture step
    np.testing.assert_allclose(
        _vec(swapped), (np.array([0.1, 1.0, 5.0]) * nu / norms) @ _jac(g), rtol=1e-5, atol=1e-5
    )


def test_compose_of_one_method_equals_the_method():
    g = _grads(3)
    for method in (nsgd(update_at=1, num_tasks=3), mtl_optax.mean()):
        u1, _ = compose(method).update(g, compose(method).init(PARAMS), PARAMS)
        u2, _ = method.update(g, method.init(PARAMS), PARAMS)
        np.testing.assert_allclose(_vec(u1), _vec(u2), rtol=1e-6, atol=1e-6)


def test_sum_norm_rescales_to_the_norm_of_the_summed_gradient():
    g = _grads(4)
    method = mtl_optax.constant([0.01, 0.02, 3.0])
    plain, _ = compose(method).update(g, compose(method).init(PARAMS))
    tx = compose(method, rescale="sum_norm")
    update, _ = tx.update(g, tx.init(PARAMS))
    summed = _jac(g).sum(0)
    np.testing.assert_allclose(np.linalg.norm(_vec(update)), np.linalg.norm(summed), rtol=1e-6)
    direction = _vec(plain) / np.linalg.norm(_vec(plain))
    np.testing.assert_allclose(
        _vec(update), np.linalg.norm(summed) * direction, rtol=1e-5, atol=1e-5
    )
    # The per-task form is scaled by the same factor, so it sums to the update.
    out, _ = tx.per_task.update(g, tx.per_task.init(PARAMS))
    np.testing.assert_allclose(_jac(out).sum(0), _vec(update), rtol=1e-5, atol=1e-5)


def test_sum_norm_ignores_a_positive_global_scale():
    g = _grads(5)
    tx1 = compose(mtl_optax.constant([1.0, 2.0, 3.0]), rescale="sum_norm")
    tx2 = compose(mtl_optax.constant([10.0, 20.0, 30.0]), rescale="sum_norm")
    u1, _ = tx1.update(g, tx1.init(PARAMS))
    u2, _ = tx2.update(g, tx2.init(PARAMS))
    np.testing.assert_allclose(_vec(u1), _vec(u2), rtol=1e-6, atol=1e-6)


def test_sum_norm_with_cancelling_outputs_is_zero_and_differentiable():
    """Outputs summing to exactly zero: the update is 0 (not 0/0), derivatives finite."""
    g = _grads(6, k=2)
    g = jax.tree.map(lambda x: x.at[1].set(-x[0]), g)
    tx = compose(identity(), rescale="sum_norm")
    update, _ = tx.update(g, tx.init(PARAMS))
    assert all(bool(jnp.all(x == 0)) for x in jax.tree_util.tree_leaves(update))

    def f(grads):
        u, _ = tx.update(grads, tx.init(PARAMS))
        return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(u))

    assert _finite(jax.grad(f)(g))
    assert _finite(jax.grad(f)(jax.tree.map(jnp.zeros_like, g)))


def test_sum_norm_below_the_floor_amplifies_like_the_reference():
    """||sum o|| < 1e-10: the update is sum(o) * ||sum g|| / 1e-10 (vambn's MOOForLoop)."""
    g = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]], jnp.float32)}
    tx = compose(mtl_optax.constant([1e-12, 1e-12]), rescale="sum_norm")
    update, _ = tx.update(g, tx.init({"w": jnp.zeros(2)}))
    np.testing.assert_allclose(np.asarray(update["w"]), 1e-12 * np.sqrt(2) / 1e-10, rtol=1e-5)


def test_nested_compose_uses_the_composed_per_task_form():
    g = _grads(7)
    inner = compose(mtl_optax.constant([1.0, 2.0, 3.0]), nsgd(update_at=0, num_tasks=3))
    assert isinstance(inner.per_task, PerTaskTransformation)
    outer = compose(inner, mtl_optax.constant([2.0, 0.5, 1.0]))
    flat = compose(
        mtl_optax.constant([1.0, 2.0, 3.0]),
        nsgd(update_at=0, num_tasks=3),
        mtl_optax.constant([2.0, 0.5, 1.0]),
    )
    u1, s1 = outer.update(g, outer.init(PARAMS))
    u2, _ = flat.update(g, flat.init(PARAMS))
    np.testing.assert_allclose(_vec(u1), _vec(u2), rtol=1e-6, atol=1e-6)
    assert len(s1) == 2 and len(s1[0]) == 2


def test_value_and_params_reach_every_method():
    g, losses = _grads(8), jnp.array([1.0, 0.5, 2.0])
    gn = gradnorm(update_at=0, optimizer=optax.sgd(0.1), num_tasks=3)
    tx = compose(identity(), gn)
    update, state = tx.update(g, tx.init(PARAMS), PARAMS, value=losses)
    direct, direct_state = gn.update(g, gn.init(PARAMS), PARAMS, value=losses)
    np.testing.assert_allclose(_vec(update), _vec(direct), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(state[1], direct_state)
    with pytest.raises(ValueError, match="per-task losses"):
        tx.update(g, tx.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="tree structures"):
        tx.update(g, tx.init(PARAMS), {"a": PARAMS["a"]}, value=losses)


def test_methods_without_a_per_task_form_are_rejected():
    with pytest.raises(
        TypeError, match=r"method #1 \(GradientTransformationExtraArgs\) has no per-task form"
    ):
        compose(identity(), optax.adam(1e-3))
    with pytest.raises(TypeError, match=r"mtl_optax.get\('nsgd', ...\)"):
        compose("nsgd")
    with pytest.raises(ValueError, match="rescale"):
        compose(identity(), rescale="norm")


def test_a_wrong_state_is_rejected():
    tx = compose(identity(), identity())
    with pytest.raises(ValueError, match="tuple of the 2 methods' states"):
        tx.update(_grads(), (tx.init(PARAMS)[0],))
    tx = compose(identity(), num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks=2"):
        tx.update(_grads(k=3), tx.init(PARAMS))


def test_jits_in_a_chain_with_adam_and_keeps_dtypes():
    tx = compose(
        gradnorm(update_at=0, variant="gradient", num_tasks=3),
        nsgd(update_at=1, num_tasks=3),
        rescale="sum_norm",
    )
    opt = optax.chain(tx, optax.adam(1e-2))

    def step(carry, i):
        params, state = carry
        u, state = opt.update(_grads(0), state, params)
        return (optax.apply_updates(params, u), state), None

    (params, state), _ = jax.lax.scan(step, (PARAMS, opt.init(PARAMS)), jnp.arange(3))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(PARAMS))
    assert int(state[0][1].count) == 3
    gb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(1))
    pb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    ub, _ = tx.update(gb, tx.init(pb), pb)
    chex.assert_trees_all_equal_shapes_and_dtypes(ub, pb)
    u32, _ = tx.update(_grads(1), tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(_vec(ub), _vec(u32), rtol=2e-2, atol=2e-2 * np.abs(_vec(u32)).max())


def test_registered_names_build_the_methods():
    assert {"identity", "compose", "nsgd", "gradnorm"} <= set(mtl_optax.available())
    g = _grads(9)
    u, _ = mtl_optax.get("compose", num_tasks=3).update(g, ())
    np.testing.assert_allclose(_vec(u), _jac(g).sum(0), rtol=1e-6, atol=1e-6)
