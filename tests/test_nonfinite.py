"""Non-finite input (NaN or inf in a task gradient or a loss) under ``mtl_optax.apply_if_finite``.

Documented behaviour (README, "Non-finite input"): every method returns a
non-finite update when a task gradient is non-finite, and every method that
reads the losses (``value=``) returns a non-finite update when a loss is
non-finite; a method that does not read the losses ignores them.

``optax.apply_if_finite`` itself cannot wrap a chain that starts with a method:
on a rejected step it returns ``zeros_like`` of its *input* (the ``[K, ...]``
task gradients), whose shapes differ from the update's (``lax.cond`` raises).
And ``chain(method, apply_if_finite(adam))`` protects adam's state only: the
method's state (GradVac's EMA, the momenta of m_conflict_free, GradNorm's
logits, SDMGrad's warm start, a random method's key) still takes the bad step.
The wrapper tested here, :func:`mtl_optax.apply_if_finite`, has apply_if_finite's
semantics for task-gradient transformations: on a non-finite update it returns
zeros of the update's shapes and keeps the previous inner state. The training
run then ends exactly where the run without the bad steps ends, for random
methods too: their PRNG key lives in the discarded inner state, so it does not
advance on a skipped step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

from .methods import hparams, raw

K = 3
PARAMS = {"w": jnp.zeros((4, 2)), "b": jnp.zeros((2,))}
CENTERS = jax.random.normal(jax.random.key(0), (K, 10))

GOOD, NAN_GRAD, INF_GRAD, NAN_LOSS = 0, 1, 2, 3
# The injected steps: a NaN gradient (and loss), an inf gradient, a NaN loss alone.
SCHEDULE = [GOOD, NAN_GRAD, GOOD, INF_GRAD, GOOD, NAN_LOSS, GOOD]


def _losses(params):
    flat = jnp.concatenate([params["b"], params["w"].ravel()])
    scales = jnp.arange(1.0, K + 1.0)[:, None]
    return jnp.sum(scales * (flat[None, :] - CENTERS) ** 2, axis=1)


def _reads_value(tx) -> bool:
    weighting = getattr(tx, "weighting", None)
    return bool(weighting is not None and weighting.needs_value)


@functools.cache
def _setup(name: str):
    method = mtl_optax.get(name, **hparams(name, K))
    opt = mtl_optax.apply_if_finite(optax.chain(method, optax.adam(1e-2)))

    @jax.jit
    def step(params, state, mode):
        losses, grads = mtl_optax.task_grads(_losses, params)
        bad_grad = (mode == NAN_GRAD) | (mode == INF_GRAD)
        poison = jnp.where(mode == NAN_GRAD, jnp.nan, jnp.inf)
        grads["w"] = grads["w"].at[1, 0, 0].set(jnp.where(bad_grad, poison, grads["w"][1, 0, 0]))
        bad_loss = (mode == NAN_GRAD) | (mode == NAN_LOSS)
        losses = losses.at[0].set(jnp.where(bad_loss, jnp.nan, losses[0]))
        updates, state = opt.update(grads, state, params, value=losses)
        return optax.apply_updates(params, updates), state

    return method, opt, step


def _finite(tree) -> bool:
    return all(
        np.isfinite(x).all()
        for x in jax.tree.leaves(raw(tree))
        if np.issubdtype(x.dtype, np.inexact)
    )


def test_optax_apply_if_finite_cannot_wrap_a_method():
    # Why mtl_optax.apply_if_finite exists: the rejected branch has the input's shapes.
    opt = optax.apply_if_finite(optax.chain(mtl_optax.mean(), optax.sgd(0.1)), 3)
    g = {"w": jnp.ones((K, 2))}
    with pytest.raises(TypeError, match="cond branches must have equal output types"):
        opt.update(g, opt.init({"w": jnp.zeros(2)}))


@pytest.mark.parametrize("name", mtl_optax.available(aliases=False))
def test_apply_if_finite_skips_bad_steps_and_ends_as_the_run_without_them(name):
    method, opt, step = _setup(name)
    skipped = {NAN_GRAD, INF_GRAD} | ({NAN_LOSS} if _reads_value(method) else set())

    params, state = PARAMS, opt.init(PARAMS)
    for mode in SCHEDULE:
        params, state = step(params, state, mode)
        assert _finite(params) and _finite(state.inner_state), (name, mode)
    assert int(state.total_notfinite) == sum(m in skipped for m in SCHEDULE)

    # The reference run: the skipped steps never happen; a NaN loss that the
    # method does not read is the same step as a good one.
    ref_params, ref_state = PARAMS, opt.init(PARAMS)
    for mode in SCHEDULE:
        if mode not in skipped:
            ref_params, ref_state = step(ref_params, ref_state, GOOD)

    jax.tree.map(np.testing.assert_array_equal, raw(params), raw(ref_params))
    # The inner states agree bitwise, PRNG keys included: a random method's key
    # does not advance on a skipped step.
    jax.tree.map(np.testing.assert_array_equal, raw(state.inner_state), raw(ref_state.inner_state))


def test_gradnorm_non_finite_loss_gives_a_non_finite_update():
    # The fix this file guards: gradnorm's update uses the weights of its state's
    # logits, so a NaN loss used to give a finite update and a NaN new state.
    tx = mtl_optax.gradnorm(num_tasks=2, update_at=0)
    g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    state = tx.init({"w": jnp.zeros(2)})
    for bad in (jnp.nan, jnp.inf):
        u, _ = tx.update(g, state, value=jnp.array([1.0, bad]))
        assert not np.isfinite(np.asarray(u["w"])).any()
    u, new_state = tx.update(g, state, value=jnp.array([1.0, 2.0]))
    assert np.isfinite(np.asarray(u["w"])).all() and _finite(new_state)


def test_max_consecutive_errors_lets_updates_through_after_that_many_bad_steps():
    opt = mtl_optax.apply_if_finite(
        optax.chain(mtl_optax.mean(num_tasks=2), optax.sgd(1.0)), max_consecutive_errors=2
    )
    params = {"w": jnp.zeros(2)}
    bad = {"w": jnp.array([[jnp.nan, 1.0], [0.0, 1.0]])}
    state = opt.init(params)
    applied = []
    for _ in range(4):
        u, state = opt.update(bad, state, params)
        applied.append(bool(jnp.any(jnp.isnan(u["w"]))))
    # Two bad steps are skipped, then the NaN updates are applied (the run is visibly broken).
    assert applied == [False, False, True, True]
    assert int(state.total_notfinite) == 4 and not bool(state.last_finite)
    with pytest.raises(ValueError, match="max_consecutive_errors must be >= 0"):
        mtl_optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=-1)


def test_a_state_that_changes_shape_needs_num_tasks():
    opt = mtl_optax.apply_if_finite(optax.chain(mtl_optax.mean(), optax.sgd(1.0)))
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="Pass num_tasks=K"):
        opt.update({"w": jnp.ones((2, 2))}, opt.init(params), params)
