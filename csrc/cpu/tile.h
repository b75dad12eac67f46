// Small loops over an L1-resident tile that the CPU kernels compose.  Each loop
// is plain C++ written so gcc/clang vectorise it at -O3 (independent lanes, no
// reassociation needed), which keeps every result deterministic: the order of
// additions depends only on where a tile starts, never on the thread count.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace lca_ext {
namespace cpu {

// Elements per tile: 2048 doubles = 16 KiB, so a tile and its inputs stay in L1/L2.
constexpr int64_t kTile = 2048;

// The type a tile is computed in: float for fp16/bf16/fp32 inputs, double as
// soon as one input is double.
template <typename A, typename B>
struct MathType { using type = float; };
template <typename B>
struct MathType<double, B> { using type = double; };
template <typename A>
struct MathType<A, double> { using type = double; };
template <>
struct MathType<double, double> { using type = double; };

// helped (< 0), hurt (> 0), zero (== 0) and non-finite counts of a tile.
// NaN and +-Inf count only as non-finite.
struct SignCounts {
  int64_t helped = 0, hurt = 0, zero = 0, nonfinite = 0;
};

// The fused inner loop: for i in [0, n)
//   x = (T(after[i]) - T(before[i])) * T(grad[i]);  out[i] = x
// returning the float64 sum of x and adding the sign counts to c: helped
// -max <= x < 0, hurt 0 < x <= max, zero x == 0; the rest is NaN or +-Inf.
//
// The sum uses 8 float64 lanes (element i goes to lane i % 8) combined in a
// fixed tree, so its rounding is fixed by construction.  lca_block_sse2 is the
// same computation, lane for lane, in SSE2 intrinsics: compilers do not reliably
// vectorise the portable loop (it mixes float math, float64 sums and integer
// counts), and this loop is the whole cost of the op.
template <typename T>
struct BlockSums {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t helped = 0, hurt = 0, zero = 0;

  inline void add(int j, T x) {
    const T big = std::numeric_limits<T>::max();
    acc[j] += static_cast<double>(x);
    helped += (x < T(0)) & (x >= -big);
    hurt += (x > T(0)) & (x <= big);
    zero += x == T(0);
  }
  inline double finish(int64_t n, SignCounts& c) const {
    c.helped += helped;
    c.hurt += hurt;
    c.zero += zero;
    c.nonfinite += n - (helped + hurt + zero);
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
           ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  }
};

template <typename P, typename G, typename T>
inline double lca_block_portable(const P* __restrict before,
                                 const P* __restrict after,
                                 const G* __restrict grad, int64_t n,
                                 T* __restrict out, SignCounts& c) {
  BlockSums<T> s;
  for (int64_t i = 0; i < n; ++i) {
    const T x = (static_cast<T>(after[i]) - static_cast<T>(before[i])) *
                static_cast<T>(grad[i]);
    out[i] = x;
    s.add(static_cast<int>(i & 7), x);
  }
  return s.finish(n, c);
}

#if defined(__SSE2__)
// float in, float math: 8 elements per iteration as two 4-float registers.
inline double lca_block_sse2(const float* __restrict before,
                             const float* __restrict after,
                             const float* __restrict grad, int64_t n,
                             float* __restrict out, SignCounts& c) {
  const __m128 zero4 = _mm_setzero_ps();
  const __m128 big = _mm_set1_ps(std::numeric_limits<float>::max());
  const __m128 neg_big = _mm_set1_ps(-std::numeric_limits<float>::max());
  __m128d acc01 = _mm_setzero_pd(), acc23 = _mm_setzero_pd();
  __m128d acc45 = _mm_setzero_pd(), acc67 = _mm_setzero_pd();
  __m128i helped = _mm_setzero_si128(), hurt = _mm_setzero_si128();
  __m128i zeros = _mm_setzero_si128();
  auto count = [&](__m128 x) {
    // compares give all-ones (-1) lanes; subtracting adds 1 per true lane
    const __m128 h = _mm_and_ps(_mm_cmplt_ps(x, zero4), _mm_cmpge_ps(x, neg_big));
    const __m128 u = _mm_and_ps(_mm_cmpgt_ps(x, zero4), _mm_cmple_ps(x, big));
    const __m128 z = _mm_cmpeq_ps(x, zero4);
    helped = _mm_sub_epi32(helped, _mm_castps_si128(h));
    hurt = _mm_sub_epi32(hurt, _mm_castps_si128(u));
    zeros = _mm_sub_epi32(zeros, _mm_castps_si128(z));
  };
  int64_t i = 0;
  // int32 lane counters cannot overflow: a block is at most one tile long.
  for (; i + 8 <= n; i += 8) {
    const __m128 x0 = _mm_mul_ps(
        _mm_sub_ps(_mm_loadu_ps(after + i), _mm_loadu_ps(before + i)),
        _mm_loadu_ps(grad + i));
    const __m128 x1 = _mm_mul_ps(
        _mm_sub_ps(_mm_loadu_ps(after + i + 4), _mm_loadu_ps(before + i + 4)),
        _mm_loadu_ps(grad + i + 4));
    _mm_storeu_ps(out + i, x0);
    _mm_storeu_ps(out + i + 4, x1);
    acc01 = _mm_add_pd(acc01, _mm_cvtps_pd(x0));
    acc23 = _mm_add_pd(acc23, _mm_cvtps_pd(_mm_movehl_ps(x0, x0)));
    acc45 = _mm_add_pd(acc45, _mm_cvtps_pd(x1));
    acc67 = _mm_add_pd(acc67, _mm_cvtps_pd(_mm_movehl_ps(x1, x1)));
    count(x0);
    count(x1);
  }
  BlockSums<float> s;
  _mm_storeu_pd(s.acc + 0, acc01);
  _mm_storeu_pd(s.acc + 2, acc23);
  _mm_storeu_pd(s.acc + 4, acc45);
  _mm_storeu_pd(s.acc + 6, acc67);
  int32_t lanes[4];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), helped);
  s.helped = int64_t(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), hurt);
  s.hurt = int64_t(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), zeros);
  s.zero = int64_t(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
  for (; i < n; ++i) {  // the tail: lane i % 8, as in the portable loop
    const float x = (after[i] - before[i]) * grad[i];
    out[i] = x;
    s.add(static_cast<int>(i & 7), x);
  }
  return s.finish(n, c);
}
#endif

template <typename P, typename G, typename T>
inline double lca_block(const P* __restrict before, const P* __restrict after,
                        const G* __restrict grad, int64_t n, T* __restrict out,
                        SignCounts& c) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<P, float> && std::is_same_v<G, float>)
    return lca_block_sse2(before, after, grad, n, out, c);
#endif
  return lca_block_portable(before, after, grad, n, out, c);
}

}  // namespace cpu
}  // namespace lca_ext
