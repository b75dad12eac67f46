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
echo "== building lca_ext (incremental: objects stay in build/, ninja recompiles what changed)"
# The library is built in place (lca_ext/_C*.so) with a persistent build directory;
# `pip install -e .` would compile everything again in a fresh temporary directory
# on every run, so the editable install below only installs the package (metadata,
# the lca-ext command) and finds the in-place library.
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace 2>&1 \
  | { grep -v -e "^ninja: no work to do" -e "UserWarning" -e "warnings.warn" || true; }
LCA_EXT_METADATA_ONLY=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 \
  | { grep -v -e "^WARNING: Location" -e "BuildBackendWarning" -e "^ *!!" -e "^ *\*\*\*" \
        -e "Please be careful" -e "name as your package" -e "with strategy" -e "^ *$" || true; }
"$VENV/bin/python" -c "import lca_ext; i = lca_ext.build_info(); print('lca_ext %s built against torch %s: cuda=%s, C++ compiled for %s, float32 loop in use %s (chosen at run time), threads=%s' % (lca_ext.__version__, i['torch_build'], i['cuda'], i['simd'], i['cpu_float32_kernel'], i['num_threads']))"
