"""The XLA flags that make the test processes compile fast (see ``tests/conftest.py``).

One definition for the test processes (``conftest.py`` sets them before JAX
creates its CPU backend) and for the scripts they run in subprocesses of their
own (``sharding_check.py``); this module imports nothing, so a script can read
it before importing JAX.
"""

FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)
