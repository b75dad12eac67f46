"""The result types of the LCA ops, shared by the fused ops (lca_ext.ops) and
their plain-PyTorch reference (lca_ext.reference): plain named tuples of
tensors, so either implementation can stand in for the other."""
from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor


class Allocation(NamedTuple):
    """Result of :func:`lca_ext.allocate` for K parameter tensors.

    sums:      float64 [K]. Sum of LCA over each tensor's elements.
    counts:    int64 [K, 4]. Columns: helped (lca < 0), hurt (lca > 0),
               zero (lca == 0), nonfinite (NaN/Inf). They add up to numel.
    row_sums:  float64 [R]. With ``row_sums=True``: the LCA summed over each row
               of dim 0 ("neuron", output unit) of every tensor, tensors
               concatenated in order (a 0-d tensor counts as one row, a 1-D
               tensor has one row per element); see :func:`lca_ext.split_rows`.
               Empty otherwise.
    histogram: int64 [K, B + 2] for B bins given by B + 1 ``bin_edges``: slot 0
               counts lca < edges[0], slot j + 1 counts edges[j] <= lca <
               edges[j + 1] (the last bin also takes lca == edges[B], as
               numpy.histogram does), slot B + 1 counts lca > edges[B].
               Non-finite values are not counted. [K, 0] without edges.
    """

    sums: Tensor
    counts: Tensor
    row_sums: Tensor
    histogram: Tensor

    @property
    def helped(self) -> Tensor:
        """int64 [K]: elements with lca < 0 (the parameter lowered the loss)."""
        return self.counts[:, 0]

    @property
    def hurt(self) -> Tensor:
        """int64 [K]: elements with lca > 0."""
        return self.counts[:, 1]

    @property
    def zero(self) -> Tensor:
        """int64 [K]: elements with lca exactly 0 (no step or no gradient)."""
        return self.counts[:, 2]

    @property
    def nonfinite(self) -> Tensor:
        """int64 [K]: elements whose lca is NaN or +-Inf."""
        return self.counts[:, 3]


class ClassAllocation(NamedTuple):
    """Result of :func:`lca_ext.allocate_classes` for C classes and K tensors.

    sums:   float64 [C, K]. LCA of class c's loss term over tensor k.
    counts: int64 [C, K, 4]. helped / hurt / zero / nonfinite, as in Allocation.
    """

    sums: Tensor
    counts: Tensor

    @property
    def helped(self) -> Tensor:
        """int64 [C, K]: elements with lca < 0 for class c."""
        return self.counts[..., 0]
