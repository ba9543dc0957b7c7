"""The documentation: a strict Sphinx build and every docstring example as a doctest.

* ``test_docs_build_without_warnings`` builds ``docs/`` with warnings as errors
  (``sphinx-build -W --keep-going``), as the documentation is published. Sphinx
  and its extensions are documentation dependencies: locally a missing one skips
  the test; with ``CI=true`` it fails it, with the command that installs them
  (the same rule as the parity references, ``tests/parity/conftest.py``).
* ``test_docstring_examples`` runs the ``Example:`` blocks of every docstring of
  every module of ``mtl_optax`` with :mod:`doctest` (one case per module), so the
  examples shown in the API reference are the ones that run.
* ``test_page_examples`` does the same for the ``>>>`` examples of the pages in
  ``docs/``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

import mtl_optax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# The documentation dependencies (the `docs` extra of pyproject.toml).
DOCS_INSTALL = "pip install 'sphinx==8.2.3' 'myst-parser==5.2.0' 'furo==2025.12.19'"
DOCS_MODULES = ("sphinx", "myst_parser", "furo")

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# A Google-style example section header inside a docstring.
EXAMPLE_SECTION = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)

MODULES = [
    "mtl_optax",
    *sorted(f"mtl_optax.{info.name}" for info in pkgutil.iter_modules(mtl_optax.__path__)),
]
PAGES = sorted(
    str(path.relative_to(DOCS))
    for path in DOCS.rglob("*.md")
    if "_build" not in path.parts and ">>> " in path.read_text(encoding="utf-8")
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _require_docs_dependencies() -> None:
    """Skips (locally) or fails (``CI=true``) when Sphinx or an extension is missing."""
    for name in DOCS_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as error:
            message = (
                f"documentation dependency {name!r} is not importable"
                f" ({type(error).__name__}: {error}). Install it with:\n    {DOCS_INSTALL}\n"
                "(or pip install -e '.[docs]')."
            )
            if _in_ci():
                pytest.fail(f"CI=true: {message}", pytrace=False)
            pytest.skip(message)


@pytest.fixture
def float32_jax() -> Iterator[None]:
    """Doctest outputs are written for JAX's default float32 mode."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _run(tests: list[doctest.DocTest]) -> tuple[int, int, str]:
    """Runs ``tests``; returns (attempted, failed, the failure report)."""
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    for test in tests:
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    return results.attempted, results.failed, "".join(report)


def _own_docstrings(module) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the module and of what it defines."""
    yield module.__name__, inspect.getdoc(module) or ""
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module.__name__}.{name}", inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) or isinstance(member, property):
                        yield f"{module.__name__}.{name}.{attr}", inspect.getdoc(member) or ""


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name: str, float32_jax: None) -> None:
    """Every ``>>>`` example in the module's docstrings gives the output shown."""
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder().find(module, module_name)
    attempted, failed, report = _run([t for t in tests if t.examples])
    assert failed == 0, f"{failed} of {attempted} docstring examples failed:\n{report}"


@pytest.mark.parametrize("module_name", MODULES)
def test_example_sections_are_doctests(module_name: str) -> None:
    """An ``Example:`` section without ``>>>`` prompts would be shown but never run."""
    module = importlib.import_module(module_name)
    untested = [
        name
        for name, doc in _own_docstrings(module)
        if EXAMPLE_SECTION.search(doc) and ">>>" not in doc[EXAMPLE_SECTION.search(doc).end() :]
    ]
    assert not untested, f"Example sections with no '>>>' example (never tested): {untested}"


@pytest.mark.parametrize("page", PAGES)
def test_page_examples(page: str, float32_jax: None) -> None:
    """The ``>>>`` examples of a documentation page give the output shown."""
    path = DOCS / page
    parser = doctest.DocTestParser()
    test = parser.get_doctest(path.read_text(encoding="utf-8"), {}, page, str(path), 0)
    attempted, failed, report = _run([test])
    assert attempted > 0
    assert failed == 0, f"{failed} of {attempted} examples of docs/{page} failed:\n{report}"


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    """``sphinx-build -W --keep-going -b html docs`` succeeds: no warning at all."""
    _require_docs_dependencies()
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "-d",
        str(tmp_path / "doctrees"),
        str(DOCS),
        str(tmp_path / "html"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"strict docs build failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    html = tmp_path / "html"
    for page in ["index", "getting_started", "conventions", "examples", "benchmarks"]:
        assert (html / f"{page}.html").is_file(), f"{page}.html not built"
    # Every registered method has its entry in the API reference (an autodoc
    # anchor such as id="mtl_optax.mgda" or id="mtl_optax._mgda_ub.mgda_ub").
    anchors = set()
    for page in html.rglob("*.html"):
        anchors.update(re.findall(r'id="(mtl_optax\.[\w.]+)"', page.read_text(encoding="utf-8")))
    documented = {anchor.rsplit(".", 1)[1] for anchor in anchors}
    undocumented = sorted(set(mtl_optax.available(aliases=False)) - documented)
    assert not undocumented, f"registered methods missing from the API reference: {undocumented}"
