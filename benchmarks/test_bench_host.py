"""Host time per call: the fixed cost of one op call on a long list of tiny
tensors, where the arithmetic is negligible, against torch._foreach_add_ on the
same list (pytest-benchmark).  The GPU issue's target is a host path at most
torch._foreach_add_'s; on the CPU this measures the Python wrapper and the C++
glue (validation, the chunk table) that every device shares, on a GPU also the
table upload (cached across calls with the same lists: LCA_EXT_TABLE_CACHE=0
turns the cache off, a case of its own here) and the launches.

500 float32 tensors of 4 elements, one thread.  ``test_host_per_call``: one
pytest-benchmark case per call (medians; compare within a run).
``test_host_interleaved``: every call timed in interleaved rounds (60 rounds of
20 calls, median per call), on the CPU and, where there is one, the GPU (calls
queued without synchronising: the host's time, the GPU idle behind it); with
LCA_BENCH_HOST_OUT=<file> the medians go there as ``host_ms_per_call``
(scripts/gpu_session.sh merges them into its results).

    .venv/bin/python -m pytest benchmarks/test_bench_host.py -q -s
"""
import json
import os
import statistics
import time

import pytest
import torch

import lca_ext

K = 500
ROUNDS = dict(rounds=200, iterations=5, warmup_rounds=20)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and lca_ext.build_info()["cuda"]
                     else [])
_RESULTS = {}


def make_lists(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    before = [torch.randn(4, generator=gen).to(device) for _ in range(K)]
    after = [b + 0.01 for b in before]
    grads = [torch.randn(4, generator=gen).to(device) for _ in range(K)]
    acc = [torch.zeros(4, device=device) for _ in range(K)]
    return before, after, grads, acc


def calls(before, after, grads, acc):
    return {
        "lca_ext.allocate": lambda: lca_ext.allocate(before, after, grads),
        "torch.ops.lca_ext.allocate (no wrapper)": lambda: torch.ops.lca_ext.allocate(
            before, after, grads, None, False, [], [], [], False),
        "lca_ext.accumulate_": lambda: lca_ext.accumulate_(acc, grads, 0.5),
        "torch._foreach_add_": lambda: torch._foreach_add_(acc, grads, alpha=0.5),
    }


@pytest.fixture(scope="module")
def lists():
    return make_lists()


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", list(calls(*[[]] * 4)))
def test_host_per_call(benchmark, lists, case):
    fn = calls(*lists)[case]
    benchmark.extra_info.update(tensors=K, case=case)
    benchmark.pedantic(fn, **ROUNDS)


@pytest.mark.parametrize("device", DEVICES)
def test_host_interleaved(benchmark, device, monkeypatch):
    if device == "cuda":   # this run checks the kernels' results itself
        monkeypatch.setenv("LCA_EXT_ALLOW_UNVERIFIED_CUDA", "1")
    lists = make_lists(device)
    fns = calls(*lists)
    uncached = fns["lca_ext.allocate"]

    def no_cache():
        os.environ["LCA_EXT_TABLE_CACHE"] = "0"
        try:
            uncached()
        finally:
            del os.environ["LCA_EXT_TABLE_CACHE"]
    fns["lca_ext.allocate, LCA_EXT_TABLE_CACHE=0"] = no_cache
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    # the results are right (against the reference ops) before they are timed
    got = lca_ext.allocate(*lists[:3])
    want = lca_ext.reference.allocate(*[[t.cpu() for t in x] for x in lists[:3]])
    torch.testing.assert_close(got.sums.cpu(), want.sums, rtol=1e-6, atol=1e-9)
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(50):
            f()
    sync()
    for _ in range(60):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(20):
                f()
            times[k].append((time.perf_counter() - t) / 20)
            sync()
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    _RESULTS[device] = medians
    benchmark.extra_info.update(tensors=K, device=device, host_ms_per_call=medians)
    benchmark.pedantic(fns["lca_ext.allocate"], rounds=20, iterations=5)
    print(f"\nhost time per call, {K} tensors on {device} (median of 60 interleaved rounds):")
    for k, v in medians.items():
        print(f"  {k:45s} {v * 1e3:8.1f} us")
    out = os.environ.get("LCA_BENCH_HOST_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(dict(tensors=K, host_ms_per_call=_RESULTS), f, indent=1)
