#!/usr/bin/env bash
# The demo command: same set-up as scripts/test.sh, then LCA of a small MLP's
# training, step by step (examples/quickstart.py).
#   bash scripts/demo.sh [--steps N] [--lr LR]
source "$(dirname "$0")/env.sh"
echo "== running examples/quickstart.py"
exec "$VENV/bin/python" examples/quickstart.py "$@"
