#!/usr/bin/env bash
# The docs command: builds the documentation site from docs/ into
# docs/_build/html (open docs/_build/html/index.html; it works offline).
# Makes .venv and builds lca_ext as scripts/test.sh does (the API pages are read
# from the built package), installs the docs tools, and treats every warning as
# an error: a broken reference or a docstring that does not render fails.
#   bash scripts/docs.sh [sphinx-build args...]
source "$(dirname "$0")/env.sh"
echo "== installing the docs tools"
"$VENV/bin/python" -m pip install -q -r requirements-docs.txt
echo "== building the site (warnings are errors)"
"$VENV/bin/python" -m sphinx -E -W --keep-going -q -b html docs docs/_build/html "$@"
echo "== docs/_build/html/index.html"
