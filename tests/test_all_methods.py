"""Every registered method on the edge cases of the issue tracker.

Properties checked for every method in ``mtl_optax.available()`` (methods added
later are picked up automatically):

* the update is finite, with the parameters' structure, shapes and dtypes, on:
  K = 1; K = 2 with identical, opposite and orthogonal gradients; collinear
  gradients; one all-zero task; magnitudes 1e-8 against 1e4; float32 and
  bfloat16 leaves; and a large K = 40, P = 1e5 problem;
* it jits inside ``optax.chain(method, optax.adam)`` and gives the same result
  with and without ``jax.jit``;
* ``jax.vmap`` over a batch of problems gives each problem's own update and
  state; a parameter leaf with no entries changes no other leaf's update;
* its direction does not change for task gradients of norms up to 1.5e19.

Method-specific numbers (parity with the references, guarantees) are tested in
each method's own test module.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

from .methods import hparams, min_tasks, raw, without_solver_diagnostics

P_SHAPES = {"w": (6, 5), "b": (5,)}  # P = 35


def _params(dtype=jnp.float32):
    return {k: jnp.zeros(s, dtype) for k, s in P_SHAPES.items()}


def _from_matrix(jac, dtype=jnp.float32):
    """Splits a (K, 35) matrix into the two-leaf pytree of P_SHAPES."""
    jac = jnp.asarray(jac, dtype)
    k = jac.shape[0]
    return {"b": jac[:, :5].reshape(k, 5), "w": jac[:, 5:].reshape(k, 6, 5)}


def _edge_cases():
    rng = np.random.default_rng(0)
    g, h = rng.standard_normal(35), rng.standard_normal(35)
    h_orth = h - (h @ g) / (g @ g) * g
    rand = rng.standard_normal((3, 35))
    zero_one = rand.copy()
    zero_one[1] = 0.0
    mag = rng.standard_normal((3, 35))
    mag[0] *= 1e-8
    mag[1] *= 1e4
    return {
        "K1": rng.standard_normal((1, 35)),
        "K2_identical": np.stack([g, g]),
        "K2_opposite": np.stack([g, -g]),
        "K2_orthogonal": np.stack([g, h_orth]),
        "collinear": np.stack([g, 2.5 * g, -0.5 * g]),
        "zero_task": zero_one,
        "magnitudes_1e-8_1e4": mag,
        "random_K5": rng.standard_normal((5, 35)),
    }


EDGE = _edge_cases()


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def _flat(tree):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)]
    )


def _cosine(a, b):
    """Cosine of two pytrees as flat float64 vectors."""
    a, b = _flat(a), _flat(b)
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@functools.cache
def _jitted(name, k):
    """Method ``name`` for ``k`` tasks and its jitted update, shared by the cases
    of the same ``K`` (one compilation each)."""
    tx = mtl_optax.get(name, **hparams(name, k))
    return tx, jax.jit(tx.update)


@pytest.mark.parametrize("case", EDGE)
@pytest.mark.parametrize("name", mtl_optax.available())
def test_edge_case_update_is_finite_and_typed(name, case):
    jac = EDGE[case]
    k = jac.shape[0]
    if k < min_tasks(name):  # krum: a clear error, as in TorchJD
        with pytest.raises(ValueError, match=f"at least .*found K={k}"):
            mtl_optax.get(name, **hparams(name, k))
        return
    tx, update_fn = _jitted(name, k)
    grads, params = _from_matrix(jac), _params()
    value = jnp.linspace(0.5, 2.0, k)
    state = tx.init(params)
    for _ in range(2):  # two steps: stateful methods use their state the second time
        update, state = update_fn(grads, state, params, value=value)
        chex.assert_trees_all_equal_shapes_and_dtypes(update, params)
        assert _finite(update), (name, case, update)


@pytest.mark.parametrize("name", mtl_optax.available())
def test_bfloat16_leaves(name):
    jac = EDGE["random_K5"]
    tx = mtl_optax.get(name, **hparams(name, 5))
    params = _params(jnp.bfloat16)
    update, _ = jax.jit(tx.update)(
        _from_matrix(jac, jnp.bfloat16), tx.init(params), params, value=jnp.ones(5)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(update, params)
    assert _finite(update)
    tx32, update_fn = _jitted(name, 5)
    ref, _ = update_fn(_from_matrix(jac), tx32.init(_params()), _params(), value=jnp.ones(5))
    # Same direction as the float32 update, to bfloat16 accuracy.
    if np.linalg.norm(_flat(ref)) > 0:
        cos = _cosine(update, ref)
        assert cos > 0.9, (name, cos)


@pytest.mark.parametrize("name", mtl_optax.available())
def test_large_k40_p1e5(name):
    k, p = 40, 100_000
    jac = jax.random.normal(jax.random.key(1), (k, p))
    params = {"x": jnp.zeros((p,))}
    tx = mtl_optax.get(name, **hparams(name, k))
    update, _ = jax.jit(tx.update)({"x": jac}, tx.init(params), params, value=jnp.ones(k))
    assert update["x"].shape == (p,) and _finite(update)


@pytest.mark.parametrize("name", mtl_optax.available())
def test_jit_and_eager_agree_in_a_chain_with_adam(name):
    jac = EDGE["random_K5"]
    opt = optax.chain(mtl_optax.get(name, **hparams(name, 5)), optax.adam(1e-3))
    params = _params()

    def run(update_fn):
        state, p = opt.init(params), params
        for i in range(3):
            u, state = update_fn(_from_matrix(jac * (1 + i)), state, p, value=jnp.ones(5))
            p = optax.apply_updates(p, u)
        return p

    chex.assert_trees_all_close(run(jax.jit(opt.update)), run(opt.update), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", mtl_optax.available(aliases=False))
def test_no_two_leaves_of_an_initial_state_share_a_buffer(name):
    """A jitted step that donates the state needs distinct buffers.

    XLA refuses to donate one buffer twice ("Attempt to donate the same buffer
    twice"): ``dwa``'s first ``init`` used one zeros array for three fields.
    """
    k = max(3, min_tasks(name))
    tx = mtl_optax.get(name, **hparams(name, k))
    leaves = [
        x
        for x in jax.tree_util.tree_leaves(tx.init(_params()))
        if isinstance(x, jax.Array) and x.size and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    ]
    pointers = [x.unsafe_buffer_pointer() for x in leaves]
    assert len(set(pointers)) == len(pointers), (name, [x.shape for x in leaves])


@pytest.mark.parametrize("name", ["rlw", "pcgrad", "gradvac", "graddrop"])
def test_init_survives_a_step_that_donates_the_state(name):
    """Random methods copy their key in ``init``: donating a state must not delete it."""
    tx = mtl_optax.get(name, key=3, num_tasks=2)
    params = {"w": jnp.zeros(3)}
    step = jax.jit(lambda g, s: tx.update(g, s, params)[1], donate_argnums=1)
    g = {"w": jnp.ones((2, 3))}
    step(g, tx.init(params))
    state = tx.init(params)  # the factory's key is still alive: reading it does not raise
    key = next(x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key))
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(key)), np.asarray(jax.random.key_data(jax.random.key(3)))
    )


# Methods whose weights depend on the gradients' scale by design: only the
# finiteness of their update is checked at large norms.
NOT_HOMOGENEOUS = {
    # lambda - gamma * A lambda: gamma has the units of 1 / |g|^2, as in the
    # paper and TorchJD (tests/test_modo.py checks the c^2 law).
    "modo",
}


@pytest.mark.parametrize("name", mtl_optax.available())
def test_update_direction_is_unchanged_by_task_gradients_of_norm_up_to_1_5e19(name):
    """Scaling every task gradient by c > 0 scales each method's update and keeps its direction.

    Every method but those of ``NOT_HOMOGENEOUS`` is positively homogeneous in the task gradients up to its
    small epsilons, so the direction of its update must not change for norms up
    to 1.5e19, where each squared norm (2.25e38) still fits float32 (3.4e38)
    though sums of them do not. Jitted with the scale as data, as in training:
    XLA rewrites a division by a scalar ``s`` into a product with ``1 / s``,
    which is flushed to zero for ``s > 2^126``, and the square of a mean as
    ``sum^2 / K^2``; ``mgda``, ``mgda_ub`` (cos 0.32-0.48 from norms of 1e19),
    ``sdmgrad`` (cos 0.51 from 5e18 at K = 10) and ``cagrad`` (whose
    ``trace(G) / K`` also overflowed, at 1.5e19 and K = 3) broke that way.
    """
    for k in (3, 10):
        jac = np.random.default_rng(k).standard_normal((k, 35))
        jac /= np.linalg.norm(jac, axis=1, keepdims=True)
        tx, update_fn = _jitted(name, k)  # K = 3: the program of the edge cases
        params = _params()
        value = jnp.linspace(0.5, 2.0, k)
        step = lambda g, tx=tx, f=update_fn, p=params, v=value: f(g, tx.init(p), p, value=v)[0]
        unit = step(_from_matrix(jac))
        for scale in (1e18, 5e18, 1e19, 1.5e19):
            big = step(_from_matrix(jac * scale))
            assert _finite(big), (name, k, scale)
            if name not in NOT_HOMOGENEOUS:
                assert _cosine(big, unit) > 1 - 1e-4, (name, k, scale, _cosine(big, unit))


@pytest.mark.parametrize("name", mtl_optax.available())
def test_vmap_over_a_batch_of_problems_equals_each_problem_alone(name):
    # Ensembles and per-seed sweeps vmap one train step over independent
    # problems: the solvers' while loops, conds and random draws must batch.
    # Two steps, the second from the batched states of the first.
    rng = np.random.default_rng(7)
    batch, k = 4, 3
    grads = _from_matrix(rng.standard_normal((batch * k, 35)))
    grads = jax.tree.map(lambda x: x.reshape(batch, k, *x.shape[1:]), grads)
    values = jnp.asarray(rng.uniform(0.5, 2.0, (batch, k)), jnp.float32)
    tx, update_fn = _jitted(name, k)  # K = 3: the program of the edge cases
    params = _params()
    state = tx.init(params)

    def step(g, s, v):
        return tx.update(g, s, params, value=v)

    states = jax.tree.map(lambda x: jnp.stack([x] * batch), state)
    alone = [state] * batch
    batched = jax.jit(jax.vmap(step))
    single = lambda g, s, v: update_fn(g, s, params, value=v)
    tol = _VMAP_SOLVER_TOLERANCE.get(name, {"rtol": 1e-5, "atol": 1e-6})
    for _ in range(2):
        updates, states = batched(grads, states, values)
        for i in range(batch):
            pick = lambda t, i=i: jax.tree.map(lambda x: x[i], t)
            update, alone[i] = single(pick(grads), alone[i], values[i])
            chex.assert_trees_all_close(pick(updates), update, **tol)
            chex.assert_trees_all_close(
                without_solver_diagnostics(raw(pick(states))),
                without_solver_diagnostics(raw(alone[i])),
                **tol,
            )


# CAGrad's projected-gradient solver stops at a float32 residual of 1e-5
# (relative), and the batched and the single program round differently: in one
# case of the test above the two stopped after 11 and 15 iterations, with
# dual weights 4e-6 apart. Its update and weights are compared at ten times
# the solver's tolerance, and its iteration count and last residual not at all
# (methods.without_solver_diagnostics).
_VMAP_SOLVER_TOLERANCE = {"cagrad": {"rtol": 1e-4, "atol": 1e-5}}


@pytest.mark.parametrize("name", mtl_optax.available())
def test_an_empty_leaf_beside_others_changes_nothing(name):
    # A parameter leaf with no entries (a layer of width 0) contributes
    # nothing to the Gramian or to the combination: its update is empty and
    # the other leaves' updates are those computed without it. GradDrop draws
    # one key per leaf, so with an extra leaf its draws differ: only the
    # update's type and finiteness are checked for it.
    jac = EDGE["random_K5"]
    tx = mtl_optax.get(name, **hparams(name, 5))
    grads, params = _from_matrix(jac), _params()
    value = jnp.linspace(0.5, 2.0, 5)
    params_e = {**params, "e": jnp.zeros((0, 3))}
    grads_e = {**grads, "e": jnp.zeros((5, 0, 3))}
    update_e, _ = jax.jit(tx.update)(grads_e, tx.init(params_e), params_e, value=value)
    chex.assert_trees_all_equal_shapes_and_dtypes(update_e, params_e)
    assert _finite(update_e)
    if name != "graddrop":
        tx, update_fn = _jitted(name, 5)  # the float32 K = 5 program of the edge cases
        update, _ = update_fn(grads, tx.init(params), params, value=value)
        chex.assert_trees_all_close({k: update_e[k] for k in params}, update, rtol=1e-6)
