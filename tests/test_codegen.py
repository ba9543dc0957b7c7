"""The suite's compile flags do not change the numbers a user's program computes.

The test processes compile with LLVM's optimisations and XLA's MLIR fusion
emitters off (``tests/conftest.py``), which halves the suite's time; users and
the benchmarks compile with XLA's defaults. ``tests/codegen_check.py`` computes
two steps of every method and the engine's products on long leaves; here it runs
once in a subprocess with XLA's default flags and once in this process, and the
two must agree to float32 rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import codegen_check
from .xla_flags import cpu_subprocess_env

HERE = Path(__file__).resolve().parent

# Float32 rounding: the two code generators may order a reduction differently,
# and an entry that cancels keeps the absolute error of the array's largest
# (conflict_free: 4e-6 on 0.134 in an update whose largest entry is 16).
RTOL, ATOL_OF_LARGEST = 1e-5, 1e-6
# CAGrad's projected-gradient solver stops at a relative residual of 1e-5 in
# float32, so a last-bit difference can stop it some iterations earlier or
# later (on the second step its dual weights differed by 1.6e-4 of their norm
# and its update by 3e-5): its arrays are compared as vectors, to 1e-3 of their
# norm (its iteration count and last residual are zeroed by codegen_check).
SOLVER_NORM_RTOL = {"cagrad": 1e-3}


def test_default_xla_codegen_gives_the_numbers_the_suite_checks(tmp_path):
    out = tmp_path / "default_codegen.npz"
    done = subprocess.run(
        [sys.executable, str(HERE / "codegen_check.py"), str(out)],
        env=cpu_subprocess_env(),  # XLA's default flags
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"]
    default = dict(np.load(out))
    here = codegen_check.results()
    assert sorted(default) == sorted(here)
    for key, expected in default.items():
        name = key.split("/")[0]
        got = here[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if name in SOLVER_NORM_RTOL:
            gap = np.linalg.norm(np.ravel(got - expected))
            assert gap <= SOLVER_NORM_RTOL[name] * np.linalg.norm(np.ravel(expected)), (key, gap)
        elif np.issubdtype(expected.dtype, np.inexact):
            atol = ATOL_OF_LARGEST * float(np.max(np.abs(expected), initial=1.0))
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=atol, err_msg=key)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=key)
