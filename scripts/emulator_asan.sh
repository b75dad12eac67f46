#!/usr/bin/env bash
# The emulated CUDA tests under AddressSanitizer: the kernel sources run on the
# CPU (tests/cuda_emu) built with -fsanitize=address, python started with
# libasan preloaded so every allocation (torch's tensors included) gets guard
# zones; any out-of-bounds read or write by a kernel aborts with a report.
#   bash scripts/emulator_asan.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
libasan=$(${CXX:-g++} -print-file-name=libasan.so)
[ -f "$libasan" ] || { echo "libasan.so not found (install the compiler's ASan runtime)" >&2; exit 1; }
# libstdc++ preloaded too: ASan must find the real __cxa_throw when it starts
libstdcxx=$(${CXX:-g++} -print-file-name=libstdc++.so)
export LCA_EMULATOR_SANITIZE=address LCA_REQUIRE_EMULATOR=1
# leaks: python and torch keep allocations to exit on purpose; fibers switch
# stacks, which ASan's stack tracking tolerates but cannot follow
# reports go to build/asan.<pid> (pytest captures stderr, and an abort loses it)
mkdir -p build
rm -f build/asan.*
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:detect_stack_use_after_return=0:abort_on_error=1:log_path=build/asan}
rc=0
LD_PRELOAD="$libasan $libstdcxx" "$PY" -m pytest tests/test_cuda_emulated.py -q -p no:cacheprovider "$@" || rc=$?
for f in build/asan.*; do
  [ -f "$f" ] || continue
  grep -q "ERROR: AddressSanitizer" "$f" || continue
  echo "== AddressSanitizer report ($f):" >&2
  head -40 "$f" >&2
  rc=1
done
exit $rc
