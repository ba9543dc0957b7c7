"""Sharded multi-task training with mtl_optax: data parallel and fully sharded parameters.

What it shows
-------------
One jitted train step, ``task_grads`` (``[K]`` losses and ``[K, ...]``
per-task gradients) followed by ``optax.chain(method, optax.adam(lr))``, run
on a mesh of 8 devices in two layouts, without a change to the step:

* ``data_parallel``: the batch is sharded over the mesh axis ``data`` and the
  parameters are replicated. Each device differentiates its part of the batch;
  XLA adds the all-reduce that sums the per-task gradients, so the method sees
  the same replicated ``[K, ...]`` gradients on every device.
* ``fsdp``: the batch *and* every parameter leaf are sharded over ``data``
  (fully sharded data parallel). The stacked task gradients ``[K, ...]`` stay
  sharded along the parameter axis, and so do the updates and Adam's moments:
  no device ever holds the whole ``K x P`` Jacobian. The method's Gramian
  ``J J^T`` is one local contraction per device plus an all-reduce of a
  ``K x K`` matrix.

Sharding is declared on the inputs only (``jax.device_put`` with a
``NamedSharding``); ``jax.jit`` propagates it through the step. After training,
the script checks that each layout's parameters equal those of the same
training on one device, and prints the shardings the step returned.

Here the 8 devices are simulated on the CPU (``XLA_FLAGS=
--xla_force_host_platform_device_count=8``, set below before JAX is imported);
on a machine with 8 accelerators, drop that line and the same code runs on
them.

Multi-host
----------
The same step runs unchanged on several hosts. On each process::

    jax.distributed.initialize()  # coordinator, process count and id from the cluster
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))  # all hosts' devices
    batch = jax.tree.map(
        lambda local: jax.make_array_from_process_local_data(
            NamedSharding(mesh, P("data")), local),
        local_batch)  # this process's slice of the global batch

``jax.devices()`` then lists every host's devices, the mesh spans them all, and
``jax.make_array_from_process_local_data`` assembles the global batch from the
slice each process loaded. Parameters are placed with ``jax.device_put`` on
the same ``NamedSharding`` on every process (initialise them from the same
seed), and the jitted step is called on every process with the same
arguments, as here.

How to run
----------
::

    python examples/sharded_training.py                  # MGDA, both layouts
    python examples/sharded_training.py --method pcgrad --steps 50

Expected runtime: 10-20 s on 2 CPU cores, most of it XLA compilation.
"""

from __future__ import annotations

import os

# Simulated devices must be requested before JAX is imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mtl_optax

NUM_TASKS = 3
BATCH, FEATURES, HIDDEN, OUTPUTS = 64, 32, 64, 4
TARGET_SCALES = (1.0, 5.0, 0.2)  # tasks whose losses differ in scale


def init_params(key: jax.Array) -> dict:
    """A shared two-layer trunk and one linear head per task."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (FEATURES, HIDDEN)) / np.sqrt(FEATURES),
        "b1": jnp.zeros((HIDDEN,)),
        "w2": jax.random.normal(k2, (HIDDEN, HIDDEN)) / np.sqrt(HIDDEN),
        "heads": jax.random.normal(k3, (NUM_TASKS, HIDDEN, OUTPUTS)) / np.sqrt(HIDDEN),
    }


# The fsdp layout: each parameter leaf sharded along one of its axes.
FSDP_SPECS = {
    "w1": P(None, "data"),
    "b1": P("data"),
    "w2": P("data", None),
    "heads": P(None, "data", None),
}
BATCH_SPECS = {"x": P("data", None), "y": P("data", None, None)}


def make_data(key: jax.Array, num_batches: int) -> dict:
    """Regression targets: one shared nonlinear feature, per-task scales."""
    kx, kw, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (num_batches, BATCH, FEATURES))
    w = jax.random.normal(kw, (NUM_TASKS, FEATURES, OUTPUTS)) / np.sqrt(FEATURES)
    scales = jnp.asarray(TARGET_SCALES)[:, None]
    y = jnp.einsum("nbf,kfo->nbko", jnp.sin(x), w) * scales
    y = y + 0.05 * jax.random.normal(kn, y.shape)
    return {"x": x, "y": y}


def loss_fn(params: dict, batch: dict) -> jax.Array:
    """The ``[K]`` per-task mean squared errors."""
    h = jax.nn.gelu(batch["x"] @ params["w1"] + params["b1"])
    h = jax.nn.gelu(h @ params["w2"])
    pred = jnp.einsum("bh,kho->bko", h, params["heads"])
    return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1), axis=0)


def make_train_step(opt: optax.GradientTransformationExtraArgs):
    @jax.jit
    def train_step(params, opt_state, batch):
        losses, grads = mtl_optax.task_grads(loss_fn, params, batch)  # [K], [K, ...]
        updates, opt_state = opt.update(grads, opt_state, params, value=losses)
        return optax.apply_updates(params, updates), opt_state, losses

    return train_step


def train(opt, train_step, params, data, steps, put_batch=lambda b: b):
    opt_state = opt.init(params)
    losses = None
    for i in range(steps):
        batch = put_batch(jax.tree.map(lambda a, i=i: a[i % a.shape[0]], data))
        params, opt_state, losses = train_step(params, opt_state, batch)
    return params, opt_state, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mgda", choices=mtl_optax.available())
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    print(f"{len(devices)} devices ({devices[0].platform}), mesh {dict(mesh.shape)}")

    hparams = {"num_tasks": NUM_TASKS}
    if args.method in ("rlw", "pcgrad", "gradvac", "graddrop"):
        hparams["key"] = 0
    opt = optax.chain(mtl_optax.get(args.method, **hparams), optax.adam(args.lr))
    train_step = make_train_step(opt)
    params0 = init_params(jax.random.key(0))
    data = make_data(jax.random.key(1), num_batches=8)

    start = time.perf_counter()
    reference, _, ref_losses = train(opt, train_step, params0, data, args.steps)
    print(f"one device     losses {np.round(np.asarray(ref_losses), 4)}")

    def put(tree, specs):
        return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)

    layouts = {"data_parallel": jax.tree.map(lambda _: P(), params0), "fsdp": FSDP_SPECS}
    for layout, specs in layouts.items():
        params, opt_state, losses = train(
            opt,
            train_step,
            put(params0, specs),
            data,
            args.steps,
            put_batch=lambda b: put(b, BATCH_SPECS),
        )
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference), strict=True)
        )
        print(
            f"{layout:<14} losses {np.round(np.asarray(losses), 4)}; max |params - one device|"
            f" = {diff:.1e}"
        )
        for name in ("w1", "heads"):
            print(
                f"  {name}: params {params[name].sharding.spec},"
                f" Adam mu {opt_state[1][0].mu[name].sharding.spec}"
            )
        # float32: the sharded reductions add in another order than one device.
        assert diff < 1e-3, (layout, diff)
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
