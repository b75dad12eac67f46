"""Each group's part of a gradient pass: the error bars' independent samples.

A group is a batch of the LCA set, or in per-class mode a class's part of a
batch (lca_ext.classes); under DDP every rank's batches.  The evaluator hands
each group's gradient to a :class:`GroupProbe` during a pass
(lca_ext.evaluate ``probe=``); the probe turns it into that group's per-tensor
samples Δθ_k·g (lca_ext.bars), keeps whole gradients where the two-pass stage
needs them (lca_ext.budget_rule), and in a mixed pass gives each group its own
point of the step.  It works through the step's public path
(lca_ext.path.StepPath: ``kernels``, ``pool``, ``ctx``, ``point``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

import numpy as np
import torch

if TYPE_CHECKING:                      # (the path builds probes: no import cycle)
    from .path import StepPath


class GroupProbe:
    """Collects each group's samples Δθ·g_i during a pass (a group: a batch of
    the LCA set, or in per-class mode a class's part of a batch); for a mixed
    pass also gives each group its own point (``points[i]``: a fraction of the
    step).  Under DDP it sees this rank's batches, i local: their global index
    is ``path.group_offset + i``, and :meth:`array` sums every rank's rows."""

    def __init__(self, path: "StepPath", groups: int, points: Optional[np.ndarray] = None,
                 keep: int = 0, total: Optional[List[torch.Tensor]] = None,
                 samples: bool = True, weights: Optional[np.ndarray] = None):
        self._path = path
        self._points = points
        self._offset = path.group_offset
        self.samples: Dict[int, torch.Tensor] = {}
        self.groups = groups
        # each group's gradient, kept while at most ``keep`` groups come (None:
        # not kept, or more came: given back)
        self.kept: Optional[List[List[torch.Tensor]]] = [] if keep else None
        self._keep = keep
        self._total = total         # the pass's whole gradient (a mixed pass's),
        self._weights = weights     # each group's part x its weight (None: 1)
        self._with_samples = samples
        # each group's share of the set's loss at the pass's point (where the pass
        # gives it: lca_ext.budget_rule's covariate for the bars' spread)
        self.losses: Dict[int, torch.Tensor] = {}

    def point(self, i: int) -> List[torch.Tensor]:
        if self._offset + i >= len(self._points):
            raise RuntimeError("lca_ext: the LCA set has more batches now than when the "
                               "step began; it must be the same at every point of a step")
        return self._path.point(float(self._points[self._offset + i]))

    def add(self, i: int, grads: List[torch.Tensor], scale: float,
            slot: Optional[int] = None, after: Optional[List[torch.Tensor]] = None,
            loss: Optional[torch.Tensor] = None) -> None:
        """Group i's gradient part (x ``scale``); ``slot``: its class, where the
        pass's whole gradient is class-stacked (per-class mode); ``after``: where
        θ_{t+1}'s values are while a pass has swapped the point into the live
        parameters (FSDP2, lca_ext.distributed.sharded_pass); ``loss``: the value
        ``grads`` is the gradient of (x ``scale``: the group's share of the loss)."""
        p = self._path
        if loss is not None and self._keep:        # (kept groups only: the two-pass stage)
            share = loss.detach().double() * scale
            self.losses[i] = share if i not in self.losses else self.losses[i] + share
        if self._with_samples:
            part = p.kernels.allocate(p.theta_t, after or p.after, grads).sums * scale
            self.samples[i] = part if i not in self.samples else self.samples[i] + part
        if self.kept is not None:
            while len(self.kept) <= i and len(self.kept) < self._keep:
                self.kept.append(p.pool.take())
            if i < len(self.kept):
                p.kernels.accumulate_(self.kept[i], grads, scale)
            else:                   # more groups than the memory allows: keep none
                for buf in self.kept:
                    p.pool.give(buf)
                self.kept = None
        if self._total is not None:
            total = self._total if slot is None else [t[slot] for t in self._total]
            w = 1.0 if self._weights is None else float(self._weights[self._offset + i])
            p.kernels.accumulate_(total, grads, scale * w)

    def array(self) -> np.ndarray:
        """[G, K] float64 (one host copy; under DDP every rank's rows, summed)."""
        p = self._path
        rows = [self._offset + i for i in self.samples]
        bad = any(g >= self.groups for g in rows) or not (self.samples or p.ctx.world > 1)
        if p.ctx.world > 1:        # every rank raises, or none (no rank left waiting)
            bad = p.ctx.max_int(int(bad)) > 0
        if bad:
            raise RuntimeError(f"lca_ext: a pass saw groups {sorted(rows)}, expected "
                               f"0..{self.groups - 1}: the LCA set must be the same batches "
                               "at every point of a step")
        # (a class with no example in the set has no part: its samples are 0)
        out = torch.zeros(self.groups, len(p.theta_t), dtype=torch.float64,
                          device=p.theta_t[0].device)
        for g, v in zip(rows, self.samples.values()):
            out[g] = v.double()
        if p.ctx.world > 1:
            p.ctx.sum_(out)
        return out.cpu().numpy()

    def loss_array(self) -> Optional[np.ndarray]:
        """[G] each group's share of the set's loss (every rank's), or None
        where the pass gave none for some group (on any rank)."""
        p = self._path
        # row 0: the losses; row 1: which groups gave one (one all-reduce)
        both = torch.zeros(2, self.groups, dtype=torch.float64, device=p.theta_t[0].device)
        # (this rank's first group counted now: a start pass in per-class mode
        # counts its units as it goes)
        offset = p.group_offset
        for i, v in self.losses.items():
            if offset + i < self.groups:
                both[0, offset + i] = v
                both[1, offset + i] = 1.0
        if p.ctx.world > 1:
            p.ctx.sum_(both)
        both = both.cpu().numpy()
        return both[0] if (both[1] > 0).all() else None
