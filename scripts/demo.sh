#!/usr/bin/env bash
# The demo command: same set-up as scripts/test.sh (makes .venv, installs torch,
# builds lca_ext), then `lca-ext demo`: the paper's FC network on 5,000 real MNIST
# digits with LCA tracked, and an HTML report.
#   bash scripts/demo.sh [--steps N] [--model lenet] [--out DIR] ...
source "$(dirname "$0")/env.sh"
echo "== running lca-ext demo"
exec "$VENV/bin/lca-ext" demo "$@"
