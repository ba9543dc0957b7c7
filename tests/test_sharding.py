"""Every registered method in a sharded train step equals the single-device step.

The checks run in ``tests/sharding_check.py``, in a subprocess of its own: the
eight simulated CPU devices (``--xla_force_host_platform_device_count=8``) must
be requested before JAX is imported, and pytest has imported it already. One
subprocess runs every method (about 70 s of CPU time, most of it XLA
compilation); one test below reads its JSON report.

For every method in ``mtl_optax.available(aliases=False)``, two steps of
``task_grads`` + ``optax.chain(method, optax.adam(1e-2))`` under ``jax.jit`` in
float64 are compared with the same steps on one device, for the layouts:

* ``data_parallel``: batch sharded over the 8 devices, parameters replicated;
  the parameters, updates and the whole optimizer state come out replicated.
* ``fsdp``: batch and every parameter leaf sharded over the 8 devices (so the
  ``[K, ...]`` task gradients are sharded along a parameter axis); the
  parameters, updates and Adam moments come out sharded like the parameters,
  no state leaf as large as the largest parameter is replicated, and the
  compiled step has no all-gather of a stacked task-gradient leaf.
* ``explicit_update``: the first update alone, on task gradients sharded like
  ``fsdp``'s over a mesh with ``Explicit`` axes (``jax.make_mesh``'s default,
  where JAX raises on ambiguous shardings); the update comes out sharded like
  the parameters.

Tolerance: the largest difference of each leaf (parameters after two steps,
every optimizer-state leaf) at most ``RTOL`` times that leaf's largest
magnitude: 1e-8 (observed at most 1e-10: the sharded reductions sum in another
order), 1e-6 for CAGrad, whose dual solver stops at a relative tolerance of
1e-8 in float64, so that a different rounding may stop it one iteration
earlier or later (observed 5e-8).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mtl_optax

from .xla_flags import FAST_COMPILE_XLA_FLAGS, cpu_subprocess_env

HERE = Path(__file__).resolve().parent
METHODS = mtl_optax.available(aliases=False)
LAYOUTS = ("data_parallel", "fsdp", "explicit_update")
RTOL = {"cagrad": 1e-6}
DEFAULT_RTOL = 1e-8


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharding_check.py"), "--methods", ",".join(METHODS)],
        capture_output=True,
        text=True,
        env=cpu_subprocess_env(),  # the script sets its own flags
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _problems(name: str, layout: str, got: dict) -> list[str]:
    """What is wrong with one method's sharded step in one layout (nothing if it is right)."""
    where = f"{name} / {layout}"
    if "error" in got:
        return [f"{where}: raised\n{got.get('traceback', got['error'])}"]
    rtol = RTOL.get(name, DEFAULT_RTOL)
    out = []
    for key in ("params_rel", "state_rel"):
        if not got[key] <= rtol:
            out.append(f"{where}: {key} = {got[key]:.3g} > {rtol:g}")
    if not got["shardings_ok"]:
        out.append(f"{where}: unexpected shardings {got['param_specs']}")
    if got["stacked_gathers"]:
        out.append(f"{where}: all-gathers of stacked task gradients {got['stacked_gathers']}")
    return out


# One test reads the report: the module fixture's subprocess takes ~90 s, and
# under pytest-xdist it would run once on every worker that gets a test using it.
def test_every_method_sharded_step_equals_single_device_step(report):
    assert sorted(k for k in report if not k.startswith("_")) == sorted(METHODS)
    problems = [
        p
        for name in METHODS
        for layout in LAYOUTS
        for p in _problems(name, layout, report[name][layout])
    ]
    assert not problems, "\n".join(problems)
    # The engine took the cache-friendly loop over column blocks on one device,
    # and the plain contraction on a leaf sharded over the mesh (the loop's
    # dynamic slices would make XLA gather the leaf onto every device).
    assert report["_engine"] == {"blocked_on_one_device": True, "blocked_on_sharded_leaf": False}


def test_sharded_training_example_runs():
    # Smoke test of examples/sharded_training.py: both layouts train, match
    # one device (the script asserts it) and report the expected shardings.
    env = cpu_subprocess_env(FAST_COMPILE_XLA_FLAGS)  # the example adds its 8 devices
    example = HERE.parent / "examples" / "sharded_training.py"
    proc = subprocess.run(
        [sys.executable, str(example), "--method", "mean", "--steps", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "8 devices (cpu)" in proc.stdout
    assert "w1: params P(None, 'data'), Adam mu P(None, 'data')" in proc.stdout, proc.stdout
