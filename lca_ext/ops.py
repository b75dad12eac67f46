"""Typed Python API over the fused ops ``torch.ops.lca_ext.*``.

Every op takes whole lists of tensors (one per parameter) and makes one pass over
memory per call; there is no per-tensor Python loop.  The definitions:

* ``delta = after - before`` and ``lca = delta * grad`` are computed per element in
  float32 when every input of that tensor is float16, bfloat16 or float32, and in
  float64 when one is float64.  ``delta`` is formed in registers, never stored.
* Sums are accumulated in float64 in a fixed order (per chunk of
  ``build_info()["chunk_size"]`` elements, then chunk by chunk), so results are
  bit-identical across runs and thread counts.
* Non-finite LCA values (from NaN/Inf inputs, or overflow) are counted in
  ``nonfinite`` and never in helped/hurt/zero or the histogram; they propagate
  into the sums (a NaN sum is never hidden) and into ``cum_lca``.  With
  ``check_finite=True`` the inputs are checked first and a NaN/Inf raises an
  error naming the argument and tensor index, before anything is written.
* Inputs may be non-contiguous (a dense copy is made); in-place outputs may be
  non-contiguous too (computed densely and copied back).

Argument errors come from the C++ side (``TORCH_CHECK``) and name the op, the
argument, the list index and what was expected, for callers of ``torch.ops``
and of this module alike.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from . import _loader  # noqa: F401  (loads the compiled library)
# the ops' result types (lca_ext.reference returns them too)
from .allocation import Allocation, ClassAllocation
# which CUDA kernels may run (and the stamps of `lca-ext verify-cuda`): cuda_gate,
# so that verify (which runs these ops) and ops do not import each other
from .cuda_gate import FUSED_OPS, UNVERIFIED_CUDA_OPS  # noqa: F401
from .cuda_gate import cuda_allowed as _cuda_allowed

Tensor = torch.Tensor

__all__ = [
    "Allocation",
    "ClassAllocation",
    "accumulate_",
    "allocate",
    "allocate_classes",
    "sign_changes_",
    "signed_log_edges",
    "split_rows",
]


def _as_list(name: str, tensors) -> List[Tensor]:
    # the hot path (a training loop's parameter list): no per-tensor Python;
    # the op's schema checks the elements and _named refuses a bad one by name
    if type(tensors) is list:
        return tensors
    if isinstance(tensors, Tensor):
        raise TypeError(f"lca_ext: {name} must be a list of tensors (one per "
                        f"parameter), got a single Tensor; wrap it as [{name}]")
    try:
        out = list(tensors)
    except TypeError:
        raise TypeError(f"lca_ext: {name} must be a list of tensors, got "
                        f"{type(tensors).__name__}") from None
    for k, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"lca_ext: {name}[{k}] must be a Tensor, got "
                            f"{type(t).__name__}")
    return out


def _named(err: RuntimeError, **lists) -> None:
    """The op's schema refused a list (an element that is not a tensor): say
    which argument and index, as for any other bad input; else re-raise."""
    if "Expected a value of type" in str(err):
        for name, tensors in lists.items():
            for k, t in enumerate(tensors or ()):
                if not isinstance(t, Tensor):
                    raise TypeError(f"lca_ext: {name}[{k}] must be a Tensor, got "
                                    f"{type(t).__name__}") from None
    raise err


def _nonempty(op: str, name: str, tensors: List[Tensor]) -> List[Tensor]:
    # The dispatcher cannot route a call without any tensor to a device kernel,
    # so this one check must come before the op (the C++ kernels repeat the rest).
    if not tensors:
        raise ValueError(f"lca_ext.{op}: {name} is an empty list; expected at "
                         "least one tensor")
    return tensors


def _guard_cuda(op: str, tensors: List[Tensor]) -> None:
    if tensors and isinstance(tensors[0], Tensor) and tensors[0].is_cuda and \
            not _cuda_allowed(op, tensors[0].device):
        raise NotImplementedError(
            f"lca_ext.{op}: the CUDA kernel has not been verified on this GPU with this "
            "build; run `lca-ext verify-cuda` once (about a minute: it checks every CUDA op "
            "against the CPU kernels here and records the result), or move the tensors to "
            "the CPU, or set LCA_EXT_ALLOW_UNVERIFIED_CUDA=1 to use it unverified")


def fused_available(op: str, device) -> bool:
    """Can ``op`` run its fused kernel on ``device`` (compiled in this build, and
    for CUDA verified or allowed; see lca_ext.cuda_gate)?"""
    device = torch.device(device)
    key = "CUDA" if device.type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lca_ext::{op}", key):
        return False
    return device.type != "cuda" or _cuda_allowed(op, device)


def _optional_list(name: str, tensors) -> List[Tensor]:
    return [] if tensors is None else _as_list(name, tensors)


def accumulate_(acc: Sequence[Tensor], grads: Sequence[Tensor],
                weight: float) -> None:
    """In place, for every k: ``acc[k] += weight * grads[k]``.

    acc:    float32 or float64 tensors (the path-integral accumulator ḡ).
    grads:  float16 / bfloat16 / float32 / float64, each of acc[k]'s shape, on
            the same device. The product is formed in acc[k]'s dtype.
    weight: a finite float (a Simpson weight such as 1/6 or 4/6).
    """
    acc = _nonempty("accumulate_", "acc", _as_list("acc", acc))
    _guard_cuda("accumulate_", acc)
    grads = _as_list("grads", grads)
    try:
        torch.ops.lca_ext.accumulate_(acc, grads, float(weight))
    except RuntimeError as err:
        _named(err, acc=acc, grads=grads)


def allocate(before: Sequence[Tensor], after: Sequence[Tensor],
             avg_grad: Sequence[Tensor], *, row_sums: bool = False,
             bin_edges: Optional[Tensor] = None,
             cum_lca: Optional[Sequence[Tensor]] = None,
             helped_steps: Optional[Sequence[Tensor]] = None,
             lca_out: Optional[Sequence[Tensor]] = None,
             check_finite: bool = False) -> Allocation:
    """The fused LCA pass: ``lca = (after - before) * avg_grad`` per element.

    One read of the three inputs gives the per-tensor sums and sign counts, and
    on request per-row sums, a histogram and in-place per-parameter state.

    before, after: the parameters at θ_t and θ_{t+1}; before[k] and after[k]
        share shape and dtype (float16/bfloat16/float32/float64; tensors in the
        list may differ in dtype).
    avg_grad: the path-averaged gradient ḡ, any of those dtypes, before[k]'s shape.
    row_sums: also return per-row ("neuron") sums, see :class:`Allocation`.
    bin_edges: 1-D, >= 2 finite, strictly increasing edges (any float dtype) for
        the LCA histogram; see :func:`signed_log_edges`.  On the CPU (best: the
        op reads them on the host, no GPU synchronisation) or on before's device
        (validating them copies them to the host, which waits for the GPU).
    cum_lca: float32/float64 tensors shaped like the parameters; ``+= lca``.
    helped_steps: int32 tensors; ``+= 1`` where lca < 0 (finite).
    lca_out: float32/float64 tensors; overwritten with the per-element lca.
    check_finite: raise (naming argument and index) if an input holds NaN/Inf,
        before any output is written. Costs one extra read of the inputs.
    """
    before = _nonempty("allocate", "before", _as_list("before", before))
    after = _as_list("after", after)
    avg_grad = _as_list("avg_grad", avg_grad)
    _guard_cuda("allocate", before)
    state = dict(cum_lca=_optional_list("cum_lca", cum_lca),
                 helped_steps=_optional_list("helped_steps", helped_steps),
                 lca_out=_optional_list("lca_out", lca_out))
    try:
        sums, counts, rows, hist = torch.ops.lca_ext.allocate(
            before, after, avg_grad, bin_edges, bool(row_sums), state["cum_lca"],
            state["helped_steps"], state["lca_out"], bool(check_finite))
    except RuntimeError as err:
        _named(err, before=before, after=after, avg_grad=avg_grad, **state)
    return Allocation(sums, counts, rows, hist)


def allocate_classes(before: Sequence[Tensor], after: Sequence[Tensor],
                     class_grads: Sequence[Tensor], *,
                     check_finite: bool = False) -> ClassAllocation:
    """Per-class LCA: ``lca[c] = (after - before) * class_grads[k][c]``.

    class_grads[k] has shape ``[C, *before[k].shape]``: the gradient of class c's
    share of the loss (so the C slices add up to the whole gradient and the C
    class sums add up to the total LCA). before/after are read once, each class
    gradient once. Dtype and error rules as in :func:`allocate`.
    """
    before = _nonempty("allocate_classes", "before", _as_list("before", before))
    after = _as_list("after", after)
    class_grads = _as_list("class_grads", class_grads)
    _guard_cuda("allocate_classes", before)
    try:
        sums, counts = torch.ops.lca_ext.allocate_classes(
            before, after, class_grads, bool(check_finite))
    except RuntimeError as err:
        _named(err, before=before, after=after, class_grads=class_grads)
    return ClassAllocation(sums, counts)


def sign_changes_(last_sign: Sequence[Tensor], changes: Sequence[Tensor],
                  x: Sequence[Tensor], base: Optional[Sequence[Tensor]] = None) -> None:
    """Oscillation counters, in place, for every k and element:
    ``s = sign(x - base)`` (``sign(x)`` without base), found by comparison, so
    exact in any dtype; ``changes += (s * last_sign < 0)``; ``last_sign = s``
    where ``s != 0`` (a zero or NaN keeps the last sign).

    last_sign: int8 tensors; changes: int32 tensors; x, base: float tensors of
    one dtype per k, all of x[k]'s shape, on one device.  With x = θ_{t+1} and
    base = θ_t this counts changes of a weight's direction of motion; with
    x = a gradient, changes of its sign.
    """
    x = _nonempty("sign_changes_", "x", _as_list("x", x))
    _guard_cuda("sign_changes_", x)
    lists = dict(last_sign=_as_list("last_sign", last_sign),
                 changes=_as_list("changes", changes), x=x, base=_optional_list("base", base))
    try:
        torch.ops.lca_ext.sign_changes_(lists["last_sign"], lists["changes"], x,
                                        lists["base"])
    except RuntimeError as err:
        _named(err, **lists)


def signed_log_edges(min_abs: float = 1e-12, max_abs: float = 1.0,
                     bins_per_sign: int = 24, *, dtype=torch.float64,
                     device=None) -> Tensor:
    """Histogram edges for LCA values: log-spaced on both sides of zero.

    Returns 2 * (bins_per_sign + 1) increasing edges
    ``[-max_abs, ..., -min_abs, min_abs, ..., max_abs]``: ``bins_per_sign``
    log-spaced bins for each sign, and the middle bin ``[-min_abs, min_abs)``
    that holds exact zeros and values too small to matter. Values beyond
    ±max_abs land in the under/overflow slots of :class:`Allocation`.histogram.
    """
    if not (isinstance(bins_per_sign, int) and bins_per_sign >= 1):
        raise ValueError(f"lca_ext.signed_log_edges: bins_per_sign is {bins_per_sign!r};"
                         " expected an int >= 1")
    if not (math.isfinite(min_abs) and math.isfinite(max_abs)
            and 0 < min_abs < max_abs):
        raise ValueError(f"lca_ext.signed_log_edges: min_abs={min_abs!r}, "
                         f"max_abs={max_abs!r}; expected 0 < min_abs < max_abs, finite")
    mags = torch.logspace(math.log10(min_abs), math.log10(max_abs),
                          bins_per_sign + 1, dtype=torch.float64)
    edges = torch.cat([-mags.flip(0), mags])
    return edges.to(dtype=dtype, device=device)


def split_rows(row_sums: Tensor, params: Sequence[Tensor]) -> List[Tensor]:
    """Split :class:`Allocation`.row_sums into one vector per parameter tensor."""
    params = _as_list("params", params)
    sizes = [t.shape[0] if t.dim() > 0 else 1 for t in params]
    if row_sums.dim() != 1 or row_sums.shape[0] != sum(sizes):
        raise ValueError(f"lca_ext.split_rows: row_sums has shape {tuple(row_sums.shape)}; "
                         f"expected [{sum(sizes)}] (the rows of {len(params)} tensors)")
    return list(torch.split(row_sums, sizes))


# ---------------------------------------------------------------------------
# Fake (meta) kernels: output shapes only, so torch.compile / export can trace.

def _fake_rows(before: List[Tensor]) -> int:
    return sum(t.shape[0] if t.dim() > 0 else 1 for t in before)


def _fake_check_devices(op: str, device, **lists) -> None:
    for name, tensors in lists.items():
        for k, t in enumerate(tensors):
            torch._check(t.device == device, lambda: (
                f"lca_ext.{op}: {name}[{k}] is on {t.device}; expected every "
                f"tensor on {device}"))


@torch.library.register_fake("lca_ext::accumulate_")
def _accumulate_fake(acc, grads, weight):
    torch._check(len(acc) == len(grads),
                 lambda: "lca_ext.accumulate_: grads and acc differ in length")
    _fake_check_devices("accumulate_", acc[0].device, acc=acc, grads=grads)
    return None


@torch.library.register_fake("lca_ext::sign_changes_")
def _sign_changes_fake(last_sign, changes, x, base):
    torch._check(len(last_sign) == len(x) and len(changes) == len(x),
                 lambda: "lca_ext.sign_changes_: lists differ in length")
    _fake_check_devices("sign_changes_", x[0].device, last_sign=last_sign,
                        changes=changes, x=x, base=base)
    return None


@torch.library.register_fake("lca_ext::allocate")
def _allocate_fake(before, after, avg_grad, bin_edges, row_sums, cum_lca,
                   helped_steps, lca_out, check_finite):
    torch._check(len(before) > 0, lambda: "lca_ext.allocate: before is empty")
    torch._check(len(after) == len(before) and len(avg_grad) == len(before),
                 lambda: "lca_ext.allocate: before/after/avg_grad differ in length")
    ref = before[0]
    _fake_check_devices("allocate", ref.device, before=before, after=after,
                        avg_grad=avg_grad, cum_lca=cum_lca,
                        helped_steps=helped_steps, lca_out=lca_out)
    k = len(before)
    rows = _fake_rows(before) if row_sums else 0
    if bin_edges is not None:
        torch._check(bin_edges.device == ref.device or bin_edges.device.type == "cpu",
                     lambda: (f"lca_ext.allocate: bin_edges is on {bin_edges.device}; "
                              f"expected the CPU or {ref.device} (the device of before)"))
    slots = bin_edges.shape[0] + 1 if bin_edges is not None else 0
    return (ref.new_empty((k,), dtype=torch.float64),
            ref.new_empty((k, 4), dtype=torch.int64),
            ref.new_empty((rows,), dtype=torch.float64),
            ref.new_empty((k, slots), dtype=torch.int64))


@torch.library.register_fake("lca_ext::allocate_classes")
def _allocate_classes_fake(before, after, class_grads, check_finite):
    torch._check(len(before) > 0, lambda: "lca_ext.allocate_classes: before is empty")
    torch._check(len(after) == len(before) and len(class_grads) == len(before),
                 lambda: "lca_ext.allocate_classes: lists differ in length")
    ref = before[0]
    _fake_check_devices("allocate_classes", ref.device, before=before, after=after,
                        class_grads=class_grads)
    c = class_grads[0].shape[0]
    k = len(before)
    return (ref.new_empty((c, k), dtype=torch.float64),
            ref.new_empty((c, k, 4), dtype=torch.int64))
