"""Every trace-time validation error names the leaf path, the shape found and expected."""

import jax
import jax.numpy as jnp
import optax
import pytest

import mtl_optax

PARAMS = {"dense": {"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}}


def _grads(k=4):
    return jax.tree.map(lambda p: jnp.ones((k, *p.shape)), PARAMS)


@pytest.mark.parametrize("factory", [mtl_optax.mean, mtl_optax.sum, mtl_optax.rlw])
def test_leading_axes_disagree(factory):
    grads = _grads()
    grads["dense"]["w"] = jnp.ones((5, 3, 2))
    tx = factory()
    with pytest.raises(ValueError) as err:
        jax.jit(tx.update)(grads, tx.init(PARAMS))
    msg = str(err.value)
    assert "['dense']['w']" in msg and "(5, 3, 2)" in msg and "(4, 3, 2)" in msg and "K=4" in msg


def test_num_tasks_differs_from_configuration():
    tx = mtl_optax.constant([1.0, 2.0, 3.0])
    with pytest.raises(ValueError) as err:
        tx.update(_grads(4), tx.init(PARAMS))
    msg = str(err.value)
    assert "num_tasks=3" in msg and "['dense']['b']" in msg and "(4, 2)" in msg and "(3, 2)" in msg


def test_num_tasks_argument_is_checked():
    tx = mtl_optax.mean(num_tasks=2)
    with pytest.raises(ValueError, match=r"num_tasks=2.*expected shape \(2, 2\)"):
        tx.update(_grads(4), tx.init(PARAMS))


def test_integer_leaf():
    grads = _grads()
    grads["dense"]["b"] = jnp.ones((4, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"leaf \['dense'\]\['b'\] has dtype int32"):
        mtl_optax.mean().update(grads, ())


def test_complex_leaf():
    grads = {"z": jnp.ones((2, 3), jnp.complex64)}
    with pytest.raises(ValueError, match=r"leaf \['z'\] has dtype complex64"):
        mtl_optax.gramian(grads)


def test_task_axis_missing_against_params():
    grads = jax.grad(lambda p: jnp.sum(p["dense"]["w"]) + jnp.sum(p["dense"]["b"]))(PARAMS)
    tx = mtl_optax.mean()
    with pytest.raises(ValueError) as err:
        tx.update(grads, tx.init(PARAMS), PARAMS)
    msg = str(err.value)
    assert "task axis is missing" in msg and "jax.jacrev" in msg
    # Leaves are visited in key order: ['dense']['b'] comes first.
    assert "['dense']['b']" in msg and "(2,)" in msg and "(K, 2)" in msg


def test_task_axis_missing_on_scalar_leaf():
    with pytest.raises(
        ValueError, match=r"leaf \['s'\] has shape \(\), but every leaf needs a leading task axis"
    ):
        mtl_optax.sum().update({"s": jnp.float32(1.0)}, ())


def test_shape_mismatch_against_params():
    grads = _grads()
    grads["dense"]["w"] = jnp.ones((4, 2, 3))
    with pytest.raises(
        ValueError, match=r"\['dense'\]\['w'\] has shape \(4, 2, 3\); expected \(4, 3, 2\)"
    ):
        mtl_optax.mean().update(grads, (), PARAMS)


def test_structure_mismatch_against_params():
    grads = {"dense": {"w": jnp.ones((4, 3, 2))}}
    with pytest.raises(ValueError, match="different tree structures"):
        mtl_optax.mean().update(grads, (), PARAMS)


def test_empty_tree():
    with pytest.raises(ValueError, match="no leaves"):
        mtl_optax.mean().update({}, ())


def test_value_of_wrong_shape():
    tx = mtl_optax.mean()
    with pytest.raises(
        ValueError,
        match=r"value= must hold the 4 per-task losses, shape \(4,\); found shape \(3,\)",
    ):
        tx.update(_grads(4), tx.init(PARAMS), value=jnp.ones(3))


def test_method_needing_value_without_it():
    rule = mtl_optax.Weighting(
        name="needs_losses",
        init=lambda: (),
        weights=lambda g, s, v, *, num_tasks, dtype: (v / v.sum(), s),
        needs_gramian=False,
        needs_value=True,
    )
    tx = mtl_optax.from_weighting(rule)
    with pytest.raises(ValueError, match=r"needs_losses needs the per-task losses.*value=losses"):
        tx.update(_grads(4), ())
    u, _ = tx.update(_grads(4), (), value=jnp.array([1.0, 1.0, 1.0, 1.0]))
    assert jnp.allclose(u["dense"]["w"], 1.0)


def test_errors_are_raised_inside_a_jitted_chain():
    opt = optax.chain(mtl_optax.mean(), optax.adam(1e-3))
    state = opt.init(PARAMS)
    grads = _grads()
    grads["dense"]["w"] = jnp.ones((3, 3, 2))
    with pytest.raises(ValueError, match=r"\['dense'\]\['w'\] has shape \(3, 3, 2\)"):
        jax.jit(opt.update)(grads, state, PARAMS)


def test_constant_rejects_bad_weights():
    with pytest.raises(ValueError, match="non-empty vector"):
        mtl_optax.constant([[1.0, 2.0]])
    with pytest.raises(ValueError, match="finite"):
        mtl_optax.constant([1.0, float("nan")])


def test_rlw_rejects_bad_key():
    with pytest.raises(ValueError, match="key must be an int seed or a PRNG key"):
        mtl_optax.rlw(key=jnp.ones(3))


def test_constant_num_tasks_must_match_weights():
    assert mtl_optax.constant([1.0, 2.0], num_tasks=2).weighting.num_tasks == 2
    with pytest.raises(ValueError, match="num_tasks=3 but 2 weights"):
        mtl_optax.constant([1.0, 2.0], num_tasks=3)
