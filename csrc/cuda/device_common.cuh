// Device helpers shared by the CUDA kernels: dtype dispatch, conversions, the
// per-element LCA, sign counts and fixed-order warp reductions.  No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "kernels.h"

// Kernel launches and dynamic shared memory go through these two macros so the
// same sources also compile as C++ for the CPU emulator the tests run
// (tests/cuda_emu/emu_runtime.h defines LCA_CUDA_EMULATION).
// LCA_CHECK_ALIGNED(p, n): the emulator reports a vector load from an address
// that is not n-byte aligned (a GPU would fault; the host might not notice).
#if defined(LCA_CUDA_EMULATION)
#define LCA_LAUNCH(kernel, grid, block, shmem, stream, ...) \
  LCA_EMU_LAUNCH(kernel, grid, block, shmem, __VA_ARGS__)
#define LCA_DYNAMIC_SHARED(type, name) LCA_EMU_DYNAMIC_SHARED(type, name)
#define LCA_CHECK_ALIGNED(p, n) LCA_EMU_CHECK_ALIGNED(p, n)
#else
#define LCA_LAUNCH(kernel, grid, block, shmem, stream, ...) \
  kernel<<<(grid), (block), (shmem), (stream)>>>(__VA_ARGS__)
#define LCA_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define LCA_CHECK_ALIGNED(p, n) ((void)0)
#endif

namespace lca_ext {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) for the C++ type T of a dtype code.  The code is the same
// for a whole chunk, so the branch is uniform across the block.
template <typename F>
__device__ __forceinline__ void dispatch_float(int32_t t, F&& f) {
  switch (t) {
    case kF32: f(Tag<float>{}); break;
    case kF64: f(Tag<double>{}); break;
    case kF16: f(Tag<__half>{}); break;
    default: f(Tag<__nv_bfloat16>{}); break;
  }
}

// A 16-bit float from its bits.
template <typename T>
__device__ __forceinline__ T bits_to(unsigned short b);
template <>
__device__ __forceinline__ __half bits_to<__half>(unsigned short b) {
  return __ushort_as_half(b);
}
template <>
__device__ __forceinline__ __nv_bfloat16 bits_to<__nv_bfloat16>(unsigned short b) {
  return __ushort_as_bfloat16(b);
}

// kVec consecutive elements from an address aligned to vector_alignment:
// one 128-bit load for fp32, one 64-bit load for fp16/bf16 (fp64 never takes
// the vector path).
// The inputs are only read during the kernel, so the loads may take the
// read-only (non-coherent) global path; __ldg also tells the compiler the
// address is global (the pointers come from a table in memory, so it cannot
// infer that and would emit generic loads).
__device__ __forceinline__ void load_vec(const float* __restrict__ p, float (&out)[kVec]) {
  LCA_CHECK_ALIGNED(p, 16);
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
// fp16 / bf16: one 64-bit load of four 16-bit values
template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&out)[kVec]) {
  static_assert(sizeof(T) == 2 && sizeof(uint2) == kVec * sizeof(T), "16-bit types");
  LCA_CHECK_ALIGNED(p, 8);
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  const unsigned short h[kVec] = {
      static_cast<unsigned short>(v.x & 0xffffu), static_cast<unsigned short>(v.x >> 16),
      static_cast<unsigned short>(v.y & 0xffffu), static_cast<unsigned short>(v.y >> 16)};
#pragma unroll
  for (int r = 0; r < kVec; ++r) out[r] = bits_to<T>(h[r]);
}

// The type a tensor's LCA is computed in: float32 unless an input is float64
// (the same rule as the CPU's MathType).
template <typename P, typename G>
struct MathType {
  using type = std::conditional_t<std::is_same_v<P, double> || std::is_same_v<G, double>,
                                  double, float>;
};

// Exact conversions to the math type (fp16/bf16 -> float is exact; a float64
// input only ever meets a float64 math type).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename S>
__device__ __forceinline__ T to_math(S v) {
  if constexpr (std::is_same_v<S, double>) {
    return static_cast<T>(v);
  } else {
    return static_cast<T>(to_float(v));
  }
}

// Round-to-nearest arithmetic through intrinsics: nvcc never contracts these
// into an FMA, so (after - before) * grad is rounded exactly as the CPU kernel
// and the torch reference round it, and `acc + lca` stays two roundings.
template <typename T>
struct Arith;
template <>
struct Arith<float> {
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static constexpr float kMax = FLT_MAX;
};
template <>
struct Arith<double> {
  static __device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
  static __device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
  static constexpr double kMax = DBL_MAX;
};

// lca = (after - before) * grad in the math type T.
template <typename T, typename P, typename G>
__device__ __forceinline__ T lca_value(P before, P after, G grad) {
  return Arith<T>::mul(Arith<T>::sub(to_math<T>(after), to_math<T>(before)),
                       to_math<T>(grad));
}

// helped: -max <= x < 0, hurt: 0 < x <= max, zero: x == 0; NaN/Inf in none
// (non-finite = seen - the three, worked out once per chunk).
struct SignCounts {
  int32_t helped = 0, hurt = 0, zero = 0;
};

template <typename T>
__device__ __forceinline__ bool is_helped(T x) {
  return (x < T(0)) & (x >= -Arith<T>::kMax);
}

template <typename T>
__device__ __forceinline__ void count_sign(T x, SignCounts& c) {
  c.helped += is_helped(x);
  c.hurt += (x > T(0)) & (x <= Arith<T>::kMax);
  c.zero += x == T(0);
}

// Butterfly sums over the 32 lanes; every lane gets the result.  The tree is
// fixed, and a + b == b + a exactly, so all lanes hold the same bits.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}
__device__ __forceinline__ int32_t warp_sum(int32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

}  // namespace cuda
}  // namespace lca_ext
