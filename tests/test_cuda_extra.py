"""GPU-only checks of the CUDA kernels that the shared per-device tests
(test_allocate / test_accumulate / test_classes / test_determinism /
test_sign_changes) and test_cuda_plan.py do not make:

* CUDA against the CPU ops (and the torch reference) on 300+ tensors of every
  dtype (and every dtype pair in one list), chunk-boundary sizes, offset views
  (storage_offset 1..3: contiguous but not 16-byte aligned, so a vector-load path
  must fall back), strided and transposed views, for inputs *and* in-place state;
  counts, histograms and state bit for bit, float64 sums to rounding;
* accumulate_ bit for bit against the torch reference (acc + (g * w), two
  roundings: no FMA contraction);
* bit-identical repeated runs under different GPU load and memory placement;
* stream semantics: every op runs on the current (non-default) stream, in order
  with the work queued before it; a second device (skipped with one GPU); CUDA
  graph capture refused with a clear error;
* no host synchronisation inside an op (torch.cuda.set_sync_debug_mode);
* kernel launches per op, independent of the number of tensors (profiler);
* tensors of more than 2**31 elements (marked slow): exact closed-form results.

Every test here skips cleanly without a GPU (and a CUDA build of lca_ext).
"""
import gc
import math

import pytest
import torch

import lca_ext
from lca_ext import reference
from conftest import HAVE_GPU, require_kernel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_GPU, reason="needs a GPU and lca_ext built with CUDA"),
]

CHUNK = lca_ext.build_info()["chunk_size"]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["dense", "offset1", "offset2", "offset3", "strided", "transposed"]


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    if HAVE_GPU:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Inputs with identical values and identical layouts on the CPU and the GPU.

def view_spec(shape, layout):
    """(buffer numel, fn) where fn(buffer) gives a tensor of `shape` laid out as
    `layout`: dense; offsetN (contiguous, storage_offset N, so misaligned for
    vector loads); strided (every other element of the last dim); transposed."""
    n = math.prod(shape)
    if layout.startswith("offset"):
        off = int(layout[len("offset"):])
        return n + off, lambda buf: buf[off:off + n].view(shape)
    if layout == "strided" and len(shape) >= 1:
        wide = (*shape[:-1], 2 * shape[-1])
        return 2 * n, lambda buf: buf.view(wide)[..., ::2]
    if layout == "transposed" and len(shape) >= 2:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return n, lambda buf: buf.view(swapped).transpose(-1, -2)
    return n, lambda buf: buf.view(shape)


class Pair:
    """The same logical tensor on the CPU and on the GPU, same layout."""

    def __init__(self, buf_cpu, fn):
        self.cpu = fn(buf_cpu)
        self.gpu = fn(buf_cpu.to("cuda"))

    @staticmethod
    def lists(pairs):
        return [p.cpu for p in pairs], [p.gpu for p in pairs]


def pair(buf, fn):
    return Pair(buf.contiguous(), fn)


def mixed_shapes():
    """300+ tensors: chunk-boundary sizes, warp-boundary rows, empty, 0-d."""
    shapes = [(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2, CHUNK + 3), (3 * CHUNK + 5,),
              (CHUNK // 32, 32), (33, 2049), (0,), (4, 0), (), (1,), (31,), (2, 3, 4)]
    shapes += [(i % 17 + 1, i % 5 + 1) if i % 3 else (i % 23 + 1,) for i in range(300)]
    return shapes


def sums_close(got, want, scale):
    """float64 sums in another order: close; NaN / +-Inf where the other has them."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape
    fin = torch.isfinite(want)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~fin & ~torch.isnan(want)], want[~fin & ~torch.isnan(want)])
    diff = (got[fin] - want[fin]).abs()
    tol = 1e-10 * (scale + 1e-30)
    assert diff.numel() == 0 or diff.max().item() <= tol, f"max diff {diff.max().item()} > {tol}"


def same(x, y):
    """Bit for bit (NaN equal to NaN: payloads may differ between devices)."""
    torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0, equal_nan=True)


def finite_scale(b, a, g):
    return sum(reference.lca_values(x, y, z).double().abs().nan_to_num(0, 0, 0).sum().item()
               for x, y, z in zip(b, a, g))


def make_allocate_inputs(shapes, dtype_pairs, seed, nonfinite=True):
    gen = torch.Generator().manual_seed(seed)
    b, a, g, state = [], [], [], []
    for k, shape in enumerate(shapes):
        pdt, gdt = dtype_pairs[k % len(dtype_pairs)]
        size, fn = view_spec(shape, LAYOUTS[k % len(LAYOUTS)])
        base = torch.randn(size, generator=gen, dtype=torch.float64)
        step = 1e-2 * torch.randn(size, generator=gen, dtype=torch.float64)
        step[::11] = 0.0  # after == before: lca exactly 0
        grad = torch.randn(size, generator=gen, dtype=torch.float64)
        grad[::13] = 0.0
        if nonfinite and size > 20 and k % 29 == 7:
            grad[5] = float("nan")
            grad[17] = float("inf")
        b.append(pair(base.to(pdt), fn))
        a.append(pair((base + step).to(pdt), fn))
        g.append(pair(grad.to(gdt), fn))
        # state: its own layout (a different one from the inputs')
        ssize, sfn = view_spec(shape, LAYOUTS[(k + 2) % len(LAYOUTS)])
        sdt = torch.float32 if k % 2 else torch.float64
        state.append(dict(
            cum=pair(torch.randn(ssize, generator=gen, dtype=torch.float64).to(sdt), sfn),
            helped=pair(torch.randint(0, 5, (ssize,), generator=gen, dtype=torch.int32), sfn),
            out=pair(torch.full((ssize,), -7.0, dtype=sdt), sfn)))
    return b, a, g, state


DTYPE_CASES = {f"{str(p)[6:]}-{str(q)[6:]}": [(p, q)] for p in FLOATS for q in FLOATS}
DTYPE_CASES["mixed"] = [(p, q) for p in FLOATS for q in FLOATS]


# ---------------------------------------------------------------------------
# allocate: CUDA against the CPU kernel, 300+ tensors, layouts, state

@pytest.mark.parametrize("dtypes", DTYPE_CASES.values(), ids=DTYPE_CASES.keys())
def test_allocate_many_tensors_layouts_match_cpu(dtypes):
    require_kernel("allocate", "cuda")
    shapes = mixed_shapes()
    b, a, g, state = make_allocate_inputs(shapes, dtypes, seed=len(dtypes) + 100)
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6)
    res, st = {}, {}
    for dev, edges_dev in (("cpu", edges), ("gpu", edges.cuda())):
        pick = (lambda p: p.cpu) if dev == "cpu" else (lambda p: p.gpu)
        cum = [pick(s["cum"]) for s in state]
        helped = [pick(s["helped"]) for s in state]
        out = [pick(s["out"]) for s in state]
        res[dev] = lca_ext.allocate([pick(x) for x in b], [pick(x) for x in a],
                                    [pick(x) for x in g], row_sums=True, bin_edges=edges_dev,
                                    cum_lca=cum, helped_steps=helped, lca_out=out)
        st[dev] = cum + helped + out
    bc, ac, gc_ = (Pair.lists(x)[0] for x in (b, a, g))
    scale = finite_scale(bc, ac, gc_)
    got, want = res["gpu"], res["cpu"]
    assert got.sums.is_cuda and got.counts.is_cuda and got.histogram.is_cuda
    assert torch.equal(got.counts.cpu(), want.counts)
    assert torch.equal(got.histogram.cpu(), want.histogram)
    sums_close(got.sums, want.sums, scale)
    sums_close(got.row_sums, want.row_sums, scale)
    for x, y in zip(st["gpu"], st["cpu"]):  # the caller's (strided, offset) views
        same(x, y)
    # and the CPU agrees with the plain reference on the counts
    ref = reference.allocate(bc, ac, gc_, bin_edges=edges)
    assert torch.equal(want.counts, ref.counts)


def test_allocate_sums_only_fast_path_matches_cpu():
    """No extras: the kernel without row walk, histogram or state."""
    require_kernel("allocate", "cuda")
    b, a, g, _ = make_allocate_inputs(mixed_shapes(), DTYPE_CASES["mixed"], seed=5)
    got = lca_ext.allocate(*(Pair.lists(x)[1] for x in (b, a, g)))
    bc, ac, gc_ = (Pair.lists(x)[0] for x in (b, a, g))
    want = lca_ext.allocate(bc, ac, gc_)
    assert torch.equal(got.counts.cpu(), want.counts)
    sums_close(got.sums, want.sums, finite_scale(bc, ac, gc_))
    assert got.row_sums.shape == (0,) and got.histogram.shape == (len(b), 0)


# ---------------------------------------------------------------------------
# accumulate_: bit for bit against the torch reference

@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad_dtype", FLOATS, ids=str)
def test_accumulate_bitwise_many_tensors_layouts(acc_dtype, grad_dtype):
    require_kernel("accumulate_", "cuda")
    gen = torch.Generator().manual_seed(41)
    acc, grads = [], []
    for k, shape in enumerate(mixed_shapes()):
        size, fn = view_spec(shape, LAYOUTS[k % len(LAYOUTS)])
        gsize, gfn = view_spec(shape, LAYOUTS[(k + 3) % len(LAYOUTS)])
        acc.append(pair(torch.randn(size, generator=gen, dtype=torch.float64).to(acc_dtype), fn))
        grads.append(pair(torch.randn(gsize, generator=gen, dtype=torch.float64).to(grad_dtype),
                          gfn))
    acc_c, acc_g = Pair.lists(acc)
    g_c, g_g = Pair.lists(grads)
    want = [t.clone() for t in acc_c]
    for w in (1 / 6, 4 / 6, -2.5, 1e-3):
        lca_ext.accumulate_(acc_g, g_g, w)
        lca_ext.accumulate_(acc_c, g_c, w)
        reference.accumulate_(want, g_c, w)
    for got, cpu, ref in zip(acc_g, acc_c, want):
        same(got, ref)  # acc + (g * w): two roundings, as torch does it
        same(got, cpu)
    # the interleaved elements of strided / offset buffers are untouched
    for p in acc:
        if not p.gpu.is_contiguous() or p.gpu.storage_offset():
            same(torch.as_strided(p.gpu, (p.gpu.untyped_storage().nbytes()
                                          // p.gpu.element_size(),), (1,), 0),
                 torch.as_strided(p.cpu, (p.cpu.untyped_storage().nbytes()
                                          // p.cpu.element_size(),), (1,), 0))


# ---------------------------------------------------------------------------
# allocate_classes and sign_changes_: many tensors, layouts, dtypes

@pytest.mark.parametrize("num_classes", [3, 11])
@pytest.mark.parametrize("dtypes", [DTYPE_CASES["mixed"]] +
                         [[(p, p)] for p in FLOATS], ids=["mixed"] + [str(p) for p in FLOATS])
def test_allocate_classes_many_tensors_layouts_match_cpu(num_classes, dtypes):
    require_kernel("allocate_classes", "cuda")
    gen = torch.Generator().manual_seed(num_classes)
    shapes = mixed_shapes()
    b, a, _, _ = make_allocate_inputs(shapes, dtypes, seed=7, nonfinite=False)
    cg = []
    for k, shape in enumerate(shapes):
        gdt = dtypes[k % len(dtypes)][1]
        size, fn = view_spec((num_classes, *shape), LAYOUTS[(k + 1) % len(LAYOUTS)])
        cg.append(pair(torch.randn(size, generator=gen, dtype=torch.float64).to(gdt), fn))
    bc, bg = Pair.lists(b)
    ac, ag = Pair.lists(a)
    gc_, gg = Pair.lists(cg)
    got = lca_ext.allocate_classes(bg, ag, gg)
    want = lca_ext.allocate_classes(bc, ac, gc_)
    assert got.sums.shape == (num_classes, len(shapes))
    assert torch.equal(got.counts.cpu(), want.counts)
    scale = max(finite_scale(bc, ac, [x[c] for x in gc_]) for c in range(num_classes))
    sums_close(got.sums, want.sums, scale)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_sign_changes_many_tensors_layouts_match_cpu(dtype):
    require_kernel("sign_changes_", "cuda")
    gen = torch.Generator().manual_seed(43)
    shapes = mixed_shapes()
    last, changes, specs = [], [], []
    for k, shape in enumerate(shapes):
        size, fn = view_spec(shape, LAYOUTS[(k + 4) % len(LAYOUTS)])
        last.append(pair(torch.randint(-1, 2, (size,), generator=gen, dtype=torch.int8), fn))
        changes.append(pair(torch.randint(0, 9, (size,), generator=gen, dtype=torch.int32), fn))
        specs.append(view_spec(shape, LAYOUTS[k % len(LAYOUTS)]))
    lc, lg = Pair.lists(last)
    cc, cg = Pair.lists(changes)
    prev = None
    for step in range(4):
        xs = []
        for k, (size, fn) in enumerate(specs):
            v = torch.randn(size, generator=gen, dtype=torch.float64)
            v[torch.rand(size, generator=gen) < 0.2] = 0.0
            if step == 2 and size > 3:
                v[3] = float("nan")
            xs.append(pair(v.to(dtype), fn))
        base = prev if step % 2 else None
        lca_ext.sign_changes_(lg, cg, [x.gpu for x in xs], [x.gpu for x in base] if base else None)
        lca_ext.sign_changes_(lc, cc, [x.cpu for x in xs], [x.cpu for x in base] if base else None)
        prev = xs
    for x, y in zip(lg + cg, lc + cc):
        same(x, y)


# ---------------------------------------------------------------------------
# determinism on the GPU

def _big_list(seed):
    shapes = [(2048, 1000), (CHUNK * 7 + 3,), (300, 1001), (5, 7), ()] + [(64, 33)] * 300
    dts = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
           (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b, a, g = [], [], []
    for k, s in enumerate(shapes):
        pdt, gdt = dts[k % len(dts)]
        x = torch.randn(s, generator=gen, device="cuda")
        b.append(x.to(pdt))
        a.append((x + 1e-2 * torch.randn(s, generator=gen, device="cuda")).to(pdt))
        g.append(torch.randn(s, generator=gen, device="cuda").to(gdt))
    return b, a, g


def _bits(t):
    t = t.detach().contiguous()
    return t.view(torch.int64) if t.dtype == torch.float64 else t.view(torch.int32) \
        if t.dtype == torch.float32 else t


def test_bit_identical_repeats_under_load_and_new_memory():
    require_kernel("allocate", "cuda")
    b, a, g = _big_list(51)
    edges = lca_ext.signed_log_edges(1e-8, 1e-1, 10, device="cuda")
    cls_g = [torch.stack([x, -0.5 * x, 2 * x]) for x in g]

    def run():
        res = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges)
        cls = lca_ext.allocate_classes(b, a, cls_g)
        acc = [torch.zeros_like(x, dtype=torch.float32) for x in b]
        lca_ext.accumulate_(acc, g, 1 / 6)
        lca_ext.accumulate_(acc, g, 4 / 6)
        return [_bits(t).clone() for t in list(res) + list(cls) + acc]

    first = run()
    # again, while another stream keeps the SMs busy (different block scheduling)
    noise = torch.randn(4096, 4096, device="cuda")
    busy = torch.cuda.Stream()
    busy.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(busy):
        for _ in range(20):
            noise = noise @ noise
            noise /= noise.norm()
    under_load = run()
    torch.cuda.current_stream().wait_stream(busy)
    # and once more with the caching allocator emptied (other addresses)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    fresh = run()
    for other in (under_load, fresh):
        for x, y in zip(first, other):
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------
# streams and devices

def test_ops_run_in_order_on_the_current_side_stream():
    """Inputs are written on a side stream behind a long sleep and the op is
    called right away: an op that ran on another stream would read them early."""
    for op in ("allocate", "accumulate_", "allocate_classes", "sign_changes_"):
        require_kernel(op, "cuda")
    shapes = [(300, 301), (CHUNK + 3,), (7,), ()]
    gen = torch.Generator().manual_seed(61)
    src = {name: [torch.randn(s, generator=gen) for s in shapes]
           for name in ("b", "a", "g")}
    src["a"] = [x + 1e-2 * y for x, y in zip(src["b"], src["a"])]
    dst = {name: [torch.full(s, float("nan"), device="cuda") for s in shapes] for name in src}
    state_cpu = [torch.zeros(s) for s in shapes]
    acc = [torch.zeros(s, device="cuda") for s in shapes]
    last = [torch.zeros(s, dtype=torch.int8, device="cuda") for s in shapes]
    ch = [torch.zeros(s, dtype=torch.int32, device="cuda") for s in shapes]
    cum = [torch.zeros(s, device="cuda") for s in shapes]
    pinned = {name: [x.pin_memory() for x in xs] for name, xs in src.items()}
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs land
        for name in dst:
            for d, s in zip(dst[name], pinned[name]):
                d.copy_(s, non_blocking=True)
        res = lca_ext.allocate(dst["b"], dst["a"], dst["g"], row_sums=True, cum_lca=cum)
        cls = lca_ext.allocate_classes(dst["b"], dst["a"], [x.unsqueeze(0) for x in dst["g"]])
        lca_ext.accumulate_(acc, dst["g"], 0.5)
        lca_ext.sign_changes_(last, ch, dst["g"])
        assert res.sums.device.type == "cuda"
    side.synchronize()
    want = lca_ext.allocate(src["b"], src["a"], src["g"], row_sums=True, cum_lca=state_cpu)
    assert torch.equal(res.counts.cpu(), want.counts)
    assert res.counts[:, 3].sum().item() == 0  # no NaN was read
    sums_close(res.sums, want.sums, finite_scale(src["b"], src["a"], src["g"]))
    sums_close(res.row_sums, want.row_sums, finite_scale(src["b"], src["a"], src["g"]))
    assert torch.equal(cls.counts[0].cpu(), want.counts)
    for x, y in zip(cum, state_cpu):
        same(x, y)
    for x, g in zip(acc, src["g"]):
        same(x, g * 0.5)
    for x, g in zip(last, src["g"]):
        same(x, torch.sign(g).to(torch.int8))


@pytest.mark.skipif(not HAVE_GPU or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device_while_current_is_first():
    for op in ("allocate", "accumulate_", "allocate_classes", "sign_changes_"):
        require_kernel(op, "cuda")
    torch.cuda.set_device(0)
    b, a, g, state = make_allocate_inputs(mixed_shapes()[:40], DTYPE_CASES["mixed"], seed=71)
    bc, ac, gc_ = (Pair.lists(x)[0] for x in (b, a, g))
    dev1 = lambda xs: [x.to("cuda:1") for x in xs]  # noqa: E731
    b1, a1, g1 = dev1(bc), dev1(ac), dev1(gc_)
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6)
    cum1 = [torch.zeros_like(x, dtype=torch.float64) for x in b1]
    cum0 = [torch.zeros_like(x, dtype=torch.float64) for x in bc]
    got = lca_ext.allocate(b1, a1, g1, row_sums=True, bin_edges=edges.to("cuda:1"), cum_lca=cum1)
    want = lca_ext.allocate(bc, ac, gc_, row_sums=True, bin_edges=edges, cum_lca=cum0)
    assert torch.cuda.current_device() == 0
    assert all(t.device == torch.device("cuda:1") for t in got)
    assert torch.equal(got.counts.cpu(), want.counts)
    assert torch.equal(got.histogram.cpu(), want.histogram)
    sums_close(got.sums, want.sums, finite_scale(bc, ac, gc_))
    for x, y in zip(cum1, cum0):
        same(x, y)
    cls = lca_ext.allocate_classes(b1, a1, [x.unsqueeze(0) for x in g1])
    assert torch.equal(cls.counts[0].cpu(), want.counts)
    acc1 = [torch.zeros_like(x, dtype=torch.float32) for x in g1]
    lca_ext.accumulate_(acc1, g1, 0.25)
    for x, y in zip(acc1, gc_):
        same(x, y.float() * 0.25)
    last = [torch.zeros_like(x, dtype=torch.int8) for x in g1]
    ch = [torch.zeros_like(x, dtype=torch.int32) for x in g1]
    lca_ext.sign_changes_(last, ch, g1)
    torch.cuda.synchronize(1)
    for x, y in zip(last, gc_):
        same(x, torch.where(torch.isnan(y), 0, torch.sign(y)).to(torch.int8))


@pytest.mark.parametrize("op", ["allocate", "accumulate_", "allocate_classes", "sign_changes_"])
def test_cuda_graph_capture_is_refused_cleanly(op):
    """Each call uploads its tables from recycled pinned memory: a captured graph
    would replay stale tables, so capture must fail with a clear error."""
    require_kernel(op, "cuda")
    x = [torch.randn(40, 7, device="cuda"), torch.randn(5, device="cuda")]
    y = [t + 0.01 for t in x]
    call = {
        "allocate": lambda: lca_ext.allocate(x, y, x),
        "accumulate_": lambda: lca_ext.accumulate_(y, x, 0.5),
        "allocate_classes": lambda: lca_ext.allocate_classes(x, y, [t.unsqueeze(0) for t in x]),
        "sign_changes_": lambda: lca_ext.sign_changes_(
            [torch.zeros_like(t, dtype=torch.int8) for t in x],
            [torch.zeros_like(t, dtype=torch.int32) for t in x], x),
    }[op]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError) as err:
        with torch.cuda.graph(graph):
            call()
    assert "CUDA graph" in str(err.value) or "captur" in str(err.value), str(err.value)
    torch.cuda.synchronize()
    res = lca_ext.allocate(x, y, x)  # the device still works
    assert res.counts.sum().item() == 40 * 7 + 5


# ---------------------------------------------------------------------------
# no host synchronisation inside an op

def _sync_free_inputs():
    shapes = [(300, 301), (CHUNK + 3,), (7,), ()] + [(33, 5)] * 50
    gen = torch.Generator(device="cuda").manual_seed(81)
    b = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
    a = [x + 1e-2 * torch.randn(x.shape, generator=gen, device="cuda") for x in b]
    g = [torch.randn(s, generator=gen, device="cuda") for s in shapes]
    return b, a, g


def test_ops_do_not_synchronise_with_the_host():
    for op in ("allocate", "accumulate_", "allocate_classes", "sign_changes_"):
        require_kernel(op, "cuda")
    b, a, g = _sync_free_inputs()
    strided = [torch.zeros(x.numel() * 2, device="cuda")[::2].view(x.shape) for x in b]
    cum = [torch.zeros_like(x) for x in b]
    helped = [torch.zeros_like(x, dtype=torch.int32) for x in b]
    last = [torch.zeros_like(x, dtype=torch.int8) for x in b]
    ch = [torch.zeros_like(x, dtype=torch.int32) for x in b]
    cls_g = [torch.stack([x, 2 * x]) for x in g]

    host_edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6)  # on the CPU: read on the host

    def all_ops():
        lca_ext.allocate(b, a, g)
        lca_ext.allocate(b, a, g, bin_edges=host_edges)
        lca_ext.allocate(b, a, g, row_sums=True, cum_lca=cum, helped_steps=helped,
                         lca_out=strided)
        lca_ext.allocate_classes(b, a, cls_g)
        lca_ext.accumulate_(cum, g, 0.5)
        lca_ext.accumulate_(strided, [x.half() for x in g], 0.5)
        lca_ext.sign_changes_(last, ch, g, b)

    all_ops()  # warm-up: first-use allocations
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        all_ops()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()


def test_host_and_device_edges_give_the_same_histogram():
    require_kernel("allocate", "cuda")
    b, a, g = _sync_free_inputs()
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6)
    on_host = lca_ext.allocate(b, a, g, bin_edges=edges).histogram
    on_gpu = lca_ext.allocate(b, a, g, bin_edges=edges.cuda()).histogram
    assert on_host.is_cuda and torch.equal(on_host, on_gpu)


@pytest.mark.xfail(strict=False, reason="documented: bin edges on the GPU are validated on "
                   "the host (copied: a sync); pass them on the CPU to avoid it")
def test_histogram_with_gpu_edges_does_not_synchronise():
    require_kernel("allocate", "cuda")
    b, a, g = _sync_free_inputs()
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6, device="cuda")
    lca_ext.allocate(b, a, g, bin_edges=edges)
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lca_ext.allocate(b, a, g, bin_edges=edges)
    finally:
        torch.cuda.set_sync_debug_mode(old)


# ---------------------------------------------------------------------------
# launches per op: one or a few, whatever the number of tensors

def cuda_kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [n for n in names if not n.startswith(("Memcpy", "Memset"))]
    copies = [n for n in names if n.startswith(("Memcpy", "Memset"))]
    return kernels, copies


@pytest.mark.parametrize("op,ours", [("allocate", 2), ("allocate_rows_state", 2),
                                     ("allocate_classes", 2), ("accumulate_", 1),
                                     ("sign_changes_", 1)])
def test_launches_do_not_grow_with_the_tensor_count(op, ours):
    require_kernel(op.split("_rows")[0], "cuda")
    counts = {}
    for k in (10, 500):
        shapes = [(64, 40)] * k
        b = [torch.randn(s, device="cuda") for s in shapes]
        a = [x + 0.01 for x in b]
        g = [torch.randn(s, device="cuda") for s in shapes]
        cum = [torch.zeros_like(x) for x in b]
        helped = [torch.zeros_like(x, dtype=torch.int32) for x in b]
        last = [torch.zeros_like(x, dtype=torch.int8) for x in b]
        ch = [torch.zeros_like(x, dtype=torch.int32) for x in b]
        cls = [torch.stack([x, -x, 2 * x]) for x in g]
        fn = {
            "allocate": lambda: lca_ext.allocate(b, a, g),
            "allocate_rows_state": lambda: lca_ext.allocate(
                b, a, g, row_sums=True, cum_lca=cum, helped_steps=helped),
            "allocate_classes": lambda: lca_ext.allocate_classes(b, a, cls),
            "accumulate_": lambda: lca_ext.accumulate_(cum, g, 0.5),
            "sign_changes_": lambda: lca_ext.sign_changes_(last, ch, g),
        }[op]
        kernels, copies = cuda_kernel_names(fn)
        if not kernels:
            pytest.skip("the profiler recorded no CUDA kernels (CUPTI unavailable?)")
        counts[k] = (len(kernels), len(copies))
        assert sum("lca_ext" in n for n in kernels) == ours, kernels
        assert len(kernels) <= ours + 4, kernels  # + at most the outputs' zero fills
    assert counts[10] == counts[500], counts


# ---------------------------------------------------------------------------
# more than 2**31 elements (GPU only, slow): values with exact closed-form results

BIG = 2**31 + 17  # = 5 * 429496733
BIG_ROWS = 5
SLICE = 2**27


def _need_gpu_bytes(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes * 1.1:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB free on the GPU, has {free / 2**30:.1f}")


def _slices(n):
    for s in range(0, n, SLICE):
        yield s, min(n, s + SLICE)


def _pattern(s, e, device="cuda"):
    """v(i) = i % 7 - 2, as int64, for i in [s, e)."""
    return torch.arange(s, e, device=device, dtype=torch.int64) % 7 - 2


def _fill_pattern(t, sign=1):
    for s, e in _slices(t.numel()):
        t[s:e] = (sign * _pattern(s, e)).to(t.dtype)
    return t


def _S(n):
    """sum of v(i) over [0, n)."""
    return 7 * (n // 7) + sum(j - 2 for j in range(n % 7))


def _residue_count(n, r):
    return n // 7 + (1 if r < n % 7 else 0)


def _counts(n, sign=1):
    neg = sum(_residue_count(n, r) for r in (0, 1))       # v = -2, -1
    pos = sum(_residue_count(n, r) for r in (3, 4, 5, 6))  # v = 1 .. 4
    zero = _residue_count(n, 2)
    return [neg, pos, zero, 0] if sign > 0 else [pos, neg, zero, 0]


@pytest.mark.slow
def test_huge_tensor_allocate_exact():
    require_kernel("allocate", "cuda")
    # inputs 3 x 4 GiB (fp16), cum_lca + helped_steps 2 x 8 GiB
    _need_gpu_bytes(3 * 2 * BIG + 2 * 4 * BIG + 2**31)
    before = torch.zeros(BIG, dtype=torch.float16, device="cuda")
    after = torch.ones(BIG, dtype=torch.float16, device="cuda")
    grad = _fill_pattern(torch.empty(BIG, dtype=torch.float16, device="cuda"))
    # small tensors around it: the big one is tensor 1, rows and chunks start late
    gen = torch.Generator().manual_seed(91)
    sb = [torch.randn(s, generator=gen) for s in [(3, 5), (CHUNK + 1,)]]
    sa = [x + 1e-2 * torch.randn(x.shape, generator=gen) for x in sb]
    sg = [torch.randn(x.shape, generator=gen) for x in sb]
    b = [sb[0].cuda(), before, sb[1].cuda()]
    a = [sa[0].cuda(), after, sa[1].cuda()]
    g = [sg[0].cuda(), grad, sg[1].cuda()]
    edges = torch.tensor([-2.5, -0.5, 0.5, 2.5], dtype=torch.float64, device="cuda")
    cum = [torch.zeros_like(x, dtype=torch.float32) for x in b]
    helped = [torch.zeros_like(x, dtype=torch.int32) for x in b]
    res = lca_ext.allocate(b, a, g, bin_edges=edges, cum_lca=cum, helped_steps=helped)
    want_small = lca_ext.allocate(sb, sa, sg, bin_edges=edges.cpu())
    assert res.sums[1].item() == float(_S(BIG))
    neg, pos, zero, _ = _counts(BIG)
    assert res.counts[1].tolist() == [neg, pos, zero, 0]
    hi = _residue_count(BIG, 5) + _residue_count(BIG, 6)  # v = 3, 4
    assert res.histogram[1].tolist() == [0, neg, zero, pos - hi, hi]
    for k_res, k_small in ((0, 0), (2, 1)):
        assert torch.equal(res.counts[k_res].cpu(), want_small.counts[k_small])
        assert torch.equal(res.histogram[k_res].cpu(), want_small.histogram[k_small])
    for s, e in _slices(BIG):  # every element of the state, exactly
        v = _pattern(s, e)
        assert torch.equal(cum[1][s:e], v.float()), (s, e)
        assert torch.equal(helped[1][s:e], (v < 0).int()), (s, e)
    del cum, helped
    gc.collect()
    torch.cuda.empty_cache()
    # row sums: 5 rows of 429496733, and one row of BIG (> 2**31) elements
    L = BIG // BIG_ROWS
    for shape in [(BIG_ROWS, L), (1, BIG)]:
        views = [[x.view(shape) if x is y else x for x in xs]
                 for xs, y in ((b, before), (a, after), (g, grad))]
        r = lca_ext.allocate(*views, row_sums=True)
        rows = lca_ext.split_rows(r.row_sums, views[0])[1]
        rl = BIG // shape[0]
        want = [float(_S((i + 1) * rl) - _S(i * rl)) for i in range(shape[0])]
        assert rows.tolist() == want, shape
        assert r.sums[1].item() == float(_S(BIG))


@pytest.mark.slow
def test_huge_tensor_row_sums_1d_exact():
    """A 1-D tensor of BIG elements: BIG rows (indices past 2**31), 16 GiB of row sums."""
    require_kernel("allocate", "cuda")
    _need_gpu_bytes(3 * 2 * BIG + 8 * BIG)
    before = torch.zeros(BIG, dtype=torch.bfloat16, device="cuda")
    after = torch.full((BIG,), -1.0, dtype=torch.bfloat16, device="cuda")
    grad = _fill_pattern(torch.empty(BIG, dtype=torch.bfloat16, device="cuda"))
    r = lca_ext.allocate([before], [after], [grad], row_sums=True)
    assert r.row_sums.shape == (BIG,)
    assert r.sums[0].item() == -float(_S(BIG))
    assert r.counts[0].tolist() == _counts(BIG, sign=-1)
    for s, e in _slices(BIG):
        assert torch.equal(r.row_sums[s:e], -_pattern(s, e).double()), (s, e)


@pytest.mark.slow
def test_huge_tensor_accumulate_exact():
    require_kernel("accumulate_", "cuda")
    _need_gpu_bytes(2 * BIG + 4 * BIG + 2**31)
    grad = _fill_pattern(torch.empty(BIG, dtype=torch.float16, device="cuda"))
    acc = torch.zeros(BIG, dtype=torch.float32, device="cuda")
    small = torch.zeros(CHUNK + 1, device="cuda")
    lca_ext.accumulate_([small, acc], [torch.ones_like(small), grad], 0.5)
    lca_ext.accumulate_([small, acc], [torch.ones_like(small), grad], 0.25)
    assert torch.equal(small, torch.full_like(small, 0.75))
    for s, e in _slices(BIG):
        assert torch.equal(acc[s:e], _pattern(s, e).float() * 0.75), (s, e)


@pytest.mark.slow
def test_huge_tensor_allocate_classes_exact():
    """Two classes: the second class's gradient starts 2**31 + 17 elements in."""
    require_kernel("allocate_classes", "cuda")
    _need_gpu_bytes(2 * 2 * BIG + 2 * 2 * BIG + 2**31)
    before = torch.zeros(BIG, dtype=torch.float16, device="cuda")
    after = torch.ones(BIG, dtype=torch.float16, device="cuda")
    cg = torch.empty(2, BIG, dtype=torch.float16, device="cuda")
    _fill_pattern(cg[0])
    _fill_pattern(cg[1], sign=-1)
    res = lca_ext.allocate_classes([before], [after], [cg])
    assert res.sums[:, 0].tolist() == [float(_S(BIG)), -float(_S(BIG))]
    assert res.counts[0, 0].tolist() == _counts(BIG)
    assert res.counts[1, 0].tolist() == _counts(BIG, sign=-1)


@pytest.mark.slow
def test_huge_tensor_sign_changes_exact():
    require_kernel("sign_changes_", "cuda")
    _need_gpu_bytes(2 * BIG + BIG + 4 * BIG + 2**31)
    x = _fill_pattern(torch.empty(BIG, dtype=torch.float16, device="cuda"))
    last = torch.zeros(BIG, dtype=torch.int8, device="cuda")
    ch = torch.zeros(BIG, dtype=torch.int32, device="cuda")
    lca_ext.sign_changes_([last], [ch], [x])
    x.neg_()
    lca_ext.sign_changes_([last], [ch], [x])
    assert ch.sum().item() == BIG - _residue_count(BIG, 2)
    for s, e in _slices(BIG):
        v = _pattern(s, e)
        assert torch.equal(last[s:e], (-torch.sign(v)).to(torch.int8)), (s, e)
        assert torch.equal(ch[s:e], (v != 0).int()), (s, e)


# ---------------------------------------------------------------------------
# LCATracker on the GPU: fused kernels vs the reference ops vs the CPU

@pytest.mark.parametrize("num_classes", [None, 5], ids=["plain", "classes"])
def test_tracker_on_gpu_fused_matches_reference_and_cpu(num_classes):
    """Two trackers watch the same training on the GPU, one with the fused
    kernels, one with the reference ops: the same allocation up to rounding,
    every step grounded; training (dropout included) bit-identical with and
    without either tracker."""
    from torch import nn

    def make(device, dtype):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 5))
        return m.to(device, dtype)

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 12, generator=gen), torch.randint(0, 5, (300,), generator=gen)
    loss_fn = nn.functional.cross_entropy
    runs, weights = {}, {}
    for name, device, dtype, kernels in (("fused", "cuda", torch.float32, None),
                                         ("reference", "cuda", torch.float32, reference),
                                         ("untracked", "cuda", torch.float32, False)):
        model = make(device, dtype)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        tracker = None
        if kernels is not False:
            tracker = lca_ext.LCATracker(model, loss_fn, (x.to(device, dtype), y.to(device)),
                                         batch_size=128, num_classes=num_classes)
            if kernels is not None:
                tracker.kernels = kernels
                for o in tracker.objectives:
                    o.evaluator.kernels = kernels
            else:
                assert tracker.kernels is lca_ext.ops
        torch.manual_seed(2)
        for i in range(4):
            xb, yb = x[i * 64:(i + 1) * 64].to(device, dtype), y[i * 64:(i + 1) * 64].to(device)
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            with tracker.step() if tracker else torch.no_grad():
                opt.step()
        weights[name] = [p.detach().cpu() for p in model.parameters()]
        if tracker:
            runs[name] = tracker.result()
    for name in ("fused", "reference"):     # tracking never changes the training
        assert all(torch.equal(a, b) for a, b in zip(weights[name], weights["untracked"]))
    f, r = runs["fused"], runs["reference"]
    scale = float(abs(f.tensor_sums).sum())
    assert abs(f.tensor_sums - r.tensor_sums).max() <= 1e-6 * scale
    assert abs(f.row_sums - r.row_sums).max() <= 1e-6 * scale
    assert (f.splits == r.splits).all()
    delta = f.loss_after - f.loss_before
    assert (f.error <= 1e-4 + 1e-3 * abs(delta)).all()
    if num_classes:
        assert abs(f.class_sums - r.class_sums).max() <= 1e-6 * scale
        assert abs(f.class_sums.sum(1) - f.tensor_sums).max() <= 1e-5 * scale
