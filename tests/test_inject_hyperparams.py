"""``optax.inject_hyperparams`` schedules a method's float hyperparameter in a jitted step.

optax calls the factory inside the jitted update with the scheduled value as a
traced array; the factories validate concrete values and keep traced ones as
they are. Each scheduled run must equal, step by step, the method built with the
concrete value of that step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

K = 3
PARAMS = {"w": jnp.zeros((4,)), "b": jnp.zeros((2,))}
GRADS = [
    jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), (K, *p.shape)), PARAMS)
    for i in range(3)
]

# (factory, hyperparameter, schedule values at steps 0, 1, 2, extra static kwargs).
# inject_hyperparams traces every numeric argument, defaults included: the ones
# not scheduled go in static_args.
CASES = {
    "cagrad_alpha": (
        mtl_optax.cagrad,
        "alpha",
        [0.0, 0.4, 0.9],
        {"rescale": 1, "eps": 0.0, "norm_eps": 0.0, "max_iter": 1000},
    ),
    "gradvac_beta": (mtl_optax.gradvac, "beta", [0.9, 0.5, 0.1], {"key": 3}),
    "upgrad_reg_eps": (mtl_optax.upgrad, "reg_eps", [0.0, 1e-2, 0.5], {"norm_eps": 0.0}),
    "dualproj_norm_eps": (
        mtl_optax.dualproj,
        "norm_eps",
        [0.0, 1e3, 0.0],  # 1e3 > tr(G): the plain mean at step 1
        {"reg_eps": 1e-3},
    ),
    "sdmgrad_lambda": (
        mtl_optax.sdmgrad,
        "lambda_",
        [0.0, 0.3, 1.0],
        {"lr": 10.0, "momentum": 0.5, "n_iter": 20},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_scheduled_hyperparameter_equals_the_fixed_method_at_each_step(case):
    factory, name, values, static = CASES[case]
    # A schedule as a function of the step count: exactly the listed values.
    schedule = lambda count: jnp.asarray(values, jnp.float32)[jnp.minimum(count, len(values) - 1)]
    injected = optax.inject_hyperparams(factory, static_args=("num_tasks", *static))(
        **{name: schedule}, num_tasks=K, **static
    )
    step = jax.jit(lambda g, s: injected.update(g, s, PARAMS))
    state = injected.init(PARAMS)
    fixed_state = None
    for i, value in enumerate(values):
        update, state = step(GRADS[i], state)
        np.testing.assert_allclose(float(state.hyperparams[name]), value, rtol=1e-7)
        fixed = factory(**{name: value}, num_tasks=K, **static)
        if fixed_state is None:
            fixed_state = fixed.init(PARAMS)
        expected, fixed_state = jax.jit(lambda g, s, fixed=fixed: fixed.update(g, s, PARAMS))(
            GRADS[i], fixed_state
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6
            ),
            update,
            expected,
        )


def test_concrete_values_are_still_validated():
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        mtl_optax.cagrad(alpha=-1.0)
    with pytest.raises(ValueError, match="beta must be in"):
        mtl_optax.gradvac(beta=jnp.float32(2.0), num_tasks=2)
    with pytest.raises(ValueError, match="lambda_ must be non-negative"):
        mtl_optax.sdmgrad(lambda_=-0.5)
    with pytest.raises(ValueError, match="reg_eps must be a finite number >= 0"):
        mtl_optax.upgrad(reg_eps=jnp.float32(-1.0))
