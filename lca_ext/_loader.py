"""Loads the compiled library, or says exactly how to build it, and refuses a
library compiled against another torch release than the one installed."""
import importlib
import re

import torch  # (torch's shared libraries must be loaded first)

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


def release(version: str) -> str:
    """The release in a torch version, "2.14.1+cu130" -> "2.14.1": the release whose C++ ABI an extension is tied to.
    The local suffix (+cpu, +cu130: the variant) is not compared; a library built
    for CUDA does not load under a CPU-only torch anyway (missing CUDA libraries)."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", str(version))
    return ".".join(m.groups()) if m else str(version)


def check_torch(info: dict, installed: str) -> None:
    built = info.get("torch_version", "")
    if built and release(installed) != built:
        shown = info.get("torch_build") or built
        raise ImportError(
            f"lca_ext's compiled library was built against torch {shown}, but torch "
            f"{installed} is installed: a C++ extension works only with the torch release it "
            f"was compiled against. Install torch=={built}, or rebuild lca_ext against this "
            "torch: pip install --no-build-isolation --no-deps --force-reinstall "
            "<lca_ext's source archive or checkout>")


_C = load_library()
check_torch(dict(_C.build_info()), torch.__version__)


def build_info() -> dict:
    """What the compiled library was built with.

    Keys: ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (e.g. "8.0,9.0"),
    ``openmp`` (bool), ``num_threads`` (ATen's current thread count), ``parallel_info``
    (ATen's report), ``chunk_size`` (elements per chunk of the multi-tensor kernels),
    ``simd`` (the baseline instruction set the C++ files were compiled for; wider
    loops are chosen at run time, see ``cpu_float32_kernel``), ``compiler``,
    ``torch_version`` (the torch release the library was compiled against, e.g.
    "2.13.0"; importing lca_ext under another release raises ImportError),
    ``torch_build`` (that torch's full version, e.g. "2.13.0+cpu"),
    ``cpu_float32_kernel`` (the inner loop chosen at run time for float32 inputs:
    "avx2", "sse2" or "portable"; all give bit-identical results).
    """
    return dict(_C.build_info())
