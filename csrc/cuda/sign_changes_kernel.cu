// sign_changes_ on the GPU: one block per chunk of the chunk table, the whole
// tensor list in one launch.  Elementwise, so no ordering question arises.
// s = sign(x - base) by comparison (exact in any dtype): s = (x > base) - (x < base);
// NaN gives 0 and leaves the state as it was (as in csrc/cpu/sign_changes_cpu.cpp).
#include "device_common.cuh"

namespace lca_ext {
namespace cuda {
namespace {

// One element: s = sign(x - base); a flip of a known sign counts; s != 0 is kept.
template <typename C>
__device__ __forceinline__ void sign_step(C v, C b, int8_t& last, int32_t& changes) {
  const int s = static_cast<int>(v > b) - static_cast<int>(v < b);
  if (s * last < 0) changes += 1;
  if (s != 0) last = static_cast<int8_t>(s);
}

// compared in float (exact for fp16/bf16) or in double
template <typename X>
using CompareType = std::conditional_t<std::is_same_v<X, double>, double, float>;

template <typename X, bool kBase>
__device__ __forceinline__ void sign_changes_elements(const SignChangesTensor& t,
                                                      int64_t begin, int64_t end) {
  using C = CompareType<X>;
  const X* __restrict__ x = static_cast<const X*>(t.x);
  const X* __restrict__ base = static_cast<const X*>(t.base);
  for (int64_t p = begin + threadIdx.x; p < end; p += kBlockThreads) {
    sign_step<C>(to_math<C>(x[p]), kBase ? to_math<C>(base[p]) : C(0), t.last_sign[p],
                 t.changes[p]);
  }
}

// 16/32-bit x with every pointer aligned (SignChangesTensor::vector): kVec
// elements per thread per step -- x (and base) by a 128- or 64-bit read-only
// load, the four int8 signs by one 32-bit load and store, the four int32
// counts by one 128-bit load and store -- then the chunk's tail element-wise.
// Elementwise, so the result is the element loop's, bit for bit.
template <typename X, bool kBase>
__device__ __forceinline__ void sign_changes_vec(const SignChangesTensor& t, int64_t begin,
                                                 int64_t end) {
  const X* __restrict__ x = static_cast<const X*>(t.x);
  const X* __restrict__ base = static_cast<const X*>(t.base);
  const int64_t nvec = (end - begin) / kVec;
  for (int64_t v = threadIdx.x; v < nvec; v += kBlockThreads) {
    const int64_t i = begin + v * kVec;
    X xv[kVec], bv[kVec];
    load_vec(x + i, xv);
    if (kBase) load_vec(base + i, bv);
    LCA_CHECK_ALIGNED(t.last_sign + i, 4);
    LCA_CHECK_ALIGNED(t.changes + i, 16);
    // written below, so plain (coherent) loads, not __ldg
    char4 last = *reinterpret_cast<const char4*>(t.last_sign + i);
    int4 cnt = *reinterpret_cast<const int4*>(t.changes + i);
    int8_t l[kVec] = {static_cast<int8_t>(last.x), static_cast<int8_t>(last.y),
                      static_cast<int8_t>(last.z), static_cast<int8_t>(last.w)};
    int32_t c[kVec] = {cnt.x, cnt.y, cnt.z, cnt.w};
#pragma unroll
    for (int r = 0; r < kVec; ++r) {
      sign_step<float>(to_math<float>(xv[r]), kBase ? to_math<float>(bv[r]) : 0.0f, l[r], c[r]);
    }
    last.x = l[0], last.y = l[1], last.z = l[2], last.w = l[3];
    cnt.x = c[0], cnt.y = c[1], cnt.z = c[2], cnt.w = c[3];
    *reinterpret_cast<char4*>(t.last_sign + i) = last;
    *reinterpret_cast<int4*>(t.changes + i) = cnt;
  }
  sign_changes_elements<X, kBase>(t, begin + nvec * kVec, end);
}

template <typename X, bool kBase>
__device__ __forceinline__ void sign_changes_chunk(const SignChangesTensor& t,
                                                   const Chunk& ch) {
  if constexpr (sizeof(X) <= 4) {
    if (t.vector) {
      sign_changes_vec<X, kBase>(t, ch.begin, ch.end);
      return;
    }
  }
  sign_changes_elements<X, kBase>(t, ch.begin, ch.end);
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
