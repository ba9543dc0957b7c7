"""Smoke tests of the benchmark scripts: they run, write their JSON rows, and report them.

Only tiny problems and no timing assertion (speed is measured by the scripts
themselves, never asserted in tests); what is checked is that the scripts
still work with the library as it is, so that the numbers in
``benchmarks/README.md`` can be regenerated.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import statistics
import subprocess
import sys

import pytest

from .xla_flags import FAST_COMPILE_XLA_FLAGS, cpu_subprocess_env

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> str:
    # The row's numbers are not checked, only written: the fast-compile flags.
    env = cpu_subprocess_env(FAST_COMPILE_XLA_FLAGS)
    done = subprocess.run(
        [sys.executable, *args],
        cwd=BENCHMARKS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _benchmark_module(name: str):
    """Imports ``benchmarks/<name>.py`` (and the benchmark modules it imports)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_bench_methods_writes_rows_that_report_reads(tmp_path):
    out = tmp_path / "rows.json"
    heap = tmp_path / "heap.json"
    common = ["--K", "2,3", "--P", "4096", "--no-torch", "--repeats", "2", "--budget", "0.1"]
    _run("bench_methods.py", *common, "--methods", "mean,mgda,imtl_g", "--json", str(out))
    _run("bench_methods.py", *common, "--methods", "mgda", "--heap-allocator", "--json", str(heap))
    sync = tmp_path / "sync.json"
    _run(
        "bench_methods.py",
        *common,
        *("--methods", "mgda", "--sync-dispatch", "--settle-ms", "5", "--json", str(sync)),
    )
    rows = json.loads(out.read_text())
    assert {(r["method"], r["K"], r["allocator"]) for r in rows} == {
        (m, k, "default") for m in ("mean", "mgda", "imtl_g") for k in (2, 3)
    }
    for r in rows:
        assert r["P"] == 4096 and r["jax_ms"] > 0 and r["floor_ms"] > 0
        # At least 3 rounds even when the budget is spent, and the paired ratio.
        assert r["rounds"] >= 3 and r["paired"]["floor"] > 0
    assert {r["allocator"] for r in json.loads(heap.read_text())} == {"glibc heap"}
    assert {r["dispatch"] for r in rows} == {"async"}
    assert {r["dispatch"] for r in json.loads(sync.read_text())} == {"sync"}
    assert {r["settle_s"] for r in rows} == {0.0}
    assert {r["settle_s"] for r in json.loads(sync.read_text())} == {0.005}
    report = _run("report.py", str(out), str(heap), str(sync))
    # A heap or sync row does not replace the default row of the same (method, K, P).
    assert report.count("| mgda (heap) ") == 2
    assert report.count("| mgda (sync) ") == 2
    assert report.count("| mgda           |") == 2
    assert report.count("| imtl_g         |") == 2


def test_bench_lower_bounds_writes_a_ratio_per_column_and_size(tmp_path):
    out = tmp_path / "bounds.json"
    common = ["--K", "2,3", "--P", "4096", "--repeats", "2", "--budget", "0.1"]
    printed = _run("bench_lower_bounds.py", *common, "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["K"], r["P"]) for r in rows] == [(2, 4096), (3, 4096)]
    bench_lower_bounds = _benchmark_module("bench_lower_bounds")
    for r in rows:
        assert set(r["ms"]) == set(bench_lower_bounds.COLUMNS)
        assert set(r["per_floor"]) == set(bench_lower_bounds.COLUMNS[1:])
        assert all(v > 0 for v in r["ms"].values()) and r["rounds"] >= 3
        assert bench_lower_bounds.format_row(r) in printed


def test_momentum_floor_updates_the_state_and_takes_the_floor_of_the_new_state():
    import jax.numpy as jnp

    bench_lower_bounds = _benchmark_module("bench_lower_bounds")
    J = jnp.arange(12.0).reshape(2, 6) - 5.0
    S = jnp.ones((2, 6))
    out, new = bench_lower_bounds.momentum_floor(J, S)
    expected = 0.9 * S + 0.1 * J
    assert jnp.allclose(new, expected)
    assert jnp.allclose(out, bench_lower_bounds.floor_fn(expected))


def test_paired_ratio_is_the_median_of_round_ratios_not_the_ratio_of_medians():
    bench_methods = _benchmark_module("bench_methods")
    # Round by round the method takes 1.1x the floor, but a slow minute hit the
    # method's bursts in rounds 2-4 and the floor's only in rounds 2-3: the
    # ratio of the medians would say 4.4x.
    rounds = [[1.1, 1.0], [4.4, 4.0], [4.4, 4.0], [4.4, 1.0], [1.1, 1.0]]
    assert statistics.median(r[0] for r in rounds) / statistics.median(r[1] for r in rounds) == 4.4
    assert bench_methods.paired_ratio(rounds, 0, 1) == pytest.approx(1.1)
    # A row of an earlier run (no "paired") falls back to the ratio of its medians.
    row = {"jax_ms": 3.0, "floor_ms": 1.5, "torchjd_ms": 6.0, "dispatch_ms": 0.01}
    assert bench_methods.ratios(row) == (2.0, ("torchjd", 2.0))
    row["paired"] = {"floor": 1.25, "torchjd": 0.9}
    assert bench_methods.ratios(row) == (1.25, ("torchjd", 0.9))
    # The reference with the lowest paired speed-up is the one reported.
    row |= {"libmtl_ms": 9.0, "paired": {"floor": 1.25, "torchjd": 0.9, "libmtl": 0.8}}
    assert bench_methods.ratios(row)[1] == ("libmtl", 0.8)
