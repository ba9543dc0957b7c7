"""mtl_optax's own matrix products run at full precision, whatever JAX's default.

JAX's default precision for a ``float32`` product lets a backend use a faster,
less accurate path (TensorFloat-32 on NVIDIA GPUs from Ampere on). On an H100
that put the Gramian of a ``10 x 1e6`` Jacobian off by ``1e-5`` of its largest
entry and broke the float32 parity and guarantee tests of several methods.
Every method therefore traces its contractions under
``jax.default_matmul_precision("highest")`` (``engine.full_precision``).

XLA's CPU backend ignores the precision, so these tests read the traced
programs instead of the numbers: with JAX's default set to the lowest
precision (``bfloat16``), every ``dot_general`` that a method's ``update``
traces (in loops, conditionals and nested calls too) must still ask for
``HIGHEST``. A product added without the decorator makes them fail on any
backend.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtl_optax
from mtl_optax import solvers

from .methods import hparams

K = 4
PARAMS = {"w": jnp.zeros((6, 5), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}


def _subjaxprs(value):
    """The jaxprs held in an equation's parameter (loops, conditionals, calls)."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _subjaxprs(v)


def _dot_precisions(jaxpr):
    """The ``precision`` of every ``dot_general`` in ``jaxpr`` and the jaxprs it holds."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.dot_general_p:
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                found.extend(_dot_precisions(sub))
    return found


def _traced_dots(fn, *args, **kwargs):
    with jax.default_matmul_precision("bfloat16"):
        closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    return _dot_precisions(closed.jaxpr)


FULL = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)


def test_the_walker_sees_a_low_precision_product_inside_a_loop():
    # The detector itself: a product in a while loop, traced under the bfloat16 default.
    def f(a):
        return lax.fori_loop(0, 3, lambda i, x: a @ x, a)

    dots = _traced_dots(f, jnp.ones((3, 3)))
    assert dots and all(p != FULL for p in dots)
    dots = _traced_dots(mtl_optax.engine.full_precision(f), jnp.ones((3, 3)))
    assert dots and all(p == FULL for p in dots)


@pytest.mark.parametrize("name", mtl_optax.available())
def test_every_method_update_traces_its_products_at_full_precision(name):
    tx = mtl_optax.get(name, **hparams(name, K))
    rng = np.random.default_rng(0)
    grads = {
        k: jnp.asarray(rng.standard_normal((K, *v.shape)), jnp.float32) for k, v in PARAMS.items()
    }
    state = tx.init(PARAMS)
    dots = _traced_dots(
        lambda g, s: tx.update(g, s, PARAMS, value=jnp.linspace(1.0, 2.0, K)), grads, state
    )
    # GradDrop masks and sums elementwise, trimmed_mean sorts each coordinate;
    # compose() of no method is the plain sum.
    if name not in ("graddrop", "compose", "trimmed_mean"):
        assert dots, f"{name}: no matrix product traced (the Gramian or the combination expected)"
    assert all(p == FULL for p in dots), (name, dots)


@pytest.mark.parametrize(
    "fn",
    [
        mtl_optax.gramian,
        lambda g: mtl_optax.combine(g, jnp.linspace(0.5, 1.5, K)),
        lambda g: mtl_optax.cross_gramian(g, g),
    ],
    ids=["gramian", "combine", "cross_gramian"],
)
def test_engine_products_are_at_full_precision(fn):
    grads = {"w": jnp.ones((K, 300), jnp.float32), "b": jnp.ones((K, 3, 5), jnp.bfloat16)}
    dots = _traced_dots(fn, grads)
    assert dots and all(p == FULL for p in dots), dots


@pytest.mark.parametrize(
    "fn",
    [
        solvers.min_norm,
        lambda g: solvers.solve_min_norm(g).weights,
        lambda g: solvers.dual_cone_weights(g, jnp.full((K,), 1.0 / K)),
        mtl_optax._upgrad.upgrad_weights,
        mtl_optax._upgrad.dualproj_weights,
        mtl_optax._imtl.imtl_g_weights,
        mtl_optax._aligned_mtl.aligned_mtl_weights,
        lambda g: solvers.alpha_fair_weights(g, 2.0),
    ],
    ids=[
        "min_norm",
        "solve_min_norm",
        "dual_cone",
        "upgrad",
        "dualproj",
        "imtl_g",
        "aligned_mtl",
        "alpha_fair",
    ],
)
def test_public_weightings_and_solvers_are_at_full_precision(fn):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((K, 7))
    gram = jnp.asarray(a @ a.T, jnp.float32)
    dots = _traced_dots(fn, gram)
    assert all(p == FULL for p in dots), dots
