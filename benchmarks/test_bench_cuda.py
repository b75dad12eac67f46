"""Speed of the CUDA kernels on a GPU (pytest-benchmark; every case skips without one).

The model: 103.2M float32 parameters in 500 tensors (450 x [512, 448] + 50 x [448]),
far larger than the L2 cache.  Each op is raced against

* a device-to-device copy moving the same number of bytes (read + written),
  run interleaved with the op: "of copy" is the op's bandwidth (its bytes read +
  written / time) over the copy's, the figure the issue asks to be >= 85%;
* the per-tensor PyTorch reference loop (lca_ext.reference), >= 5x asked;
* torch.compile of that reference, >= 1.2x asked (set LCA_BENCH_COMPILE=0 to skip:
  compiling a 500-tensor loop takes minutes).

Two timings per case, both in the JSON (LCA_BENCH_OUT, see conftest.py):
  median_s (pytest-benchmark): wall time of one call + torch.cuda.synchronize(),
      host overhead included, paired with a copy probe run before every round;
  events_median_s: CUDA-event time per call over `reps` calls queued back to
      back (the host runs ahead, so this is the GPU's throughput), in rounds
      interleaved with the copy probe timed the same way; events_fraction_of_copy
      is the median of the per-round ratios.
Kernel launches per call (torch.profiler) go in kernels / memcpys / memsets.

    LCA_BENCH_OUT=benchmarks/results/<gpu>-<date>.json python -m pytest benchmarks/test_bench_cuda.py
"""
import math
import os
import sys
import time

# the kernels are verified by this very run (see lca_ext/ops.py UNVERIFIED_CUDA_OPS)
os.environ.setdefault("LCA_EXT_ALLOW_UNVERIFIED_CUDA", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lca_ext  # noqa: E402
from lca_ext import reference  # noqa: E402

HAVE_GPU = bool(lca_ext.build_info()["cuda"]) and torch.cuda.is_available()
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_GPU, reason="needs a GPU and lca_ext built with CUDA")]

SHAPES = [(512, 448)] * 450 + [(448,)] * 50
NUMEL = sum(math.prod(s) for s in SHAPES)
ROWS = sum(s[0] for s in SHAPES)
F32 = 4
ROUNDS = dict(rounds=30, iterations=1, warmup_rounds=3)
REF_ROUNDS = dict(rounds=4, iterations=1, warmup_rounds=1)
EVENT_ROUNDS, EVENT_REPS = 7, 10
REF_EVENT_ROUNDS, REF_EVENT_REPS = 3, 2
CLASSES, CLASS_TENSORS = 10, 50  # allocate_classes on the first 50 tensors (11.5M params)
COMPILE = os.environ.get("LCA_BENCH_COMPILE", "1") == "1"

assert NUMEL >= 100_000_000 and len(SHAPES) == 500


class CopyProbe:
    """dst.copy_(src) on the GPU, moving `nbytes` (nbytes / 2 read + nbytes / 2
    written).  As pytest-benchmark's `setup` it runs, synchronised and timed,
    right before every timed round of the op (the pairing conftest.Recorder uses)."""

    def __init__(self, nbytes):
        n = max(1, nbytes // 2 // F32)
        self.src = torch.randn(n, device="cuda")
        self.dst = torch.empty_like(self.src)
        self.bytes = 2 * n * F32
        self.times = []

    def copy(self):
        self.dst.copy_(self.src)

    def __call__(self):
        torch.cuda.synchronize()
        t = time.perf_counter()
        self.copy()
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t)


def events_per_call(fn, reps):
    """GPU time per call of `reps` calls queued back to back (CUDA events)."""
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def count_launches(fn):
    """Kernels, memcpys and memsets one call puts on the GPU (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return dict(kernels=sum(not n.startswith(("Memcpy", "Memset")) for n in names),
                memcpys=sum(n.startswith("Memcpy") for n in names),
                memsets=sum(n.startswith("Memset") for n in names),
                lca_ext_kernels=sum("lca_ext" in n for n in names))


def _device_info():
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return dict(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                sm_count=p.multi_processor_count, cuda=torch.version.cuda,
                torch=torch.__version__, cuda_archs=lca_ext.build_info()["cuda_archs"])


def run(benchmark, record, name, fn, nbytes, baseline=None, heavy=False, extra=None):
    """Times fn (wall, paired with a copy probe; and CUDA events, interleaved with
    the probe), counts its launches and records one row."""
    probe = CopyProbe(nbytes)

    def call():
        fn()
        torch.cuda.synchronize()

    call()  # warm-up outside the timing (first-use allocations, compilation)
    benchmark.pedantic(call, setup=probe, **(REF_ROUNDS if heavy else ROUNDS))
    record(benchmark, name, nbytes, probe=probe, baseline=baseline)
    rounds, reps = (REF_EVENT_ROUNDS, REF_EVENT_REPS) if heavy else (EVENT_ROUNDS, EVENT_REPS)
    op_t, copy_t = [], []
    for _ in range(rounds):
        copy_t.append(events_per_call(probe.copy, reps))
        op_t.append(events_per_call(fn, reps))
    ratios = sorted((nbytes / o) / (probe.bytes / c) for o, c in zip(op_t, copy_t))
    row = sys.modules[type(record).__module__]._ROWS[-1]
    assert row["name"] == name
    row.update(
        events_median_s=sorted(op_t)[len(op_t) // 2],
        events_min_s=min(op_t),
        events_gb_per_s=nbytes / sorted(op_t)[len(op_t) // 2] / 1e9,
        copy_events_gb_per_s=probe.bytes / sorted(copy_t)[len(copy_t) // 2] / 1e9,
        events_fraction_of_copy=ratios[len(ratios) // 2],
        events_rounds=rounds, events_reps=reps,
        **count_launches(fn), **_device_info(), **(extra or {}))
    del probe
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def step():
    gen = torch.Generator(device="cuda").manual_seed(0)
    before = [torch.randn(s, generator=gen, device="cuda") for s in SHAPES]
    after = [b + 1e-2 * torch.randn(s, generator=gen, device="cuda")
             for b, s in zip(before, SHAPES)]
    grads = [torch.randn(s, generator=gen, device="cuda") for s in SHAPES]
    torch.cuda.synchronize()
    return before, after, grads


# ---------------------------------------------------------------------------
# allocate

def test_allocate_sums_counts(benchmark, step, record):
    run(benchmark, record, "cuda allocate (sums + counts)",
        lambda: lca_ext.allocate(*step), 3 * F32 * NUMEL,
        baseline="cuda reference loop (sums + counts)")


def test_allocate_rows(benchmark, step, record):
    run(benchmark, record, "cuda allocate (+ row sums)",
        lambda: lca_ext.allocate(*step, row_sums=True), 3 * F32 * NUMEL + 8 * ROWS,
        baseline="cuda reference loop (+ row sums)")


def test_allocate_rows_histogram(benchmark, step, record):
    edges = lca_ext.signed_log_edges(1e-12, 1.0, 24, device="cuda")
    run(benchmark, record, "cuda allocate (+ row sums + 50-bin histogram)",
        lambda: lca_ext.allocate(*step, row_sums=True, bin_edges=edges),
        3 * F32 * NUMEL + 8 * ROWS)


def test_allocate_state(benchmark, step, record):
    cum = [torch.zeros(s, device="cuda") for s in SHAPES]
    helped = [torch.zeros(s, dtype=torch.int32, device="cuda") for s in SHAPES]
    # + read and write of cum_lca (fp32) and helped_steps (int32)
    run(benchmark, record, "cuda allocate (+ row sums + cum_lca + helped_steps)",
        lambda: lca_ext.allocate(*step, row_sums=True, cum_lca=cum, helped_steps=helped),
        (3 + 4) * F32 * NUMEL + 8 * ROWS)


def test_allocate_all_outputs(benchmark, step, record):
    edges = lca_ext.signed_log_edges(1e-12, 1.0, 24, device="cuda")
    cum = [torch.zeros(s, device="cuda") for s in SHAPES]
    helped = [torch.zeros(s, dtype=torch.int32, device="cuda") for s in SHAPES]
    out = [torch.empty(s, device="cuda") for s in SHAPES]
    run(benchmark, record, "cuda allocate (rows + histogram + state + lca_out)",
        lambda: lca_ext.allocate(*step, row_sums=True, bin_edges=edges, cum_lca=cum,
                                 helped_steps=helped, lca_out=out),
        (3 + 4 + 1) * F32 * NUMEL + 8 * ROWS)


@pytest.mark.parametrize("rows", [False, True], ids=["sums", "rows"])
def test_allocate_scalar_loads(benchmark, step, record, rows, monkeypatch):
    """The same op with the vector loads off (LCA_EXT_CUDA_VECTOR=0): what the
    128-bit loads bring, measured in the same run as the vector rows above."""
    monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", "0")
    what = "+ row sums" if rows else "sums + counts"
    run(benchmark, record, f"cuda allocate, scalar loads ({what})",
        lambda: lca_ext.allocate(*step, row_sums=rows), 3 * F32 * NUMEL + (8 * ROWS if rows else 0),
        baseline="cuda allocate (+ row sums)" if rows else "cuda allocate (sums + counts)")


def test_reference_sums_counts(benchmark, step, record):
    run(benchmark, record, "cuda reference loop (sums + counts)",
        lambda: reference.allocate(*step), 3 * F32 * NUMEL, heavy=True)


def test_reference_rows(benchmark, step, record):
    run(benchmark, record, "cuda reference loop (+ row sums)",
        lambda: reference.allocate(*step, row_sums=True), 3 * F32 * NUMEL + 8 * ROWS,
        heavy=True)


# ---------------------------------------------------------------------------
# accumulate_, sign_changes_, allocate_classes

def test_accumulate(benchmark, step, record):
    acc = [torch.zeros(s, device="cuda") for s in SHAPES]
    run(benchmark, record, "cuda accumulate_ (acc += w * g)",
        lambda: lca_ext.accumulate_(acc, step[2], 1 / 6), 3 * F32 * NUMEL,
        baseline="cuda reference loop accumulate_")


def test_reference_accumulate(benchmark, step, record):
    acc = [torch.zeros(s, device="cuda") for s in SHAPES]
    run(benchmark, record, "cuda reference loop accumulate_",
        lambda: reference.accumulate_(acc, step[2], 1 / 6), 3 * F32 * NUMEL, heavy=True)


def test_foreach_accumulate(benchmark, step, record):
    """torch's own multi-tensor kernel for the same update, for scale."""
    acc = [torch.zeros(s, device="cuda") for s in SHAPES]
    run(benchmark, record, "cuda torch._foreach_add_ (acc += w * g)",
        lambda: torch._foreach_add_(acc, step[2], alpha=1 / 6), 3 * F32 * NUMEL)


def test_sign_changes(benchmark, step, record):
    last = [torch.zeros(s, dtype=torch.int8, device="cuda") for s in SHAPES]
    ch = [torch.zeros(s, dtype=torch.int32, device="cuda") for s in SHAPES]
    # read x, base (fp32); read + write last_sign (int8) and changes (int32)
    run(benchmark, record, "cuda sign_changes_ (x vs base)",
        lambda: lca_ext.sign_changes_(last, ch, step[1], step[0]), (8 + 2 + 8) * NUMEL)


@pytest.fixture(scope="module")
def class_step(step):
    b, a, _ = step
    gen = torch.Generator(device="cuda").manual_seed(1)
    g = [torch.randn((CLASSES, *s), generator=gen, device="cuda")
         for s in SHAPES[:CLASS_TENSORS]]
    n = sum(x.numel() for x in b[:CLASS_TENSORS])
    return b[:CLASS_TENSORS], a[:CLASS_TENSORS], g, n


def test_allocate_classes(benchmark, class_step, record):
    b, a, g, n = class_step
    run(benchmark, record, f"cuda allocate_classes ({CLASSES} classes, {n / 1e6:.1f}M params)",
        lambda: lca_ext.allocate_classes(b, a, g), (2 + CLASSES) * F32 * n,
        baseline=f"cuda reference loop allocate_classes ({CLASSES} classes)")


def test_allocate_classes_scalar_loads(benchmark, class_step, record, monkeypatch):
    monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", "0")
    b, a, g, n = class_step
    run(benchmark, record, f"cuda allocate_classes, scalar loads ({CLASSES} classes)",
        lambda: lca_ext.allocate_classes(b, a, g), (2 + CLASSES) * F32 * n,
        baseline=f"cuda allocate_classes ({CLASSES} classes, {n / 1e6:.1f}M params)")


def test_accumulate_scalar_loads(benchmark, step, record, monkeypatch):
    monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", "0")
    _, _, grads = step
    acc = [torch.zeros_like(x) for x in grads]
    run(benchmark, record, "cuda accumulate_, scalar loads",
        lambda: lca_ext.accumulate_(acc, grads, 1 / 6), 3 * F32 * NUMEL,
        baseline="cuda accumulate_ (acc += w * g)")


def test_sign_changes_scalar_loads(benchmark, step, record, monkeypatch):
    monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", "0")
    last = [torch.zeros(s, dtype=torch.int8, device="cuda") for s in SHAPES]
    ch = [torch.zeros(s, dtype=torch.int32, device="cuda") for s in SHAPES]
    run(benchmark, record, "cuda sign_changes_, scalar loads",
        lambda: lca_ext.sign_changes_(last, ch, step[1], step[0]), (8 + 2 + 8) * NUMEL,
        baseline="cuda sign_changes_ (x vs base)")


def test_reference_classes(benchmark, class_step, record):
    b, a, g, n = class_step
    run(benchmark, record, f"cuda reference loop allocate_classes ({CLASSES} classes)",
        lambda: reference.allocate_classes(b, a, g), (2 + CLASSES) * F32 * n, heavy=True)


# ---------------------------------------------------------------------------
# torch.compile of the reference (last: compiling a 500-tensor loop is slow)

def _compiled(fn):
    if not COMPILE:
        pytest.skip("LCA_BENCH_COMPILE=0")
    torch._dynamo.reset()
    compiled = torch.compile(fn)
    t = time.perf_counter()
    try:
        compiled()
        torch.cuda.synchronize()
    except Exception as e:  # record why, but keep the other benchmarks
        pytest.skip(f"torch.compile of the reference failed: {type(e).__name__}: {e}")
    return compiled, time.perf_counter() - t


def test_compiled_reference_sums_counts(benchmark, step, record):
    b, a, g = step
    fn, compile_s = _compiled(lambda: reference.allocate(b, a, g))
    run(benchmark, record, "cuda torch.compile(reference) (sums + counts)", fn,
        3 * F32 * NUMEL, extra=dict(compile_s=compile_s))


def test_compiled_reference_accumulate(benchmark, step, record):
    acc = [torch.zeros(s, device="cuda") for s in SHAPES]
    fn, compile_s = _compiled(lambda: reference.accumulate_(acc, step[2], 1 / 6))
    run(benchmark, record, "cuda torch.compile(reference) accumulate_", fn,
        3 * F32 * NUMEL, extra=dict(compile_s=compile_s))
