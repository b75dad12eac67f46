"""What a tracker records of each step besides the path integral: the fused pass
over the step's LCA (per-tensor sums and sign counts, per-neuron sums, the
histogram, the per-parameter state cum_lca and helped_steps), the oscillation
counters and the frames; and StatsOptions, the options that choose them.

The path integral that gives ḡ is lca_ext.quadrature's; this module takes ḡ and
reduces (after − before)·ḡ in one call of the fused op (lca_ext.ops.allocate, or
lca_ext.reference where a device has no verified kernel: lca_ext.kernels).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ._options import grouped
from .ops import signed_log_edges


@dataclasses.dataclass
class StatsOptions:
    """What each tracked step records besides the per-tensor sums and counts.

    bin_edges:   the LCA histogram's edges (None: signed_log_edges(1e-12, 1, 24),
                 50 bins); kept on the CPU, where the fused op reads them
                 without a GPU synchronisation
    row_sums:    record per-neuron (per row of dim 0) LCA every tracked step
    oscillation: count per parameter the changes of direction of its steps and
                 of the sign of its whole-set gradient (2.5 bytes a parameter)
    frames:      names of parameter tensors whose full per-element LCA is stored
                 every ``frame_every`` tracked steps (for animations)
    frame_every: see frames (an int >= 1)
    """

    bin_edges: Optional[torch.Tensor] = None
    row_sums: bool = True
    oscillation: bool = True
    frames: Sequence[str] = ()
    frame_every: int = 1

    def __post_init__(self):
        if not (isinstance(self.frame_every, int) and self.frame_every >= 1):
            raise ValueError(f"lca_ext.LCATracker: frame_every={self.frame_every!r}; "
                             "expected an int >= 1")
        if isinstance(self.frames, str):
            raise TypeError(f"lca_ext.LCATracker: frames={self.frames!r}; expected a list "
                            f"of parameter names, e.g. [{self.frames!r}]")
        self.frames = tuple(self.frames)


def stats_options(stats=None, **shorthands) -> StatsOptions:
    """StatsOptions from ``stats`` (StatsOptions, dict or None) or the tracker's
    keywords of the same names (None = not given)."""
    return grouped(StatsOptions, "stats", stats, shorthands)


class Statistics:
    """One tracker's per-step reductions and per-parameter state.

    ``state``: cum_lca (in the gradient buffers' float dtype), helped_steps
    (int32) and, with ``oscillation``, direction_changes and grad_sign_changes
    (int32) and the last signs (int8), one tensor per parameter (this rank's
    shard under FSDP2)."""

    def __init__(self, options: StatsOptions, params, model, kernels, ctx,
                 new_buffer: Callable[[], List[torch.Tensor]]):
        self.options = options
        self.kernels, self.ctx = kernels, ctx
        self.frame_tensors = [self._frame_index(params, model, n) for n in options.frames]
        self.bin_edges = (signed_log_edges(1e-12, 1.0, 24) if options.bin_edges is None
                          else options.bin_edges.detach().double()).cpu()
        like = lambda dt: [torch.zeros_like(p, dtype=dt) for p in params.params]  # noqa: E731
        self.state: Dict[str, List[torch.Tensor]] = {
            "cum_lca": new_buffer(), "helped_steps": like(torch.int32)}
        if options.oscillation:
            self.state.update(direction_changes=like(torch.int32),
                              grad_sign_changes=like(torch.int32),
                              last_delta_sign=like(torch.int8),
                              last_grad_sign=like(torch.int8))

    @staticmethod
    def _frame_index(params, model, name: str) -> int:
        if name in params.names:
            return params.names.index(name)
        if params.aliases.get(name) in params.names:
            raise ValueError(
                f"lca_ext.LCATracker: frames names {name!r}, an alias of the tracked "
                f"parameter {params.aliases[name]!r} (the same tensor, tied); a tied "
                f"tensor is tracked once, under its first name: use "
                f"{params.aliases[name]!r}")
        frozen = dict(model.named_parameters()).get(name)
        why = "is frozen (requires_grad=False), so not tracked" if frozen is not None \
            else "is not a parameter of the model"
        raise ValueError(f"lca_ext.LCATracker: frames names {name!r}, which {why}; "
                         f"tracked: {params.names}")

    def count_oscillations(self, before, after, g_start) -> None:
        """The step's direction (after − before) and the gradient at θ_t
        against the last ones seen, per parameter."""
        s = self.state
        self.kernels.sign_changes_(s["last_delta_sign"], s["direction_changes"], after, before)
        self.kernels.sign_changes_(s["last_grad_sign"], s["grad_sign_changes"], g_start)

    def allocate(self, before, after, avg, update_state: bool):
        """The fused pass over (after − before)·ḡ: sums, counts, row sums and
        histogram (whole-model values under FSDP2); cum_lca and helped_steps
        updated when ``update_state`` (the LCA set's objective)."""
        state = {}
        if update_state:
            state = dict(cum_lca=self.state["cum_lca"], helped_steps=self.state["helped_steps"])
        rows = self.options.row_sums
        return self.ctx.allocation(
            self.kernels.allocate(before, after, avg, row_sums=rows,
                                  bin_edges=self.bin_edges, **state), rows=rows)

    def wants_frame(self, tracked_count: int) -> bool:
        return bool(self.frame_tensors) and tracked_count % self.options.frame_every == 0

    def frame(self, before, after, avg) -> Dict[str, np.ndarray]:
        """The per-element LCA of the frame tensors (whole tensors under FSDP2)."""
        ks = self.frame_tensors
        out = [torch.empty_like(avg[k]) for k in ks]
        self.kernels.allocate([before[k] for k in ks], [after[k] for k in ks],
                              [avg[k] for k in ks], lca_out=out)
        return {str(k): self.ctx.full(k, t).cpu().numpy() for k, t in zip(ks, out)}
