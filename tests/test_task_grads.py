"""task_grads: per-task losses and stacked gradients, for pytrees, Linen and NNX."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import mtl_optax


def _losses(params, x, y):
    pred = jnp.tanh(x @ params["w"] + params["b"])  # [B, K]
    return jnp.mean((pred - y) ** 2, axis=0)  # [K]


def _data(k=3):
    kx, ky, kw = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (16, 5))
    y = jax.random.normal(ky, (16, k))
    params = {"w": jax.random.normal(kw, (5, k)), "b": jnp.zeros((k,))}
    return params, x, y


def test_task_grads_equal_per_task_jax_grad():
    params, x, y = _data()
    losses, grads = jax.jit(lambda p: mtl_optax.task_grads(_losses, p, x, y))(params)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(_losses(params, x, y)), rtol=1e-6)
    for k in range(3):
        g_k = jax.grad(lambda p, k=k: _losses(p, x, y)[k])(params)
        row = jax.tree.map(lambda g, k=k: g[k], grads)
        # float32: the two programs round differently (5e-6 relative on an
        # entry of 0.03 that cancels, 1.6e-7 absolute on gradients of 0.2).
        chex.assert_trees_all_close(row, g_k, rtol=1e-5, atol=1e-6)
    assert mtl_optax.check_task_grads(grads, params) == 3


def test_task_grads_with_aux_and_kwargs():
    params, x, y = _data()

    def fn(p, x, *, y):
        losses = _losses(p, x, y)
        return losses, {"total": jnp.sum(losses)}

    (losses, aux), grads = mtl_optax.task_grads(fn, params, x, y=y, has_aux=True)
    np.testing.assert_allclose(float(aux["total"]), float(jnp.sum(losses)), rtol=1e-6)
    assert grads["w"].shape == (3, 5, 3)


def test_task_grads_rejects_scalar_loss():
    params, x, y = _data()
    with pytest.raises(ValueError, match=r"vector of shape \(K,\); it returned shape \(\)"):
        mtl_optax.task_grads(lambda p: jnp.sum(_losses(p, x, y)), params)


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        h = linen.tanh(linen.Dense(8)(x))
        return linen.Dense(3)(h)


def test_task_grads_with_linen_params():
    _, x, y = _data()
    net = LinenNet()
    variables = net.init(jax.random.key(1), x)

    def losses(p):
        return jnp.mean((net.apply({"params": p}, x) - y) ** 2, axis=0)

    _, grads = mtl_optax.task_grads(losses, variables["params"])
    chex.assert_trees_all_equal_structs(grads, variables["params"])
    g1 = jax.grad(lambda p: losses(p)[1])(variables["params"])
    chex.assert_trees_all_close(jax.tree.map(lambda g: g[1], grads), g1, rtol=1e-5, atol=1e-7)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


def test_task_grads_with_nnx_module_writes_back_batch_stats():
    _, x, y = _data()
    model = NNXNet(nnx.Rngs(0))
    before = np.array(model.bn.mean[...])  # a copy: the variable is updated in place

    def losses(m, x, y):
        return jnp.mean((m(x) - y) ** 2, axis=0)

    _, grads = mtl_optax.task_grads(losses, model, x, y)
    assert isinstance(grads, nnx.State)
    params = nnx.state(model, nnx.Param)
    chex.assert_trees_all_equal_structs(grads, params)
    # Per-task gradient equals nnx.grad of that task's loss on a copy of the module.
    ref_model = NNXNet(nnx.Rngs(0))
    g0 = nnx.grad(lambda m: losses(m, x, y)[0])(ref_model)
    chex.assert_trees_all_close(
        jax.tree.map(lambda g: g[0], nnx.to_pure_dict(grads)),
        nnx.to_pure_dict(g0),
        rtol=1e-5,
        atol=1e-7,
    )
    # The forward pass in training mode moved the running mean, and it was written back.
    # (nnx.grad above ran one forward pass on ref_model and wrote its stats back.)
    np.testing.assert_allclose(
        np.asarray(model.bn.mean[...]), np.asarray(ref_model.bn.mean[...]), rtol=1e-6
    )
    assert not np.allclose(before, np.asarray(model.bn.mean[...]))


@pytest.mark.parametrize("k", [1, 5, 65])  # backward passes one by one (CPU, K <= 64) or vmapped
def test_task_grads_equals_jacrev_for_any_number_of_tasks(k):
    params = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
    x = jax.random.normal(jax.random.key(1), (7, 4))
    scales = jnp.linspace(0.5, 2.0, k)

    def losses(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return scales * jnp.mean(h**2) + jnp.arange(k) * jnp.mean(h)

    got_losses, got = jax.jit(lambda p, x: mtl_optax.task_grads(losses, p, x))(params, x)
    expected = jax.jacrev(losses)(params, x)
    np.testing.assert_allclose(np.asarray(got_losses), np.asarray(losses(params, x)), rtol=1e-6)
    for name in params:
        assert got[name].shape == (k, *params[name].shape)
        np.testing.assert_allclose(
            np.asarray(got[name]), np.asarray(expected[name]), rtol=1e-5, atol=1e-6
        )
