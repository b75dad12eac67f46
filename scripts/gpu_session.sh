#!/usr/bin/env bash
# One command for a session on a GPU machine (H100 / H200): build lca_ext with
# its CUDA kernels for this GPU's arch only, check them, time them.  Run from
# anywhere; it works in the repository root.
#
#   bash scripts/gpu_session.sh [PHASE ...]          (default: session)
#
# A GPU is lent here for 15 minutes in all, its 1-2 minute start included, so
# the default is ONE call that fits in 9 minutes:
#   session   env build smoke bench tracker test (~6-8 min on an H200)
# and what did not fit goes in an optional second call:
#   extra     slow sanitize compile
# Phases, run in the order given (every phase that needs the extension builds it
# first; skipped when up to date), each step under a time cap within the deadline:
#   env       what is there: GPU, driver, nvcc, python, torch, packages
#   build     FORCE_CUDA=1 setup.py build_ext --inplace for the GPU's arch, then
#             lca_ext.build_info() and a check that the CUDA kernels registered
#   smoke     every op once on small CUDA inputs against the CPU ops (~20 s),
#             then `lca-ext verify-cuda --no-record` (the user's check, ~1 min)
#   test      the CUDA tests: pytest tests -m "not slow" -k "cuda and not emulated"
#   cpu       the rest of the suite on this machine's torch (CI runs it anyway)
#   bench     benchmarks/test_bench_cuda.py without torch.compile (the op table)
#   tracker   benchmarks/test_bench_gpu_tracker.py: a tracked step of GPT-2 small
#             (124M parameters) vs its passes + the plain step, fused vs
#             reference kernels, GPU memory per parameter
#   slow      the slow CUDA tests (tensors of more than 2**31 elements)
#   sanitize  the smoke script under compute-sanitizer: memcheck, racecheck,
#             initcheck, synccheck (lca_ext kernels only, no caching allocator)
#   compile   the torch.compile baselines of benchmarks/test_bench_cuda.py
#   report    merge the benchmark parts into $OUT/<gpu>-<date>.json and print
#             the issue's targets (run by bench, tracker and compile as well)
#   all       every phase above but cpu (more than 10 minutes!)
# On the device tool: run `bash scripts/gpu_session.sh` with timeout_s 600, then
# (if the budget allows) `bash scripts/gpu_session.sh extra` on the warm machine.
#
# Rehearsal without a GPU (LCA_REHEARSE=1, with a CUDA build of torch here):
# the same phases, with the build for sm_90, the CUDA tests collected (and
# skipped), the GPU benchmarks collected, the tracker benchmark run on the CPU
# with a tiny GPT-2, and the smoke / verify steps replaced by their emulated
# counterparts; so the first GPU call does not die on a typo or a missing package.
#
# Output: everything is logged to $OUT/gpu-session-<gpu>-<date>.log; benchmark
# results go to $OUT/<gpu>-<date>.json (copy it to benchmarks/results/).  OUT
# defaults to benchmarks/results.  The exit status is 0 when every step passed,
# 1 when one failed or timed out, 2 when none failed but a step was skipped for
# lack of time; every step's result is listed at the end.
#
# Environment:
#   OUT                where logs and results go (default benchmarks/results)
#   LCA_PYTHON         the python to use (default: .venv-gpu/bin/python if it has
#                      a CUDA torch, else the python3 on PATH if it has one, else
#                      a new .venv-gpu with torch==2.14.1 -r requirements-dev.txt)
#   LCA_GPU_VENV=1     make / use .venv-gpu (pip install torch==2.14.1) first
#   LCA_DEADLINE_S     seconds this invocation may take (default 530)
#   LCA_PYTEST_ARGS    extra pytest arguments (default --maxfail=30; "-x" to stop early)
#   LCA_FORCE_BUILD=1  rebuild even when the sources did not change
#   LCA_REHEARSE=1     the rehearsal without a GPU (above)
#   TORCH_CUDA_ARCH_LIST  default: the GPU's compute capability (nvidia-smi)
#   .whl/*.whl         wheels carried along (e.g. zarr for the CPU tests) are
#                      installed into /tmp/lca-site and put on PYTHONPATH
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
START=$(date +%s)
DEADLINE=${LCA_DEADLINE_S:-530}
REHEARSE=${LCA_REHEARSE:-0}
OUT=${OUT:-$REPO/benchmarks/results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STATE=${LCA_STATE_DIR:-/tmp/lca-gpu-session}
mkdir -p "$STATE"
export PYTHONUNBUFFERED=1 LCA_EXT_ALLOW_UNVERIFIED_CUDA=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 16)}
(( JOBS > 16 )) && JOBS=16

PHASES=("$@")
[[ ${#PHASES[@]} -eq 0 ]] && PHASES=(session)
expand() {
  local p
  for p in "$@"; do
    case $p in
      session) echo env build smoke bench tracker test ;;
      extra) echo slow sanitize compile ;;
      all) echo env build smoke test bench tracker slow sanitize compile ;;
      *) echo "$p" ;;
    esac
  done
}
PHASES=($(expand "${PHASES[@]}"))
for p in "${PHASES[@]}"; do
  case $p in
    env|build|smoke|test|cpu|slow|sanitize|bench|tracker|compile|report) ;;
    *) echo "gpu_session.sh: unknown phase '$p' (session extra all, or env build smoke test cpu bench tracker slow sanitize compile report)" >&2
       exit 64 ;;
  esac
done

# ---------------------------------------------------------------------------
# GPU name and date: the names of the log and the results file

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
GPU_NAME=${GPU_NAME:-no-gpu}
(( REHEARSE )) && GPU_NAME="rehearsal $GPU_NAME"
GPU_SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
DAY=$(date -u +%F)
TAG="$GPU_SLUG-$DAY"
LOG="$OUT/gpu-session-$TAG.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
echo "===== gpu_session.sh ${PHASES[*]}: $(date -u '+%F %T') UTC, repo $REPO, OUT $OUT, deadline ${DEADLINE}s"

# ---------------------------------------------------------------------------
# step bookkeeping

STEPS=()
FAILED=0
INCOMPLETE=0

record() {
  STEPS+=("$(printf '%-12s %s' "$1" "$2")")
  echo "== [$1] $2"
}

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# run_step NAME CAP_S MIN_S CMD...: CMD under `timeout` (SIGINT first, so pytest
# still prints its summary), within what is left of the deadline.
run_step() {
  local name=$1 cap=$2 min=$3
  shift 3
  local t=$(( $(left) - 15 ))
  (( t > cap )) && t=$cap
  if (( t < min )); then
    record "$name" "SKIPPED: only ${t}s left (needs ${min}s); run this phase in a new call"
    INCOMPLETE=1
    return 0
  fi
  echo
  echo "===== $name (limit ${t}s): $*"
  local s rc d
  s=$(date +%s)
  timeout --signal=INT --kill-after=20 "$t" "$@"
  rc=$?
  d=$(( $(date +%s) - s ))
  if (( rc == 0 )); then
    record "$name" "ok (${d}s)"
  elif (( rc == 124 || rc == 137 )); then
    record "$name" "TIMEOUT after ${d}s"
    FAILED=1
  elif (( rc == 5 )) && [[ $1 == "$PY" && "$*" == *pytest* ]]; then
    record "$name" "no tests collected (${d}s)"
  else
    record "$name" "FAILED (exit $rc, ${d}s)"
    FAILED=1
  fi
  return $rc
}

finish() {
  echo
  echo "===== summary ($(( $(date +%s) - START ))s): ${PHASES[*]}"
  local s
  for s in "${STEPS[@]}"; do echo "  $s"; done
  echo "  log: $LOG"
  ls "$OUT"/"$TAG".json 2>/dev/null | sed 's/^/  results: /'
  local rc=0
  (( INCOMPLETE )) && rc=2
  (( FAILED )) && rc=1
  echo "  exit status $rc"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit $rc
}

# ---------------------------------------------------------------------------
# python, nvcc, arch

has_cuda_torch() {
  "$1" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1
}

make_venv() {
  local base
  for base in python3.11 python3.12 python3; do
    command -v "$base" >/dev/null 2>&1 || continue
    echo "== making .venv-gpu with $base (torch==2.14.1 -r requirements-dev.txt)"
    if [[ ! -x .venv-gpu/bin/python ]]; then
      "$base" -m venv --system-site-packages .venv-gpu || continue
    fi
    if timeout 300 .venv-gpu/bin/python -m pip install -q --retries 0 --timeout 10 \
         torch==2.14.1 -r requirements-dev.txt; then
      PY=$REPO/.venv-gpu/bin/python
      return 0
    fi
    echo "   pip install failed (no package index or local wheels?)"
    has_cuda_torch .venv-gpu/bin/python && { PY=$REPO/.venv-gpu/bin/python; return 0; }
    return 1
  done
  return 1
}

pick_python() {
  PY=
  if [[ -n ${LCA_PYTHON:-} ]]; then
    PY=$(command -v "$LCA_PYTHON")
  elif [[ ${LCA_GPU_VENV:-0} == 1 ]] && make_venv; then
    :
  else
    local c
    for c in "$REPO/.venv-gpu/bin/python" python3 python; do
      if command -v "$c" >/dev/null 2>&1 && has_cuda_torch "$c"; then
        PY=$(command -v "$c")
        break
      fi
    done
    [[ -z $PY ]] && make_venv
  fi
  if [[ -z $PY ]] || ! has_cuda_torch "$PY"; then
    echo "gpu_session.sh: no python with a CUDA build of torch (set LCA_PYTHON)" >&2
    record python "FAILED: no CUDA torch"
    FAILED=1
    finish
  fi
  # wheels carried in .whl/ (packages the image lacks, e.g. zarr)
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    echo "== installing carried wheels from .whl/ into /tmp/lca-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/lca-site "$REPO"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/lca-site"
  fi
}

find_nvcc() {
  NVCC=
  if [[ -n ${CUDA_HOME:-} && -x ${CUDA_HOME}/bin/nvcc ]]; then
    NVCC=$CUDA_HOME/bin/nvcc
  elif command -v nvcc >/dev/null 2>&1; then
    NVCC=$(command -v nvcc)
  else
    local d
    for d in /usr/local/cuda /usr/local/cuda-*; do
      [[ -x $d/bin/nvcc ]] && NVCC=$d/bin/nvcc
    done
  fi
  if [[ -n $NVCC ]]; then
    NVCC=$(readlink -f "$NVCC")
    export CUDA_HOME
    CUDA_HOME=$(dirname "$(dirname "$NVCC")")
    # an nvcc on PATH may be a wrapper script (here: /usr/local/bin/nvcc), whose
    # directory has no CUDA headers: take a toolkit that has both
    if [[ ! -f $CUDA_HOME/include/cuda_runtime.h ]]; then
      local d
      for d in /usr/local/cuda /usr/local/cuda-*; do
        if [[ -x $d/bin/nvcc && -f $d/include/cuda_runtime.h ]]; then
          NVCC=$(readlink -f "$d/bin/nvcc")
          CUDA_HOME=$d
        fi
      done
    fi
  fi
}

find_arch() {
  if [[ -n ${TORCH_CUDA_ARCH_LIST:-} ]]; then
    ARCHS=$TORCH_CUDA_ARCH_LIST
  else
    ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
              | tr -d ' ' | sort -u | paste -sd';')
    [[ -z $ARCHS ]] && ARCHS=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
    [[ -z $ARCHS ]] && ARCHS="9.0"
  fi
}

pick_python
find_nvcc
find_arch
echo "== python $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1))"
echo "== nvcc ${NVCC:-NOT FOUND} (CUDA_HOME=${CUDA_HOME:-}) $([[ -n $NVCC ]] && "$NVCC" --version | tail -2 | head -1)"
echo "== GPU $GPU_NAME, archs $ARCHS, MAX_JOBS $JOBS"

PYTEST_ARGS=(${LCA_PYTEST_ARGS:---maxfail=30})
"$PY" -c 'import pytest_timeout' >/dev/null 2>&1 && PYTEST_ARGS+=(--timeout="${LCA_TEST_TIMEOUT:-300}")

# ---------------------------------------------------------------------------
# phases

phase_env() {
  echo "===== env"
  nvidia-smi || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem,power.limit --format=csv || true
  [[ -n $NVCC ]] && "$NVCC" --version
  command -v compute-sanitizer || ls /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null || true
  "$PY" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs",
          "capability %d.%d" % (p.major, p.minor))
for m in ["numpy", "pytest", "pytest_benchmark", "pytest_timeout", "hypothesis", "expecttest",
          "zarr", "mlxtend", "lightning", "tensorboard", "matplotlib", "PIL", "tqdm", "ninja",
          "setuptools", "pybind11", "triton"]:
    try:
        mod = importlib.import_module(m)
        print(f"  {m:18s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {m:18s} MISSING ({type(e).__name__})")
PY
  write_env_json
  record env "ok"
}

write_env_json() {
  "$PY" - "$STATE/env.json" "$GPU_NAME" "${NVCC:-}" "$ARCHS" <<'PY' || true
import hashlib, glob, json, os, platform, subprocess, sys
import torch
out, gpu, nvcc, archs = sys.argv[1:5]
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"unavailable: {e}"
env = dict(gpu=gpu, archs=archs, python=platform.python_version(), torch=torch.__version__,
           torch_cuda=torch.version.cuda,
           nvidia_smi=run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,"
                           "clocks.max.sm,clocks.max.mem", "--format=csv,noheader"]),
           nvcc=run([nvcc, "--version"]).splitlines()[-2:] if nvcc else None,
           git=run(["git", "rev-parse", "HEAD"]) or None,
           git_status=run(["git", "status", "--short", "csrc", "tests", "benchmarks"]) or None,
           csrc_sha256={p: hashlib.sha256(open(p, "rb").read()).hexdigest()[:16]
                        for p in sorted(glob.glob("csrc/**/*", recursive=True)) if os.path.isfile(p)})
try:
    import lca_ext
    info = lca_ext.build_info()
    info.pop("parallel_info", None)
    env["build_info"] = info
except Exception as e:
    env["build_info"] = f"not importable: {e}"
json.dump(env, open(out, "w"), indent=1)
PY
}

source_hash() {
  cat setup.py $(find csrc -type f | sort) | sha256sum | cut -c1-32
  echo "$ARCHS $PY"
}

built_ok() {
  compgen -G "lca_ext/_C*.so" >/dev/null || return 1
  [[ -f $STATE/build.hash ]] && [[ "$(source_hash)" == "$(cat "$STATE/build.hash")" ]] || return 1
  "$PY" -c 'import sys, lca_ext, torch; sys.exit(0 if lca_ext.build_info()["cuda"] else 1)' >/dev/null 2>&1
}

BUILT=0
phase_build() {
  (( BUILT )) && return 0
  if [[ ${LCA_FORCE_BUILD:-0} != 1 ]] && built_ok; then
    record build "up to date (sources unchanged since the last build here)"
  else
    if [[ -z $NVCC ]]; then
      record build "FAILED: nvcc not found (set CUDA_HOME)"
      FAILED=1
      finish
    fi
    rm -f "$STATE/build.hash"
    run_step build 480 60 env FORCE_CUDA=1 CUDA_HOME="$CUDA_HOME" TORCH_CUDA_ARCH_LIST="$ARCHS" \
      MAX_JOBS="$JOBS" "$PY" setup.py -q build_ext --inplace || { FAILED=1; finish; }
  fi
  echo "===== build_info"
  if "$PY" - <<'PY'
import json, sys, torch, lca_ext
info = lca_ext.build_info()
info.pop("parallel_info", None)
print(json.dumps(info, indent=1))
missing = [op for op in ("accumulate_", "allocate", "allocate_classes", "sign_changes_")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lca_ext::{op}", "CUDA")]
import os
rehearse = os.environ.get("LCA_REHEARSE") == "1"
ok = info["cuda"] and not missing and (torch.cuda.is_available() or rehearse)
print("CUDA kernels registered:", not missing, "| GPU visible:", torch.cuda.is_available(),
      "| device:", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
sys.exit(0 if ok else 1)
PY
  then
    # how it was linked: a libstdc++ linked into _C (the image's compiler did)
    # once made every error message with a number crash; csrc/validate.h
    echo "== linked with: ${CXX:-c++} $("${CXX:-c++}" -dumpfullversion 2>/dev/null) LDFLAGS='${LDFLAGS:-}'"
    local lib
    lib=$(ls lca_ext/_C*.so | head -1)
    readelf -d "$lib" 2>/dev/null | grep NEEDED | sed 's/^/   /'
    if nm -C --defined-only "$lib" 2>/dev/null | grep -q "_M_insert<unsigned long>"; then
      echo "== note: $lib holds its own copy of libstdc++'s stream code (static libstdc++)"
    fi
    source_hash >"$STATE/build.hash"
    BUILT=1
    record build_info "ok"
  else
    record build_info "FAILED: not a working CUDA build"
    FAILED=1
    finish
  fi
  write_env_json
}

# A small script that runs every op on CUDA and on the CPU and compares them;
# also what compute-sanitizer runs.
write_smoke() {
  cat >"$STATE/smoke.py" <<'PY'
import os
import sys
import torch
import lca_ext

CHUNK = lca_ext.build_info()["chunk_size"]
torch.manual_seed(0)
bad = []


def check(name, ok):
    print(("ok   " if ok else "FAIL ") + name, flush=True)
    if not ok:
        bad.append(name)


def same(x, y):
    return torch.equal(x.cpu(), y.cpu()) or bool(
        torch.all((x.cpu() == y.cpu()) | (torch.isnan(x.cpu()) & torch.isnan(y.cpu()))))


def close(x, y, scale):
    x, y = x.double().cpu(), y.double().cpu()
    fin = torch.isfinite(y)
    return (torch.equal(torch.isnan(x), torch.isnan(y))
            and bool(torch.all((x[fin] - y[fin]).abs() <= 1e-10 * (scale + 1e-30))))


shapes = [(5, 3), (), (0,), (4, 0), (7,), (33, 2049), (3, CHUNK + 5000), (CHUNK - 1,),
          (CHUNK + 1,), (1001, 131)] + [(i % 9 + 1, 3) for i in range(40)]
dts = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
       (torch.float16, torch.float16), (torch.float64, torch.bfloat16)]
if os.environ.get("LCA_SMOKE_QUICK") == "1":  # under compute-sanitizer
    dts = dts[1:3]
for pdt, gdt in dts:
    b = [torch.randn(s).to(pdt) for s in shapes]
    a = [(x.double() + 1e-2 * torch.randn(x.shape, dtype=torch.float64)).to(pdt) for x in b]
    g = [torch.randn(s).to(gdt) for s in shapes]
    if g[5].numel():
        g[5].view(-1)[7] = float("nan")
    scale = sum(((y.double() - x.double()) * z.double()).abs().nan_to_num(0, 0, 0).sum().item()
                for x, y, z in zip(b, a, g))
    tag = f"{str(pdt)[6:]}/{str(gdt)[6:]}"
    for nedges in (13, 10001):  # shared-memory and global-memory histograms
        edges = torch.linspace(-0.05, 0.05, nedges, dtype=torch.float64)
        res = {}
        for dev in ("cpu", "cuda"):
            cum = [torch.full(x.shape, 0.5, dtype=torch.float32, device=dev) for x in b]
            hs = [torch.zeros(x.shape, dtype=torch.int32, device=dev) for x in b]
            out = [torch.zeros(x.shape, dtype=torch.float64, device=dev) for x in b]
            r = lca_ext.allocate([x.to(dev) for x in b], [x.to(dev) for x in a],
                                 [x.to(dev) for x in g], row_sums=True, bin_edges=edges.to(dev),
                                 cum_lca=cum, helped_steps=hs, lca_out=out)
            plain = lca_ext.allocate([x.to(dev) for x in b], [x.to(dev) for x in a],
                                     [x.to(dev) for x in g])
            res[dev] = (r, plain, cum + hs + out)
        (r, p, st), (rc, pc, stc) = res["cuda"], res["cpu"]
        check(f"allocate {tag} {nedges} edges: counts", same(r.counts, rc.counts))
        check(f"allocate {tag} {nedges} edges: histogram", same(r.histogram, rc.histogram))
        check(f"allocate {tag} {nedges} edges: sums", close(r.sums, rc.sums, scale))
        check(f"allocate {tag} {nedges} edges: row sums", close(r.row_sums, rc.row_sums, scale))
        check(f"allocate {tag} {nedges} edges: state", all(same(x, y) for x, y in zip(st, stc)))
        check(f"allocate {tag} plain: counts, sums",
              same(p.counts, pc.counts) and close(p.sums, pc.sums, scale))
    for C in (1, 9):
        cg = [torch.randn((C, *s)).to(gdt) for s in shapes]
        r = lca_ext.allocate_classes([x.cuda() for x in b], [x.cuda() for x in a],
                                     [x.cuda() for x in cg])
        rc = lca_ext.allocate_classes(b, a, cg)
        check(f"allocate_classes {tag} C={C}", same(r.counts, rc.counts)
              and close(r.sums, rc.sums, 10 * scale))
    for acc_dt in (torch.float32, torch.float64):
        acc = [torch.randn(s, dtype=acc_dt) for s in shapes]
        accg = [x.cuda() for x in acc]
        for w in (1 / 6, -2.5):
            lca_ext.accumulate_(acc, g, w)
            lca_ext.accumulate_(accg, [x.cuda() for x in g], w)
        check(f"accumulate_ {str(acc_dt)[6:]} += {str(gdt)[6:]}",
              all(same(x, y) for x, y in zip(accg, acc)))
    for base in (None, a):
        st = {dev: ([torch.zeros(s, dtype=torch.int8, device=dev) for s in shapes],
                    [torch.zeros(s, dtype=torch.int32, device=dev) for s in shapes])
              for dev in ("cpu", "cuda")}
        for xs in ((b, a, g) if base is None else (b, a, b)):
            for dev, (last, ch) in st.items():
                lca_ext.sign_changes_(last, ch, [x.to(dev) for x in xs],
                                      [x.to(dev) for x in base] if base else None)
        check(f"sign_changes_ {str(pdt)[6:]} base={base is not None}",
              all(same(x, y) for x, y in zip(st["cuda"][0] + st["cuda"][1],
                                             st["cpu"][0] + st["cpu"][1])))
torch.cuda.synchronize()
print("SMOKE", "OK" if not bad else f"FAILED: {len(bad)} checks", flush=True)
sys.exit(1 if bad else 0)
PY
}

phase_smoke() {
  phase_build
  write_smoke
  if (( REHEARSE )); then   # no GPU: the smoke script compiles; verify runs emulated
    run_step smoke 60 5 "$PY" -m py_compile "$STATE/smoke.py"
    run_step verify-cuda 240 30 "$PY" -m pytest tests/test_verify.py -q -p no:cacheprovider \
      -k emulated "${PYTEST_ARGS[@]}"
    return
  fi
  run_step smoke 120 30 "$PY" "$STATE/smoke.py"
  # what a user runs before the CUDA kernels are enabled on their GPU
  run_step verify-cuda 150 30 "$PY" -m lca_ext verify-cuda --no-record
}

MISSING_IGNORES=()
cpu_ignores() {
  MISSING_IGNORES=()
  if ! "$PY" -c 'import zarr' >/dev/null 2>&1; then
    echo "== zarr is missing: leaving out the tests of the run store (CPU only; CI runs them)"
    MISSING_IGNORES+=(--ignore=tests/test_store.py --ignore=tests/test_offline.py
                      --ignore=tests/test_distributed.py
                      --deselect=tests/test_tracker_features.py::test_nan_loss_names_the_step_and_keeps_finished_steps)
  fi
}

phase_test() {
  phase_build
  # the emulated CUDA tests (test_cuda_emulated.py) need no GPU: CI runs them
  run_step test-cuda 200 60 "$PY" -m pytest tests -q -p no:cacheprovider -m "not slow" \
    -k "cuda and not emulated" -rfEsx --durations=15 --junitxml="$STATE/test-cuda.xml" \
    "${PYTEST_ARGS[@]}"
  cp "$STATE/test-cuda.xml" "$OUT/test-cuda-$TAG.xml" 2>/dev/null || true
}

phase_cpu() {
  phase_build
  cpu_ignores
  run_step test-rest 300 60 "$PY" -m pytest tests -q -p no:cacheprovider -m "not slow" \
    -k "not cuda" -rfE --durations=5 --ignore=tests/test_cuda_emulated.py \
    "${MISSING_IGNORES[@]}" "${PYTEST_ARGS[@]}"
}

phase_slow() {
  phase_build
  "$PY" -c 'import torch; f, t = torch.cuda.mem_get_info(); print(f"== GPU memory free {f / 2**30:.1f} of {t / 2**30:.1f} GiB")'
  run_step slow 200 60 "$PY" -m pytest tests -q -p no:cacheprovider -m slow -k cuda \
    -rfEsx --durations=10 "${PYTEST_ARGS[@]}"
}

find_sanitizer() {
  SAN=$(command -v compute-sanitizer 2>/dev/null || true)
  local c
  for c in "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer" \
           "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
           /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
    [[ -z $SAN && -x $c ]] && SAN=$c
  done
}

phase_sanitize() {
  phase_build
  write_smoke
  find_sanitizer
  if [[ -z $SAN ]]; then
    record sanitize "SKIPPED: compute-sanitizer not found"
    return
  fi
  local filter=()
  "$SAN" --help 2>&1 | grep -q -- "--kernel-name" && filter=(--kernel-name kns=lca_ext)
  local tool
  for tool in memcheck racecheck initcheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 LCA_SMOKE_QUICK=1 run_step "san-$tool" 90 20 "$SAN" --tool "$tool" \
      "${filter[@]}" --error-exitcode 1 --print-limit 20 "$PY" "$STATE/smoke.py"
  done
}

phase_report() {
  write_env_json
  "$PY" - "$STATE" "$OUT/$TAG.json" <<'PY'
import json, os, sys
state, out = sys.argv[1:3]
parts = [os.path.join(state, f) for f in ("bench-ops.json", "bench-compile.json")]
parts = [p for p in parts if os.path.exists(p)]
tracker_part = os.path.join(state, "bench-tracker.json")
tracker = json.load(open(tracker_part)) if os.path.exists(tracker_part) else None
if not parts and tracker:
    parts, merged0 = [], dict(rows=[])
if not parts and not tracker:
    print("report: no benchmark results yet (run the bench phase)")
    sys.exit(0)
merged = None if parts else merged0
for p in parts:
    d = json.load(open(p))
    if merged is None:
        merged = d
    else:
        merged["rows"] += d["rows"]
merged["parts"] = [os.path.basename(p) for p in parts]
if tracker:
    merged["tracker"] = tracker
    merged["parts"].append("bench-tracker.json")
host_part = os.path.join(state, "bench-host.json")
host = json.load(open(host_part))["host_ms_per_call"] if os.path.exists(host_part) else {}
if host:
    # the issue's keys: the GPU's numbers where there is one (else the CPU's, rehearsal)
    dev = "cuda" if "cuda" in host else "cpu"
    merged["host_ms_per_call"] = dict(device=dev, **{
        k.replace("lca_ext.", ""): v for k, v in host[dev].items()})
    merged["host_ms_per_call_all"] = host
    merged["parts"].append("bench-host.json")
merged["gpu_env"] = json.load(open(os.path.join(state, "env.json"))) \
    if os.path.exists(os.path.join(state, "env.json")) else None
rows = {r["name"]: r for r in merged["rows"]}


def ev(name):
    r = rows.get(name)
    return r.get("events_median_s") if r else None


def ratio(num, den):
    return num / den if num and den else None


print(f"\n{'case':58s} {'ev ms':>8s} {'ev GB/s':>8s} {'of copy':>8s} {'wall ms':>8s} "
      f"{'wall of copy':>12s} {'kernels':>7s}")
for r in merged["rows"]:
    print(f"{r['name'][:58]:58s} {(r.get('events_median_s') or 0) * 1e3:8.3f} "
          f"{r.get('events_gb_per_s') or 0:8.0f} {r.get('events_fraction_of_copy') or 0:8.0%} "
          f"{r['median_s'] * 1e3:8.3f} {r.get('fraction_of_probe') or 0:12.0%} "
          f"{r.get('kernels', '?'):>7}")
print("ev: CUDA events over calls queued back to back; wall: one call + synchronize; "
      "'of copy': bandwidth over a device-to-device copy's, bytes read + written")
checks = []
alloc = rows.get("cuda allocate (sums + counts)")
if alloc:
    checks.append(("allocate >= 85% of copy bandwidth (events)",
                   alloc.get("events_fraction_of_copy"), 0.85))
    checks.append(("allocate >= 85% of copy bandwidth (wall)", alloc.get("fraction_of_probe"), 0.85))
    for ref, target in (("cuda reference loop (sums + counts)", 5.0),
                        ("cuda torch.compile(reference) (sums + counts)", 1.2)):
        if ref in rows:
            checks.append((f"allocate vs {ref} >= {target}x (wall)",
                           ratio(rows[ref]["median_s"], alloc["median_s"]), target))
            checks.append((f"allocate vs {ref} >= {target}x (events)",
                           ratio(ev(ref), ev("cuda allocate (sums + counts)")), target))
acc = rows.get("cuda accumulate_ (acc += w * g)")
if acc:
    checks.append(("accumulate_ >= 85% of copy bandwidth (events)",
                   acc.get("events_fraction_of_copy"), 0.85))
    for ref, target in (("cuda reference loop accumulate_", 5.0),
                        ("cuda torch.compile(reference) accumulate_", 1.2)):
        if ref in rows:
            checks.append((f"accumulate_ vs {ref} >= {target}x (events)",
                           ratio(ev(ref), acc.get("events_median_s")), target))
hm = merged.get("host_ms_per_call")
if hm and hm.get("allocate") and hm.get("torch._foreach_add_"):
    print(f"host time per call ({hm['device']}, 500 tensors): " + ", ".join(
        f"{k} {v * 1e3:.1f} us" for k, v in hm.items() if k != "device"))
    checks.append((f"allocate host time per call <= torch._foreach_add_'s ({hm['device']})",
                   ratio(hm["torch._foreach_add_"], hm["allocate"]), 1.0))
if tracker:
    for kind, r in tracker["speed"].items():
        checks.append((f"tracked GPT-2 step ({kind} kernels) <= 1.05 x (passes x pass + plain)",
                       1 / r["ratio_median"], 1 / 1.05))
    m = tracker.get("memory") or {}
    if m:
        print(f"tracker GPU memory, fp32 values per parameter: held {m['held_fp32_per_param']:.2f}, "
              f"extra peak {m['extra_peak_fp32_per_param']:.2f}, documented "
              f"{m['documented_fp32_per_param']}")
    print("fused vs reference on the same steps:", tracker.get("agreement"))
print()
merged["targets"] = []
for name, value, target in checks:
    ok = value is not None and value >= target
    merged["targets"].append(dict(name=name, value=value, target=target, met=ok))
    print(f"  {'MET ' if ok else 'MISS'} {name}: {value if value is None else round(value, 3)}")
for r in merged["rows"]:
    if "lca_ext_kernels" in r and not r["name"].startswith(("cuda reference", "cuda torch")):
        print(f"  launches: {r['name']}: {r['kernels']} kernels ({r['lca_ext_kernels']} lca_ext), "
              f"{r['memcpys']} memcpy, {r['memsets']} memset")
json.dump(merged, open(out, "w"), indent=1)
print(f"\nresults: {out}")
PY
  record report "$( [[ -f $OUT/$TAG.json ]] && echo "wrote $OUT/$TAG.json" || echo "no results yet")"
}

phase_bench() {
  phase_build
  "$PY" -c 'import pytest_benchmark' >/dev/null 2>&1 || { record bench "FAILED: pytest-benchmark missing"; FAILED=1; return; }
  rm -f "$STATE/bench-ops.json"
  LCA_BENCH_OUT="$STATE/bench-ops.json" LCA_BENCH_COMPILE=0 run_step bench 220 90 \
    "$PY" -m pytest benchmarks/test_bench_cuda.py -q -p no:cacheprovider -k "not compiled" -rfEs
  rm -f "$STATE/bench-host.json"
  LCA_BENCH_HOST_OUT="$STATE/bench-host.json" run_step bench-host 60 30 \
    "$PY" -m pytest benchmarks/test_bench_host.py -q -s -p no:cacheprovider -k interleaved -rfEs
  phase_report
}

phase_tracker() {
  phase_build
  "$PY" -c 'import pytest_benchmark, transformers' >/dev/null 2>&1 || {
    record tracker "FAILED: pytest-benchmark or transformers missing"; FAILED=1; return; }
  rm -f "$STATE/bench-tracker.json"
  LCA_BENCH_TRACKER_OUT="$STATE/bench-tracker.json" LCA_BENCH_REHEARSE=$REHEARSE \
    run_step tracker 180 45 "$PY" -m pytest benchmarks/test_bench_gpu_tracker.py -q -s \
    -p no:cacheprovider -rfEs
  phase_report
}

phase_compile() {
  phase_build
  "$PY" -c 'import pytest_benchmark' >/dev/null 2>&1 || { record compile "FAILED: pytest-benchmark missing"; FAILED=1; return; }
  rm -f "$STATE/bench-compile.json"
  LCA_BENCH_OUT="$STATE/bench-compile.json" LCA_BENCH_COMPILE=1 \
    TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$JOBS} run_step compile 400 120 \
    "$PY" -m pytest benchmarks/test_bench_cuda.py -q -p no:cacheprovider -k compiled -rfEs
  phase_report
}

for p in "${PHASES[@]}"; do
  "phase_$p"
done
finish
