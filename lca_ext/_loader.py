"""Loads the compiled library, or says exactly how to build it."""
import importlib

import torch  # noqa: F401  (torch's shared libraries must be loaded first)

_BUILD_HELP = (
    "lca_ext's compiled library (lca_ext._C) is missing or does not load: {err}\n"
    "Build it from the source checkout, with torch installed first:\n"
    "    pip install --no-build-isolation -e .\n"
    "or let `bash scripts/test.sh` make a virtual environment and build everything.\n"
    "A library built against another torch version must be rebuilt after upgrading torch."
)


def load_library():
    try:
        return importlib.import_module("lca_ext._C")
    except ImportError as err:
        raise ImportError(_BUILD_HELP.format(err=err)) from err


_C = load_library()


def build_info() -> dict:
    """What the compiled library was built with.

    Keys: ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (e.g. "8.0,9.0"),
    ``openmp`` (bool), ``num_threads`` (ATen's current thread count), ``parallel_info``
    (ATen's report), ``chunk_size`` (elements per chunk of the multi-tensor kernels),
    ``simd`` (the instruction set the C++ kernels were compiled for), ``compiler``,
    ``cpu_float32_kernel`` (the inner loop chosen at run time for float32 inputs:
    "avx2", "sse2" or "portable"; all give bit-identical results).
    """
    return dict(_C.build_info())
