"""Sphinx configuration of citron's documentation site.

Build it with ``sphinx-build -W -b html docs build/docs`` (``pip install -e
'.[docs]'``): the guides are the Markdown files of this folder (MyST), the
API reference comes from the docstrings (autodoc). Warnings are errors.
"""

from __future__ import annotations

project = "citron"
author = "the citron authors"
copyright = "the citron authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinxcontrib.mermaid",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "api/_build"]
myst_fence_as_directive = ["mermaid"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
html_theme = "alabaster"
html_title = "citron"
nitpicky = False
