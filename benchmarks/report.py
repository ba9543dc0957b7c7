"""Turns the JSON rows of ``bench_methods.py --json`` into markdown tables.

Prints the full table (as ``bench_methods.py`` prints it) and a table of the
rows that miss a target: ``jax / floor > 1.5`` at ``P >= 1e6``, or a PyTorch
reference faster than mtl_optax.

With ``--png FILE`` it also draws the times against P (one panel per K) and
against K (at the largest P), with the engine floor, into FILE (needs
matplotlib, in the ``examples`` extra).

Usage::

  python benchmarks/report.py results_cpu/bench_methods_2026-11-21.json
  python benchmarks/report.py old.json new_rows.json   # new rows replace old ones
  python benchmarks/report.py results_cpu/bench_methods_2026-11-21.json --png times.png
"""

from __future__ import annotations

import argparse
import json

from bench_methods import HEADER, _format_row, ratios, reference_times, row_label


def misses(row: dict) -> list[str]:
    """The targets ``row`` misses, in words (judged on :func:`bench_methods.ratios`)."""
    out = []
    ratio, best = ratios(row)
    if row["P"] >= 1_000_000 and ratio > 1.5:
        out.append(f"{ratio:.2f}x the floor")
    if best is not None and best[1] < 1:
        name, speedup = best
        ref_ms = reference_times(row)[name]
        if "paired" in row:  # the ratio is not that of the medians shown
            out.append(f"{name} faster: {speedup:.2f}x in paired rounds (median {ref_ms:.2f} ms)")
        else:
            out.append(f"{name} faster: {ref_ms:.2f} ms ({speedup:.2f}x)")
    return out


def plot(rows: list[dict], path: str) -> None:
    """Time against P for each K, and against K at the largest P, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ks = sorted({r["K"] for r in rows})
    ps = sorted({r["P"] for r in rows})
    # One line per label: "(heap)" and "(sync)" rows are other measurements of the method.
    methods = sorted({row_label(r) for r in rows})
    cmap = plt.get_cmap("tab20")
    colors = {m: cmap(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(4.2 * (len(ks) + 1), 4.2), squeeze=False)
    axes = axes[0]

    def series(x_key, fixed_key, fixed, method=None, key="jax_ms"):
        sel = [
            r for r in rows if r[fixed_key] == fixed and (method is None or row_label(r) == method)
        ]
        pts = sorted({(r[x_key], r[key]) for r in sel})
        return [x for x, _ in pts], [y for _, y in pts]

    for ax, k in zip(axes[:-1], ks, strict=False):
        for m in methods:
            ax.plot(*series("P", "K", k, m), marker="o", ms=3, lw=1, color=colors[m], label=m)
        ax.plot(*series("P", "K", k, methods[0], "floor_ms"), "k--", lw=2, label="engine floor")
        ax.set(xscale="log", yscale="log", xlabel="P (parameters)", ylabel="ms", title=f"K = {k}")
    p_max = ps[-1]
    ax = axes[-1]
    for m in methods:
        ax.plot(*series("K", "P", p_max, m), marker="o", ms=3, lw=1, color=colors[m], label=m)
    ax.plot(*series("K", "P", p_max, methods[0], "floor_ms"), "k--", lw=2, label="engine floor")
    ax.set(xscale="log", yscale="log", xlabel="K (tasks)", ylabel="ms", title=f"P = {p_max:.0e}")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "json_files",
        nargs="+",
        help="JSON rows of bench_methods.py; a row of a later file replaces the row of the"
        " same (method, K, P, allocator, dispatch) of an earlier one (each row is one run's side-by-side"
        " timing)",
    )
    parser.add_argument("--png", help="also draw the times into this PNG file")
    args = parser.parse_args()
    merged: dict[tuple, dict] = {}
    for name in args.json_files:
        with open(name, encoding="utf-8") as f:
            for row in json.load(f):
                key = (
                    row["method"],
                    row["K"],
                    row["P"],
                    row.get("allocator", "default"),
                    row.get("dispatch", "async"),
                )
                merged[key] = row
    rows = sorted(merged.values(), key=lambda r: (r["P"], r["K"], r["method"]))
    print(HEADER)
    for row in rows:
        print(_format_row(row))
    print("\n| method | K | P | jax ms | target missed |\n|---|---|---|---|---|")
    for row in rows:
        if m := misses(row):
            print(
                f"| {row_label(row)} | {row['K']} | {row['P']:.0e} | {row['jax_ms']:.2f} | {'; '.join(m)} |"
            )
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
