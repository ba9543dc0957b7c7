"""Parity of mtl_optax.rotograd with rotograd 0.1.6 (+ geotorch 0.3.0), float64.

The same small model (a linear+tanh backbone, one linear head per task, MSE
losses) is built in torch and in Flax NNX from identical initial weights,
including geotorch's random base rotations. Both are trained for STEPS steps
(SGD on the model, Adam on the rotations / GradNorm weights, as the reference
recommends a separate optimizer) with burn_in_period=2, so the burn-in reset of
the initial losses and gradient norms happens inside the compared window. At
every step we compare the rotation matrices, the rotated representations, the
losses, the gradients reaching the backbone and the heads, and the gradients of
the rotation parameters and of the GradNorm weights.

Tolerance: float64, every entry within 1e-8 relative to itself or to the largest
entry of the compared array (plus 1e-12). The scale-relative part is needed
because Adam divides each gradient entry by its own running RMS: an entry of
size 1e-9 computed with float64 rounding (1e-17) moves the next iterate by
about lr * 1e-8, in both implementations alike, so single small entries of the
later iterates differ at about 1e-10 absolute.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtl_optax import rotograd as rg

from .conftest import require_reference, to_numpy

torch = require_reference("torch")
rotograd_ref = require_reference("rotograd")
require_reference("geotorch")

K = 3
BATCH = 5
DIN = 4
STEPS = 6
BURN_IN = 2
RTOL, ATOL = 1e-8, 1e-12

CASES = [
    # (variant, rotation_shape, post_shape, normalize_losses, alpha)
    ("rotate_only", (4,), (), False, None),
    ("rotograd", (4,), (), True, None),
    ("rotograd", (2, 2), (), False, None),
    ("rotograd_norm", (2,), (3,), False, 1.5),
    ("rotograd_norm", (4,), (), True, 0.5),
]


def _close(actual, expected, what):
    expected = np.asarray(expected)
    atol = ATOL + RTOL * float(np.max(np.abs(expected), initial=0.0))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=atol, err_msg=what)


class TorchBackbone(torch.nn.Module):
    def __init__(self, rep_shape):
        super().__init__()
        self.rep_shape = rep_shape
        self.linear = torch.nn.Linear(DIN, math.prod(rep_shape))

    def forward(self, x):
        return torch.tanh(self.linear(x)).view(x.shape[0], *self.rep_shape)


class TorchHead(torch.nn.Module):
    def __init__(self, rep_size):
        super().__init__()
        self.linear = torch.nn.Linear(rep_size, 1)

    def forward(self, z):
        return self.linear(z.flatten(start_dim=1))[:, 0]


class Backbone(nnx.Module):
    def __init__(self, rep_shape, rngs):
        self.rep_shape = rep_shape
        self.linear = nnx.Linear(DIN, math.prod(rep_shape), rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return jnp.tanh(self.linear(x)).reshape(x.shape[0], *self.rep_shape)


class Heads(nnx.Module):
    def __init__(self, rep_size, rngs):
        self.layers = nnx.List(
            [nnx.Linear(rep_size, 1, rngs=rngs, param_dtype=jnp.float64) for _ in range(K)]
        )


def heads_loss(heads, zs, y):
    preds = [heads.layers[k](zs[k].reshape(zs.shape[1], -1))[:, 0] for k in range(K)]
    return jnp.stack([jnp.mean((preds[k] - y[:, k]) ** 2) for k in range(K)])


def _copy_linear(dst, src):
    dst.kernel[...] = jnp.asarray(to_numpy(src.weight).T)
    dst.bias[...] = jnp.asarray(to_numpy(src.bias))


def _build(variant, rotation_shape, post_shape, normalize_losses, alpha):
    torch.manual_seed(0)
    rep_shape = rotation_shape + post_shape
    rep_size = math.prod(rep_shape)
    t_backbone = TorchBackbone(rep_shape).double()
    t_heads = [TorchHead(rep_size).double() for _ in range(K)]
    t_heads_list = list(t_heads)  # the reference wraps the list's items in place
    kwargs = dict(post_shape=post_shape, normalize_losses=normalize_losses, burn_in_period=BURN_IN)
    if variant == "rotate_only":
        t_model = rotograd_ref.RotateOnly(t_backbone, t_heads_list, rotation_shape, **kwargs)
        j_roto = rg.RotateOnly
    elif variant == "rotograd":
        t_model = rotograd_ref.RotoGrad(t_backbone, t_heads_list, rotation_shape, **kwargs)
        j_roto = rg.RotoGrad
    else:
        t_model = rotograd_ref.RotoGradNorm(
            t_backbone, t_heads_list, rotation_shape, alpha=alpha, **kwargs
        )

        def j_roto(*a, **kw):
            return rg.RotoGradNorm(*a, alpha=alpha, **kw)

    t_model = t_model.double()
    t_model.train()

    backbone = Backbone(rep_shape, nnx.Rngs(0))
    heads = Heads(rep_size, nnx.Rngs(1))
    roto = j_roto(
        K,
        rotation_shape,
        post_shape=post_shape,
        normalize_losses=normalize_losses,
        burn_in_period=BURN_IN,
        rngs=nnx.Rngs(2),
        dtype=jnp.float64,
    )
    _copy_linear(backbone.linear, t_backbone.linear)
    for k in range(K):
        _copy_linear(heads.layers[k], t_heads[k].linear)
    bases = [to_numpy(t_model.parametrizations[f"rotation_{k}"][0].base) for k in range(K)]
    roto.base[...] = jnp.asarray(np.stack(bases))
    originals = [to_numpy(t_model.parametrizations[f"rotation_{k}"].original) for k in range(K)]
    np.testing.assert_array_equal(np.stack(originals), np.asarray(roto.rotation[...]))
    return t_model, t_backbone, t_heads, backbone, heads, roto


@pytest.mark.parametrize(("variant", "rotation_shape", "post_shape", "normalize", "alpha"), CASES)
def test_rotograd_matches_reference_over_steps_with_burn_in_reset(
    x64, variant, rotation_shape, post_shape, normalize, alpha
):
    t_model, t_backbone, t_heads, backbone, heads, roto = _build(
        variant, rotation_shape, post_shape, normalize, alpha
    )
    t_model_params = list(t_model.model_parameters())
    t_opt_model = torch.optim.SGD(t_model_params, lr=0.1)
    t_opt_roto = torch.optim.Adam(list(t_model.parameters()), lr=0.05)
    rotated = {}
    for k in range(K):
        t_model.heads[k][0].register_forward_hook(
            lambda _m, _i, out, k=k: rotated.__setitem__(k, to_numpy(out))
        )

    opt_model = nnx.Optimizer(nnx.Dict(b=backbone, h=heads), optax.sgd(0.1), wrt=nnx.Param)
    opt_roto = nnx.Optimizer(roto, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(backbone, heads, roto, opt_model, opt_roto, x, y):
        zs = roto(backbone(x))
        rotations = roto.rotations()
        losses, g_b, g_h, g_r = roto.value_and_grad(backbone, heads, heads_loss, x, y)
        opt_model.update(nnx.Dict(b=backbone, h=heads), nnx.State({"b": g_b, "h": g_h}))
        opt_roto.update(roto, g_r)
        return zs, rotations, losses, g_b, g_h, g_r

    rng = np.random.default_rng(1)
    initial_losses = []
    for t in range(STEPS):
        x = rng.normal(size=(BATCH, DIN))
        y = rng.normal(size=(BATCH, K)) * (1.0 + np.arange(K))

        t_opt_model.zero_grad()
        t_opt_roto.zero_grad()
        t_rotations = [to_numpy(r) for r in t_model.rotation]
        preds = t_model(torch.from_numpy(x))
        t_losses = [((preds[k] - torch.from_numpy(y[:, k])) ** 2).mean() for k in range(K)]
        t_model.backward(t_losses)

        zs, rotations, losses, g_b, g_h, g_r = step(
            backbone, heads, roto, opt_model, opt_roto, jnp.asarray(x), jnp.asarray(y)
        )
        where = f"{variant} step {t}"
        _close(rotations, np.stack(t_rotations), f"rotations, {where}")
        _close(zs, np.stack([rotated[k] for k in range(K)]), f"rotated reps, {where}")
        _close(losses, np.array([to_numpy(v) for v in t_losses]), f"losses, {where}")
        _close(g_b["linear"]["kernel"][...], to_numpy(t_backbone.linear.weight.grad).T, where)
        _close(g_b["linear"]["bias"][...], to_numpy(t_backbone.linear.bias.grad), where)
        for k in range(K):
            t_lin = t_heads[k].linear
            _close(g_h["layers"][k]["kernel"][...], to_numpy(t_lin.weight.grad).T, where)
            _close(g_h["layers"][k]["bias"][...], to_numpy(t_lin.bias.grad), where)
        t_rot_grads = [
            to_numpy(t_model.parametrizations[f"rotation_{k}"].original.grad) for k in range(K)
        ]
        _close(g_r["rotation"][...], np.stack(t_rot_grads), f"rotation grads, {where}")
        if variant == "rotograd_norm":
            t_w_grads = np.array([to_numpy(w.grad) for w in t_model.weight_])
            _close(g_r["weight"][...], t_w_grads, f"weight grads, {where}")
        assert int(roto.count[...]) == t_model.iteration_counter == t + 1
        _close(roto.initial_losses[...], np.array(t_model.initial_losses), f"L0, {where}")
        initial_losses.append(np.asarray(roto.initial_losses[...]))
        if variant != "rotate_only":
            t_init_norms = np.array([to_numpy(n).item() for n in t_model.initial_grads])
            _close(roto.initial_grad_norms[...], t_init_norms, f"initial norms, {where}")

        t_opt_model.step()
        t_opt_roto.step()

    # The burn-in reset happened inside the compared window (and only then).
    np.testing.assert_array_equal(initial_losses[0], initial_losses[BURN_IN - 1])
    assert np.all(initial_losses[BURN_IN] != initial_losses[0])
    np.testing.assert_array_equal(initial_losses[BURN_IN], initial_losses[-1])
    # The parameters moved and still agree after the last update.
    _close(roto.rotations(), np.stack([to_numpy(r) for r in t_model.rotation]), "final R")
    _close(backbone.linear.kernel[...], to_numpy(t_backbone.linear.weight).T, "final backbone")
    if variant == "rotograd_norm":
        t_weights = np.array([to_numpy(w) for w in t_model.weight])
        _close(roto.method.weights(roto.params()), t_weights, "final weights")
        assert np.ptp(t_weights) > 1e-3  # the GradNorm weights did move
    assert np.abs(np.asarray(roto.rotation[...])).max() > 1e-3  # the rotations did move
