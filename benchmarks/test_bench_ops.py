"""Speed of the fused ops against the memory-bandwidth probe and the per-tensor
reference, side by side in one run (pytest-benchmark).

The model: 10M float32 parameters in 200 tensors of [250, 200]."""
import pytest
import torch

import lca_ext
from lca_ext import reference

SHAPES = [(250, 200)] * 200
NUMEL = sum(a * b for a, b in SHAPES)
F32 = 4
ROUNDS = dict(rounds=15, iterations=1, warmup_rounds=2)
REF_ROUNDS = dict(rounds=4, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def step():
    gen = torch.Generator().manual_seed(0)
    before = [torch.randn(s, generator=gen) for s in SHAPES]
    after = [b + 1e-2 * torch.randn(s, generator=gen) for b, s in zip(before, SHAPES)]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    return before, after, grads


def test_probe_triad(benchmark, record):
    x, y, z = torch.randn(NUMEL), torch.randn(NUMEL), torch.empty(NUMEL)
    benchmark.pedantic(lambda: torch.add(y, x, alpha=0.5, out=z), **ROUNDS)
    record(benchmark, "probe: triad z = y + a*x", 3 * F32 * NUMEL, probe=True)


def test_allocate_sums_counts(benchmark, step, record):
    benchmark.pedantic(lambda: lca_ext.allocate(*step), **ROUNDS)
    record(benchmark, "allocate (sums + counts)", 3 * F32 * NUMEL)


def test_allocate_rows(benchmark, step, record):
    benchmark.pedantic(lambda: lca_ext.allocate(*step, row_sums=True), **ROUNDS)
    record(benchmark, "allocate (sums + counts + row sums)", 3 * F32 * NUMEL,
           baseline="reference loop (sums + counts + row sums)")


def test_reference_rows(benchmark, step, record):
    benchmark.pedantic(lambda: reference.allocate(*step, row_sums=True), **REF_ROUNDS)
    record(benchmark, "reference loop (sums + counts + row sums)", 3 * F32 * NUMEL)


def test_allocate_rows_histogram(benchmark, step, record):
    edges = lca_ext.signed_log_edges(1e-12, 1.0, 24)
    benchmark.pedantic(lambda: lca_ext.allocate(*step, row_sums=True, bin_edges=edges),
                       **ROUNDS)
    record(benchmark, "allocate (+ row sums + 50-bin histogram)", 3 * F32 * NUMEL)


def test_allocate_state(benchmark, step, record):
    cum = [torch.zeros(s) for s in SHAPES]
    helped = [torch.zeros(s, dtype=torch.int32) for s in SHAPES]
    benchmark.pedantic(lambda: lca_ext.allocate(*step, row_sums=True, cum_lca=cum,
                                                helped_steps=helped), **ROUNDS)
    # + read and write of cum_lca (fp32) and helped_steps (int32)
    record(benchmark, "allocate (+ row sums + cum_lca + helped_steps)",
           (3 + 4) * F32 * NUMEL)


def test_accumulate(benchmark, step, record):
    acc = [torch.zeros(s) for s in SHAPES]
    benchmark.pedantic(lambda: lca_ext.accumulate_(acc, step[2], 1 / 6), **ROUNDS)
    record(benchmark, "accumulate_ (acc += w * g)", 3 * F32 * NUMEL,
           baseline="reference loop accumulate_")


def test_reference_accumulate(benchmark, step, record):
    acc = [torch.zeros(s) for s in SHAPES]
    benchmark.pedantic(lambda: reference.accumulate_(acc, step[2], 1 / 6), **REF_ROUNDS)
    record(benchmark, "reference loop accumulate_", 3 * F32 * NUMEL)


@pytest.fixture(scope="module")
def class_grads(step):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn((10, *s), generator=gen) for s in SHAPES]


def test_allocate_classes(benchmark, step, class_grads, record):
    b, a, _ = step
    benchmark.pedantic(lambda: lca_ext.allocate_classes(b, a, class_grads), **ROUNDS)
    record(benchmark, "allocate_classes (10 classes)", (2 + 10) * F32 * NUMEL,
           baseline="reference loop allocate_classes")


def test_reference_classes(benchmark, step, class_grads, record):
    b, a, _ = step
    benchmark.pedantic(lambda: reference.allocate_classes(b, a, class_grads), **REF_ROUNDS)
    record(benchmark, "reference loop allocate_classes", (2 + 10) * F32 * NUMEL)
