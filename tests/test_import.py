"""Importing the package prints nothing and raises no warning."""

import subprocess
import sys


def test_import_prints_no_warnings():
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import mtl_optax; mtl_optax.available()"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_package_ships_py_typed():
    import importlib.resources

    assert importlib.resources.files("mtl_optax").joinpath("py.typed").is_file()
