// sign_changes_ on the GPU: one block per chunk of the chunk table, the whole
// tensor list in one launch.  Elementwise, so no ordering question arises.
// s = sign(x - base) by comparison (exact in any dtype): s = (x > base) - (x < base);
// NaN gives 0 and leaves the state as it was (as in csrc/cpu/sign_changes_cpu.cpp).
#include "device_common.cuh"

namespace lca_ext {
namespace cuda {
namespace {

template <typename X, bool kBase>
__device__ __forceinline__ void sign_changes_chunk(const SignChangesTensor& t,
                                                   const Chunk& ch) {
  // compared in float (exact for fp16/bf16) or in double
  using C = std::conditional_t<std::is_same_v<X, double>, double, float>;
  const X* __restrict__ x = static_cast<const X*>(t.x);
  const X* __restrict__ base = static_cast<const X*>(t.base);
  for (int64_t p = ch.begin + threadIdx.x; p < ch.end; p += kBlockThreads) {
    const C v = to_math<C>(x[p]);
    const C b = kBase ? to_math<C>(base[p]) : C(0);
    const int s = static_cast<int>(v > b) - static_cast<int>(v < b);
    const int last = t.last_sign[p];
    if (s * last < 0) t.changes[p] += 1;
    if (s != 0) t.last_sign[p] = static_cast<int8_t>(s);
  }
}

__global__ void __launch_bounds__(kBlockThreads)
sign_changes_kernel(const SignChangesTensor* __restrict__ tensors,
                    const Chunk* __restrict__ chunks) {
  const Chunk ch = chunks[blockIdx.x];
  const SignChangesTensor t = tensors[ch.tensor];
  dispatch_float(t.x_t, [&](auto tag) {
    using X = typename decltype(tag)::type;
    if (t.base) {
      sign_changes_chunk<X, true>(t, ch);
    } else {
      sign_changes_chunk<X, false>(t, ch);
    }
  });
}

}  // namespace

void launch_sign_changes(const SignChangesTensor* tensors, const Chunk* chunks,
                         int64_t num_chunks, cudaStream_t stream) {
  LCA_LAUNCH(sign_changes_kernel, static_cast<unsigned>(num_chunks), kBlockThreads, 0, stream,
             tensors, chunks);
}

}  // namespace cuda
}  // namespace lca_ext
