// The CUDA registration of the ops: csrc/cuda/ops_impl.h over the CUDA backend
// (device guard, non-blocking upload through pinned memory, the current stream).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "ops_impl.h"

namespace lca_ext {
namespace cuda {
namespace {

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  // Every op uploads its tensor and chunk tables from pinned host memory that
  // is recycled once the copy has run, so a CUDA graph that captured the copy
  // would replay it from whatever the buffer holds later (wrong pointers, wrong
  // results).  Refuse capture with a clear error instead.  Called after the
  // device guard (the check is on that device's current stream).
  static void check_not_capturing(const char* op) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status));
    TORCH_CHECK(status == cudaStreamCaptureStatusNone, "lca_ext.", op,
                ": cannot be captured in a CUDA graph (each call uploads its tensor "
                "table from host memory); call it outside the captured region");
  }

  // Copies the packed tables to the device through pinned memory without
  // blocking the host; the caching host allocator keeps the staging buffer
  // alive until the copy has run.
  static at::Tensor upload(const std::vector<unsigned char>& bytes, const at::Device& device) {
    const int64_t n = static_cast<int64_t>(bytes.size());
    at::Tensor staging =
        at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    if (n) std::memcpy(staging.data_ptr(), bytes.data(), bytes.size());
    return staging.to(device, /*non_blocking=*/true);
  }

  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

  static void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
};

}  // namespace
}  // namespace cuda
}  // namespace lca_ext

TORCH_LIBRARY_IMPL(lca_ext, CUDA, m) {
  using lca_ext::cuda::CudaBackend;
  m.impl("accumulate_", &lca_ext::cuda::accumulate_impl<CudaBackend>);
  m.impl("allocate", &lca_ext::cuda::allocate_impl<CudaBackend>);
  m.impl("allocate_classes", &lca_ext::cuda::allocate_classes_impl<CudaBackend>);
  m.impl("sign_changes_", &lca_ext::cuda::sign_changes_impl<CudaBackend>);
}
