"""graddrop: its definition, per-task form, randomness, batch axes, state and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax._graddrop import GradDropState, apply_graddrop, graddrop_uniforms

PARAMS = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5,))}


def _grads(seed=0, k=3):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"a": jax.random.normal(keys[0], (k, 4, 3)), "b": jax.random.normal(keys[1], (k, 5))}


def _expected(grads, draws, leak, f=lambda p: p):
    """Algorithm 1 of the paper on one leaf in numpy (no batch axes)."""
    g = np.asarray(grads, np.float64)
    total, mass = g.sum(0), np.abs(g).sum(0)
    purity = f(0.5 * (1 + np.divide(total, mass, out=np.zeros_like(total), where=mass > 0)))
    keep = ((purity > draws) & (g > 0)) | ((purity < draws) & (g < 0))
    leak = np.broadcast_to(np.asarray(leak, np.float64).reshape(-1, *([1] * (g.ndim - 1))), g.shape)
    return np.where(keep, 1.0, leak) * g


def test_doc_example_agreeing_coordinates_are_kept():
    tx = mtl_optax.get("graddrop", key=0)
    g = {"w": jnp.array([[1.0, 2.0, -1.0], [3.0, -2.0, -1.0]])}
    u, _ = tx.update(g, tx.init({"w": jnp.zeros(3)}))
    assert float(u["w"][0]) == 4.0 and float(u["w"][2]) == -2.0
    assert float(u["w"][1]) in (2.0, -2.0)


@pytest.mark.parametrize("leak", [0.0, 0.25, [0.0, 0.5, 1.0]])
def test_update_is_the_papers_masked_sum(leak):
    grads = _grads(1)
    tx = mtl_optax.get("graddrop", leakage=leak, key=3)
    state = tx.init(PARAMS)
    draws = tx.uniforms(grads, state)
    update, _ = jax.jit(tx.update)(grads, state, PARAMS)
    per_task, _ = jax.jit(tx.per_task.update)(grads, state, PARAMS)
    for name in grads:
        expected = _expected(grads[name], np.asarray(draws[name]), leak)
        np.testing.assert_allclose(np.asarray(per_task[name]), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(update[name]), expected.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 8, 9, 20])  # one fused pass; chunks of 8 plus a remainder
@pytest.mark.parametrize("leak_kind", ["zero", "scalar", "per_task"])
def test_summed_update_equals_the_masked_sum_for_any_k(k, leak_kind, x64):
    leak = {"zero": 0.0, "scalar": 0.3, "per_task": list(np.linspace(0.0, 0.9, k))}[leak_kind]
    g = jax.random.normal(jax.random.key(k), (k, 6, 50), jnp.float64)
    g = g.at[:, 0, :].set(0.0)  # zero statistic: purity 1/2
    g = g.at[:, 1, :].set(jnp.abs(g[:, 1, :]))  # every task positive: purity 1
    draws = jax.random.uniform(jax.random.key(7), (6, 50), jnp.float64)
    draws = draws.at[0, :].set(0.5)  # ties: f(P) == U drops every sign
    f = lambda p: jnp.minimum(p, 0.5)
    for fn in (None, f):
        summed = apply_graddrop({"w": g}, {"w": draws}, leakage=leak, f=fn)["w"]
        per_task = apply_graddrop({"w": g}, {"w": draws}, leakage=leak, f=fn, per_task=True)
        expected = _expected(g, np.asarray(draws), leak, f=(lambda p: p) if fn is None else f)
        np.testing.assert_allclose(np.asarray(per_task["w"]), expected, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(np.asarray(summed), expected.sum(0), rtol=1e-12, atol=1e-14)
        if leak_kind == "zero":  # the same terms in the same order: bit for bit
            np.testing.assert_array_equal(np.asarray(summed), np.asarray(per_task["w"]).sum(0))


def test_without_leakage_every_coordinate_keeps_one_sign():
    grads = _grads(2, k=5)
    tx = mtl_optax.get("graddrop", key=1)
    per_task, _ = tx.per_task.update(grads, tx.init(PARAMS))
    for name in grads:
        out, g = np.asarray(per_task[name]), np.asarray(grads[name])
        kept = out != 0
        np.testing.assert_array_equal(out[kept], g[kept])  # masks are exactly 0 or 1
        signs = np.sign(np.where(kept, g, 0.0))
        assert not np.any((signs > 0).any(0) & (signs < 0).any(0))
        # At least one task survives wherever the tasks do not all vanish.
        assert np.all(kept.any(0))


def test_leakage_one_is_the_sum():
    grads = _grads(3)
    tx = mtl_optax.get("graddrop", leakage=1.0)
    update, _ = tx.update(grads, tx.init(PARAMS))
    chex.assert_trees_all_close(update, jax.tree.map(lambda x: x.sum(0), grads), rtol=1e-6)


def test_k1_is_the_gradient():
    g = jax.tree.map(lambda x: x[:1], _grads(4))
    tx = mtl_optax.get("graddrop", key=2)
    update, _ = tx.update(g, tx.init(PARAMS))
    chex.assert_trees_all_equal(update, jax.tree.map(lambda x: x[0], g))


def test_zero_coordinates_give_zero_and_finite_gradients():
    g = {"w": jnp.array([[0.0, 1.0, 0.0], [0.0, -2.0, 0.0]])}
    tx = mtl_optax.get("graddrop", leakage=0.3, key=0)
    update, _ = tx.update(g, tx.init(None))
    assert float(update["w"][0]) == 0.0 and float(update["w"][2]) == 0.0

    def loss(g):
        return jnp.sum(tx.update(g, tx.init(None))[0]["w"] ** 2)

    grad = jax.grad(loss)(g)
    assert bool(jnp.all(jnp.isfinite(grad["w"])))


def test_per_task_form_sums_to_the_update_and_keeps_dtypes():
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(5))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    tx = mtl_optax.get("graddrop", leakage=0.2, key=9)
    state = tx.init(params)
    update, s1 = tx.update(grads, state, params)
    per_task, s2 = tx.per_task.update(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(update, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(per_task, grads)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32).sum(0), per_task),
        jax.tree.map(lambda x: x.astype(jnp.float32), update),
        rtol=2e-2,
        atol=2e-2,
    )
    chex.assert_trees_all_equal(s1, s2)
    assert isinstance(tx.per_task, mtl_optax.base.PerTaskTransformation)
    assert tx.per_task.name == "graddrop"


def test_injected_uniforms_replay_the_draw_and_the_key_still_advances():
    grads = _grads(6)
    tx = mtl_optax.get("graddrop", leakage=0.1, key=4)
    state = tx.init(PARAMS)
    drawn, s_drawn = tx.update(grads, state)
    injected, s_injected = tx.update(grads, state, graddrop_uniforms=tx.uniforms(grads, state))
    chex.assert_trees_all_equal(drawn, injected)
    chex.assert_trees_all_equal(s_drawn, s_injected)
    # Other draws give other masks; the core function gives the same numbers.
    ones = jax.tree.map(lambda x: jnp.full(x.shape[1:], 0.999), grads)
    other, _ = tx.update(grads, state, graddrop_uniforms=ones)
    assert not np.allclose(np.asarray(other["a"]), np.asarray(drawn["a"]))
    chex.assert_trees_all_equal(other, apply_graddrop(grads, ones, leakage=0.1))
    # The draw is graddrop_uniforms at the draw key split from the state.
    draw_key = jax.random.split(state.key)[1]
    chex.assert_trees_all_equal(tx.uniforms(grads, state), graddrop_uniforms(draw_key, grads))


def test_uniforms_broadcast_a_scalar():
    grads = {"w": jnp.array([[1.0, -2.0], [-1.0, 0.5]])}  # purities 0.5 and 0.2
    tx = mtl_optax.get("graddrop")
    u, _ = tx.update(grads, tx.init(None), graddrop_uniforms={"w": jnp.float32(0.3)})
    # 0.5 > 0.3 keeps the positive gradient; 0.2 < 0.3 keeps the negative one.
    np.testing.assert_array_equal(np.asarray(u["w"]), [1.0, -2.0])


def test_same_key_same_sequence_different_key_different():
    grads = _grads(7, k=4)

    def run(key, n=4):
        tx = mtl_optax.get("graddrop", key=key)
        state, out = tx.init(PARAMS), []
        for _ in range(n):
            u, state = tx.update(grads, state)
            out.append(np.asarray(u["a"]))
        return np.stack(out)

    first = run(11)
    np.testing.assert_array_equal(first, run(11))
    np.testing.assert_array_equal(first, run(jax.random.key(11)))
    assert not np.array_equal(first, run(12))
    assert len({row.tobytes() for row in first}) == 4  # a fresh draw every step


def test_batch_axes_sum_the_statistic_and_share_the_mask():
    # Task 0 sums to +2 over the batch (one entry negative), task 1 to -2: purity 1/2.
    g = {"z": jnp.array([[[3.0], [-1.0]], [[-1.0], [-1.0]]])}  # [K=2, B=2, D=1]
    tx = mtl_optax.get("graddrop", batch_axes=0)
    state = tx.init(None)
    assert tx.uniforms(g, state)["z"].shape == (1, 1)
    low, _ = tx.per_task.update(g, state, graddrop_uniforms={"z": jnp.array([[0.3]])})
    np.testing.assert_array_equal(np.asarray(low["z"]), [[[3.0], [-1.0]], [[0.0], [0.0]]])
    high, _ = tx.per_task.update(g, state, graddrop_uniforms={"z": jnp.array([[0.7]])})
    np.testing.assert_array_equal(np.asarray(high["z"]), [[[0.0], [0.0]], [[-1.0], [-1.0]]])
    # Negative axes count from the end of the parameter's shape.
    neg = mtl_optax.get("graddrop", batch_axes=-2)
    same, _ = neg.per_task.update(g, state, graddrop_uniforms={"z": jnp.array([[0.3]])})
    chex.assert_trees_all_equal(same, low)


def test_batch_axes_mask_is_constant_along_the_batch():
    g = {"z": jax.random.normal(jax.random.key(0), (3, 8, 5, 4))}
    tx = mtl_optax.get("graddrop", batch_axes=(0, 2), key=1)
    out, _ = tx.per_task.update(g, tx.init(None))
    ratio = np.asarray(out["z"]) / np.asarray(g["z"])
    assert set(np.unique(ratio)) <= {0.0, 1.0}
    np.testing.assert_array_equal(ratio, np.broadcast_to(ratio[:, :1, :, :1], ratio.shape))
    assert tx.uniforms(g, tx.init(None))["z"].shape == (1, 5, 1)


def test_f_is_applied_to_the_purity():
    g = {"w": jnp.array([[1.0, 1.0], [2.0, -1.0]])}
    draws = {"w": jnp.array([0.7, 0.7])}
    plain = mtl_optax.get("graddrop")
    u, _ = plain.update(g, plain.init(None), graddrop_uniforms=draws)
    np.testing.assert_array_equal(np.asarray(u["w"]), [3.0, -1.0])  # P = 1 and 1/2
    # vambn's clamped purity min(P, 1/2) drops the agreeing positive coordinate.
    clamped = mtl_optax.get("graddrop", f=lambda p: jnp.minimum(p, 0.5))
    v, _ = clamped.update(g, clamped.init(None), graddrop_uniforms=draws)
    np.testing.assert_array_equal(np.asarray(v["w"]), [0.0, -1.0])


def test_expectation_matches_the_formula():
    """Mean of 4000 updates vs sum_k (l_k + (1 - l_k) p_k) g_k, within 5 standard errors."""
    k, n = 3, 4000
    g = jax.random.normal(jax.random.key(3), (k, 40))
    g = g.at[:, :3].set(jnp.abs(g[:, :3]))  # some coordinates where every task agrees
    leak = np.array([0.0, 0.2, 0.5])
    tx = mtl_optax.get("graddrop", leakage=leak, key=8, num_tasks=k)

    @jax.jit
    def run(state):
        def step(state, _):
            out, state = tx.per_task.update({"x": g}, state)
            return state, out["x"]

        return jax.lax.scan(step, state, None, length=n)[1]

    outs = np.asarray(run(tx.init(None)), np.float64)
    gn = np.asarray(g, np.float64)
    purity = 0.5 * (1 + gn.sum(0) / np.abs(gn).sum(0))
    p = np.where(gn > 0, purity, 1 - purity)
    lk = leak[:, None]
    expected = (lk + (1 - lk) * p) * gn
    se = np.sqrt(p * (1 - p) / n) * (1 - lk) * np.abs(gn)
    err = np.abs(outs.mean(0) - expected)
    assert np.all(err[se == 0] < 1e-5)
    assert np.all(err[se > 0] < 5 * se[se > 0])
    # The test has power: the law with purities shifted by 0.05 is rejected.
    shifted = (lk + (1 - lk) * np.clip(p + 0.05, 0, 1)) * gn
    assert np.any(np.abs(outs.mean(0) - shifted)[se > 0] > 5 * se[se > 0])


def test_jits_in_a_chain_with_adam_and_scans_over_steps():
    opt = optax.chain(mtl_optax.get("graddrop", leakage=0.1, num_tasks=3), optax.adam(1e-2))

    def step(carry, i):
        params, state = carry
        u, state = opt.update(_grads(0), state, params)
        return (optax.apply_updates(params, u), state), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(3)))(
        (PARAMS, opt.init(PARAMS))
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(params, PARAMS)
    assert not np.allclose(np.asarray(params["a"]), 0.0)
    assert isinstance(state[0], GradDropState)


def test_float64_leaves_draw_float64(x64):
    g = {"w": jnp.ones((2, 3), jnp.float64)}
    tx = mtl_optax.get("graddrop")
    assert tx.uniforms(g, tx.init(None))["w"].dtype == jnp.float64
    u, _ = tx.update(g, tx.init(None))
    assert u["w"].dtype == jnp.float64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"leakage": 1.5}, r"leakage must lie in \[0, 1\]"),
        ({"leakage": -0.1}, r"leakage must lie in \[0, 1\]"),
        ({"leakage": float("nan")}, r"leakage must lie in \[0, 1\]"),
        ({"leakage": [[0.1]]}, "scalar or a vector"),
        ({"leakage": [0.1, 0.2], "num_tasks": 3}, "2 per-task leakage values"),
        ({"batch_axes": "0"}, "batch_axes must be an int"),
    ],
)
def test_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mtl_optax.get("graddrop", **kwargs)


def test_update_errors_name_the_problem():
    grads = _grads(0)
    tx = mtl_optax.get("graddrop", leakage=[0.1, 0.2])
    with pytest.raises(ValueError, match="num_tasks=2"):
        tx.update(grads, tx.init(PARAMS))
    tx = mtl_optax.get("graddrop", batch_axes=1)
    with pytest.raises(ValueError, match=r"leaf \['b'\].*rank 1"):
        tx.update(grads, tx.init(PARAMS))
    tx = mtl_optax.get("graddrop", batch_axes=(0, -2))
    with pytest.raises(ValueError, match="repeats an axis"):
        tx.update({"a": grads["a"]}, tx.init(None))
    tx = mtl_optax.get("graddrop")
    with pytest.raises(ValueError, match="tree structure"):
        tx.update(grads, tx.init(PARAMS), graddrop_uniforms={"a": jnp.zeros((4, 3))})
    bad = {"a": jnp.zeros((4, 2)), "b": jnp.zeros(5)}
    with pytest.raises(ValueError, match=r"leaf \['a'\] have shape \(4, 2\)"):
        tx.update(grads, tx.init(PARAMS), graddrop_uniforms=bad)
    with pytest.raises(ValueError, match="task axis is missing"):
        tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="K=3"):
        apply_graddrop(grads, tx.uniforms(grads, tx.init(PARAMS)), leakage=[0.1, 0.2])


def test_registered_and_has_no_required_arguments():
    assert "graddrop" in mtl_optax.available()
    tx = mtl_optax.get("graddrop")
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert callable(tx.per_task.update) and callable(tx.uniforms)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_uniforms_are_uniform_on_the_24_bit_grid_and_leaves_independent(impl):
    n = 200_001  # odd: Threefry-2x32 pairs the counters
    grads = {"a": jnp.zeros((2, n)), "b": jnp.zeros((2, n))}
    draws = graddrop_uniforms(jax.random.key(5, impl=impl), grads)
    a, b = np.asarray(draws["a"], np.float64), np.asarray(draws["b"], np.float64)
    assert a.shape == (n,) and a.dtype == np.float64 and draws["a"].dtype == jnp.float32
    assert a.min() >= 0.0 and a.max() < 1.0
    np.testing.assert_array_equal(a * 2**24, np.floor(a * 2**24))  # the 24-bit grid
    # Mean 1/2 and variance 1/12 within 5 standard errors; 20 equal bins within
    # 5 standard deviations of their binomial counts; uncorrelated leaves and neighbours.
    assert abs(a.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(a.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    counts = np.histogram(a, bins=20, range=(0.0, 1.0))[0]
    assert np.all(np.abs(counts - n / 20) < 5 * np.sqrt(n / 20 * 0.95))
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(n)
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 5 / np.sqrt(n)
    half = n // 2  # Threefry-2x32 hashes counters i and i + n/2 together
    assert abs(np.corrcoef(a[:half], a[half : 2 * half])[0, 1]) < 5 / np.sqrt(half)


def test_activation_sign_flips_the_statistic_where_the_activation_is_negative(x64):
    g = jax.random.normal(jax.random.key(0), (3, 4, 6), jnp.float64)
    a = jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)
    draws = jax.random.uniform(jax.random.key(2), (1, 6), jnp.float64)
    tx = mtl_optax.graddrop(leakage=0.1, batch_axes=0, activation_sign=True)
    out, _ = tx.per_task.update({"z": g}, tx.init(None), {"z": a}, graddrop_uniforms={"z": draws})
    # The paper's statistic S_k = sum_b sign(A) g_k decides the masks; they multiply g_k.
    stat = np.sum(np.sign(np.asarray(a)) * np.asarray(g), axis=1)  # [K, 6]
    mask = _expected(stat, np.asarray(draws)[0], 0.1) / np.where(stat == 0, 1.0, stat)
    np.testing.assert_allclose(np.asarray(out["z"]), mask[:, None, :] * np.asarray(g), rtol=1e-12)
    summed, _ = tx.update({"z": g}, tx.init(None), {"z": a}, graddrop_uniforms={"z": draws})
    np.testing.assert_allclose(np.asarray(summed["z"]), np.asarray(out["z"]).sum(0), rtol=1e-12)


def test_activation_sign_needs_the_activation_as_params():
    tx = mtl_optax.graddrop(activation_sign=True)
    g = {"z": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="activation_sign=True needs params="):
        tx.update(g, tx.init(None))
    with pytest.raises(ValueError, match=r"leaf \['z'\] has shape \(2, 3\); expected \(2, 4\)"):
        tx.update(g, tx.init(None), {"z": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"activation \(params\) of leaf \['z'\] has shape \(4,\)"):
        apply_graddrop(g, {"z": jnp.zeros(3)}, activations={"z": jnp.ones(4)})
