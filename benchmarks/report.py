"""Turns the JSON rows of ``bench_methods.py --json`` into markdown tables.

Prints the full table (as ``bench_methods.py`` prints it) and a table of the
rows that miss a target: ``jax / floor > 1.5`` at ``P >= 1e6``, or a PyTorch
reference faster than mtl_optax.

Usage::

  python benchmarks/report.py results_cpu/bench_methods_2026-11-21.json
"""

from __future__ import annotations

import argparse
import json

from bench_methods import HEADER, _format_row

OWN = ("jax_ms", "floor_ms", "dispatch_ms")


def misses(row: dict) -> list[str]:
    """The targets ``row`` misses, in words."""
    out = []
    ratio = row["jax_ms"] / row["floor_ms"]
    if row["P"] >= 1_000_000 and ratio > 1.5:
        out.append(f"{ratio:.2f}x the floor")
    refs = {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and k not in OWN}
    if refs:
        name, best = min(refs.items(), key=lambda kv: kv[1])
        if best < row["jax_ms"]:
            out.append(f"{name} faster: {best:.2f} ms ({best / row['jax_ms']:.2f}x)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    args = parser.parse_args()
    with open(args.json_file, encoding="utf-8") as f:
        rows = json.load(f)
    print(HEADER)
    for row in rows:
        print(_format_row(row))
    print("\n| method | K | P | jax ms | target missed |\n|---|---|---|---|---|")
    for row in rows:
        if m := misses(row):
            print(
                f"| {row['method']} | {row['K']} | {row['P']:.0e} | {row['jax_ms']:.2f} | {'; '.join(m)} |"
            )


if __name__ == "__main__":
    main()
