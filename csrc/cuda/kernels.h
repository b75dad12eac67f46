// Launchers of the CUDA kernels: plain C++ declarations (no torch headers), so
// the .cu files compile quickly and the torch binding lives in ops_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../chunk_plan.h"

namespace lca_ext {
namespace cuda {

// dtype codes shared by host and device
enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct AccumulateTensor {
  void* acc;         // float32 or float64
  const void* grad;  // any DType
  int32_t acc_t, grad_t;
};

// acc[k] += weight * grad[k] over every chunk (device arrays), one launch.
void launch_accumulate(const AccumulateTensor* tensors, const Chunk* chunks,
                       int64_t num_chunks, double weight, cudaStream_t stream);

}  // namespace cuda
}  // namespace lca_ext
