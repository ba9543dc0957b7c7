"""Every registered method's updates, for comparing two XLA code generators.

The test processes compile with LLVM's optimisations and XLA's MLIR fusion
emitters off (``tests/conftest.py``: it halves the suite's time), while users
and the benchmarks get XLA's defaults. ``tests/test_codegen.py`` runs
:func:`results` in a subprocess with XLA's default flags and in the test
process, and compares the numbers, so that what the suite checks is what a
user's program computes.

``python tests/codegen_check.py OUT.npz`` writes the results by hand.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import mtl_optax

if __package__:
    from .methods import hparams, min_tasks, raw, without_solver_diagnostics
else:  # run as a script: python tests/codegen_check.py
    from methods import hparams, min_tasks, raw, without_solver_diagnostics

K = 5
SHAPES = {"w": (6, 5), "b": (5,)}
# Long leaves take the engine's blocked CPU paths (engine.leaf_cross): column
# blocks for more than 6 tasks, the row reductions and the lane reduction for 2.
ENGINE_SHAPES = ((8, 1 << 17), (2, 1 << 19), (3, 1 << 18))


def _tree(jac: np.ndarray) -> dict:
    jac = jnp.asarray(jac, jnp.float32)
    return {"b": jac[:, :5], "w": jac[:, 5:].reshape(jac.shape[0], 6, 5)}


def results() -> dict[str, np.ndarray]:
    """Two steps of every method on one K = 5 problem, and the engine on long leaves.

    Keys ``method/step/update`` and ``method/step/state/<i>`` (the state's
    leaves, PRNG keys as their key data, CAGrad's solver diagnostics zeroed),
    ``engine/<shape>/gramian``,
    ``.../combine`` and ``.../cross``.
    """
    rng = np.random.default_rng(0)
    jacs = [rng.standard_normal((K, 35)) * scale for scale in (1.0, 3.0)]
    values = [jnp.asarray(rng.uniform(0.5, 2.0, K), jnp.float32) for _ in jacs]
    params = {name: jnp.zeros(shape, jnp.float32) for name, shape in SHAPES.items()}
    out: dict[str, np.ndarray] = {}
    for name in mtl_optax.available(aliases=False):
        if min_tasks(name) > K:
            continue
        tx = mtl_optax.get(name, **hparams(name, K))
        step = jax.jit(tx.update)
        state = tx.init(params)
        for i, (jac, value) in enumerate(zip(jacs, values, strict=True)):
            update, state = step(_tree(jac), state, params, value=value)
            out[f"{name}/{i}/update"] = np.concatenate(
                [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(update)]
            )
            # CAGrad's iteration count and last residual may differ between
            # two code generators; its weights are compared at its tolerance.
            for j, leaf in enumerate(jax.tree.leaves(raw(without_solver_diagnostics(state)))):
                out[f"{name}/{i}/state/{j}"] = np.asarray(leaf)
    for k, p in ENGINE_SHAPES:
        x = jnp.asarray(rng.standard_normal((k, p)), jnp.float32)
        y = jnp.asarray(rng.standard_normal((k, p)), jnp.float32)
        w = jnp.asarray(rng.uniform(0.1, 1.0, k), jnp.float32)
        where = f"engine/{k}x{p}"
        out[f"{where}/gramian"] = np.asarray(jax.jit(mtl_optax.gramian)({"x": x}))
        out[f"{where}/combine"] = np.asarray(jax.jit(mtl_optax.combine)({"x": x}, w)["x"])
        out[f"{where}/cross"] = np.asarray(jax.jit(mtl_optax.cross_gramian)({"x": x}, {"x": y}))
    return out


if __name__ == "__main__":
    np.savez(sys.argv[1], **results())
