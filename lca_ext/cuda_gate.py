"""Which CUDA kernels the ops may run: the gate between ``lca_ext.ops`` and the
stamps that ``lca-ext verify-cuda`` (``lca_ext.verify``) writes.

Every CUDA kernel of this library ran on an NVIDIA H200 (sm_90) on 2026-11-28:
every CUDA test, ``verify_cuda`` and compute-sanitizer's memcheck passed (see
benchmarks/results/nvidia-h200-2026-11-28.json), so no op is in
``UNVERIFIED_CUDA_OPS`` and CUDA tensors are accepted by default.  The gate
stays for kernels added later: an op listed there refuses CUDA tensors until
``lca-ext verify-cuda`` has checked it on the GPU at hand and stamped it for
this build (the stamp file below), or ``LCA_EXT_ALLOW_UNVERIFIED_CUDA=1``; so a
kernel that never ran on a GPU cannot hand out a silently wrong number.

This module imports neither ``ops`` nor ``verify``: ops asks it, verify writes
the stamps it reads.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Dict, List, Optional

import torch

FUSED_OPS = ("accumulate_", "allocate", "allocate_classes", "sign_changes_")
# ops whose CUDA kernel has not run on a GPU of this project (see the docstring)
UNVERIFIED_CUDA_OPS: frozenset = frozenset()
STAMP_FILE = "cuda-verified.json"


def cuda_allowed(op: str, device) -> bool:
    """May `op` run its CUDA kernel on `device`: verified by this project, stamped
    by `lca-ext verify-cuda` for this build and GPU, or allowed by the user."""
    if op not in UNVERIFIED_CUDA_OPS or os.environ.get("LCA_EXT_ALLOW_UNVERIFIED_CUDA") == "1":
        return True
    return op in verified_ops(device)


# ---------------------------------------------------------------------------
# the stamps that `lca-ext verify-cuda` writes


def stamp_path() -> str:
    root = os.environ.get("LCA_EXT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "lca_ext")
    return os.path.join(root, STAMP_FILE)


_library_digest: Optional[str] = None


def library_sha256() -> str:
    """SHA-256 of the compiled library (lca_ext._C): a rebuild changes it."""
    global _library_digest
    if _library_digest is None:
        from ._loader import _C
        h = hashlib.sha256()
        with open(_C.__file__, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _library_digest = h.hexdigest()
    return _library_digest


def device_identity(device) -> Dict[str, str]:
    """What a verification holds for: this library, torch, CUDA and GPU model."""
    from . import __version__

    device = torch.device(device)
    major, minor = torch.cuda.get_device_capability(device)
    return {"lca_ext": __version__, "library_sha256": library_sha256(),
            "torch": torch.__version__, "torch_cuda": str(torch.version.cuda),
            "gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}


def _read_stamps(path: str) -> list:
    try:
        with open(path) as f:
            data = json.load(f)
        entries = data.get("verified", [])
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    except (OSError, ValueError, AttributeError):
        return []  # no file, or not ours: nothing verified


def record_stamp(identity: Dict[str, str], ops: List[str]) -> str:
    """Adds (or replaces) the entry for `identity` with `ops`; atomic write."""
    path = stamp_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    entries = [e for e in _read_stamps(path) if e.get("identity") != identity]
    entries.append({"identity": identity, "ops": sorted(ops),
                    "date": datetime.datetime.now().isoformat(timespec="seconds")})
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"verified": entries}, f, indent=1)
    os.replace(tmp, path)
    forget_verified()
    return path


def stamped_ops(identity: Dict[str, str]) -> frozenset:
    """The ops recorded as verified for exactly this identity."""
    for e in _read_stamps(stamp_path()):
        if e.get("identity") == identity and isinstance(e.get("ops"), list):
            return frozenset(op for op in e["ops"] if op in FUSED_OPS)
    return frozenset()


_verified_cache: Dict[int, frozenset] = {}


def forget_verified() -> None:
    """Read the stamps again at the next verified_ops (after a stamp is
    written, or the cache directory changed)."""
    _verified_cache.clear()


def verified_ops(device) -> frozenset:
    """The ops verified on this CUDA device (read once per device and process,
    and again after record_stamp); empty for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return frozenset()
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _verified_cache:
            _verified_cache[index] = stamped_ops(device_identity(torch.device("cuda", index)))
        return _verified_cache[index]
    except (RuntimeError, OSError, AssertionError):  # no usable GPU: nothing verified
        return frozenset()
