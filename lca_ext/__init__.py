"""lca_ext: Loss Change Allocation (Lan et al., NeurIPS 2019) for PyTorch.

The fused ops live in :mod:`lca_ext.ops` (``torch.ops.lca_ext.*`` underneath);
plain-PyTorch and NumPy versions of each are in :mod:`lca_ext.reference`.
"""
from ._loader import build_info
from .ops import (
    Allocation,
    ClassAllocation,
    accumulate_,
    allocate,
    allocate_classes,
    sign_changes_,
    signed_log_edges,
    split_rows,
)
from .tracker import LCATracker, Run, load_run

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "LCATracker",
    "Run",
    "ClassAllocation",
    "accumulate_",
    "allocate",
    "allocate_classes",
    "build_info",
    "load_run",
    "sign_changes_",
    "signed_log_edges",
    "split_rows",
]
