#!/usr/bin/env bash
# The test command: on a machine with only Python 3.11 it makes .venv, installs
# torch (CPU build) and the test tools, builds lca_ext and runs the tests.
# Re-running reuses the environment and rebuilds incrementally.
#   bash scripts/test.sh [pytest args...]
source "$(dirname "$0")/env.sh"
echo "== running the tests"
exec "$VENV/bin/python" -m pytest tests "$@"
