"""The CUDA path of every op, run on the CPU by the kernel emulator.

torch.ops.lca_ext_emu.* run the same code a GPU runs for torch.ops.lca_ext.*:
the torch glue (csrc/cuda/ops_impl.h: checks, dense views, packed tables,
launch) and the kernel sources csrc/cuda/*.cu, compiled as C++ against
tests/cuda_emu/emu_runtime.h (threads as fibers, warp shuffles and
__syncthreads checked for convergence).  Each result is compared with the CPU
kernels and the torch reference: counts, histograms and per-parameter state bit
for bit, float64 sums to rounding (they add the same values in another order).
So the indexing, chunking, row walk, histogram and cleanup logic of the CUDA
kernels is tested on every CI run, GPU or not.  What only a GPU can show (the
memory model, speed) is in test_cuda_extra.py and benchmarks/test_bench_cuda.py.
"""
import math

import pytest
import torch

import cuda_emulator
import lca_ext
from lca_ext import reference
from lca_ext.ops import Allocation
from helpers import abs_scale, assert_allocation_equal, assert_sums_close, make_step

CHUNK = lca_ext.build_info()["chunk_size"]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emu():
    ops = cuda_emulator.load()
    ops.set_schedule(0)
    yield ops
    ops.set_schedule(0)


def emu_allocate(emu, b, a, g, *, bin_edges=None, row_sums=False, cum_lca=(), helped_steps=(),
                 lca_out=(), check_finite=True):
    return Allocation(*emu.allocate(b, a, g, bin_edges, row_sums, list(cum_lca),
                                    list(helped_steps), list(lca_out), check_finite))


def cpu_allocate(b, a, g, **kw):
    return lca_ext.allocate(b, a, g, **kw)


# ---------------------------------------------------------------------------
# the emulator itself


def test_emulator_reports_divergent_collectives(emu):
    """A shuffle only half a warp reaches and a __syncthreads only one thread
    reaches are errors, not silent results (else a passing test means little)."""
    with pytest.raises(RuntimeError, match="exited while its warp waits at a shuffle"):
        emu.selftest(0)
    with pytest.raises(RuntimeError, match="exited while others wait at __syncthreads"):
        emu.selftest(1)


def test_emulator_reports_memory_misuse(emu):
    """A misaligned vector load and a write past the dynamic shared memory are
    errors; shared memory a kernel never wrote reads as garbage, not zero."""
    with pytest.raises(RuntimeError, match="16-byte vector load from a misaligned address"):
        emu.selftest(2)
    with pytest.raises(RuntimeError, match="past the end of the 256 bytes of dynamic shared"):
        emu.selftest(3)
    assert emu.selftest(4) == 0xA5A5A5A5 - 2**32


# ---------------------------------------------------------------------------
# allocate

ROW_SHAPES = {
    "row_len_1": [(3 * CHUNK + 5,)],
    "row_len_2": [(CHUNK // 2 + 3, 2)],
    "row_len_31": [(700, 31)],
    "row_len_32": [(2049, 32)],
    "row_len_33": [(4000, 33)],
    "row_len_4097": [(20, 4097)],
    "row_len_chunk": [(3, CHUNK)],
    "row_len_2chunks": [(2, 2 * CHUNK + 7)],
    "mixed": [(5, 3), (), (0,), (7, 1), (101, 131), (2, CHUNK + 5000), (33,)],
}


@pytest.mark.parametrize("shapes", ROW_SHAPES.values(), ids=ROW_SHAPES.keys())
def test_allocate_row_layouts_match_cpu(emu, shapes):
    b, a, g = make_step(shapes, seed=31)
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6)
    got = emu_allocate(emu, b, a, g, row_sums=True, bin_edges=edges)
    want = cpu_allocate(b, a, g, row_sums=True, bin_edges=edges)
    assert_allocation_equal(got, want, abs_scale(b, a, g))
    # and without row sums (the other kernel instantiation)
    got = emu_allocate(emu, b, a, g, bin_edges=edges)
    assert_allocation_equal(got, cpu_allocate(b, a, g, bin_edges=edges), abs_scale(b, a, g))


DTYPE_PAIRS = [(p, q) for p in FLOATS for q in FLOATS]


@pytest.mark.parametrize("pdt,gdt", DTYPE_PAIRS, ids=[f"{p}-{q}".replace("torch.", "")
                                                       for p, q in DTYPE_PAIRS])
def test_allocate_dtypes_and_state_match_cpu_bitwise(emu, pdt, gdt):
    shapes = [(64, 33), (CHUNK + 11,), (), (3, 0)]
    b, a, g = make_step(shapes, pdt, gdt, seed=33)
    edges = lca_ext.signed_log_edges(1e-8, 1e-1, 10)
    results, states = {}, {}
    for name, run in (("emu", lambda *x, **k: emu_allocate(emu, *x, **k)), ("cpu", cpu_allocate)):
        cum = [torch.full(s, 0.5, dtype=torch.float32) for s in shapes]
        cum64 = [torch.full(s, 0.5, dtype=torch.float64) for s in shapes]
        hs = [torch.full(s, 3, dtype=torch.int32) for s in shapes]
        out = [torch.empty(s, dtype=torch.float64) for s in shapes]
        results[name] = run(b, a, g, row_sums=True, bin_edges=edges, cum_lca=cum,
                            helped_steps=hs, lca_out=out)
        run(b, a, g, cum_lca=cum64)
        states[name] = cum + cum64 + hs + out
    assert_allocation_equal(results["emu"], results["cpu"], abs_scale(b, a, g))
    for x, y in zip(states["emu"], states["cpu"]):
        assert torch.equal(x, y), (pdt, gdt)
    # the per-element values themselves against the torch reference
    for x, bb, aa, gg in zip(states["emu"][-len(shapes):], b, a, g):
        assert torch.equal(x, reference.lca_values(bb, aa, gg).to(torch.float64))


LAYOUTS = ["offset1", "offset3", "strided", "transposed"]


def _laid_out(t, layout):
    """t's values in another memory layout (misaligned, strided, transposed)."""
    if layout.startswith("offset"):
        off = int(layout[len("offset"):])
        buf = torch.empty(t.numel() + off, dtype=t.dtype)
        view = buf[off:].view(t.shape)
    elif layout == "strided" and t.dim() >= 1:
        view = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)[..., ::2]
    elif layout == "transposed" and t.dim() >= 2:
        view = torch.empty((*t.shape[:-2], t.shape[-1], t.shape[-2]), dtype=t.dtype).transpose(-1, -2)
    else:
        view = torch.empty_like(t)
    view.copy_(t)
    return view


@pytest.mark.parametrize("layout", LAYOUTS)
def test_allocate_views_and_inplace_state_match_cpu(emu, layout):
    shapes = [(37, 65), (CHUNK + 99,), (9, 3)]
    b, a, g = make_step(shapes, torch.float32, torch.bfloat16, seed=37)
    b, a, g = ([_laid_out(x, layout) for x in xs] for xs in (b, a, g))
    got_state = [_laid_out(torch.full(s, 0.25), layout) for s in shapes]
    want_state = [torch.full(s, 0.25) for s in shapes]
    got = emu_allocate(emu, b, a, g, row_sums=True, cum_lca=got_state)
    want = cpu_allocate([x.contiguous() for x in b], [x.contiguous() for x in a],
                        [x.contiguous() for x in g], row_sums=True, cum_lca=want_state)
    assert_allocation_equal(got, want, abs_scale(b, a, g))
    for x, y in zip(got_state, want_state):
        assert torch.equal(x, y)  # written back into the caller's strided tensor


@pytest.mark.parametrize("num_edges", [2001, 10001])
def test_allocate_histogram_with_many_slots_matches_reference(emu, num_edges):
    """Edges too many for shared memory (read from global memory); with 10001,
    slots too many as well (counted with global atomics)."""
    b, a, g = make_step([(300, 31), (CHUNK + 3,)], seed=32)
    edges = torch.linspace(-0.05, 0.05, num_edges, dtype=torch.float64)
    got = emu_allocate(emu, b, a, g, bin_edges=edges).histogram
    want = reference.allocate(b, a, g, bin_edges=edges).histogram
    assert torch.equal(got, want)


def test_allocate_nonfinite_values_counted_like_cpu(emu):
    b, a, g = make_step([(70, 33), (CHUNK + 5,)], seed=38)
    g[0][3, 4] = float("nan")
    g[0][10] = float("inf")
    a[1][CHUNK - 1] = float("-inf")
    b[1][CHUNK + 2] = float("nan")
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6)
    got = emu_allocate(emu, b, a, g, bin_edges=edges, check_finite=False)
    want = cpu_allocate(b, a, g, bin_edges=edges, check_finite=False)
    assert torch.equal(got.counts, want.counts)
    assert got.counts[:, 3].tolist() == [34, 2]
    assert torch.equal(got.histogram, want.histogram)
    assert torch.equal(got.sums.isnan(), want.sums.isnan())


def test_allocate_many_tensors_in_two_launches(emu):
    """313 tensors of mixed sizes and dtypes: one main launch and one cleanup."""
    shapes = [((i % 13) + 1, (i * 7) % 61 + 1) for i in range(313)]
    b, a, g = make_step(shapes, seed=39)
    b[5], a[5], g[5] = b[5].double(), a[5].double(), g[5].half()
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6)
    before = emu.launches()
    got = emu_allocate(emu, b, a, g, row_sums=True, bin_edges=edges)
    assert emu.launches() - before == 2
    assert_allocation_equal(got, cpu_allocate(b, a, g, row_sums=True, bin_edges=edges),
                            abs_scale(b, a, g))


def test_tables_are_uploaded_once_for_the_same_lists(emu, monkeypatch):
    """The table cache (csrc/cuda/ops_impl.h TableCache): a loop that passes the
    same lists every step uploads their tables once; new data in the same
    tensors is read (the tables hold pointers, not values); another tensor, a
    list of another length or LCA_EXT_TABLE_CACHE=0 uploads again; more lists
    than the cache holds evict the oldest.  Every result equals the CPU op's."""
    shapes = [(7, 5), (33,), (4, 3, 2)]
    b, a, g = make_step(shapes, seed=41)

    def check(b, a, g):
        got = emu_allocate(emu, b, a, g, row_sums=True)
        assert_allocation_equal(got, cpu_allocate(b, a, g, row_sums=True), abs_scale(b, a, g))

    n = emu.uploads()
    check(b, a, g)
    assert emu.uploads() == n + 1
    check(b, a, g)
    g[1].mul_(-3.0)                                    # new values, same tensors
    check(b, a, g)
    assert emu.uploads() == n + 1                      # no upload after the first
    g2 = list(g)
    g2[2] = g[2].clone()                               # another tensor: another table
    check(b, a, g2)
    assert emu.uploads() == n + 2
    check(b[:2], a[:2], g[:2])                         # a shorter list
    assert emu.uploads() == n + 3
    monkeypatch.setenv("LCA_EXT_TABLE_CACHE", "0")
    check(b, a, g)
    check(b, a, g)
    assert emu.uploads() == n + 5
    monkeypatch.delenv("LCA_EXT_TABLE_CACHE")
    # nine more lists evict the first table (the cache holds eight)
    others = [make_step(shapes, seed=100 + i) for i in range(9)]
    for ob, oa, og in others:
        check(ob, oa, og)
    n = emu.uploads()
    check(b, a, g)
    assert emu.uploads() == n + 1
    check(*others[-1])                                 # still held
    assert emu.uploads() == n + 1
    # every op's table: equal lists give equal bytes (no stray padding in the key)
    acc = [torch.zeros_like(t) for t in g]
    stacks = [torch.stack([t, 2 * t]) for t in g]
    n = emu.uploads()
    for _ in range(3):
        emu.accumulate_(acc, g, 0.5)
        got = emu.allocate_classes(b, a, stacks, True)
    torch.testing.assert_close(acc, [1.5 * t for t in g])
    torch.testing.assert_close(got[0], lca_ext.allocate_classes(b, a, stacks).sums)
    assert emu.uploads() - n == 2          # accumulate_ and allocate_classes: once each


def test_allocate_empty_tensors_only(emu):
    shapes = [(0,), (3, 0)]
    b, a, g = make_step(shapes, seed=40)
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 3)
    got = emu_allocate(emu, b, a, g, row_sums=True, bin_edges=edges)
    assert_allocation_equal(got, cpu_allocate(b, a, g, row_sums=True, bin_edges=edges), 0.0)


def test_results_do_not_depend_on_thread_or_block_order(emu):
    """The determinism claim: every float64 sum is added in an order fixed by
    the sizes alone, so shuffling the order in which blocks run and threads are
    resumed changes no bit."""
    shapes = [(40, 33), (2 * CHUNK + 17,), (5, 7), ()]
    b, a, g = make_step(shapes, seed=41)
    edges = lca_ext.signed_log_edges(1e-8, 1e-1, 10)
    class_g = [torch.stack([x, -0.5 * x, 2 * x] * 3) for x in g]  # 9 classes: 2 groups
    runs = []
    for seed in (0, 1, 2):
        emu.set_schedule(seed)
        res = emu_allocate(emu, b, a, g, row_sums=True, bin_edges=edges)
        runs.append(list(res) + list(emu.allocate_classes(b, a, class_g, True)))
    emu.set_schedule(0)
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


def test_errors_are_the_cpu_errors(emu):
    b, a, g = make_step([(3, 4)], seed=42)
    with pytest.raises(RuntimeError, match=r"avg_grad\[0\]"):
        emu_allocate(emu, b, a, [torch.zeros(4, 3)])
    g[0][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        emu_allocate(emu, b, a, g)


# ---------------------------------------------------------------------------
# allocate_classes, accumulate_, sign_changes_


@pytest.mark.parametrize("num_classes", [0, 1, 8, 9, 17])
def test_allocate_classes_groups_match_cpu(emu, num_classes):
    # numel % 4 == 0 (vector loads) and not (element loads)
    shapes = [(17, 9), (16, 8), (CHUNK + 2,), (CHUNK + 4,), (), (0,)]
    b, a, _ = make_step(shapes, torch.bfloat16, seed=35)
    gen = torch.Generator().manual_seed(36)
    g = [torch.randn((num_classes, *s), generator=gen) for s in shapes]
    got = emu.allocate_classes(b, a, g, True)
    want = lca_ext.allocate_classes(b, a, g)
    scale = sum(abs_scale(b, a, [x[c] for x in g]) for c in range(num_classes))
    assert torch.equal(got[1], want.counts)
    assert torch.allclose(got[0], want.sums, rtol=0, atol=1e-10 * (scale + 1e-30))


@pytest.mark.parametrize("layout", ["aligned", "acc_offset", "grad_offset"])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad_dtype", FLOATS, ids=str)
def test_accumulate_bitwise(emu, acc_dtype, grad_dtype, layout):
    """Against the torch reference bit for bit: the vector path (aligned float32
    acc, 16/32-bit grads) and the element path (misaligned acc or grad)."""
    shapes = [(CHUNK + 3,), (17, 5), (), (0,), (2 * CHUNK + 130,)]
    gen = torch.Generator().manual_seed(43)
    grads = [torch.randn(s, generator=gen).to(grad_dtype) for s in shapes]
    if layout == "grad_offset":
        grads = [_laid_out(x, "offset1") for x in grads]
    acc0 = [torch.randn(s, generator=gen).to(acc_dtype) for s in shapes]
    got = [_laid_out(x, "offset1" if layout == "acc_offset" else "dense") for x in acc0]
    want = [x.clone() for x in acc0]
    emu.accumulate_(got, grads, 0.3)
    reference.accumulate_(want, grads, 0.3)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("with_base", [False, True])
def test_sign_changes_match_cpu(emu, dtype, with_base):
    shapes = [(CHUNK + 7,), (13, 3), ()]
    gen = torch.Generator().manual_seed(44)
    states = {}
    for name in ("emu", "cpu"):
        gen.manual_seed(44)
        last = [torch.randint(-1, 2, s, generator=gen, dtype=torch.int8) for s in shapes]
        changes = [torch.randint(0, 5, s, generator=gen, dtype=torch.int32) for s in shapes]
        for _ in range(3):
            x = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            x[0][::97] = 0
            x[0][5] = float("nan")
            base = [torch.randn(s, generator=gen).to(dtype) for s in shapes] if with_base else []
            op = emu.sign_changes_ if name == "emu" else torch.ops.lca_ext.sign_changes_
            op(last, changes, x, base)
        states[name] = last + changes
    for x, y in zip(states["emu"], states["cpu"]):
        assert torch.equal(x, y)


SIGN_LAYOUTS = ["aligned", "scalar_loads", "x_offset", "base_offset", "last_sign_offset",
                "changes_offset"]


@pytest.mark.parametrize("layout", SIGN_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sign_changes_vector_path_and_misaligned_inputs(emu, dtype, layout, monkeypatch):
    """The vector path (all four pointers aligned) and the element path (loads
    turned off, or any one pointer a storage offset of one element off; the
    emulator reports a misaligned vector load) against the CPU kernel, bit for
    bit, written back into the caller's views."""
    if layout == "scalar_loads":
        monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", "0")
    shapes = [(CHUNK + 7,), (2 * CHUNK + 130,), (33, 4), (1,)]
    gen = torch.Generator().manual_seed(50)
    last0 = [torch.randint(-1, 2, s, generator=gen, dtype=torch.int8) for s in shapes]
    changes0 = [torch.randint(0, 5, s, generator=gen, dtype=torch.int32) for s in shapes]
    steps = []
    for _ in range(3):
        x = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        x[1][::7] = 0
        x[1][9] = float("nan")
        steps.append((x, [torch.randn(s, generator=gen).to(dtype) for s in shapes]))

    def lay(ts, name):
        return [_laid_out(t, "offset1") for t in ts] if layout == name + "_offset" else ts

    last = lay([t.clone() for t in last0], "last_sign")
    changes = lay([t.clone() for t in changes0], "changes")
    want_last, want_changes = [t.clone() for t in last0], [t.clone() for t in changes0]
    for x, base in steps:
        emu.sign_changes_(last, changes, lay(x, "x"), lay(base, "base"))
        torch.ops.lca_ext.sign_changes_(want_last, want_changes, x, base)
    for got, want in zip(last + changes, want_last + want_changes):
        assert torch.equal(got, want)


@pytest.mark.parametrize("pdt,gdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                     (torch.float16, torch.float32)], ids=str)
def test_vector_and_scalar_loads_agree_bitwise(emu, pdt, gdt, monkeypatch):
    """LCA_EXT_CUDA_VECTOR=0 forces scalar loads on aligned tensors; every
    result, float64 sums included, must stay the same to the bit (the order of
    the sums depends on the sizes alone, not on how the elements are loaded)."""
    shapes = [(300, 33), (3, CHUNK + 130), (2 * CHUNK + 100,)]
    b, a, g = make_step(shapes, pdt, gdt, seed=45)
    edges = lca_ext.signed_log_edges(1e-8, 1e-1, 10)
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", flag)
        state = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        res = emu_allocate(emu, b, a, g, row_sums=True, bin_edges=edges, cum_lca=state)
        runs.append((res, state))
    (vec, vec_state), (sca, sca_state) = runs
    for x, y in zip(list(vec) + vec_state, list(sca) + sca_state):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["before", "after", "grad", "none"])
def test_one_misaligned_input_takes_scalar_loads_same_bits(emu, dtype, which):
    """Only one of the three inputs misaligned (a storage offset of one element):
    the vector loads must not be used for that tensor (the emulator reports a
    misaligned vector load), and the results equal the aligned run's bit for bit."""
    shapes = [(200, 65), (CHUNK + 300,)]
    b, a, g = make_step(shapes, dtype, dtype, seed=47)
    edges = lca_ext.signed_log_edges(1e-8, 1e-1, 10)
    aligned = emu_allocate(emu, b, a, g, row_sums=True, bin_edges=edges)
    lists = {"before": b, "after": a, "grad": g}
    if which != "none":
        lists[which] = [_laid_out(x, "offset1") for x in lists[which]]
    got = emu_allocate(emu, lists["before"], lists["after"], lists["grad"], row_sums=True,
                       bin_edges=edges)
    for x, y in zip(got, aligned):
        assert torch.equal(x, y)
    assert_allocation_equal(got, cpu_allocate(b, a, g, row_sums=True, bin_edges=edges),
                            abs_scale(b, a, g))


@pytest.mark.parametrize("offset", [2**31, 2**32 + 3 * 2**16], ids=["2^31", "2^32+"])
@pytest.mark.parametrize("row_len", [1, 33, 1000, 3 * 2**30])
def test_allocate_64bit_indexing(emu, offset, row_len):
    """The last 3 chunks + 1000 elements of a tensor of more than 2^31 (or 2^32)
    elements: flat indices, chunk bounds and row numbers beyond 32 bits (only
    that tail is in memory; see allocate_far in tests/cuda_emu/emu_ops.cpp)."""
    n = 3 * CHUNK + 1000
    b, a, g = make_step([(n,)], seed=46)
    sums, counts, rows = emu.allocate_far(b[0], a[0], g[0], offset, row_len)
    x = reference.lca_values(b[0], a[0], g[0]).double()
    assert_sums_close(sums[0], x.sum(), x.abs().sum().item())
    assert counts[0].tolist() == [int((x < 0).sum()), int((x > 0).sum()), int((x == 0).sum()), 0]
    row_of = (torch.arange(n, dtype=torch.int64) + offset) // row_len - offset // row_len
    want_rows = torch.zeros(rows.numel(), dtype=torch.float64).index_add_(0, row_of, x)
    assert_sums_close(rows, want_rows, x.abs().sum().item())


@pytest.mark.parametrize("pdt,gdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)],
                         ids=str)
def test_classes_vector_and_element_loads_agree_bitwise(emu, pdt, gdt, monkeypatch):
    """allocate_classes with vector loads (aligned, numel % 4 == 0), with them
    turned off, and on misaligned copies: the same bits every time."""
    shapes = [(64, 36), (CHUNK + 400,)]
    b, a, _ = make_step(shapes, pdt, pdt, seed=48)
    gen = torch.Generator().manual_seed(49)
    g = [torch.randn((9, *s), generator=gen).to(gdt) for s in shapes]
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", flag)
        runs.append(emu.allocate_classes(b, a, g, True))
    monkeypatch.setenv("LCA_EXT_CUDA_VECTOR", "1")
    runs.append(emu.allocate_classes([_laid_out(x, "offset1") for x in b], a,
                                     [_laid_out(x, "offset1") for x in g], True))
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)
    want = lca_ext.allocate_classes(b, a, g)
    assert torch.equal(runs[0][1], want.counts)
