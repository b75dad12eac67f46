"""Speed of the fused ops against the memory-bandwidth probe (run interleaved with
each op) and the per-tensor reference, side by side in one run (pytest-benchmark).

The model: 10M float32 parameters in 200 tensors of [250, 200]."""
import pytest
import torch

import lca_ext
from lca_ext import reference
from conftest import TriadProbe

SHAPES = [(250, 200)] * 200
NUMEL = sum(a * b for a, b in SHAPES)
F32 = 4
ROUNDS = dict(rounds=50, iterations=1, warmup_rounds=3)
REF_ROUNDS = dict(rounds=4, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def step():
    gen = torch.Generator().manual_seed(0)
    before = [torch.randn(s, generator=gen) for s in SHAPES]
    after = [b + 1e-2 * torch.randn(s, generator=gen) for b, s in zip(before, SHAPES)]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    return before, after, grads


def run(benchmark, record, name, fn, nbytes, baseline=None, rounds=ROUNDS):
    probe = TriadProbe(NUMEL)
    benchmark.pedantic(fn, setup=probe, **rounds)
    record(benchmark, name, nbytes, probe=probe, baseline=baseline)


def test_allocate_sums_counts(benchmark, step, record):
    run(benchmark, record, "allocate (sums + counts)",
        lambda: lca_ext.allocate(*step), 3 * F32 * NUMEL)


def test_allocate_rows(benchmark, step, record):
    run(benchmark, record, "allocate (sums + counts + row sums)",
        lambda: lca_ext.allocate(*step, row_sums=True), 3 * F32 * NUMEL,
        baseline="reference loop (sums + counts + row sums)")


def test_reference_rows(benchmark, step, record):
    run(benchmark, record, "reference loop (sums + counts + row sums)",
        lambda: reference.allocate(*step, row_sums=True), 3 * F32 * NUMEL,
        rounds=REF_ROUNDS)


def test_allocate_rows_histogram(benchmark, step, record):
    edges = lca_ext.signed_log_edges(1e-12, 1.0, 24)
    run(benchmark, record, "allocate (+ row sums + 50-bin histogram)",
        lambda: lca_ext.allocate(*step, row_sums=True, bin_edges=edges), 3 * F32 * NUMEL)


def test_allocate_state(benchmark, step, record):
    cum = [torch.zeros(s) for s in SHAPES]
    helped = [torch.zeros(s, dtype=torch.int32) for s in SHAPES]
    # + read and write of cum_lca (fp32) and helped_steps (int32)
    run(benchmark, record, "allocate (+ row sums + cum_lca + helped_steps)",
        lambda: lca_ext.allocate(*step, row_sums=True, cum_lca=cum, helped_steps=helped),
        (3 + 4) * F32 * NUMEL)


def test_accumulate(benchmark, step, record):
    acc = [torch.zeros(s) for s in SHAPES]
    run(benchmark, record, "accumulate_ (acc += w * g)",
        lambda: lca_ext.accumulate_(acc, step[2], 1 / 6), 3 * F32 * NUMEL,
        baseline="reference loop accumulate_")


def test_reference_accumulate(benchmark, step, record):
    acc = [torch.zeros(s) for s in SHAPES]
    run(benchmark, record, "reference loop accumulate_",
        lambda: reference.accumulate_(acc, step[2], 1 / 6), 3 * F32 * NUMEL,
        rounds=REF_ROUNDS)


@pytest.fixture(scope="module")
def class_grads(step):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn((10, *s), generator=gen) for s in SHAPES]


def test_allocate_classes(benchmark, step, class_grads, record):
    b, a, _ = step
    run(benchmark, record, "allocate_classes (10 classes)",
        lambda: lca_ext.allocate_classes(b, a, class_grads), (2 + 10) * F32 * NUMEL,
        baseline="reference loop allocate_classes")


def test_reference_classes(benchmark, step, class_grads, record):
    b, a, _ = step
    run(benchmark, record, "reference loop allocate_classes",
        lambda: reference.allocate_classes(b, a, class_grads), (2 + 10) * F32 * NUMEL,
        rounds=REF_ROUNDS)
