"""Builds and loads the CPU emulator of the CUDA kernels (tests/cuda_emu).

torch.ops.lca_ext_emu.* take CPU tensors and run the CUDA path of every op: the
torch glue of csrc/cuda/ops_impl.h and the kernel sources csrc/cuda/*.cu
themselves, compiled as C++ against tests/cuda_emu/emu_runtime.h.  It needs the
CUDA headers (cuda_fp16.h, cuda_bf16.h, vector_types.h; no GPU, no driver) and a
C++ compiler and ninja; the tests skip when they are missing (unless
LCA_REQUIRE_EMULATOR=1, as in CI).  The build (~1 min on two
cores) is cached under build/cuda-emu-<torch version>/.
"""
import glob
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(ROOT, "tests", "cuda_emu")
_ops = None


def cuda_include_dir():
    """A directory holding cuda_fp16.h, or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for r in roots:
        if r and os.path.isfile(os.path.join(r, "include", "cuda_fp16.h")):
            return os.path.join(r, "include")
    return None


def load():
    """torch.ops.lca_ext_emu, built on first use; skips the test if it cannot be."""
    global _ops
    if _ops is not None:
        return _ops
    from torch.utils import cpp_extension

    include = cuda_include_dir()
    missing = ("the CUDA headers (set CUDA_HOME)" if include is None else
               "ninja (pip install ninja)" if not cpp_extension.is_ninja_available() else None)
    if missing:
        if os.environ.get("LCA_REQUIRE_EMULATOR") == "1":  # CI: never skip silently
            raise RuntimeError(f"LCA_REQUIRE_EMULATOR=1 but the CUDA emulator needs {missing}")
        pytest.skip(f"the CUDA emulator needs {missing}")

    # LCA_EMULATOR_SANITIZE=address: build with AddressSanitizer, so an
    # out-of-bounds access by a kernel is reported (run python with libasan
    # preloaded: scripts/emulator_asan.sh)
    sanitize = os.environ.get("LCA_EMULATOR_SANITIZE", "")
    # (-fsanitize-sections: guard zones also around the __shared__ arrays,
    # which emu_runtime.h places in a section of their own)
    san_flags = ([f"-fsanitize={sanitize}", "-fno-omit-frame-pointer",
                  "-fsanitize-sections=lca_emu_shared"] if sanitize else [])
    tag = torch.__version__.replace("+", "_") + (f"-{sanitize}" if sanitize else "")
    build = os.path.join(ROOT, "build", "cuda-emu-" + tag)
    os.makedirs(build, exist_ok=True)
    cpp_extension.load(
        name="lca_ext_cuda_emu" + (f"_{sanitize}" if sanitize else ""),
        sources=[os.path.join(EMU, "emu_ops.cpp"), os.path.join(EMU, "emu_kernels.cpp"),
                 os.path.join(CSRC, "validate.cpp")],
        extra_include_paths=[CSRC, include],
        # -ffp-contract=off: a*b+c stays two roundings, as nvcc's __fmul_rn/__fadd_rn
        extra_cflags=["-O2", "-ffp-contract=off", "-Wno-unknown-pragmas"] + san_flags,
        extra_ldflags=san_flags,
        build_directory=build,
        is_python_module=False,
        verbose=False,
    )
    _ops = torch.ops.lca_ext_emu
    return _ops
