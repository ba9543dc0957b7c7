"""Parity of ``uw``, ``dwa`` and ``gls`` with LibMTL 1.1.5, live, in float64, over several steps.

LibMTL's weightings are mixins of its model: ``backward(losses)`` builds a
loss from the task losses and calls ``loss.backward()`` on the shared
parameters. As in tests/parity/test_normalization_parity.py, the shared
parameters are one vector ``theta`` and the task losses are linear,
``L = v + J theta`` at ``theta = 0``, so the task gradients are the rows of
``J`` and the losses are ``v``; LibMTL's update is ``theta.grad``.

* ``GLS``: autograd of ``prod(L) ** (1 / K)``, i.e. ``sum_k w_k g_k`` with
  ``w_k = L_geo / (K L_k)``: 1e-12 of ``sum_k |w_k| |J_kj|``. LibMTL's returned
  weights, ``L / (K prod(L))``, are not those of its gradient (shown).
* ``DWA``: weights ``K softmax((Lbar(e-1) / Lbar(e-2)) / T)`` from the
  trainer's ``train_loss_buffer`` of epoch means, ones in epochs 0 and 1; the
  buffer is filled here as LibMTL's trainer does (the mean over an epoch's
  steps at its end) from the same losses mtl_optax accumulates. LibMTL's
  softmax runs in float32 (``torch.Tensor`` of a numpy array): weights 1e-6
  relative, updates 1e-6 of ``sum_k |w_k| |J_kj|``.
* ``UW``: the loss ``sum_k L_k / (2 exp(s_k)) + s_k / 2`` with ``s`` stepped
  by LibMTL's default optimizer, ``Adam(lr, weight_decay)`` from
  ``LibMTL.config``: the update, the weights, the gradient of ``s`` and ``s``
  after each step, 1e-12.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax

from .conftest import (
    assert_combination_close,
    import_libmtl,
    jacobian_to_tree,
    params_like,
    random_jacobian,
    reference,
    to_numpy,
    torch_default_float64,
    tree_to_vector,
)

torch = reference("torch")


def _driven(cls, k, p):
    """A LibMTL weighting whose shared parameters are one float64 vector theta."""

    class Driven(cls):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(p, dtype=torch.float64))

        def get_share_params(self):
            return [self.theta]

    with torch_default_float64():
        w = Driven()
        w.task_num, w.device, w.rep_grad, w.epoch = k, "cpu", False, 0
    return w


def _libmtl_step(w, jac, losses, optimizer=None, **kwargs):
    with torch_default_float64():
        w.theta.grad = None
        if optimizer is not None:
            optimizer.zero_grad()
        total = torch.tensor(losses) + torch.tensor(jac) @ w.theta
        weights = w.backward(total, **kwargs)
        update = to_numpy(w.theta.grad).copy()
        if optimizer is not None:
            optimizer.step()
    return update, np.asarray(weights, np.float64)


def _problem(seed, k, p, steps):
    rng = np.random.default_rng(seed)
    jacs = [random_jacobian(seed + t, k, p, scales=np.geomspace(0.3, 3.0, k)) for t in range(steps)]
    # Positive losses on different scales, falling at different rates.
    start = 10.0 ** rng.uniform(-1, 1, k)
    rates = rng.uniform(0.7, 1.0, k)
    losses = [start * rates**t * rng.uniform(0.9, 1.1, k) for t in range(steps)]
    return jacs, losses


def _ours(tx, jac, value, state):
    tree = jacobian_to_tree(jac)
    update, state = jax.jit(tx.update)(tree, state, params_like(tree), value=jnp.asarray(value))
    return tree_to_vector(update), state


@pytest.mark.parametrize(("k", "p"), [(2, 40), (3, 300), (10, 100)])
def test_gls_matches_libmtl(x64, k, p):
    libmtl = import_libmtl()
    jacs, losses = _problem(3 * k, k, p, steps=3)
    tx = mtl_optax.gls(num_tasks=k)
    state = tx.init(None)
    for jac, value in zip(jacs, losses, strict=True):
        reference = _driven(libmtl.weighting.GLS, k, p)
        expected, logged = _libmtl_step(reference, jac, value)
        update, state = _ours(tx, jac, value, state)
        weights = np.asarray(jnp.exp(jnp.mean(jnp.log(value)) - jnp.log(value)) / k)
        assert_combination_close(update, expected, weights, jac)
        np.testing.assert_allclose(state.weights, weights, rtol=1e-6)
        # LibMTL's returned weights are not those of its own gradient.
        assert not np.allclose(logged, weights)


def test_gls_of_many_small_losses_stays_finite_where_the_product_underflows(x64):
    """K = 40 losses of 1e-10: LibMTL's product underflows to 0 (its gradient is NaN)."""
    libmtl = import_libmtl()
    k, p = 40, 50
    jac = random_jacobian(1, k, p)
    value = np.full(k, 1e-10) * np.linspace(1, 2, k)
    expected, _ = _libmtl_step(_driven(libmtl.weighting.GLS, k, p), jac, value)
    assert not np.all(np.isfinite(expected))
    tx = mtl_optax.gls(num_tasks=k)
    update, state = _ours(tx, jac, value, tx.init(None))
    geo = np.exp(np.mean(np.log(value)))
    weights = geo / (k * value)
    np.testing.assert_allclose(np.asarray(state.weights), weights, rtol=1e-6)
    assert_combination_close(update, weights @ jac, weights, jac)


@pytest.mark.parametrize("steps_per_epoch", [1, 3])
@pytest.mark.parametrize(("k", "p", "temperature"), [(2, 40, 2.0), (4, 200, 0.5), (10, 60, 2.0)])
def test_dwa_matches_libmtl_over_epochs(x64, k, p, temperature, steps_per_epoch):
    libmtl = import_libmtl()
    epochs = 5
    jacs, losses = _problem(7 * k, k, p, steps=epochs * steps_per_epoch)
    reference = _driven(libmtl.weighting.DWA, k, p)
    reference.train_loss_buffer = np.zeros((k, epochs))
    tx = mtl_optax.dwa(temperature=temperature, steps_per_epoch=steps_per_epoch, num_tasks=k)
    state = tx.init(None)
    for e in range(epochs):
        reference.epoch = e
        for s in range(steps_per_epoch):
            t = e * steps_per_epoch + s
            expected, weights = _libmtl_step(reference, jacs[t], losses[t], T=temperature)
            update, state = _ours(tx, jacs[t], losses[t], state)
            np.testing.assert_allclose(state.weights, weights, rtol=1e-6, err_msg=f"epoch {e}")
            assert_combination_close(update, expected, weights, jacs[t], rtol=1e-6)
        # LibMTL's trainer records the epoch's mean losses at its end.
        reference.train_loss_buffer[:, e] = np.mean(
            losses[e * steps_per_epoch : (e + 1) * steps_per_epoch], axis=0
        )
    assert int(state.epoch) == epochs
    assert np.abs(np.asarray(state.weights) - 1.0).max() > 1e-3  # the rates moved the weights


@pytest.mark.parametrize(("k", "p"), [(2, 40), (3, 300), (10, 100)])
def test_uw_matches_libmtl_over_steps(x64, k, p):
    libmtl = import_libmtl()
    args = libmtl.config.LibMTL_args.parse_args([])
    assert args.optim == "adam"
    jacs, losses = _problem(11 * k, k, p, steps=6)
    reference = _driven(libmtl.weighting.UW, k, p)
    with torch_default_float64():
        reference.init_param()
        reference.loss_scale.data = reference.loss_scale.data.to(torch.float64)
    optimizer = torch.optim.Adam([reference.loss_scale], lr=args.lr, weight_decay=args.weight_decay)
    tx = mtl_optax.uw(num_tasks=k)  # LibMTL's default optimizer and initial s = -0.5
    state = tx.init(None)
    np.testing.assert_array_equal(np.asarray(state.log_var), to_numpy(reference.loss_scale))
    for t, (jac, value) in enumerate(zip(jacs, losses, strict=True)):
        with torch_default_float64():
            reference.loss_scale.grad = None
        expected, weights = _libmtl_step(reference, jac, value, optimizer=optimizer)
        grad = to_numpy(reference.loss_scale.grad)
        update, state = _ours(tx, jac, value, state)
        np.testing.assert_allclose(state.weights, weights, rtol=1e-6, err_msg=f"step {t}")
        assert_combination_close(update, expected, weights, jac)
        np.testing.assert_allclose(np.asarray(state.log_var_grad), grad, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(
            np.asarray(state.log_var), to_numpy(reference.loss_scale), rtol=0, atol=1e-12
        )
    assert np.abs(np.asarray(state.log_var) + 0.5).max() > 1e-4  # s moved
