"""Gradient-sized buffers, recycled: the memory the rules' points and sums live in
(one pool per tracker; lca_ext.path hands them to the rules as opaque handles)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch


class BufferPool:
    """Gradient-sized buffers of one parameter list (float32, float64 for
    float64 parameters), with an optional leading class dimension, recycled."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self._spares: Dict[int, List[List[torch.Tensor]]] = {}
        # bytes of one class's (one parameter-shaped) gradient buffer
        self.one_buffer = sum(p.numel() * (8 if p.dtype == torch.float64 else 4)
                              for p in self.params)

    def new(self, classes: int = 0) -> List[torch.Tensor]:
        lead = (classes,) if classes else ()
        return [torch.zeros((*lead, *p.shape), device=p.device,
                            dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                for p in self.params]

    def take(self, classes: int = 0) -> List[torch.Tensor]:
        """A zeroed buffer (a spare one if there is one)."""
        pool = self._spares.setdefault(classes, [])
        if not pool:
            return self.new(classes)
        buf = pool.pop()
        torch._foreach_zero_(buf)
        return buf

    def give(self, buf: List[torch.Tensor]) -> None:
        stacked = buf[0].dim() > self.params[0].dim()
        self._spares.setdefault(buf[0].shape[0] if stacked else 0, []).append(buf)

    def clear(self) -> None:
        self._spares.clear()

    def class_total(self, stacked: List[torch.Tensor]) -> List[torch.Tensor]:
        """Σ over classes of a per-class buffer: the whole-set quantity."""
        total = self.take()
        for t, s in zip(total, stacked):
            torch.sum(s, 0, out=t)
        return total
