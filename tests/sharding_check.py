"""Every registered method in a sharded train step, against the single-device step.

Run by ``tests/test_sharding.py`` in a subprocess of its own, because the
simulated devices (``--xla_force_host_platform_device_count=8``) must be
requested before JAX is imported. Prints one JSON object on its last line of
stdout; ``python tests/sharding_check.py [--methods mean,pcgrad]`` runs it by
hand.

For each method ``m`` and each layout, two steps of

    losses, grads = mtl_optax.task_grads(loss_fn, params, batch)   # grads [K, ...]
    updates, state = optax.chain(m, optax.adam(1e-2)).update(grads, state, params, value=losses)
    params = optax.apply_updates(params, updates)

run under ``jax.jit`` in float64, on one device (the reference) and on a mesh
of 8 CPU devices:

* ``data_parallel``: ``Mesh`` axis ``data`` (``Auto``), batch sharded along it,
  parameters replicated: XLA all-reduces the per-task gradients, which reach
  the method replicated.
* ``fsdp``: the same mesh, batch *and* every parameter leaf sharded along
  ``data`` (on some axis of each leaf), so the stacked task gradients
  ``[K, ...]`` reach the method sharded along a parameter axis. The largest
  leaf has 512 x 512 = 2**18 entries, enough for the engine's blocked CPU
  Gramian path on one device (``engine.leaf_cross``).
* ``explicit_update``: a mesh with ``Explicit`` axes (the default of
  ``jax.make_mesh``, where sharding is part of the type and JAX raises on an
  ambiguous one) and the method's update alone, on task gradients sharded like
  ``fsdp``'s (the train step itself would need the model written for explicit
  sharding, which is the user's code, not mtl_optax's).

Recorded per (layout, method): the largest absolute and relative differences of
the parameters and of the whole optimizer state after two steps (PRNG keys as
their key data), whether the output shardings are the expected ones
(``data_parallel``: everything replicated; ``fsdp`` and ``explicit_update``:
each parameter, update and Adam moment sharded like its parameter), and, for
``fsdp``, the ``all-gather`` ops of the compiled step whose result has the
shape of a stacked task-gradient leaf (there should be none: gathering them
would put the whole ``K x P`` Jacobian on every device).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from xla_flags import FAST_COMPILE_XLA_FLAGS

# Eight simulated CPU devices; LLVM's optimisations and XLA's MLIR fusion
# emitters off, which cuts the compilation time (most of this script's) by
# more than half (see tests/conftest.py).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 "
    + FAST_COMPILE_XLA_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import contextlib
import json
import re
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import methods  # noqa: E402  (tests/ is on sys.path, above)

import mtl_optax  # noqa: E402

K = 3  # tasks
BATCH, D_IN, D_OUT = 32, 512, 8
STEPS = 2
# Each parameter leaf and the axis of it sharded in the ``fsdp`` layout.
PARAM_SPECS = {
    "embed": P(None, "data"),  # (D_IN, D_IN): 2**18 entries, the blocked-Gramian leaf
    "heads": P(None, "data", None),  # (K, D_IN, D_OUT): one head per task
}
BATCH_SPECS = {"x": P("data", None), "y": P("data", None, None)}


def make_params() -> dict:
    keys = jax.random.split(jax.random.key(0), 2)
    return {
        "embed": jax.random.normal(keys[0], (D_IN, D_IN), jnp.float64) / np.sqrt(D_IN),
        "heads": jax.random.normal(keys[1], (K, D_IN, D_OUT), jnp.float64) / np.sqrt(D_IN),
    }


def make_batch() -> dict:
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (BATCH, D_IN), jnp.float64)
    # Targets on different scales, so that the methods' weights differ.
    scale = jnp.array([1.0, 3.0, 0.3])[None, :, None]
    return {"x": x, "y": scale * jax.random.normal(ky, (BATCH, K, D_OUT), jnp.float64)}


def loss_fn(params: dict, batch: dict) -> jax.Array:
    """The K per-task mean squared errors of a shared layer with K linear heads."""
    h = jnp.tanh(batch["x"] @ params["embed"])  # [B, D_IN]
    pred = jnp.einsum("bh,kho->bko", h, params["heads"])
    return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1), axis=0)


def cross_gramian_of_halves(params: dict, batch: dict) -> jax.Array:
    """SDMGrad's ``A = J_1 J_2^T`` from the two halves of the batch."""
    half = BATCH // 2
    g1, g2 = (
        mtl_optax.task_grads(loss_fn, params, jax.tree.map(lambda a, s=s: a[s], batch))[1]
        for s in (slice(0, half), slice(half, None))
    )
    return mtl_optax.cross_gramian(g1, g2)


def make_step(name: str):
    opt = optax.chain(mtl_optax.get(name, **methods.hparams(name, K)), optax.adam(1e-2))

    def step(params, state, batch):
        losses, grads = mtl_optax.task_grads(loss_fn, params, batch)
        extra = {}
        if name == "sdmgrad":
            extra["cross_gramian"] = cross_gramian_of_halves(params, batch)
        updates, state = opt.update(grads, state, params, value=losses, **extra)
        return optax.apply_updates(params, updates), state, updates

    def update_only(grads, state, params, losses, cross):
        extra = {"cross_gramian": cross} if name == "sdmgrad" else {}
        return opt.update(grads, state, params, value=losses, **extra)

    return opt, step, update_only


def flat(tree) -> list[np.ndarray]:
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [leaf(x) for x in jax.tree.leaves(tree)]


def max_diff(a, b) -> tuple[float, float]:
    """The largest absolute difference, and the largest one relative to max|b| of its leaf."""
    abs_err, rel_err = 0.0, 0.0
    for x, y in zip(flat(a), flat(b), strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf"), float("inf")
        if x.size == 0:
            continue
        x, y = x.astype(np.float64), y.astype(np.float64)
        same_nan = np.isnan(x) & np.isnan(y)
        d = np.where(same_nan, 0.0, np.abs(x - y))
        d = np.where(np.isnan(d), np.inf, d)
        scale = float(np.max(np.abs(np.where(np.isnan(y), 0.0, y))))
        abs_err = max(abs_err, float(np.max(d)))
        rel_err = max(rel_err, float(np.max(d)) / scale if scale > 0 else float(np.max(d)))
    return abs_err, rel_err


def sharded_like(tree, shardings) -> bool:
    return all(
        x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    )


def replicated(tree) -> bool:
    return all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))


def stacked_gathers(hlo: str) -> list[str]:
    """The all-gather results in ``hlo`` with the shape of a stacked task-gradient leaf."""
    shapes = {f"f64[{','.join(map(str, (K, *p.shape)))}]" for p in jax.tree.leaves(make_params())}
    found = []
    for line in hlo.splitlines():
        if "all-gather" in line and "=" in line:
            result = re.split(r"\s*=\s*", line.strip(), maxsplit=1)[1].split(" ", 1)[0]
            if result.split("{")[0] in shapes:
                found.append(result)
    return found


@contextlib.contextmanager
def record(out: dict, layout: str):
    """Records an exception raised in the block as ``out[layout]["error"]``."""
    try:
        yield
    except Exception as e:  # reported per (method, layout) by the test
        out[layout] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def check_method(name: str, mesh_auto, mesh_explicit, first_grads) -> dict:
    """The report of method ``name``: one entry per layout (see the module's docstring)."""
    params0, batch0 = make_params(), make_batch()
    opt, step, update_only = make_step(name)
    out: dict = {}

    # Reference: one device, two steps (one compilation).
    ref_step = jax.jit(step)
    ref_params, ref_state, ref_updates = [], [], []
    params, state = params0, opt.init(params0)
    for _ in range(STEPS):
        params, state, updates = ref_step(params, state, batch0)
        ref_params.append(params), ref_state.append(state), ref_updates.append(updates)

    def put(tree, specs, mesh):
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)

    def entry(params_diff, state_diff, shardings_ok, specs_of, gathers=()):
        return {
            "params_abs": params_diff[0],
            "params_rel": params_diff[1],
            "state_abs": state_diff[0],
            "state_rel": state_diff[1],
            "shardings_ok": shardings_ok,
            "param_specs": {k: str(v.sharding.spec) for k, v in specs_of.items()},
            "stacked_gathers": list(gathers),
        }

    def auto_layout(layout, specs):
        params = put(params0, specs, mesh_auto)
        batch = put(batch0, BATCH_SPECS, mesh_auto)
        state = opt.init(params)
        compiled = jax.jit(step).lower(params, state, batch).compile()
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        # The second step's inputs must have the first's shardings, else the
        # compiled step refuses them: itself a check that the state keeps them.
        for _ in range(STEPS):
            params, state, updates = compiled(params, state, batch)
        adam = state[1][0]
        if layout == "data_parallel":
            shardings_ok = replicated(params) and replicated(updates) and replicated(state)
        else:
            shardings_ok = (
                sharded_like(params, param_shardings)
                and sharded_like(updates, param_shardings)
                and sharded_like(adam.mu, param_shardings)
                and sharded_like(adam.nu, param_shardings)
                # A state leaf as large as the largest parameter (a method's
                # momenta) must not be replicated on every device either.
                and not any(
                    x.sharding.is_fully_replicated
                    for x in jax.tree.leaves(state)
                    if x.size >= D_IN * D_IN
                )
            )
        gathers = stacked_gathers(compiled.as_text()) if layout == "fsdp" else []
        return entry(
            max_diff(params, ref_params[-1]),
            max_diff(state, ref_state[-1]),
            shardings_ok,
            params,
            gathers,
        )

    def explicit_update():
        losses, grads, cross = first_grads
        with jax.set_mesh(mesh_explicit):
            params = put(params0, PARAM_SPECS, mesh_explicit)
            grad_specs = jax.tree.map(lambda s: P(None, *s), PARAM_SPECS)
            sharded_grads = put(grads, grad_specs, mesh_explicit)
            losses, cross = (
                jax.device_put(x, NamedSharding(mesh_explicit, P())) for x in (losses, cross)
            )
            state = opt.init(params)
            updates, state = jax.jit(update_only)(sharded_grads, state, params, losses, cross)
        shardings_ok = sharded_like(updates, jax.tree.map(lambda x: x.sharding, params))
        return entry(
            max_diff(updates, ref_updates[0]), max_diff(state, ref_state[0]), shardings_ok, updates
        )

    replicated_specs = jax.tree.map(lambda _: P(), params0)
    for layout, specs in (("data_parallel", replicated_specs), ("fsdp", PARAM_SPECS)):
        with record(out, layout):
            out[layout] = auto_layout(layout, specs)
    with record(out, "explicit_update"):
        out["explicit_update"] = explicit_update()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(mtl_optax.available(aliases=False)))
    args = parser.parse_args()
    assert jax.device_count() == 8, jax.devices()
    mesh_auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    mesh_explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    results, start = {}, time.perf_counter()
    params0, batch0 = make_params(), make_batch()
    losses, grads = jax.jit(mtl_optax.task_grads, static_argnums=0)(loss_fn, params0, batch0)
    first_grads = (losses, grads, jax.jit(cross_gramian_of_halves)(params0, batch0))
    for name in args.methods.split(","):
        t0 = time.perf_counter()
        try:
            results[name] = check_method(name, mesh_auto, mesh_explicit, first_grads)
        except Exception as e:  # reported per method by the test
            results[name] = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(name, results[name]["seconds"], file=sys.stderr, flush=True)
    # The engine's blocked CPU Gramian (a loop over column blocks) is still
    # taken on one device, and not on a sharded leaf (see engine.leaf_cross).
    leaf = jnp.ones((K, D_IN * D_IN), jnp.float32)
    sharded = jax.device_put(leaf, NamedSharding(mesh_auto, P(None, "data")))
    gram = jax.jit(mtl_optax.gramian)
    results["_engine"] = {
        "blocked_on_one_device": "while" in gram.lower(leaf).compile().as_text(),
        "blocked_on_sharded_leaf": "while" in gram.lower(sharded).compile().as_text(),
    }
    results["_total_seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
