"""Sphinx configuration of the mtl_optax documentation.

Build (warnings are errors, as in ``tests/test_docs.py``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST); the API reference is pulled from the docstrings with
autodoc (Google style through napoleon, ``.. math::`` through MathJax).
``examples/README.md`` and ``benchmarks/README.md`` are included when they exist.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402

project = "mtl_optax"
author = "mtl_optax developers"
copyright = "mtl_optax developers"  # noqa: A001
release = mtl_optax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ math, ::: fences, {include} of the repository's READMEs.
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Docstrings: Google style; the "Example:" / "References:" sections as rubrics.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" sections as fields, so that they do not duplicate the NamedTuple
# fields autodoc documents with :members:.
napoleon_use_ivar = True
napoleon_custom_sections = [
    ("Differences from the references", "notes_style"),
    ("Degenerate cases", "notes_style"),
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"show-inheritance": False}
# NamedTuple states carry their fields; the generated "Alias for field number N"
# docstrings are noise.
autodoc_inherit_docstrings = False

html_theme = "furo"
html_title = f"mtl_optax {release}"
html_static_path: list[str] = []

# Repository READMEs shown as pages: {docname: README path}. The examples' README
# is written alongside the examples; without it the page lists the scripts.
READMES = {
    "examples": ROOT / "examples" / "README.md",
    "benchmarks": ROOT / "benchmarks" / "README.md",
}
# Where a README's link to another README points in these docs.
README_DOCS = {(ROOT / "README.md").resolve(): "index"} | {
    path.resolve(): doc for doc, path in READMES.items()
}
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)(\s+\"[^\"]*\")?\)")


def _rewrite_link(match: re.Match[str], readme: Path) -> str:
    """A README's relative link or image, made valid from ``docs/``.

    Links to a README shown in these docs become ``{doc}`` links; links to other
    files of the repository become ``{download}`` links; links to folders or to
    missing files become their text in code style (output folders, generated
    results). Missing images become their alt text. URLs and anchors are kept.
    """
    bang, text, target, title = match.groups()
    if "://" in target or target.startswith(("#", "mailto:")):
        return match.group(0)
    file_part = target.split("#", 1)[0]
    path = (readme.parent / file_part).resolve()
    relative = os.path.relpath(path, DOCS).replace(os.sep, "/")
    if bang:
        return f"![{text}]({relative}{title or ''})" if path.is_file() else f"*{text}*"
    label = text.replace("`", "") or file_part
    if path in README_DOCS:
        return f"{{doc}}`{label} <{README_DOCS[path]}>`"
    if path.is_file():
        return f"{{download}}`{label} <{relative}>`"
    return f"`{label}`"


def _readme_markdown(readme: Path) -> str:
    text = readme.read_text(encoding="utf-8")
    return _LINK.sub(lambda m: _rewrite_link(m, readme), text)


def _readme_pages(app, docname: str, source: list[str]) -> None:
    """Fills the ``<!-- readme -->`` marker of a page with its README."""
    readme = READMES.get(docname)
    if readme is None or "<!-- readme -->" not in source[0]:
        return
    if readme.is_file():
        app.env.note_dependency(str(readme))  # rebuild the page when it changes
        body = _readme_markdown(readme)
    else:
        scripts = sorted(p.name for p in readme.parent.glob("*.py"))
        listing = "\n".join(f"* `{readme.parent.name}/{name}`" for name in scripts)
        body = (
            f"# {docname.capitalize()}\n\nThe scripts live in `{readme.parent.name}/`"
            " in the repository (run them from the repository root):\n\n" + listing + "\n"
        )
    source[0] = source[0].replace("<!-- readme -->", body)


def setup(app):
    app.connect("source-read", _readme_pages)
    return {"parallel_read_safe": True}
