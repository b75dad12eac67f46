# Sourced by scripts/test.sh and scripts/demo.sh: make the virtual environment
# (if missing), install torch (CPU build) and the dev tools, build lca_ext.
# Environment: PYTHON (default python3.11), LCA_VENV (default .venv),
#              LCA_TORCH (default torch==2.13.0, the CPU build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${LCA_VENV:-.venv}
TORCH_SPEC=${LCA_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing $TORCH_SPEC and the dev tools"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" -r requirements-dev.txt
echo "== building lca_ext"
"$VENV/bin/python" -m pip install -q --no-build-isolation -e .
"$VENV/bin/python" -c "import lca_ext; i = lca_ext.build_info(); print('lca_ext built: cuda=%s simd=%s threads=%s' % (i['cuda'], i['simd'], i['num_threads']))"
