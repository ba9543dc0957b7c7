"""What the floor target asks of the methods that miss it: their least work, timed.

``bench_methods.py`` judges every method against the engine floor (one
Gramian and one combination of J, ``bench_methods.floor_fn``), with the
target ``jax / floor <= 1.5`` from P = 1e6 on. Three methods miss it on this
CPU at some sizes: ``m_conflict_free`` and ``excess_mtl``, which keep a
``K x P`` state, and ``graddrop``, which draws P uniforms per step. This
script times, side by side in the same shuffled rounds as
``bench_methods.py``, the least work of each kind of method, written as
plainly as XLA runs it fastest:

* ``floor``: the engine floor on J (as in ``bench_methods.py``);
* ``momentum``: the floor of a method that keeps one momentum per task,
  ``S <- beta S + (1 - beta) J`` updated in place (the state donated, as in a
  training loop), then the Gramian and the combination of the new ``S``.
  Every method whose weights or update read a ``K x P`` state updated from J
  does at least this much: the update pass reads J and ``S`` and writes
  ``S`` (``3 K P`` words), and the Gramian and the combination then read
  ``K P`` words each, against ``2 K P`` words for the floor: 2.5x the floor's
  memory traffic (XLA's CPU backend has no multi-output fusion, so the Gramian
  cannot be taken in the pass that writes the state; with it, 2x). M-ConFIG
  adds its Adam moments (``7 P`` words more); ExcessMTL reads J once more for
  its excess risks;
* ``uniforms``: the P uniform draws of a GradDrop step (``jax.random``'s
  Threefry bits, as ``mtl_optax.graddrop`` computes them: its ``uniforms``
  method), written to memory; ``jax.random.uniform``: the same bits by JAX's
  own kernel. GradDrop makes the same draws and one pass over J, fused;
* the three methods themselves (their state donated).

Where ``momentum / floor`` is above 1.5, no method that keeps per-task
momenta can meet the floor target at that size on this machine; where
``uniforms / floor`` is, no GradDrop that draws ``jax.random``'s bits can.
The ratios are medians of the ratios taken round by round (as
``bench_methods.py``'s ``paired`` ratios).

Usage::

  python benchmarks/bench_lower_bounds.py                     # K 2,10,40; P 1e6,1e7
  python benchmarks/bench_lower_bounds.py --K 2 --P 1e6 --repeats 20 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import platform
import warnings

import jax
import jax.numpy as jnp
from bench_methods import _time_rounds, floor_fn, paired_ratio, round_medians

import mtl_optax

BETA = 0.9
# The methods these bounds are for (bench_methods.py too gives them num_tasks alone).
METHODS = ("m_conflict_free", "excess_mtl", "graddrop")
COLUMNS = ("floor", "momentum", "uniforms", "jax.random.uniform", *METHODS)


def momentum_floor(J: jax.Array, S: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One in-place momentum pass over ``S``, then the floor on the new ``S``."""
    S = BETA * S + (1 - BETA) * J
    return floor_fn(S), S


def measure(k: int, p: int, repeats: int, budget_s: float) -> dict:
    """Times every column at one size; returns the row (medians and paired ratios)."""
    J = jax.random.normal(jax.random.key(0), (k, p), jnp.float32)
    value = jnp.linspace(0.5, 2.0, k)
    key = jax.random.key(1)
    floor = jax.jit(floor_fn)
    momentum = jax.jit(momentum_floor, donate_argnums=1)
    # GradDrop's own draws for the next step (``tx.uniforms``; only J's shape is read).
    graddrop = mtl_optax.graddrop()
    graddrop_state = graddrop.init({"J": jnp.zeros((p,), jnp.float32)})
    shape = {"J": jax.ShapeDtypeStruct((k, p), jnp.float32)}
    uniforms = jax.jit(lambda state: graddrop.uniforms(shape, state)["J"])
    jax_uniform = jax.jit(lambda key: jax.random.uniform(key, (p,), jnp.float32))
    # The stateful columns: a jitted (J, state) -> (out, new state), the state
    # donated and threaded from call to call.
    steps = {"momentum": (momentum, jnp.zeros((k, p), jnp.float32))}
    for name in METHODS:
        tx = mtl_optax.get(name, num_tasks=k)
        step = jax.jit(lambda J, s, tx=tx: tx.update({"J": J}, s, value=value), donate_argnums=1)
        steps[name] = (step, tx.init({"J": jnp.zeros((p,), jnp.float32)}))

    def threaded(step, state):
        holder = [state]

        def call():
            out, holder[0] = step(J, holder[0])
            return out

        return call

    calls = {
        "floor": lambda: floor(J),
        "uniforms": lambda: uniforms(graddrop_state),
        "jax.random.uniform": lambda: jax_uniform(key),
    } | {name: threaded(*step_and_state) for name, step_and_state in steps.items()}
    calls = {name: calls[name] for name in COLUMNS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rounds = _time_rounds(list(calls.values()), repeats, len(calls) * budget_s)
    names = list(calls)
    row = {"K": k, "P": p, "rounds": len(rounds)}
    row["ms"] = dict(zip(names, round_medians(rounds), strict=True))
    row["per_floor"] = {
        name: paired_ratio(rounds, i, 0) for i, name in enumerate(names) if name != "floor"
    }
    return row


HEADER = (
    "|   K |         P | floor ms | momentum / floor | uniforms / floor |"
    " jax.random.uniform / floor | m_conflict_free / floor | excess_mtl / floor |"
    " graddrop / floor |\n|---|---|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
    """One markdown table row: the floor's time and every column's paired ratio."""
    ratios = " | ".join(f"{row['per_floor'][name]:.2f}" for name in COLUMNS[1:])
    return f"| {row['K']:3d} | {row['P']:9.0e} | {row['ms']['floor']:8.2f} | {ratios} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--K", default="2,10,40", help="comma list of task counts")
    parser.add_argument("--P", default="1e6,1e7", help="comma list of parameter counts")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per column at most")
    parser.add_argument("--json", default="", help="write the rows to this JSON file")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}),"
        f" {platform.processor() or platform.machine()}, float32; ratios to the floor,"
        " medians of the ratios round by round"
    )
    print(HEADER)
    rows = []
    for p in (int(float(x)) for x in args.P.split(",")):
        for k in (int(x) for x in args.K.split(",")):
            rows.append(measure(k, p, args.repeats, args.budget))
            print(format_row(rows[-1]), flush=True)
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
