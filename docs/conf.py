"""Sphinx configuration for pyro_genext."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "pyro_genext"
author = "pyro_genext developers"
copyright = "2026, pyro_genext developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
intersphinx_mapping = {}
html_theme = "alabaster"
html_static_path = ["_static"] if os.path.isdir(os.path.join(os.path.dirname(__file__), "_static")) else []
nitpicky = False
suppress_warnings = ["ref.python", "autodoc.import_object"]
# sections written by separate benchmark scripts, included into benchmarks.rst
exclude_patterns = ["_build", "benchmarks_*.rst"]
