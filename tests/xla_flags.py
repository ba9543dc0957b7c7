"""The XLA flags that make the test processes compile fast (see ``tests/conftest.py``).

One definition for the test processes (``conftest.py`` sets them before JAX
creates its CPU backend) and for the scripts they run in subprocesses of their
own (``sharding_check.py``); this module does not import JAX, so a script can
read it before importing JAX.
"""

import os

FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)


def cpu_subprocess_env(xla_flags: str = "") -> dict[str, str]:
    """This process's environment for a Python subprocess on JAX's CPU backend.

    The subprocess gets ``xla_flags`` as its ``XLA_FLAGS`` (none given: XLA's
    defaults), not the test process's own flags, and ``JAX_PLATFORMS=cpu``.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    return env
