"""Unit and property tests of mtl_optax.rotograd (parity is in tests/parity)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtl_optax import rotograd as rg

K = 3


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def _methods(**kw):
    return [
        rg.rotate_only(K, 4, **kw),
        rg.rotograd(K, 4, **kw),
        rg.rotograd_norm(K, 4, alpha=1.0, **kw),
    ]


def test_rotation_matrices_are_rotations_for_any_parameters():
    base = rg.uniform_rotations(jax.random.key(0), K, 4)
    r = rg.rotation_matrices(3.0 * _rand(1, (K, 4, 4)), base)
    eye = np.broadcast_to(np.eye(4), (K, 4, 4))
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), eye, atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(r), np.ones(K), atol=1e-5)


def test_uniform_rotations_are_orthogonal_with_positive_determinant():
    q = rg.uniform_rotations(jax.random.key(3), 16, 4)
    np.testing.assert_allclose(
        np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(4), q.shape), atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.det(q), np.ones(16), atol=1e-5)


def test_only_the_strict_lower_triangle_is_a_parameter():
    base = rg.uniform_rotations(jax.random.key(0), K, 4)
    p = _rand(1, (K, 4, 4))
    upper = jnp.triu(_rand(2, (K, 4, 4)))
    np.testing.assert_allclose(
        rg.rotation_matrices(p + upper, base), rg.rotation_matrices(p, base), atol=1e-6
    )


def test_rotate_only_with_zero_parameters_and_identity_init_is_identity():
    roto = rg.RotateOnly(K, 4, init_rotations="identity", rngs=nnx.Rngs(0))
    z = _rand(0, (6, 4))
    zs = roto(z)
    assert zs.shape == (K, 6, 4)
    np.testing.assert_array_equal(zs, jnp.broadcast_to(z, zs.shape))


def test_initial_rotations_are_the_random_bases():
    method = rg.rotograd(K, 4)
    params, state = method.init(0)
    np.testing.assert_array_equal(params["rotation"], np.zeros((K, 4, 4)))
    np.testing.assert_allclose(method.rotations(params, state), state.base, atol=1e-6)
    assert not np.allclose(state.base[0], np.eye(4))


def test_rotate_with_post_shape_rotates_each_trailing_column():
    # z: (batch, rotation 2x2, post 3); every [4, 3] block is multiplied by R_k.
    r = rg.rotation_matrices(_rand(0, (K, 4, 4)), rg.uniform_rotations(jax.random.key(1), K, 4))
    z = _rand(2, (5, 2, 2, 3))
    zs = rg.rotate(z, r, (2, 2), (3,))
    expected = np.einsum("kij,bjp->kbip", r, np.asarray(z).reshape(5, 4, 3)).reshape(K, 5, 2, 2, 3)
    np.testing.assert_allclose(zs, expected, rtol=1e-5, atol=1e-6)


def test_rotations_receive_no_gradient_from_the_task_losses():
    method = rg.rotate_only(K, 4)
    params, state = method.init(0)
    g = jax.grad(lambda p: jnp.sum(method.rotate(p, state, _rand(1, (2, 4)))))(params)
    np.testing.assert_array_equal(g["rotation"], np.zeros((K, 4, 4)))


def test_rotation_loss_gradient_vanishes_on_the_upper_triangle():
    method = rg.rotograd(K, 4)
    params, state = method.init(0)
    losses = jnp.ones(K)
    _, state = method.loss_scales(state, losses)
    _, grads, _ = method.update(params, state, _rand(1, (K, 6, 4)), losses)
    np.testing.assert_array_equal(jnp.triu(grads["rotation"]), np.zeros((K, 4, 4)))
    assert np.abs(grads["rotation"]).max() > 0


def test_rotation_gradient_is_the_gradient_of_the_documented_rotation_loss():
    # L(P) = sum_k sum_b ||R_k(P) m_b - g~_k,b||^2 (post_shape empty: summed over b),
    # m = mean_k (||mean_j g_j|| / ||g_k||) g_k, g_k = R_k^T g~_k, held constant.
    method = rg.rotate_only(K, 4)
    params, state = method.init(0)
    params = {"rotation": 0.3 * _rand(5, (K, 4, 4))}
    tilde = _rand(1, (K, 6, 4))
    losses = jnp.ones(K)
    _, state = method.loss_scales(state, losses)
    _, grads, _ = method.update(params, state, tilde, losses)

    r0 = method.rotations(params, state)
    g = jnp.einsum("kji,kbj->kbi", r0, tilde)
    norms = jnp.linalg.norm(g.reshape(K, -1), axis=1)
    m = jnp.mean(g * (jnp.linalg.norm(jnp.mean(g, 0)) / norms)[:, None, None], axis=0)

    def loss(p):
        r = rg.rotation_matrices(p, state.base)
        return jnp.sum((jnp.einsum("kij,bj->kbi", r, m) - tilde) ** 2)

    np.testing.assert_allclose(
        grads["rotation"], jax.grad(loss)(params["rotation"]), rtol=1e-4, atol=1e-5
    )
    stepped = params["rotation"] - 1e-3 * grads["rotation"]
    assert loss(stepped) < loss(params["rotation"])


def test_rotograd_rescales_every_task_gradient_to_one_norm():
    method = rg.rotograd(K, 4, init_rotations="identity", burn_in_period=1)
    params, state = method.init(0)
    losses = jnp.ones(K)
    scales = jnp.array([1.0, 10.0, 0.1])
    for step in range(3):
        tilde = _rand(step, (K, 6, 4)) * scales[:, None, None] * (step + 1)
        _, state = method.loss_scales(state, losses)
        rep, _, state = method.update(params, state, tilde, losses)
        # rep = (nu / n_k) sum_k g_k-direction: its decomposition has equal norms.
        norms = jnp.linalg.norm(tilde.reshape(K, -1), axis=1)
        conv = norms / state.initial_grad_norms
        nu = jnp.sum(conv / jnp.sum(conv) * norms)
        expected = jnp.sum(tilde / norms[:, None, None] * nu, axis=0)
        np.testing.assert_allclose(rep, expected, rtol=1e-5, atol=1e-6)


def test_burn_in_reset_captures_losses_at_step_zero_and_at_burn_in_period():
    method = rg.rotograd(K, 4, burn_in_period=2, normalize_losses=True)
    params, state = method.init(0)
    seen = []
    for step in range(5):
        losses = jnp.full((K,), step + 1.0)
        scales, state = method.loss_scales(state, losses)
        np.testing.assert_allclose(scales, 1.0 / state.initial_losses)
        seen.append(float(state.initial_losses[0]))
        _, _, state = method.update(params, state, _rand(step, (K, 2, 4)), losses)
    assert seen == [1.0, 1.0, 3.0, 3.0, 3.0]
    assert int(state.count) == 5


@pytest.mark.parametrize("method", _methods(), ids=lambda m: m.variant)
def test_zero_gradients_and_zero_losses_give_finite_results(method):
    params, state = method.init(0)
    losses = jnp.zeros(K)
    _, state = method.loss_scales(state, losses)
    rep, grads, state = method.update(params, state, jnp.zeros((K, 3, 4)), losses)
    for leaf in jax.tree.leaves((rep, grads, state)):
        assert np.all(np.isfinite(leaf))
    np.testing.assert_array_equal(rep, np.zeros((3, 4)))


def _plain_model():
    def backbone_fn(p, x):
        return jnp.tanh(x @ p["w"])

    def heads_fn(p, zs, y):
        return jnp.mean((jnp.einsum("kbd,kd->kb", zs, p) - y.T) ** 2, axis=1)

    bp = {"w": _rand(0, (5, 4)) * 0.5}
    hp = _rand(1, (K, 4))
    x, y = _rand(2, (7, 5)), _rand(3, (7, K))
    return backbone_fn, heads_fn, bp, hp, x, y


@pytest.mark.parametrize("method", _methods(burn_in_period=1), ids=lambda m: m.variant)
def test_value_and_grad_jits_and_matches_eager(method):
    backbone_fn, heads_fn, bp, hp, x, y = _plain_model()
    params, state = method.init(1)
    fn = rg.value_and_grad(method, backbone_fn, heads_fn)
    eager = fn(bp, hp, params, state, x, y)
    jitted = jax.jit(fn)(bp, hp, params, state, x, y)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_value_and_grad_backbone_gradient_is_one_vjp_of_the_combined_gradient():
    method = rg.rotate_only(K, 4)
    backbone_fn, heads_fn, bp, hp, x, y = _plain_model()
    params, state = method.init(1)
    _, (g_b, g_h, _), _ = rg.value_and_grad(method, backbone_fn, heads_fn)(
        bp, hp, params, state, x, y
    )

    # RotateOnly's combination is the plain sum: the gradient of the summed losses.
    def total(bp, hp):
        return jnp.sum(heads_fn(hp, method.rotate(params, state, backbone_fn(bp, x)), y))

    e_b, e_h = jax.grad(total, argnums=(0, 1))(bp, hp)
    np.testing.assert_allclose(g_b["w"], e_b["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_h, e_h, rtol=1e-5, atol=1e-6)


def test_shape_errors_name_the_shapes():
    method = rg.rotograd(K, (2, 2), post_shape=(3,))
    params, state = method.init(0)
    with pytest.raises(ValueError, match=r"\(5, 4, 3\).*\(\.\.\., 2, 2, 3\)"):
        method.rotate(params, state, jnp.zeros((5, 4, 3)))
    with pytest.raises(ValueError, match=r"losses has shape \(2,\); expected \(3,\)"):
        method.loss_scales(state, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"rotated_grads has shape \(2, 5, 2, 2, 3\)"):
        method.update(params, state, jnp.zeros((2, 5, 2, 2, 3)), jnp.zeros(K))
    with pytest.raises(ValueError, match=r"params\['rotation'\] has shape \(3, 3, 3\)"):
        method.rotate({"rotation": jnp.zeros((3, 3, 3))}, state, jnp.zeros((5, 2, 2, 3)))
    with pytest.raises(ValueError, match="keys"):
        method.rotate({"rot": jnp.zeros((3, 4, 4))}, state, jnp.zeros((5, 2, 2, 3)))


def test_invalid_hyperparameters_raise():
    with pytest.raises(ValueError, match="num_tasks"):
        rg.rotograd(0, 4)
    with pytest.raises(ValueError, match="burn_in_period"):
        rg.rotograd(2, 4, burn_in_period=-1)
    with pytest.raises(ValueError, match="rotation_shape"):
        rg.rotograd(2, (4, 0))
    with pytest.raises(ValueError, match="init_rotations"):
        rg.rotograd(2, 4, init_rotations="random")
    with pytest.raises(ValueError, match="alpha"):
        rg.rotograd_norm(2, 4, alpha=None)


def test_nnx_module_trains_under_nnx_jit_and_advances_its_state():
    backbone = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    heads = nnx.Linear(4, 1, rngs=nnx.Rngs(1))
    roto = rg.RotoGradNorm(K, 4, alpha=1.0, burn_in_period=1, rngs=nnx.Rngs(2))
    opt_roto = nnx.Optimizer(roto, optax.adam(1e-2), wrt=nnx.Param)
    opt_b = nnx.Optimizer(backbone, optax.sgd(1e-1), wrt=nnx.Param)

    def heads_loss(h, zs, y):
        return jnp.mean((h(zs)[..., 0] - y.T) ** 2, axis=1)

    @nnx.jit
    def step(backbone, heads, roto, opt_b, opt_roto, x, y):
        losses, g_b, _, g_r = roto.value_and_grad(backbone, heads, heads_loss, x, y)
        opt_b.update(backbone, g_b)
        opt_roto.update(roto, g_r)
        return losses

    x, y = _rand(0, (8, 5)), _rand(1, (8, K))
    for _ in range(3):
        losses = step(backbone, heads, roto, opt_b, opt_roto, x, y)
    assert losses.shape == (K,)
    assert int(roto.count[...]) == 3
    assert np.abs(roto.rotation[...]).max() > 0
    assert np.abs(roto.weight[...] - 1.0).max() > 0


def test_example_runs_a_few_steps():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "rotograd_example.py"
    spec = importlib.util.spec_from_file_location("rotograd_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    results = example.main(steps=5, verbose=False)
    assert set(results) == {"mean", "rotograd"}
    for metrics in results.values():
        assert len(metrics) == K
        assert all(np.isfinite(v) for v in metrics)
