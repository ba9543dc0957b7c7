"""``rep_grad`` against LibMTL with ``rep_grad=True`` (live): MGDA and GradDrop.

LibMTL 1.1.5's model is built as its trainer builds it (``class
MTLmodel(HPS, weighting)``, LibMTL/trainer.py ``_prepare_model``) from a tiny
encoder (``Linear(3, D)`` then ``Softplus``: a strictly positive
representation) and ``K`` linear regression decoders with an MSE loss each,
in float64 with identical weights on both sides. One ``backward(losses,
...)`` of the weighting with ``rep_grad=True`` fills the encoder's and the
decoders' ``.grad``; ``rep_grad(...)`` gives ``{"encoder", "heads"}``
gradients for the same model written in JAX; they are compared entrywise.

* MGDA: ``mgda_ub(normalization, batch_axes=0)`` (LibMTL sums the
  representation gradients over the batch before its solver and applies the
  weights to the full ones). K = 2 away from the 0.999/0.001 boundary: the
  two-point rule is exact on both sides, tolerance 1e-10 relative. K = 3:
  LibMTL's loop stops when its weights move by < 1e-5, so the weights are
  compared to 1e-4 and the gradients to 1e-4 of their scale, and our cost on
  the solver's Gramian is at most LibMTL's.
* GradDrop: ``graddrop(leak, batch_axes=0)`` with its uniform draws replayed
  in LibMTL (``torch.rand_like`` patched to return them). LibMTL's
  statistic is ``sum_b sign(rep) * g``: the batch sum for a positive
  representation. Tolerance 1e-10 relative (LibMTL's ``+1e-7`` in the purity's
  denominator moves ``P`` by ~1e-7 / sum|S|, which never crosses a draw here:
  checked by the masks being equal, see test_graddrop_parity.py).
* The heads' gradient is the gradient of the plain sum of the losses on both
  sides (LibMTL's per-task backward reaches only the decoders and the
  detached representation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax._mgda_ub import mgda_ub
from mtl_optax.representation import rep_grad

from .conftest import import_libmtl, reference, to_numpy, torch_default_float64

torch = reference("torch")
DIN, B, D = 3, 8, 5


def _weights(seed, k):
    rng = np.random.default_rng(seed)
    return {
        "enc_w": rng.standard_normal((D, DIN)),  # torch Linear layout [out, in]
        "enc_b": 0.3 * rng.standard_normal(D),
        "dec_w": rng.standard_normal((k, D)),
        "dec_b": 0.3 * rng.standard_normal(k),
        "x": rng.standard_normal((B, DIN)),
        "y": rng.standard_normal((B, k)) + np.linspace(-2, 2, k),
    }


def _libmtl_step(weighting_name, data, k, **kwargs):
    """LibMTL's weighting backward with rep_grad=True: (losses, grads dict, returned)."""
    libmtl = import_libmtl()
    HPS = libmtl.architecture.HPS
    weighting = getattr(libmtl.weighting, weighting_name)
    nn = torch.nn
    tasks = [f"t{i}" for i in range(k)]

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(DIN, D)
            with torch.no_grad():
                self.linear.weight.copy_(torch.from_numpy(data["enc_w"]))
                self.linear.bias.copy_(torch.from_numpy(data["enc_b"]))

        def forward(self, x):
            if data.get("act") == "tanh":
                return torch.tanh(self.linear(x))
            return nn.functional.softplus(self.linear(x))

    class MTLmodel(HPS, weighting):  # as LibMTL.trainer.Trainer._prepare_model
        def __init__(self, decoders):
            super().__init__(tasks, Encoder, decoders, True, False, "cpu")
            self.init_param()

    with torch_default_float64():
        decoders = nn.ModuleDict({t: nn.Linear(D, 1) for t in tasks})
        with torch.no_grad():
            for i, t in enumerate(tasks):
                decoders[t].weight.copy_(torch.from_numpy(data["dec_w"][i : i + 1]))
                decoders[t].bias.copy_(torch.from_numpy(data["dec_b"][i : i + 1]))
        model = MTLmodel(decoders)
        preds = model(torch.from_numpy(data["x"]))
        y = torch.from_numpy(data["y"])
        losses = torch.stack(
            [((preds[t][:, 0] - y[:, i]) ** 2).mean() for i, t in enumerate(tasks)]
        )
        returned = model.backward(losses, **kwargs)
    grads = {
        "enc_w": to_numpy(model.encoder.linear.weight.grad),
        "enc_b": to_numpy(model.encoder.linear.bias.grad),
        "dec_w": np.concatenate([to_numpy(decoders[t].weight.grad) for t in tasks]),
        "dec_b": np.concatenate([to_numpy(decoders[t].bias.grad) for t in tasks]),
    }
    return to_numpy(losses), grads, returned


def _encoder(p, x, y):
    del y
    return jax.nn.softplus(x @ p["w"].T + p["b"])


def _tanh_encoder(p, x, y):
    del y
    return jnp.tanh(x @ p["w"].T + p["b"])


def _heads(h, z, x, y):
    del x
    pred = z @ h["w"].T + h["b"]  # [B, K]
    return jnp.mean((pred - y) ** 2, axis=0)


def _ours(method, data):
    enc = {"w": jnp.asarray(data["enc_w"]), "b": jnp.asarray(data["enc_b"])}
    heads = {"w": jnp.asarray(data["dec_w"]), "b": jnp.asarray(data["dec_b"])}
    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    rg = rep_grad(method, _tanh_encoder if data.get("act") == "tanh" else _encoder, _heads)
    state = rg.init(enc, x, y)
    losses, grads, new_state = jax.jit(rg.step)(state, enc, heads, x, y)
    flat = {
        "enc_w": np.asarray(grads["encoder"]["w"]),
        "enc_b": np.asarray(grads["encoder"]["b"]),
        "dec_w": np.asarray(grads["heads"]["w"]),
        "dec_b": np.asarray(grads["heads"]["b"]),
    }
    return np.asarray(losses), flat, state, new_state


def _assert_grads_close(ours, ref, rtol):
    for name in ("enc_w", "enc_b", "dec_w", "dec_b"):
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(ours[name], ref[name], rtol=0, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize(("seed", "k"), [(0, 2), (1, 2), (2, 3), (3, 3)])
def test_mgda_ub_matches_libmtl_mgda_rep_grad(x64, normalization, seed, k):
    data = _weights(seed, k)
    ref_losses, ref, sol = _libmtl_step("MGDA", data, k, mgda_gn=normalization)
    losses, ours, _, state = _ours(mgda_ub(normalization, batch_axes=0, num_tasks=k), data)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-13)
    # The heads: the gradient of the plain sum of the losses, on both sides.
    for name in ("dec_w", "dec_b"):
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-12, atol=0)
    lam = np.asarray(state.method.simplex_weights, np.float64)  # logged in float32
    sol = np.asarray(sol, np.float64)
    if k == 2:
        assert np.all((sol > 0.001 + 1e-9) & (sol < 0.999 - 1e-9)), sol  # not the boundary rule
        np.testing.assert_allclose(lam, sol, rtol=0, atol=1e-6)  # float32 log
        _assert_grads_close(ours, ref, rtol=1e-10)
    else:
        np.testing.assert_allclose(lam, sol, rtol=0, atol=1e-4)
        _assert_grads_close(ours, ref, rtol=1e-4)


@pytest.mark.parametrize(("seed", "k", "leak"), [(4, 2, 0.0), (5, 3, 0.2), (6, 4, 0.5)])
def test_graddrop_matches_libmtl_graddrop_rep_grad(x64, monkeypatch, seed, k, leak):
    data = _weights(seed, k)
    method = mtl_optax.graddrop(leakage=leak, key=seed, batch_axes=0, num_tasks=k)
    losses, ours, state, _ = _ours(method, data)
    # The draws our step uses: the method's next draws for [K, B, D] representation gradients.
    draws = method.uniforms(jnp.zeros((k, B, D)), state.method)  # [1, D]
    draws = np.asarray(draws, np.float64)[0]
    calls = []
    real = torch.rand_like

    def fake_rand_like(tensor, **kwargs):
        if tuple(tensor.shape) != (D,):
            return real(tensor, **kwargs)
        calls.append(tuple(tensor.shape))
        return torch.from_numpy(draws.copy())

    monkeypatch.setattr(torch, "rand_like", fake_rand_like)
    ref_losses, ref, _ = _libmtl_step("GradDrop", data, k, leak=leak)
    assert calls == [(D,)]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-13)
    _assert_grads_close(ours, ref, rtol=1e-10)
    # Not the plain sum: some representation coordinate had its sign dropped.
    _, plain, _, _ = _ours(mtl_optax.sum(), data)
    if leak < 1:
        assert not np.allclose(plain["enc_w"], ref["enc_w"], rtol=1e-8)


@pytest.mark.parametrize(("seed", "k", "leak"), [(7, 2, 0.0), (8, 3, 0.2), (9, 4, 0.5)])
def test_graddrop_activation_sign_matches_libmtl_on_a_signed_representation(
    x64, monkeypatch, seed, k, leak
):
    """A tanh representation (both signs): LibMTL's statistic sum_b sign(rep) * g.

    ``graddrop(batch_axes=0, activation_sign=True)`` equals LibMTL to 1e-10;
    without ``activation_sign`` (vambn's statistic) the result differs.
    """
    data = dict(_weights(seed, k), act="tanh")
    method = mtl_optax.graddrop(
        leakage=leak, key=seed, batch_axes=0, num_tasks=k, activation_sign=True
    )
    losses, ours, state, _ = _ours(method, data)
    draws = np.asarray(method.uniforms(jnp.zeros((k, B, D)), state.method), np.float64)[0]
    real = torch.rand_like

    def fake_rand_like(tensor, **kwargs):
        if tuple(tensor.shape) != (D,):
            return real(tensor, **kwargs)
        return torch.from_numpy(draws.copy())

    monkeypatch.setattr(torch, "rand_like", fake_rand_like)
    ref_losses, ref, _ = _libmtl_step("GradDrop", data, k, leak=leak)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-13)
    _assert_grads_close(ours, ref, rtol=1e-10)
    z = np.tanh(data["x"] @ data["enc_w"].T + data["enc_b"])
    assert (z < 0).any() and (z > 0).any()
    unsigned = mtl_optax.graddrop(leakage=leak, key=seed, batch_axes=0, num_tasks=k)
    _, other, _, _ = _ours(unsigned, data)
    assert not np.allclose(other["enc_w"], ref["enc_w"], rtol=1e-8)
