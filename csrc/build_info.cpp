// The small non-tensor surface, through pybind11: what this binary was built
// with.  Kept alone in this file because pybind11's headers compile slowly; it
// also provides PyInit__C, which makes the library importable as lca_ext._C
// (importing it runs the TORCH_LIBRARY registrations of the other files).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "chunk_plan.h"
#include "cpu/tile.h"

// setup.py passes the arch list as bare tokens (-DLCA_EXT_CUDA_ARCHS=8.0,9.0).
#define LCA_EXT_STR_(...) #__VA_ARGS__
#define LCA_EXT_STR(...) LCA_EXT_STR_(__VA_ARGS__)
#ifdef LCA_EXT_CUDA_ARCHS
#define LCA_EXT_CUDA_ARCHS_STRING LCA_EXT_STR(LCA_EXT_CUDA_ARCHS)
#else
#define LCA_EXT_CUDA_ARCHS_STRING ""
#endif

// setup.py passes torch.__version__ as bare tokens too (-DLCA_EXT_TORCH_BUILD=2.13.0+cpu):
// the header's numbers lack the local suffix (+cpu, +cu130) that names the variant.
#ifdef LCA_EXT_TORCH_BUILD
#define LCA_EXT_TORCH_BUILD_STRING LCA_EXT_STR(LCA_EXT_TORCH_BUILD)
#else
#define LCA_EXT_TORCH_BUILD_STRING ""
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict d;
#ifdef WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = std::string(LCA_EXT_CUDA_ARCHS_STRING);
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["num_threads"] = at::get_num_threads();
  d["parallel_info"] = at::get_parallel_info();
  d["chunk_size"] = lca_ext::kChunkSize;
#if defined(__AVX512F__)
  d["simd"] = std::string("avx512");
#elif defined(__AVX2__)
  d["simd"] = std::string("avx2");
#elif defined(__SSE2__)
  d["simd"] = std::string("sse2");
#elif defined(__ARM_NEON)
  d["simd"] = std::string("neon");
#else
  d["simd"] = std::string("none");
#endif
  d["compiler"] = std::string(__VERSION__);
  // the torch this binary was compiled against (its C++ ABI is that release's)
  d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                       std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
  d["torch_build"] = std::string(LCA_EXT_TORCH_BUILD_STRING);
  d["cpu_float32_kernel"] = std::string(lca_ext::cpu::float_kernel_path());
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "lca_ext compiled ops (registered as torch.ops.lca_ext.*) and build info";
  m.def("build_info", &build_info,
        "What this binary was compiled with: CUDA (and for which archs), "
        "OpenMP, SIMD level, compiler, the inner loop float32 inputs use on "
        "this CPU, and the current ATen thread count.");
}
