import os

import pytest
import torch

# the suite is how an unverified CUDA kernel gets verified: let it run them
os.environ.setdefault("LCA_EXT_ALLOW_UNVERIFIED_CUDA", "1")

import lca_ext

CUDA_BUILT = lca_ext.build_info()["cuda"]
HAVE_GPU = CUDA_BUILT and torch.cuda.is_available()

# Every op test runs on each device; CUDA cases skip cleanly without a GPU.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not HAVE_GPU, reason="needs a GPU and lca_ext built with CUDA")]),
]


def require_kernel(op: str, device: str) -> None:
    """Skip when `op` has no kernel for `device` in this build."""
    key = "CUDA" if device.startswith("cuda") else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lca_ext::{op}", key):
        pytest.skip(f"lca_ext::{op} has no {key} kernel in this build")
