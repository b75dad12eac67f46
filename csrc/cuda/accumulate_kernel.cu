// accumulate_ on the GPU: one block per chunk of the chunk table, the whole
// tensor list in one launch.
#include "device_common.cuh"

namespace lca_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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

// A is the accumulator type (float or double); a gradient is converted to it
// exactly (fp16/bf16 -> float, float -> double; double grads only meet a
// double accumulator or are rounded once to float, as the CPU does).
template <typename A, typename G>
__device__ __forceinline__ void axpy(A* __restrict__ acc, const G* __restrict__ g,
                                     int64_t begin, int64_t end, A w) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    acc[i] = axpy_rn(acc[i], w, to_math<A>(g[i]));
  }
}

// float32 accumulators with 16/32-bit gradients on aligned addresses: kVec
// elements per thread per step (128-bit load and store of acc, a 128- or
// 64-bit read-only load of the gradient), then the chunk's tail element-wise.
// Chunks start at multiples of kChunkSize, so aligned bases keep every
// step aligned.  Elementwise: the same result as the scalar loop, bit for bit.
template <typename G>
__device__ __forceinline__ void axpy_vec(float* __restrict__ acc, const G* __restrict__ g,
                                         int64_t begin, int64_t end, float w) {
  const int64_t nvec = (end - begin) / kVec;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int64_t i = begin + v * kVec;
    LCA_CHECK_ALIGNED(acc + i, 16);
    float4 a = *reinterpret_cast<const float4*>(acc + i);  // acc is written: no __ldg
    G gv[kVec];
    load_vec(g + i, gv);
    a.x = axpy_rn(a.x, w, to_math<float>(gv[0]));
    a.y = axpy_rn(a.y, w, to_math<float>(gv[1]));
    a.z = axpy_rn(a.z, w, to_math<float>(gv[2]));
    a.w = axpy_rn(a.w, w, to_math<float>(gv[3]));
    *reinterpret_cast<float4*>(acc + i) = a;
  }
  axpy(acc, g, begin + nvec * kVec, end, w);
}

__global__ void __launch_bounds__(kThreads)
accumulate_kernel(const AccumulateTensor* __restrict__ tensors,
                  const Chunk* __restrict__ chunks, double weight) {
  const Chunk ch = chunks[blockIdx.x];
  const AccumulateTensor t = tensors[ch.tensor];
  dispatch_float(t.grad_t, [&](auto gtag) {
    using G = typename decltype(gtag)::type;
    if (t.acc_t == kF64) {
      axpy(static_cast<double*>(t.acc), static_cast<const G*>(t.grad), ch.begin, ch.end,
           weight);
    } else if constexpr (sizeof(G) <= 4) {
      if (t.vector) {
        axpy_vec(static_cast<float*>(t.acc), static_cast<const G*>(t.grad), ch.begin, ch.end,
                 static_cast<float>(weight));
      } else {
        axpy(static_cast<float*>(t.acc), static_cast<const G*>(t.grad), ch.begin, ch.end,
             static_cast<float>(weight));
      }
    } else {
      axpy(static_cast<float*>(t.acc), static_cast<const G*>(t.grad), ch.begin, ch.end,
           static_cast<float>(weight));
    }
  });
}

}  // namespace

void launch_accumulate(const AccumulateTensor* tensors, const Chunk* chunks,
                       int64_t num_chunks, double weight, cudaStream_t stream) {
  // gridDim.x allows 2^31 - 1 blocks: 64Ki-element chunks cover 2^47 elements.
  if (num_chunks == 0) return;
  LCA_LAUNCH(accumulate_kernel, static_cast<unsigned>(num_chunks), kThreads, 0, stream,
             tensors, chunks, weight);
}

}  // namespace cuda
}  // namespace lca_ext
