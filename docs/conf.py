"""Sphinx configuration: the guides (Markdown, via MyST) and the API reference (autodoc +
napoleon, math by MathJax). Built in strict mode by ``make test`` and ``make docs``:

    python -m sphinx -W --keep-going -b html docs build/docs
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # document this checkout, installed or not

import flora  # noqa: E402

project = "flora-optim"
author = "The flora-optim authors"
copyright = "2026, the flora-optim authors"
release = version = flora.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style "Args:" / "Returns:" sections
    "sphinx.ext.mathjax",  # :math: roles and .. math:: blocks of the docstrings
    "myst_parser",  # the Markdown pages
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_static_path: list[str] = []
