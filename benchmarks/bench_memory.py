"""Peak memory and time of one train step: stacked path, lean path, single loss.

On an MLP with about 10.5M parameters (float32) and ``K`` regression heads, for
``K`` in {4, 16, 64}, it compiles and times one SGD train step three ways:

* ``single``: ``jax.grad`` of the summed loss (the plain single-loss step,
  the floor);
* ``stacked``: ``mtl_optax.task_grads`` (``K`` stacked gradients) then the
  method's ``update``;
* ``lean``: :func:`mtl_optax.lean.lean_grad` (the Gramian one task gradient
  at a time, the update as one VJP of the weighted loss).

Memory is read from the compiled executable
(``jax.jit(step).lower(...).compile().memory_analysis()``), which XLA
computes from its buffer assignment, without running the step:
``args`` (parameters and batch), ``out`` (new parameters and method state),
``temp`` (the peak of the temporaries: gradients, activations, loop buffers)
and ``alias`` (outputs written into donated arguments; the parameters are
donated). ``peak = args + out + temp - alias`` is the most the step can
hold at once. Where the backend reports device memory
(``device.memory_stats()``, GPUs) its ``peak_bytes_in_use`` after the step
is printed too; the CPU backend does not report it.

The script checks the target ``lean peak <= 2 x single peak`` for every ``K``
and exits with status 1 if it fails. Time is the median of ``--repeats``
calls after one warm-up call (compilation excluded).

Usage::

  python benchmarks/bench_memory.py                       # K in {4, 16, 64}, mgda
  python benchmarks/bench_memory.py --ks 4,16 --method imtl_g --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import mtl_optax
from mtl_optax.lean import lean_grad

MB = 1024.0**2
TARGET = 2.0  # lean peak / single peak


def make_params(key: jax.Array, dims: tuple[int, ...], num_tasks: int) -> dict[str, Any]:
    """An MLP ``dims[0] -> ... -> dims[-1]`` (tanh) and a linear head per task."""
    params = {}
    keys = jax.random.split(key, len(dims))
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        params[f"w{i}"] = jax.random.normal(keys[i], (a, b), jnp.float32) / jnp.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    params["heads"] = jax.random.normal(keys[-1], (dims[-1], num_tasks), jnp.float32) / 32.0
    return params


def losses_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    """The ``K`` per-task mean squared errors, one per head."""
    h, i = x, 0
    while f"w{i}" in params:
        h = jnp.tanh(h @ params[f"w{i}"] + params[f"b{i}"])
        i += 1
    return jnp.mean((h @ params["heads"] - y) ** 2, axis=0)


def make_steps(method: Any, lr: float = 1e-3) -> dict[str, Callable[..., Any]]:
    """The three train steps, ``(params, state, x, y) -> (params, state)``."""
    opt = optax.sgd(lr)

    def apply(params, grad):
        updates, _ = opt.update(grad, opt.init(params), params)
        return optax.apply_updates(params, updates)

    def single(params, state, x, y):
        grad = jax.grad(lambda p: jnp.sum(losses_fn(p, x, y)))(params)
        return apply(params, grad), state

    def stacked(params, state, x, y):
        losses, g = mtl_optax.task_grads(losses_fn, params, x, y)
        grad, state = method.update(g, state, params, value=losses)
        return apply(params, grad), state

    def lean(params, state, x, y):
        _, grad, state = lean_grad(method, losses_fn, params, x, y, state=state)
        return apply(params, grad), state

    return {"single": single, "stacked": stacked, "lean": lean}


def measure(step: Callable[..., Any], params, state, x, y, repeats: int) -> dict[str, Any]:
    jitted = jax.jit(step, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(params, state, x, y).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = {
        "args": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
    }
    row["peak"] = row["args"] + row["out"] + row["temp"] - row["alias"]
    row["compile_s"] = compile_s
    # Donation consumes the parameters: each call gets a fresh copy.
    copies = [jax.tree_util.tree_map(jnp.copy, params) for _ in range(repeats + 1)]
    jax.block_until_ready(copies)
    times = []
    for i, p in enumerate(copies):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(p, state, x, y))
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t0)
    row["ms"] = 1e3 * statistics.median(times)
    stats = jax.devices()[0].memory_stats()
    row["device_peak"] = stats.get("peak_bytes_in_use") if stats else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="4,16,64", help="comma-separated numbers of tasks")
    parser.add_argument("--method", default="mgda", help="a method with a weighting")
    parser.add_argument("--dims", default="1024,2048,2048,2048", help="MLP layer widths")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    dims = tuple(int(d) for d in args.dims.split(","))
    ks = [int(k) for k in args.ks.split(",")]

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}),"
        f" {platform.machine()}; method {args.method}; MLP {dims}, batch {args.batch}, float32"
    )
    print("peak = args + out + temp - alias (compiled memory analysis), MiB; time: median ms")
    header = (
        f"{'K':>3} {'path':>8} {'P':>11} {'args':>8} {'out':>8} {'temp':>9} {'alias':>8}"
        f" {'peak':>9} {'peak/single':>11} {'ms':>9} {'ms/single':>9} {'compile s':>9}"
    )
    print(header)
    rows, ok = [], True
    for k in ks:
        key = jax.random.key(k)
        params = make_params(key, dims, k)
        num_params = sum(v.size for v in jax.tree_util.tree_leaves(params))
        kx, ky = jax.random.split(jax.random.fold_in(key, 1))
        x = jax.random.normal(kx, (args.batch, dims[0]), jnp.float32)
        y = jax.random.normal(ky, (args.batch, k), jnp.float32)
        method = mtl_optax.get(args.method, num_tasks=k)
        state = method.init(params)
        results = {}
        for path, step in make_steps(method).items():
            results[path] = row = measure(step, params, state, x, y, args.repeats)
            row.update(k=k, path=path, num_params=int(num_params), method=args.method)
            rows.append(row)
        base = results["single"]
        for path, row in results.items():
            row["peak_ratio"] = row["peak"] / base["peak"]
            row["time_ratio"] = row["ms"] / base["ms"]
            print(
                f"{k:>3} {path:>8} {num_params:>11,} {row['args'] / MB:>8.1f}"
                f" {row['out'] / MB:>8.1f} {row['temp'] / MB:>9.1f} {row['alias'] / MB:>8.1f}"
                f" {row['peak'] / MB:>9.1f} {row['peak_ratio']:>11.2f} {row['ms']:>9.1f}"
                f" {row['time_ratio']:>9.2f} {row['compile_s']:>9.1f}"
                + (
                    f"  device peak {row['device_peak'] / MB:.1f} MiB"
                    if row["device_peak"] is not None
                    else ""
                )
            )
        if results["lean"]["peak_ratio"] > TARGET:
            ok = False
        sys.stdout.flush()
    worst = max(r["peak_ratio"] for r in rows if r["path"] == "lean")
    verdict = "PASS" if ok else "FAIL"
    print(
        f"target lean peak <= {TARGET:g} x single peak for every K: {verdict} (worst {worst:.2f})"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
