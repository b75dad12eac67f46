"""Plain per-tensor reference implementations of every lca_ext op.

Written for clarity, not speed: tests compare the fused kernels against these,
and benchmarks race against them.  They follow the definitions stated in
:mod:`lca_ext.ops` exactly (the per-element LCA in float32 unless an input is
float64, non-finite values counted apart), but add up in plain float64 with
torch's own reductions, so sums agree with the kernels to rounding only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from .allocation import Allocation, ClassAllocation

Tensor = torch.Tensor


def math_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def lca_values(before: Tensor, after: Tensor, grad: Tensor) -> Tensor:
    """Per-element LCA, (after - before) * grad, in the ops' math dtype."""
    dt = math_dtype(before, grad)
    return (after.to(dt) - before.to(dt)) * grad.to(dt)


def per_row(x):
    """x as [rows of dim 0, rest]; a 0-d x is one row. Works for torch and numpy."""
    n_rows = x.shape[0] if x.ndim else 1
    per = int(np.prod(x.shape)) // n_rows if n_rows else 0
    return x.reshape(n_rows, per)


def histogram_slots(lca: Tensor, edges: Tensor) -> Tensor:
    """Counts in the [under, bins..., over] layout of Allocation.histogram."""
    x = lca.reshape(-1).double()
    x = x[torch.isfinite(x)]
    e = edges.double().cpu()
    x = x.cpu()
    nb = e.numel() - 1
    slots = torch.bucketize(x, e, right=True)  # index of first edge > x
    slots[x == e[-1]] = nb                     # last bin is closed on the right
    return torch.bincount(slots, minlength=nb + 2)


def accumulate_(acc: Sequence[Tensor], grads: Sequence[Tensor], weight: float) -> None:
    for a, g in zip(acc, grads):
        a.add_(g.to(a.dtype) * weight)


def sign_changes_(last_sign, changes, x, base=None) -> None:
    for k, xk in enumerate(x):
        s = torch.sign(xk.double() - (base[k].double() if base else 0.0)).to(torch.int8)
        s = torch.where(torch.isnan(xk.double() - (base[k].double() if base else 0.0)),
                        torch.zeros_like(s), s)
        changes[k].add_((s.int() * last_sign[k].int() < 0).int())
        last_sign[k].copy_(torch.where(s != 0, s, last_sign[k]))


def allocate(before: Sequence[Tensor], after: Sequence[Tensor],
             avg_grad: Sequence[Tensor], *, row_sums: bool = False,
             bin_edges: Optional[Tensor] = None,
             cum_lca: Optional[Sequence[Tensor]] = None,
             helped_steps: Optional[Sequence[Tensor]] = None,
             lca_out: Optional[Sequence[Tensor]] = None,
             check_finite: bool = False) -> Allocation:
    dev = before[0].device
    sums, counts, rows, hists = [], [], [], []
    for k, (b, a, g) in enumerate(zip(before, after, avg_grad)):
        if check_finite:
            for name, t in (("before", b), ("after", a), ("avg_grad", g)):
                if not torch.isfinite(t).all():
                    raise RuntimeError(f"lca_ext.allocate: {name}[{k}] contains NaN or Inf")
        lca = lca_values(b, a, g)
        finite = torch.isfinite(lca)
        sums.append(lca.double().sum())
        counts.append(torch.stack([
            (finite & (lca < 0)).sum(), (finite & (lca > 0)).sum(),
            (lca == 0).sum(), (~finite).sum()]))
        if row_sums:
            rows.append(per_row(lca.double()).sum(1))
        if bin_edges is not None:
            hists.append(histogram_slots(lca, bin_edges).to(dev))
        if cum_lca is not None:
            cum_lca[k].add_(lca.to(cum_lca[k].dtype))
        if helped_steps is not None:
            helped_steps[k].add_((finite & (lca < 0)).to(torch.int32))
        if lca_out is not None:
            lca_out[k].copy_(lca)
    k = len(before)
    nslots = bin_edges.numel() + 1 if bin_edges is not None else 0
    return Allocation(
        torch.stack(sums).to(dev),
        torch.stack(counts).to(dev, torch.int64),
        torch.cat(rows) if rows else torch.zeros(0, dtype=torch.float64, device=dev),
        torch.stack(hists) if hists else torch.zeros(k, nslots, dtype=torch.int64, device=dev))


def allocate_classes(before: Sequence[Tensor], after: Sequence[Tensor],
                     class_grads: Sequence[Tensor], *,
                     check_finite: bool = False) -> ClassAllocation:
    sums: List[List[Tensor]] = []
    counts: List[List[Tensor]] = []
    num_classes = class_grads[0].shape[0]
    for c in range(num_classes):
        res = allocate(before, after, [g[c] for g in class_grads],
                       check_finite=check_finite)
        sums.append(res.sums)
        counts.append(res.counts)
    dev = before[0].device
    if num_classes == 0:
        k = len(before)
        return ClassAllocation(torch.zeros(0, k, dtype=torch.float64, device=dev),
                               torch.zeros(0, k, 4, dtype=torch.int64, device=dev))
    return ClassAllocation(torch.stack(sums), torch.stack(counts))


def allocate_numpy(before: Sequence[np.ndarray], after: Sequence[np.ndarray],
                   avg_grad: Sequence[np.ndarray], *, row_sums: bool = False,
                   bin_edges: Optional[np.ndarray] = None) -> dict:
    """NumPy version of :func:`allocate`'s reductions (float64 throughout).

    Returns a dict of numpy arrays: sums [K], counts [K, 4], row_sums [R],
    histogram [K, B + 2]. Its histogram uses ``numpy.histogram`` for the inner
    bins, an independent check of the kernels' bin search.
    """
    sums, counts, rows, hists = [], [], [], []
    for b, a, g in zip(before, after, avg_grad):
        lca = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) * np.asarray(g, np.float64)
        finite = np.isfinite(lca)
        sums.append(lca.sum())
        counts.append([np.sum(finite & (lca < 0)), np.sum(finite & (lca > 0)),
                       np.sum(lca == 0), np.sum(~finite)])
        if row_sums:
            rows.append(per_row(lca).sum(axis=1))
        if bin_edges is not None:
            x = lca[finite].ravel()
            inner, _ = np.histogram(x, bins=bin_edges)
            hists.append(np.concatenate([[np.sum(x < bin_edges[0])], inner,
                                         [np.sum(x > bin_edges[-1])]]))
    nslots = len(bin_edges) + 1 if bin_edges is not None else 0
    return {
        "sums": np.array(sums, dtype=np.float64),
        "counts": np.array(counts, dtype=np.int64).reshape(len(before), 4),
        "row_sums": np.concatenate(rows) if rows else np.zeros(0),
        "histogram": np.array(hists, dtype=np.int64).reshape(len(before), nslots),
    }
