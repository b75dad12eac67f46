"""lca_ext: Loss Change Allocation (Lan et al., NeurIPS 2019) for PyTorch.

The fused ops live in :mod:`lca_ext.ops` (``torch.ops.lca_ext.*`` underneath);
plain-PyTorch and NumPy versions of each are in :mod:`lca_ext.reference`.
"""
from ._version import __version__
from ._loader import build_info  # loads the compiled library, checks its torch
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
from .rule_options import RuleOptions
from .run import Run, load_run
from .statistics import StatsOptions
from .store import truncate_run
from .store_link import StoreOptions
from .tracker import LCATracker

__all__ = [
    "__version__",
    "Allocation",
    "LCATracker",
    "Run",
    "RuleOptions",
    "StatsOptions",
    "StoreOptions",
    "ClassAllocation",
    "accumulate_",
    "allocate",
    "allocate_classes",
    "build_info",
    "load_run",
    "sign_changes_",
    "signed_log_edges",
    "split_rows",
    "truncate_run",
]
