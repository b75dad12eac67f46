// accumulate_ on the GPU: one block per chunk of the chunk table, the whole
// tensor list in one launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"

namespace lca_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// acc + w * g with two roundings, as the CPU kernel and the torch reference
// (g * w, then add) round it: the intrinsics keep nvcc from contracting the
// pair into one FMA (nvcc contracts by default), which would round once and
// give results that differ from the CPU's in the last bit.
__device__ __forceinline__ float axpy_rn(float acc, float w, float g) {
  return __fadd_rn(acc, __fmul_rn(w, g));
}
__device__ __forceinline__ double axpy_rn(double acc, double w, double g) {
  return __dadd_rn(acc, __dmul_rn(w, g));
}

template <typename A, typename G>
__device__ void axpy(A* __restrict__ acc, const G* __restrict__ g, int64_t begin,
                     int64_t end, A w) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    acc[i] = axpy_rn(acc[i], w, static_cast<A>(to_float(g[i])));
  }
}

template <typename A>
__device__ void axpy_any(A* acc, const void* g, int32_t grad_t, int64_t begin,
                         int64_t end, A w) {
  switch (grad_t) {
    case kF32: axpy(acc, static_cast<const float*>(g), begin, end, w); break;
    case kF64: {
      // double grads: exact conversion to A, no float detour
      const double* gd = static_cast<const double*>(g);
      for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x)
        acc[i] = axpy_rn(acc[i], w, static_cast<A>(gd[i]));
      break;
    }
    case kF16: axpy(acc, static_cast<const __half*>(g), begin, end, w); break;
    case kBF16: axpy(acc, static_cast<const __nv_bfloat16*>(g), begin, end, w); break;
  }
}

__global__ void __launch_bounds__(kThreads)
accumulate_kernel(const AccumulateTensor* __restrict__ tensors,
                  const Chunk* __restrict__ chunks, double weight) {
  const Chunk ch = chunks[blockIdx.x];
  const AccumulateTensor t = tensors[ch.tensor];
  if (t.acc_t == kF64) {
    axpy_any(static_cast<double*>(t.acc), t.grad, t.grad_t, ch.begin, ch.end, weight);
  } else {
    axpy_any(static_cast<float*>(t.acc), t.grad, t.grad_t, ch.begin, ch.end,
             static_cast<float>(weight));
  }
}

}  // namespace

void launch_accumulate(const AccumulateTensor* tensors, const Chunk* chunks,
                       int64_t num_chunks, double weight, cudaStream_t stream) {
  // gridDim.x allows 2^31 - 1 blocks: 64Ki-element chunks cover 2^47 elements.
  if (num_chunks == 0) return;
  accumulate_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
      tensors, chunks, weight);
}

}  // namespace cuda
}  // namespace lca_ext
