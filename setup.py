"""Build lca_ext: C++ CPU kernels always, CUDA kernels when possible.

Switches (environment variables):
  FORCE_CUDA=1      build the CUDA kernels even without a visible GPU (needs a CUDA
                    build of torch and nvcc; CUDA_HOME should name the toolkit root)
  FORCE_ONLY_CPU=1  never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST  CUDA archs; defaults to "8.0;9.0" (A100, H100/H200)
  LCA_EXT_DEBUG=1   -O0 -g
  LCA_EXT_METADATA_ONLY=1  install the package without compiling (scripts/env.sh
                    builds the library in place with `setup.py build_ext --inplace`,
                    incrementally, and installs the package editable this way)
Without either switch, CUDA is built when torch has CUDA, nvcc is found and a GPU
is visible.
"""
import glob
import os
import re

from setuptools import find_packages, setup
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    # lca_ext/_version.py, read as text: importing lca_ext needs the compiled library
    with open(os.path.join(HERE, "lca_ext", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def depends() -> list:
    """What a rebuild must notice besides the .cpp/.cu sources: setuptools skips an
    extension whose sources are older than the library, so every header, this file
    and torch's version header (a reinstalled torch) are listed; ninja then
    recompiles only the objects that changed."""
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True)
                     + glob.glob("csrc/**/*.cuh", recursive=True))
    torch_version_h = os.path.join(os.path.dirname(torch.__file__), "include", "torch",
                                   "csrc", "api", "include", "torch", "version.h")
    return headers + ["setup.py"] + ([torch_version_h] if os.path.exists(torch_version_h)
                                     else [])


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
    # build_info() records the torch this binary is built against (bare tokens, as
    # for the arch list below); lca_ext refuses to load under another torch release
    torch_build = re.sub(r"[^0-9A-Za-z.+_]", "_", torch.__version__)
    cxx = opt + ["-fopenmp", "-fno-math-errno", f"-DLCA_EXT_TORCH_BUILD={torch_build}"]
    if not want_cuda():
        return CppExtension(
            "lca_ext._C", sources, depends=depends(),
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    # build_info.cpp stringifies this token list (no quotes: they do not survive
    # the trip through ninja's shell).
    arch_tokens = archs.replace(";", ",").replace(" ", ",")
    return CUDAExtension(
        "lca_ext._C", sources, depends=depends(),
        extra_compile_args={
            "cxx": cxx + ["-DWITH_CUDA", f"-DLCA_EXT_CUDA_ARCHS={arch_tokens}"],
            "nvcc": opt + ["-lineinfo", "-DWITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


EXTRAS = {
    # the demo, its report and figures, progress bars, TensorBoard logging, the
    # report's interactive page (plotly >= 6 embeds arrays as base64 typed arrays)
    "demo": ["mlxtend", "matplotlib", "pillow", "tqdm", "tensorboard", "plotly>=6"],
    "lightning": ["lightning>=2.0"],
    # the GPT-2 benchmarks (benchmarks/); Trainer needs accelerate
    "transformers": ["transformers", "accelerate>=1.1"],
    "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest", "ninja"],
}
EXTRAS["all"] = sorted({r for k, reqs in EXTRAS.items() if k != "test" for r in reqs})

setup(
    name="lca_ext",
    version=read_version(),
    description="Loss Change Allocation (LCA) for PyTorch: fused C++/CUDA ops, a "
                "training-loop tracker and the paper's analyses",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="MIT",
    keywords=["pytorch", "loss change allocation", "interpretability", "training dynamics",
              "cuda", "torch extension"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    project_urls={
        "Paper": "https://arxiv.org/abs/1909.01440",
    },
    packages=find_packages(include=["lca_ext", "lca_ext.*"]),
    ext_modules=([] if os.getenv("LCA_EXT_METADATA_ONLY", "0") == "1" else [extension()]),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.11",
    install_requires=["torch>=2.4", "numpy", "zarr>=3.1"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lca-ext = lca_ext.cli:main"]},
    zip_safe=False,
)
