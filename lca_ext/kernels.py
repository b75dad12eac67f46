"""Which implementation of the LCA ops a tracker uses on a device: the fused
kernels (lca_ext.ops) where every op has a usable kernel there, else the
plain-PyTorch reference (lca_ext.reference), which gives the same results,
slower.  Kept apart from both so that neither imports the other."""
from __future__ import annotations

import warnings

import torch

from . import ops, reference
from .cuda_gate import FUSED_OPS

_warned_fallback = set()


def kernels_for(device):
    """The module whose ops LCATracker uses on ``device``: :mod:`lca_ext.ops` (the
    fused kernels) when every op has a usable kernel there, else
    :mod:`lca_ext.reference` (the plain-PyTorch ops: the same results, slower),
    with a warning once per device type.  So the tracker works on a GPU before
    the CUDA kernels are verified, without trusting them."""
    if all(ops.fused_available(op, device) for op in FUSED_OPS):
        return ops
    kind = torch.device(device).type
    if kind not in _warned_fallback:
        _warned_fallback.add(kind)
        warnings.warn(f"lca_ext: no verified fused kernels for {kind} tensors in this build; "
                      "LCA is computed with the plain-PyTorch reference ops (same results, "
                      "slower). Run `lca-ext verify-cuda` once to check and enable the CUDA "
                      "kernels on this GPU.",
                      RuntimeWarning, stacklevel=3)
    return reference
