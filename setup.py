"""Build lca_ext: C++ CPU kernels always, CUDA kernels when possible.

Switches (environment variables):
  FORCE_CUDA=1      build the CUDA kernels even without a visible GPU (needs a CUDA
                    build of torch and nvcc; CUDA_HOME should name the toolkit root)
  FORCE_ONLY_CPU=1  never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST  CUDA archs; defaults to "8.0;9.0" (A100, H100/H200)
  LCA_EXT_DEBUG=1   -O0 -g
Without either switch, CUDA is built when torch has CUDA, nvcc is found and a GPU
is visible.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.getenv("FORCE_ONLY_CPU", "0") == "1":
        return False
    if os.getenv("FORCE_CUDA", "0") == "1":
        if torch.version.cuda is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but this torch is a CPU build; install a CUDA build of "
                "torch (e.g. torch==2.14.1) to compile the CUDA kernels")
        return True
    return (torch.version.cuda is not None and CUDA_HOME is not None
            and torch.cuda.is_available())


def extension():
    debug = os.getenv("LCA_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = opt + ["-fopenmp", "-fno-math-errno"]
    if not want_cuda():
        return CppExtension(
            "lca_ext._C", sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    # build_info.cpp stringifies this token list (no quotes: they do not survive
    # the trip through ninja's shell).
    arch_tokens = archs.replace(";", ",").replace(" ", ",")
    return CUDAExtension(
        "lca_ext._C", sources,
        extra_compile_args={
            "cxx": cxx + ["-DWITH_CUDA", f"-DLCA_EXT_CUDA_ARCHS={arch_tokens}"],
            "nvcc": opt + ["-lineinfo", "-DWITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="lca_ext",
    version="0.1.0",
    description="Loss Change Allocation for PyTorch: fused C++/CUDA ops",
    packages=find_packages(include=["lca_ext", "lca_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.11",
    install_requires=["torch>=2.4", "numpy", "zarr>=3.1"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"],
                    "demo": ["mlxtend", "matplotlib", "pillow", "tqdm", "tensorboard"],
                    "lightning": ["lightning>=2.0"]},
    entry_points={"console_scripts": ["lca-ext = lca_ext.cli:main"]},
    zip_safe=False,
)
