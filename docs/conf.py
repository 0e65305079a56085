"""Sphinx configuration of the scfedvi documentation (MyST, myst-nb, the book theme).

Build with ``make docs`` (warnings are errors). Notebooks are rendered as committed, without
outputs: the test suite executes them (``tests/test_tutorials.py``), the docs build does not.
"""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from scfedvi import __version__  # noqa: E402

project = "scfedvi"
author = "scfedvi developers"
copyright = f"{date.today().year}, {author}"
version = release = __version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
master_doc = "index"

# MyST: heading anchors for links such as method.md#the-site-local-statistics-trap.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]

# Notebooks: never executed here (the tests run them; a build stays under a minute).
nb_execution_mode = "off"

# API reference: autosummary pages from the numpydoc docstrings.
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True

html_theme = "sphinx_book_theme"
html_title = f"scfedvi {version}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
