"""Smoke tests of the benchmark scripts: they run, write their JSON rows, and report them.

Only tiny problems and no timing assertion (speed is measured by the scripts
themselves, never asserted in tests); what is checked is that the scripts
still work with the library as it is, so that the numbers in
``benchmarks/README.md`` can be regenerated.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from .conftest import FAST_COMPILE_XLA_FLAGS

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS  # the row's numbers are not checked, only written
    env["JAX_PLATFORMS"] = "cpu"
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
