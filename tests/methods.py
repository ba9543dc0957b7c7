"""Helpers shared by the generic tests over every registered method.

:func:`hparams`: the arguments that build a method (a method whose factory has
required arguments gets them here; every other method is built with its
defaults). :func:`raw`: a state or update as NumPy arrays, for comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np

import mtl_optax


def hparams(name: str, num_tasks: int) -> dict:
    """The keyword arguments that build method ``name`` for ``num_tasks`` tasks."""
    extra = {
        "constant": {"weights": np.linspace(0.5, 1.5, num_tasks).tolist()},
        "fairgrad": {"alpha": 2.0},
        # Krum scores need K >= n_byzantine + 3 (see MIN_TASKS).
        "krum": {"n_byzantine": max(0, (num_tasks - 3) // 2), "n_selected": max(1, num_tasks // 4)},
        # The coordinate-wise median for odd K.
        "trimmed_mean": {"trim_number": (num_tasks - 1) // 2},
    }.get(name, {})
    return {"num_tasks": num_tasks, **extra}


# The fewest tasks a method accepts; with fewer, building it with
# ``hparams(name, K)`` raises a ValueError whose message says "at least".
MIN_TASKS = {"krum": 3}


def min_tasks(name: str) -> int:
    """The fewest tasks method ``name`` accepts (1 for most)."""
    return MIN_TASKS.get(name, 1)


def without_solver_diagnostics(state):
    """``state`` with CAGrad's iteration count and last residual zeroed.

    CAGrad's float32 dual solver stops at a relative residual of 1e-5, so two
    programs that round differently (batched and single, or two code
    generators) can stop some iterations apart; tests that compare such
    programs compare its weights at the solver's tolerance and not these two.
    Other states are returned as they are.
    """
    if isinstance(state, mtl_optax.CAGradState):
        return state._replace(solver_iterations=0, solver_error=0.0)
    return state


def raw(tree):
    """``tree`` with NumPy leaves, its typed PRNG keys as their key data."""

    def one(x):
        if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(one, tree)
