"""rep_grad (methods on representation gradients) and mgda_ub: values, cost, errors.

The reference for every value is a direct computation with ``jax.jacrev`` /
``jax.grad`` of the same model: the representation gradients
``dL_k/dz`` stacked, the method applied to them directly, and the encoder's
Jacobian transposed applied to the result. Parity with LibMTL
(``rep_grad=True``) and vambn's ``MOOForLoop`` is in
``tests/parity/test_representation_parity.py`` and
``tests/parity/test_vambn_final_parity.py``.
"""

from __future__ import annotations

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax import _mgda_ub, representation
from mtl_optax._mgda_ub import mgda_ub
from mtl_optax.representation import rep_grad

B, DIN, D = 4, 3, 6


def _encoder(p, x, *labels):
    del labels  # the batch is (x, y): the heads read y, the encoder does not
    return jnp.tanh(x @ p["w"] + p["b"])  # z: [B, D]


def _heads(h, z, x, y):
    """K = h.shape[0] regression heads, one per column of y."""
    del x
    pred = jnp.einsum("bd,kd->kb", z, h)
    return jnp.mean((pred - y.T) ** 2, axis=1)


def _problem(k, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    enc = {
        "w": jnp.asarray(rng.standard_normal((DIN, D)), dtype),
        "b": jnp.asarray(0.1 * rng.standard_normal(D), dtype),
    }
    heads = jnp.asarray(rng.standard_normal((k, D)), dtype)
    x = jnp.asarray(rng.standard_normal((B, DIN)), dtype)
    y = jnp.asarray(rng.standard_normal((B, k)), dtype)
    return enc, heads, x, y


def _direct(method, enc, heads, x, y, *, rescale="none", **extra):
    """The same step written with jacrev: (losses, encoder grads, heads grads, state)."""
    z, vjp = jax.vjp(lambda p: _encoder(p, x), enc)
    losses = _heads(heads, z, x, y)
    rep = jax.jacrev(_heads, argnums=1)(heads, z, x, y)  # [K, B, D]
    combined, state = method.update(rep, method.init(z), z, value=losses, **extra)
    if rescale == "sum_norm":
        combined = combined * jnp.linalg.norm(rep.sum(0)) / jnp.linalg.norm(combined)
    heads_grads = jax.grad(lambda h: jnp.sum(_heads(h, z, x, y)))(heads)
    return losses, vjp(combined)[0], heads_grads, state


def _close(a, b, rtol=1e-5):
    """Entrywise within ``rtol`` of each leaf's largest magnitude (float32 rounding)."""
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        v = np.asarray(v)
        atol = rtol * float(np.max(np.abs(v), initial=0.0))
        np.testing.assert_allclose(np.asarray(u), v, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "name",
    ["identity", "mean", "mgda_ub", "mgda_ub_loss+", "imtl_g", "nsgd", "pcgrad", "graddrop"],
)
def test_step_equals_direct_jacrev_computation(name):
    k = 3
    method = {
        "identity": lambda: mtl_optax.identity(),
        "mean": lambda: mtl_optax.mean(),
        "mgda_ub": lambda: mgda_ub(num_tasks=k),
        "mgda_ub_loss+": lambda: mgda_ub("loss+", batch_axes=0),
        "imtl_g": lambda: mtl_optax.imtl_g(),
        "nsgd": lambda: mtl_optax.nsgd(update_at=0, num_tasks=k),
        "pcgrad": lambda: mtl_optax.pcgrad(key=3),
        "graddrop": lambda: mtl_optax.graddrop(key=5, batch_axes=0),
    }[name]
    enc, heads, x, y = _problem(k)
    rg = rep_grad(method(), _encoder, _heads)
    losses, grads, state = jax.jit(rg.step)(rg.init(enc, x, y), enc, heads, x, y)
    ref_losses, ref_enc, ref_heads, ref_state = _direct(method(), enc, heads, x, y)
    _close(losses, ref_losses)
    _close(grads["encoder"], ref_enc)
    _close(grads["heads"], ref_heads)
    assert jax.tree_util.tree_structure(state.method) == jax.tree_util.tree_structure(ref_state)


def test_identity_and_mean_are_the_gradients_of_the_sum_and_mean_of_the_losses():
    """Property: a linear method's encoder gradient is that of the weighted loss sum."""
    enc, heads, x, y = _problem(4, seed=1)

    def total(enc, heads, weights):
        return jnp.sum(weights * _heads(heads, _encoder(enc, x), x, y))

    for method, weights in ((mtl_optax.identity(), 1.0), (mtl_optax.mean(), 0.25)):
        rg = rep_grad(method, _encoder, _heads)
        _, grads, _ = rg.step(rg.init(enc), enc, heads, x, y)
        _close(grads["encoder"], jax.grad(total)(enc, heads, weights))
        # The heads always get the gradient of the plain sum (LibMTL's rep_grad=True).
        _close(grads["heads"], jax.grad(total, argnums=1)(enc, heads, 1.0))


def test_sum_norm_rescale_gives_the_norm_of_the_summed_representation_gradient():
    """Property: with an identity encoder the encoder gradient is the combination itself;
    sum_norm makes its norm that of sum_k dL_k/dz and keeps its direction."""
    k = 3
    _, heads, x, y = _problem(k, seed=2)
    z0 = jnp.asarray(np.random.default_rng(3).standard_normal((B, D)), jnp.float32)

    def identity_encoder(z, *batch):
        del batch
        return z

    rep = jax.jacrev(_heads, argnums=1)(heads, z0, x, y)
    plain = jnp.linalg.norm(rep.sum(0))
    for method in (mtl_optax.mean(), mgda_ub(), mtl_optax.constant([3.0, 0.5, 1.0])):
        rg = rep_grad(method, identity_encoder, _heads, rescale="sum_norm")
        _, grads, _ = rg.step(rg.init(z0), z0, heads, x, y)
        out = grads["encoder"]
        np.testing.assert_allclose(jnp.linalg.norm(out), plain, rtol=1e-5)
        direction, _ = method.update(rep, method.init(z0), z0, value=_heads(heads, z0, x, y))
        cos = jnp.vdot(out, direction) / (jnp.linalg.norm(out) * jnp.linalg.norm(direction))
        np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
    # mean vs sum: a positive global scale has no effect under sum_norm.
    outs = []
    for method in (mtl_optax.mean(), mtl_optax.sum()):
        rg = rep_grad(method, identity_encoder, _heads, rescale="sum_norm")
        outs.append(rg.step(rg.init(z0), z0, heads, x, y)[1]["encoder"])
    _close(outs[0], outs[1], rtol=1e-6)


def test_sum_norm_rescale_of_a_zero_combination_is_zero_not_nan():
    """Opposite tasks: the mean of the representation gradients is exactly 0; the
    1e-10 floor keeps the result 0 (no 0/0)."""

    def heads(h, z):
        s = jnp.sum(h * z)
        return jnp.stack([s, -s])

    z0 = jnp.ones((2, 3))
    rg = rep_grad(mtl_optax.mean(), lambda z: z, heads, rescale="sum_norm")
    _, grads, _ = jax.jit(rg.step)(rg.init(z0), z0, jnp.ones((2, 3)))
    assert np.all(np.asarray(grads["encoder"]) == 0.0)


def test_pytree_representation_and_has_aux():
    k = 2
    enc, heads, x, y = _problem(k, seed=4)

    def encoder(p, x, y):
        del y
        z = _encoder(p, x)
        return {"a": z[:, :2], "b": z[:, 2:]}

    def heads_fn(h, z, x, y):
        zz = jnp.concatenate([z["a"], z["b"]], axis=1)
        losses = _heads(h, zz, x, y)
        return losses, {"sum": jnp.sum(losses)}

    rg = rep_grad(mgda_ub(batch_axes=0), encoder, heads_fn, has_aux=True)
    (losses, aux), grads, _ = jax.jit(rg.step)(rg.init(enc, x, y), enc, heads, x, y)
    np.testing.assert_allclose(aux["sum"], jnp.sum(losses), rtol=1e-6)
    # Same as the array representation: the method sees the same Gramian and combination.
    rg_arr = rep_grad(mgda_ub(batch_axes=0), _encoder, _heads)
    _, ref, _ = rg_arr.step(rg_arr.init(enc), enc, heads, x, y)
    _close(grads, ref)


def test_state_advances_and_jit_matches_eager():
    k = 3
    enc, heads, x, y = _problem(k, seed=5)
    rg = rep_grad(mtl_optax.graddrop(key=0, batch_axes=0), _encoder, _heads)
    state = rg.init(enc)
    eager = rg.step(state, enc, heads, x, y)
    jitted = jax.jit(rg.step)(state, enc, heads, x, y)
    _close(eager[1], jitted[1], rtol=1e-6)
    k0 = jax.random.key_data(state.method.key)
    k1 = jax.random.key_data(jitted[2].method.key)
    assert not np.array_equal(np.asarray(k0), np.asarray(k1))


def test_init_gives_the_method_a_representation_shaped_template():
    """m_conflict_free's state takes the parameters' shapes: here, z's [B, D]."""
    k = 2
    enc, heads, x, y = _problem(k, seed=6)
    method = mtl_optax.m_conflict_free(num_tasks=k)
    rg = rep_grad(method, _encoder, _heads)
    state = rg.init(enc, x, y)
    shapes = {leaf.shape for leaf in jax.tree_util.tree_leaves(state.method)}
    assert (k, B, D) in shapes or (B, D) in shapes, shapes
    _, grads, _ = jax.jit(rg.step)(state, enc, heads, x, y)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
    with pytest.raises(ValueError, match="params"):
        rg.init(enc)  # without an example batch m_conflict_free has no shapes


def test_grads_feed_an_optax_optimizer_and_training_reduces_every_loss():
    k = 2
    enc, heads, x, y = _problem(k, seed=7)
    rg = rep_grad(mgda_ub("l2", num_tasks=k), _encoder, _heads)
    params = {"encoder": enc, "heads": heads}
    opt = optax.adam(1e-2)
    opt_state, state = opt.init(params), rg.init(enc)

    @jax.jit
    def train_step(params, opt_state, state):
        losses, grads, state = rg.step(state, params["encoder"], params["heads"], x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, losses

    first = None
    for _ in range(100):
        params, opt_state, state, losses = train_step(params, opt_state, state)
        first = losses if first is None else first
    assert np.all(np.asarray(losses) < np.asarray(first))


# ---------------------------------------------------------------------------
# Cost: one encoder backward pass, whatever K.
# ---------------------------------------------------------------------------


def _counting_encoder(counter):
    @jax.custom_vjp
    def enc(w, x):
        return jnp.tanh(x @ w)

    def fwd(w, x):
        z = jnp.tanh(x @ w)
        return z, (w, x, z)

    def bwd(res, ct):
        counter["bwd"] += 1  # runs once per traced backward pass of the encoder
        w, x, z = res
        dpre = ct * (1 - z**2)
        return x.T @ dpre, dpre @ w.T

    enc.defvjp(fwd, bwd)
    return lambda w, x, y: enc(w, x)


@pytest.mark.parametrize("k", [1, 5])
def test_one_encoder_backward_pass_for_k_tasks(k):
    counter = {"bwd": 0}
    encoder = _counting_encoder(counter)
    _, heads, x, y = _problem(k, seed=8)
    w = jnp.asarray(np.random.default_rng(9).standard_normal((DIN, D)), jnp.float32)
    rg = rep_grad(mgda_ub(num_tasks=k), encoder, _heads)
    jax.make_jaxpr(rg.step)(rg.init(w), w, heads, x, y)
    assert counter["bwd"] == 1


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _encoder_weight_contractions(jaxpr):
    """dot_generals whose operands have the shapes of x [B, DIN] and dz [B, D]."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes = sorted(tuple(v.aval.shape) for v in eqn.invars)
            count += shapes == sorted([(B, DIN), (B, D)])
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                count += _encoder_weight_contractions(sub)
    return count


def test_encoder_weight_gradient_contraction_appears_once_whatever_k():
    """In the step's jaxpr the encoder's weight-gradient contraction x^T dz (shapes
    [B, DIN] and [B, D], not batched over K) appears exactly once for K = 2 and 6."""
    counts = []
    for k in (2, 6):
        enc, heads, x, y = _problem(k, seed=10)
        rg = rep_grad(mgda_ub(num_tasks=k), _encoder, _heads)
        jaxpr = jax.make_jaxpr(rg.step)(rg.init(enc), enc, heads, x, y).jaxpr
        counts.append(_encoder_weight_contractions(jaxpr))
    assert counts == [1, 1], counts
    # The same count on task_grads over the encoder: K encoder backward passes. On CPU
    # they are K unbatched contractions; elsewhere one contraction batched over K
    # ([K, B, D] operand), so the unbatched one is absent.
    enc, heads, x, y = _problem(6, seed=10)
    jaxpr = jax.make_jaxpr(
        lambda p: mtl_optax.task_grads(lambda p: _heads(heads, _encoder(p, x), x, y), p)
    )(enc).jaxpr
    assert _encoder_weight_contractions(jaxpr) == (6 if jax.default_backend() == "cpu" else 0)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_errors_name_the_problem():
    enc, heads, x, y = _problem(2)
    with pytest.raises(ValueError, match="rescale"):
        rep_grad(mtl_optax.mean(), _encoder, _heads, rescale="max")
    rg = rep_grad(mtl_optax.mean(), _encoder, lambda h, z, x, y: jnp.sum(z))
    with pytest.raises(ValueError, match=r"shape \(K,\); it returned shape \(\)"):
        rg.step(rg.init(enc), enc, heads, x, y)
    per_task = mtl_optax.mean().per_task  # returns [K, B, D]: not a combination
    rg = rep_grad(per_task, _encoder, _heads)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 6\); expected the representation's"):
        rg.step(rg.init(enc), enc, heads, x, y)
    rg = rep_grad(mtl_optax.mean(), _encoder, _heads)
    with pytest.raises(ValueError, match="RepGradState"):
        rg.step(None, enc, heads, x, y)
    rg = rep_grad(mtl_optax.mean(num_tasks=3), _encoder, _heads)
    with pytest.raises(ValueError, match="num_tasks=3"):
        rg.step(rg.init(enc), enc, heads, x, y)


# ---------------------------------------------------------------------------
# mgda_ub.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_ub_is_mgda_weights_on_raw_gradients(normalization):
    rng = np.random.default_rng(11)
    g = {"z": jnp.asarray(rng.standard_normal((3, 4, 5)))}
    value = jnp.asarray([0.5, 1.0, 2.0])
    ref = mtl_optax.mgda(normalization, normalize_update=False)
    u_ref, _ = ref.update(g, ref.init(None), value=value)
    tx = mgda_ub(normalization)
    u, s = tx.update(g, tx.init(None), value=value)
    _close(u, u_ref, rtol=1e-6)
    np.testing.assert_array_equal(s.weights, s.simplex_weights)  # raw weights = lambda
    assert tx.weighting.name == "mgda_ub"
    assert mtl_optax.get("mgda_ub", normalization=normalization).weighting.name == "mgda_ub"


@pytest.mark.parametrize("normalization", ["none", "l2", "loss+"])
def test_mgda_ub_batch_axes_uses_the_gramian_of_the_batch_summed_gradients(normalization):
    """Property: the weights are mgda's on sum_b g_k,b, applied to the full g_k."""
    rng = np.random.default_rng(12)
    g = {"z": jnp.asarray(rng.standard_normal((3, 4, 5)))}
    value = jnp.asarray([0.5, 1.0, 2.0])
    ref = mtl_optax.mgda(normalization, normalize_update=False)
    _, s_ref = ref.update({"z": g["z"].sum(1)}, ref.init(None), value=value)
    tx = mgda_ub(normalization, batch_axes=0)
    u, s = tx.update(g, tx.init(None), value=value)
    np.testing.assert_allclose(s.weights, s_ref.weights, rtol=1e-6)
    _close(u, mtl_optax.combine(g, s.weights), rtol=1e-6)
    per_task, _ = tx.per_task.update(g, tx.init(None), value=value)
    _close(per_task["z"].sum(0), u["z"], rtol=1e-6)
    # Negative axes count from the end of each leaf's parameter shape.
    u2, _ = mgda_ub(normalization, batch_axes=-2).update(g, tx.init(None), value=value)
    _close(u2, u, rtol=0)


def test_mgda_ub_errors():
    g = {"z": jnp.ones((2, 4, 5))}
    with pytest.raises(ValueError, match="normalization"):
        mgda_ub("l1")
    with pytest.raises(ValueError, match="batch_axes"):
        mgda_ub(batch_axes="0")
    with pytest.raises(ValueError, match=r"axis 2, but leaf \['z'\] has shape \(2, 4, 5\)"):
        mgda_ub(batch_axes=2).update(g, None)
    for axes in (None, 0):
        with pytest.raises(ValueError, match="value="):
            mgda_ub("loss", batch_axes=axes).update(g, None)


def test_docstring_examples_run():
    for module in (representation, _mgda_ub):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_flax_nnx_encoder_and_heads_through_split_and_merge():
    """NNX modules plug in through ``nnx.split`` / ``nnx.merge`` (pure functions of their state)."""
    nnx = pytest.importorskip("flax.nnx")
    encoder = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
    heads = nnx.Linear(5, 2, rngs=nnx.Rngs(1))  # column k is task k's head
    enc_def, enc_params = nnx.split(encoder)
    heads_def, heads_params = nnx.split(heads)
    x = jax.random.normal(jax.random.key(2), (8, 3))
    y = jax.random.normal(jax.random.key(3), (8, 2))

    def encoder_fn(p, x, y):
        del y
        return jnp.tanh(nnx.merge(enc_def, p)(x))

    def heads_fn(p, z, x, y):
        del x
        return jnp.mean((nnx.merge(heads_def, p)(z) - y) ** 2, axis=0)

    rg = mtl_optax.rep_grad(mtl_optax.mean(), encoder_fn, heads_fn)
    losses, grads, _ = jax.jit(rg.step)(rg.init(enc_params, x, y), enc_params, heads_params, x, y)

    def total(enc_p, heads_p, reduce):
        return reduce(heads_fn(heads_p, encoder_fn(enc_p, x, y), x, y))

    # mean of the representation gradients: the encoder gets grad of the mean loss,
    # the heads get grad of the summed loss.
    expected = jax.grad(total)(enc_params, heads_params, jnp.mean)
    chex.assert_trees_all_close(grads["encoder"], expected, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(
        grads["heads"],
        jax.grad(total, argnums=1)(enc_params, heads_params, jnp.sum),
        rtol=1e-5,
        atol=1e-7,
    )
    nnx.update(encoder, jax.tree.map(lambda p, g: p - 0.1 * g, enc_params, grads["encoder"]))
    assert losses.shape == (2,)
