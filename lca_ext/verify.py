"""Verify the CUDA kernels on the GPU they will run on, once: ``lca-ext verify-cuda``.

The CUDA kernels are compiled for sm_80/sm_90 in CI and their sources run on a
CPU emulator in every CI run; this project ran them on an H200 (sm_90), where
every check passed, so they are enabled by default (lca_ext.cuda_gate).  On
another GPU, toolkit or build, this check says whether they hold there too; a
kernel added later starts in cuda_gate.UNVERIFIED_CUDA_OPS and is enabled by
it (or by the next project GPU run).

:func:`verify_cuda` runs every CUDA op on your GPU against the CPU kernels (and
the torch reference) on inputs chosen to reach every code path: each dtype pair,
sizes around the chunk size, offset (misaligned), strided and transposed views
of inputs and of in-place state, 313 tensors in one call, NaN and Inf, 1 to 17
classes, vector loads against element loads, and the same call twice
(determinism).  Counts, histograms, in-place state and accumulate_ must match
bit for bit; float64 sums to 1e-10 of the sum of |lca| (they add the same
values in another order).  When every check of an op passes, a stamp naming
the op is written to ``$LCA_EXT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lca_ext``,
else ``~/.cache/lca_ext``), file ``cuda-verified.json``, keyed by the library's
SHA-256, the torch and CUDA versions and the GPU's name and compute capability.
From then on the ops accept CUDA tensors on that GPU, with that build; a
rebuild, a torch upgrade or another GPU needs a new run (about a minute).
``LCA_EXT_ALLOW_UNVERIFIED_CUDA=1`` skips the question altogether (the test
suite sets it, to test the kernels themselves).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from .cuda_gate import FUSED_OPS as CUDA_OPS
# the stamps live in cuda_gate (which the ops read); these names are verify's API too
from .cuda_gate import (device_identity, forget_verified, library_sha256,  # noqa: F401
                        record_stamp, stamp_path, stamped_ops, verified_ops)

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass
class Check:
    op: str
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0

    def format_line(self) -> str:
        line = f"{'ok' if self.ok else 'FAIL':4s} {self.op:16s} {self.name:42s} {self.seconds:6.1f} s"
        return line + (f"\n     {self.detail}" if self.detail else "")


class VerifyReport(List[Check]):
    """The checks run by :func:`verify_cuda`, in order."""

    def passed_ops(self) -> List[str]:
        """Ops every one of whose checks passed (and that had at least one)."""
        return [op for op in CUDA_OPS
                if any(c.op == op for c in self) and all(c.ok for c in self if c.op == op)]

    @property
    def ok(self) -> bool:
        return bool(self) and all(c.ok for c in self)

    def format(self) -> str:
        return "\n".join(c.format_line() for c in self)


# ---------------------------------------------------------------------------
# inputs: the same values on the CPU and, in a chosen memory layout, on the device


def _laid_out(t: torch.Tensor, layout: str, device) -> torch.Tensor:
    """t's values on `device` in `layout`: dense, offsetN (contiguous from a
    storage offset of N elements: misaligned for vector loads), strided (every
    other element of the last dim) or transposed (the last two dims)."""
    if layout.startswith("offset"):
        off = int(layout[len("offset"):])
        view = torch.empty(t.numel() + off, dtype=t.dtype, device=device)[off:].view(t.shape)
    elif layout == "strided" and t.dim() >= 1:
        view = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype,
                           device=device)[..., ::2]
    elif layout == "transposed" and t.dim() >= 2:
        view = torch.empty((*t.shape[:-2], t.shape[-1], t.shape[-2]), dtype=t.dtype,
                           device=device).transpose(-1, -2)
    else:
        view = torch.empty(t.shape, dtype=t.dtype, device=device)
    view.copy_(t)
    return view


def _step(shapes, pdt, gdt, seed):
    gen = torch.Generator().manual_seed(seed)
    before = [torch.randn(s, generator=gen).to(pdt) for s in shapes]
    after = [(b.double() + 1e-2 * torch.randn(s, generator=gen, dtype=torch.float64)).to(pdt)
             for b, s in zip(before, shapes)]
    grads = [torch.randn(s, generator=gen).to(gdt) for s in shapes]
    return before, after, grads


class _Mismatch(AssertionError):
    pass


def _same(got, want) -> bool:
    """Equal values, NaN where the other has NaN."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.is_floating_point():
        nan = want.isnan()
        return torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])
    return torch.equal(got, want)


def _equal(name, got, want):
    got = got.cpu()
    if not _same(got, want):
        diff = (f"shape {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} "
                f"{want.dtype}" if got.shape != want.shape or got.dtype != want.dtype else
                f"{int((got != want).sum())} of {want.numel()} elements differ")
        raise _Mismatch(f"{name}: {diff}")


def _close(name, got, want, scale):
    """float64 sums of the same values in another order: NaN and +-Inf where the
    CPU has them, within 1e-10 * scale elsewhere."""
    tol = 1e-10 * (scale + 1e-30)
    got, want = got.cpu().double(), want.double()
    if got.shape != want.shape:
        raise _Mismatch(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    finite = want.isfinite()
    if not (torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isfinite(), finite)
            and torch.equal(got[want.isinf()], want[want.isinf()])):
        raise _Mismatch(f"{name}: NaN or Inf in other places than on the CPU")
    diff = (got[finite] - want[finite]).abs()
    if diff.numel() and not diff.max().item() <= tol:
        raise _Mismatch(f"{name}: max difference {diff.max().item():.3e} > {tol:.3e}")


def _scale(lca_values: List[torch.Tensor]) -> float:
    return sum(float(v.double().abs().nan_to_num(0.0, 0.0, 0.0).sum()) for v in lca_values)


# ---------------------------------------------------------------------------
# allocate


def _allocate_case(ops, device, shapes, pdt, gdt, seed, *, layout="dense", state=True,
                   edges=None, rows=True, poison=None, repeat=False):
    """One allocate call on the device against the CPU kernel: every output and
    every in-place state tensor (cum_lca in float32 and float64, helped_steps,
    lca_out).  poison(b, a, g) may plant NaN/Inf in the inputs first."""
    b, a, g = _step(shapes, pdt, gdt, seed)
    if poison is not None:
        poison(b, a, g)
    if edges is None:
        edges = torch.cat([-torch.logspace(-1, -8, 15, dtype=torch.float64),
                           torch.logspace(-8, -1, 15, dtype=torch.float64)])

    def states(dev):
        if not state:
            return [], [], []
        cum = [_laid_out(torch.full(s, 0.5), layout, dev) for s in shapes]
        cum64 = [_laid_out(torch.full(s, 0.25, dtype=torch.float64), layout, dev) for s in shapes]
        hs = [_laid_out(torch.full(s, 3, dtype=torch.int32), layout, dev) for s in shapes]
        return cum, cum64, hs

    cum_d, cum64_d, hs_d = states(device)
    out_d = [_laid_out(torch.zeros(s, dtype=torch.float64), layout, device) for s in shapes]
    b_d, a_d, g_d = ([_laid_out(x, layout, device) for x in xs] for xs in (b, a, g))
    cum_c, cum64_c, hs_c = states("cpu")
    out_c = [torch.zeros(s, dtype=torch.float64) for s in shapes]

    cpu = torch.ops.lca_ext
    want = cpu.allocate(b, a, g, edges, rows, cum_c, hs_c, out_c, False)
    got = ops.allocate(b_d, a_d, g_d, edges, rows, cum_d, hs_d, out_d, False)
    if state:
        cpu.allocate(b, a, g, None, False, cum64_c, [], [], False)
        ops.allocate(b_d, a_d, g_d, None, False, cum64_d, [], [], False)
    scale = _scale(out_c)
    for name, x, y in zip(("sums", "counts", "row_sums", "histogram"), got, want):
        if name in ("sums", "row_sums"):
            _close(name, x, y, scale)
        else:
            _equal(name, x, y)
    for name, xs, ys in (("lca_out", out_d, out_c), ("cum_lca float32", cum_d, cum_c),
                         ("cum_lca float64", cum64_d, cum64_c), ("helped_steps", hs_d, hs_c)):
        for k, (x, y) in enumerate(zip(xs, ys)):
            _equal(f"{name}[{k}]", x, y)
    if repeat:  # the same call again: every bit the same (no float atomics)
        again = ops.allocate(b_d, a_d, g_d, edges, rows, [], [], [], False)
        for name, x, y in zip(("sums", "counts", "row_sums", "histogram"), again, got):
            _equal(f"repeated {name}", x, y.cpu())


def _allocate_checks(ops, device, chunk):
    shapes = [(64, 33), (chunk + 11,), (), (3, 0), (2, chunk + 5)]

    def dtype_pairs():
        for p in FLOATS:
            for q in FLOATS:
                _allocate_case(ops, device, shapes, p, q, seed=1)

    def layouts():
        for layout in ("offset1", "offset3", "strided", "transposed"):
            _allocate_case(ops, device, [(37, 65), (chunk + 99,), (9, 3)], torch.float32,
                           torch.bfloat16, seed=2, layout=layout)

    def many_tensors():
        many = [((i % 13) + 1, (i * 7) % 61 + 1) for i in range(313)]
        _allocate_case(ops, device, many, torch.float32, torch.float32, seed=3, state=False)

    def row_lengths():
        for shape in [(3 * chunk + 5,), (700, 31), (2049, 32), (4000, 33), (20, 4097),
                      (3, chunk), (2, 2 * chunk + 7)]:
            _allocate_case(ops, device, [shape], torch.float32, torch.float16, seed=4,
                           state=False)

    def nonfinite():
        def poison(b, a, g):
            g[0][3, 4] = float("nan")
            g[0][10] = float("inf")
            a[1][chunk - 1] = float("-inf")
            b[1][chunk + 2] = float("nan")
        _allocate_case(ops, device, [(70, 33), (chunk + 5,)], torch.float32, torch.float32,
                       seed=5, poison=poison, state=False)

    def many_edges():
        for n in (2001, 10001):  # edges past shared memory; slots too, with 10001
            _allocate_case(ops, device, [(300, 31), (chunk + 3,)], torch.float32,
                           torch.float32, seed=6, state=False, rows=False,
                           edges=torch.linspace(-0.05, 0.05, n, dtype=torch.float64))

    def repeatable():
        _allocate_case(ops, device, [(40, 33), (2 * chunk + 17,), (5, 7)], torch.float32,
                       torch.float32, seed=7, repeat=True)

    def vector_vs_element_loads():
        with _env("LCA_EXT_CUDA_VECTOR", "0"):
            layouts_scalar = [(300, 33), (3, chunk + 130), (2 * chunk + 100,)]
            _allocate_case(ops, device, layouts_scalar, torch.bfloat16, torch.float16, seed=8)
        _allocate_case(ops, device, [(300, 33), (3, chunk + 130), (2 * chunk + 100,)],
                       torch.bfloat16, torch.float16, seed=8)

    return [("allocate", "16 dtype pairs, in-place state", dtype_pairs),
            ("allocate", "offset, strided, transposed views", layouts),
            ("allocate", "313 tensors in one call", many_tensors),
            ("allocate", "row lengths 1 .. 2 chunks", row_lengths),
            ("allocate", "NaN and Inf", nonfinite),
            ("allocate", "2001 and 10001 bin edges", many_edges),
            ("allocate", "the same call twice: same bits", repeatable),
            ("allocate", "element loads (LCA_EXT_CUDA_VECTOR=0)", vector_vs_element_loads)]


def _large_check(ops, device, n=2**31 + 2**17):
    """n float16 elements (by default past 2^31: 64-bit indexing; 12 GiB on the
    device): exact closed-form results."""
    before = torch.zeros(n, dtype=torch.float16, device=device)
    after = torch.ones(n, dtype=torch.float16, device=device)
    grad = torch.ones(n, dtype=torch.float16, device=device)
    grad[-2**16:] = -2.0  # the last 2^16 elements helped, each by -2
    edges = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64)
    sums, counts, _, hist = ops.allocate([before], [after], [grad], edges, False, [], [], [],
                                         False)
    m = 2**16
    _equal("sums", sums, torch.tensor([float(n - m) - 2.0 * m], dtype=torch.float64))
    _equal("counts", counts, torch.tensor([[m, n - m, 0, 0]]))
    _equal("histogram", hist, torch.tensor([[0, m, n - m, 0]]))


# ---------------------------------------------------------------------------
# allocate_classes, accumulate_, sign_changes_


def _classes_checks(ops, device, chunk):
    def groups():
        shapes = [(17, 9), (16, 8), (chunk + 2,), (chunk + 4,), (), (0,)]
        for num_classes, pdt, gdt, layout in ((1, torch.float32, torch.float32, "dense"),
                                              (9, torch.bfloat16, torch.float32, "dense"),
                                              (17, torch.float16, torch.bfloat16, "dense"),
                                              (9, torch.float32, torch.float32, "offset1"),
                                              (3, torch.float64, torch.float16, "dense")):
            b, a, _ = _step(shapes, pdt, pdt, seed=10 + num_classes)
            gen = torch.Generator().manual_seed(20 + num_classes)
            g = [torch.randn((num_classes, *s), generator=gen).to(gdt) for s in shapes]
            want = torch.ops.lca_ext.allocate_classes(b, a, g, False)
            got = ops.allocate_classes(*([_laid_out(x, layout, device) for x in xs]
                                         for xs in (b, a, g)), False)
            _equal("counts", got[1], want[1])
            scale = sum(_scale([(y.double() - x.double()) * gc.double() for x, y, gc in
                                zip(b, a, [t[c] for t in g])]) for c in range(num_classes))
            _close("sums", got[0], want[0], scale)
            again = ops.allocate_classes(*([_laid_out(x, layout, device) for x in xs]
                                           for xs in (b, a, g)), False)
            _equal("repeated sums", again[0], got[0].cpu())

    return [("allocate_classes", "1, 9, 17 classes; every dtype; offset", groups)]


def _accumulate_checks(ops, device, chunk):
    from . import reference

    def bitwise():
        shapes = [(chunk + 3,), (17, 5), (), (0,), (2 * chunk + 130,)]
        for acc_dtype in (torch.float32, torch.float64):
            for grad_dtype in FLOATS:
                for layout in ("dense", "offset1"):
                    gen = torch.Generator().manual_seed(30)
                    grads = [torch.randn(s, generator=gen).to(grad_dtype) for s in shapes]
                    acc0 = [torch.randn(s, generator=gen).to(acc_dtype) for s in shapes]
                    got = [_laid_out(x, layout, device) for x in acc0]
                    want = [x.clone() for x in acc0]
                    ops.accumulate_(got, [_laid_out(x, "dense", device) for x in grads], 0.3)
                    reference.accumulate_(want, grads, 0.3)
                    for k, (x, y) in enumerate(zip(got, want)):
                        _equal(f"acc[{k}] ({acc_dtype}, {grad_dtype}, {layout})", x, y)

    return [("accumulate_", "bit for bit; every dtype pair; offset", bitwise)]


def _sign_changes_checks(ops, device, chunk):
    def states():
        shapes = [(chunk + 7,), (2 * chunk + 130,), (33, 4), ()]
        for dtype in FLOATS:
            for with_base in (False, True):
                for layout in ("dense", "x", "last_sign", "changes"):
                    gen = torch.Generator().manual_seed(40)
                    last0 = [torch.randint(-1, 2, s, generator=gen, dtype=torch.int8)
                             for s in shapes]
                    ch0 = [torch.randint(0, 5, s, generator=gen, dtype=torch.int32)
                           for s in shapes]

                    def lay(ts, name):
                        return [_laid_out(t, "offset1" if layout == name else "dense", device)
                                for t in ts]
                    last, changes = lay(last0, "last_sign"), lay(ch0, "changes")
                    for _ in range(3):
                        x = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
                        x[1][::7] = 0
                        x[1][9] = float("nan")
                        base = ([torch.randn(s, generator=gen).to(dtype) for s in shapes]
                                if with_base else [])
                        ops.sign_changes_(last, changes, lay(x, "x"), lay(base, "x"))
                        torch.ops.lca_ext.sign_changes_(last0, ch0, x, base)
                    for k, (g1, w1, g2, w2) in enumerate(zip(last, last0, changes, ch0)):
                        _equal(f"last_sign[{k}] ({dtype}, {layout})", g1, w1)
                        _equal(f"changes[{k}] ({dtype}, {layout})", g2, w2)

    return [("sign_changes_", "every dtype; with/without base; offset", states)]


# ---------------------------------------------------------------------------
# running the checks


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def run_checks(ops, device, *, large: bool = False,
               progress: Optional[Callable[[Check], None]] = None) -> VerifyReport:
    """Every check of the ops in `ops` (an object with the raw schemas of
    torch.ops.lca_ext: allocate, allocate_classes, accumulate_, sign_changes_)
    on `device`, against the CPU kernels.  A check that raises fails with the
    error; the others still run."""
    from ._loader import build_info

    chunk = build_info()["chunk_size"]
    plan = (_allocate_checks(ops, device, chunk) + _classes_checks(ops, device, chunk)
            + _accumulate_checks(ops, device, chunk) + _sign_changes_checks(ops, device, chunk))
    if large:
        plan.append(("allocate", "2^31 + 2^17 elements (64-bit indexing)",
                     lambda: _large_check(ops, device)))
    report = VerifyReport()
    for op, name, fn in plan:
        start = time.perf_counter()
        try:
            fn()
            check = Check(op, name, True)
        except Exception as err:  # a failed comparison, or the kernel's own error
            check = Check(op, name, False, f"{type(err).__name__}: {err}".splitlines()[0])
        check.seconds = time.perf_counter() - start
        report.append(check)
        if progress is not None:
            progress(check)
    return report


def verify_cuda(device="cuda", *, large: bool = False, record: bool = True,
                progress: Optional[Callable[[Check], None]] = None) -> VerifyReport:
    """Runs every check of the CUDA kernels on `device` and, with `record`,
    stamps the ops whose checks all passed as verified for this build, torch
    and GPU (see the module docstring).  Returns the report; raises
    RuntimeError when there is no GPU or no CUDA kernels in this build."""
    device = cuda_device(device)
    with torch.cuda.device(device):
        report = run_checks(torch.ops.lca_ext, device, large=large, progress=progress)
        torch.cuda.synchronize()
    if record and report.passed_ops():
        record_stamp(device_identity(device), report.passed_ops())
    return report


def cuda_device(device) -> torch.device:
    """`device` as an indexed CUDA device, if this machine and build can run the
    CUDA kernels on it; else RuntimeError saying what is missing."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"verify_cuda: device {str(device)!r} is not an available CUDA "
                           "device (torch.cuda.is_available() is "
                           f"{torch.cuda.is_available()})")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lca_ext::allocate", "CUDA"):
        raise RuntimeError("verify_cuda: this build of lca_ext has no CUDA kernels "
                           "(lca_ext.build_info()['cuda'] is False); rebuild it with nvcc "
                           "present, or FORCE_CUDA=1")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise RuntimeError(f"verify_cuda: device {str(device)!r}: this machine has "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    return device
