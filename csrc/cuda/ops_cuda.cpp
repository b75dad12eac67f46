// The torch side of the CUDA kernels: argument checks (shared with the CPU),
// the chunk table copied to the device, the launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../chunk_plan.h"
#include "../validate.h"
#include "kernels.h"

namespace lca_ext {
namespace cuda {
namespace {

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "lca_ext: unsupported dtype ", t);
  }
}

// Copies plain structs to the device through pinned memory without blocking
// the host; the caching host allocator keeps the staging buffer alive until the
// copy has run.
template <typename T>
at::Tensor to_device(const std::vector<T>& host, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(T));
  at::Tensor staging = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (bytes) std::memcpy(staging.data_ptr(), host.data(), bytes);
  return staging.to(device, /*non_blocking=*/true);
}

void accumulate_cuda(at::TensorList acc, at::TensorList grads, double weight) {
  check_accumulate_inputs(acc, grads, weight);

  const c10::cuda::CUDAGuard guard(acc[0].device());
  const auto g = contiguous_all(grads);
  auto a = contiguous_all(acc);
  std::vector<AccumulateTensor> tensors(a.size());
  for (size_t k = 0; k < a.size(); ++k) {
    tensors[k] = AccumulateTensor{a[k].data_ptr(), g[k].const_data_ptr(),
                                  dtype_code(a[k].scalar_type()),
                                  dtype_code(g[k].scalar_type())};
  }
  const ChunkPlan plan = make_chunk_plan(numels(acc));
  const int64_t n = static_cast<int64_t>(plan.chunks.size());
  if (n > 0) {
    const at::Tensor d_tensors = to_device(tensors, acc[0].device());
    const at::Tensor d_chunks = to_device(plan.chunks, acc[0].device());
    launch_accumulate(static_cast<const AccumulateTensor*>(d_tensors.const_data_ptr()),
                      static_cast<const Chunk*>(d_chunks.const_data_ptr()), n, weight,
                      c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  write_back(acc, a);
}

}  // namespace
}  // namespace cuda
}  // namespace lca_ext

TORCH_LIBRARY_IMPL(lca_ext, CUDA, m) {
  m.impl("accumulate_", &lca_ext::cuda::accumulate_cuda);
}
