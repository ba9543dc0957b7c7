"""chain(mean, adam) on task gradients trains exactly like adam on the mean loss."""

import chex
import jax
import jax.numpy as jnp
import optax
from flax import linen, nnx

import mtl_optax

K = 3
STEPS = 10


def _batch(i):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(42), i))
    return jax.random.normal(kx, (32, 6)), jax.random.normal(ky, (32, K))


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(K)(linen.relu(linen.Dense(16)(x)))


def test_chain_mean_adam_matches_adam_on_mean_loss_linen():
    net = LinenMLP()
    params0 = net.init(jax.random.key(0), _batch(0)[0])["params"]

    def task_losses(p, x, y):
        return jnp.mean((net.apply({"params": p}, x) - y) ** 2, axis=0)

    mtl_opt = optax.chain(mtl_optax.mean(num_tasks=K), optax.adam(1e-3))
    ref_opt = optax.adam(1e-3)

    @jax.jit
    def mtl_step(p, s, x, y):
        losses, grads = mtl_optax.task_grads(task_losses, p, x, y)
        u, s = mtl_opt.update(grads, s, p, value=losses)
        return optax.apply_updates(p, u), s

    @jax.jit
    def ref_step(p, s, x, y):
        g = jax.grad(lambda p: jnp.mean(task_losses(p, x, y)))(p)
        u, s = ref_opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p_mtl, s_mtl = params0, mtl_opt.init(params0)
    p_ref, s_ref = params0, ref_opt.init(params0)
    for i in range(STEPS):
        x, y = _batch(i)
        p_mtl, s_mtl = mtl_step(p_mtl, s_mtl, x, y)
        p_ref, s_ref = ref_step(p_ref, s_ref, x, y)
    # Float32 rounding: the two gradients differ by a few ulps, which Adam's
    # normalisation can amplify slightly over 10 steps of size 1e-3.
    chex.assert_trees_all_close(p_mtl, p_ref, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), p_ref, params0)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-3  # the parameters did move


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, K, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def test_chain_mean_adam_matches_adam_on_mean_loss_nnx():
    def task_losses(m, x, y):
        return jnp.mean((m(x) - y) ** 2, axis=0)

    mtl_model, ref_model = NNXMLP(nnx.Rngs(0)), NNXMLP(nnx.Rngs(0))
    mtl_opt = nnx.Optimizer(
        mtl_model, optax.chain(mtl_optax.mean(), optax.adam(1e-3)), wrt=nnx.Param
    )
    ref_opt = nnx.Optimizer(ref_model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def mtl_step(model, opt, x, y):
        losses, grads = mtl_optax.task_grads(task_losses, model, x, y)
        opt.update(model, grads, value=losses)

    @nnx.jit
    def ref_step(model, opt, x, y):
        grads = nnx.grad(lambda m: jnp.mean(task_losses(m, x, y)))(model)
        opt.update(model, grads)

    for i in range(STEPS):
        x, y = _batch(i)
        mtl_step(mtl_model, mtl_opt, x, y)
        ref_step(ref_model, ref_opt, x, y)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(mtl_model, nnx.Param)),
        nnx.to_pure_dict(nnx.state(ref_model, nnx.Param)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert int(mtl_opt.step[...]) == STEPS
