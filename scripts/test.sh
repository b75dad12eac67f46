#!/usr/bin/env bash
# The test command: on a machine with only Python 3.11 it makes a virtual
# environment, installs torch (CPU build) and the test tools, builds lca_ext and
# runs the tests.  Re-running reuses the environment and rebuilds incrementally.
#   bash scripts/test.sh [pytest args...]
# Environment: PYTHON (default python3.11), LCA_VENV (default .venv),
#              LCA_TORCH (default torch==2.13.0, the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${LCA_VENV:-.venv}
TORCH_SPEC=${LCA_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing $TORCH_SPEC and the test tools"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" -r requirements-dev.txt
echo "== building lca_ext"
"$VENV/bin/python" -m pip install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import lca_ext; i = lca_ext.build_info(); print('lca_ext built: cuda=%s simd=%s threads=%s' % (i['cuda'], i['simd'], i['num_threads']))"
echo "== running the tests"
exec "$VENV/bin/python" -m pytest tests "$@"
