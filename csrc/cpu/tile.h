// The CPU kernels' inner loops, over one tile (a few KiB, L1-resident) at a time.
// Every float64 sum adds in a fixed order that depends only on where a tile or
// row segment starts, never on the thread count: results are deterministic.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
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

// The fused inner loop, as a small accumulator that lives for one chunk:
//   x = (T(after[i]) - T(before[i])) * T(grad[i]);  out[i] = x
// block() returns the float64 sum of one block (a tile, or a row segment of
// one) and keeps counting signs across blocks: helped -max <= x < 0, hurt
// 0 < x <= max, zero x == 0; the rest is NaN or +-Inf.  finish() hands the
// counts over.
//
// A block's sum uses 8 float64 lanes (element i of the block goes to lane i % 8)
// combined in a fixed tree, so its rounding is fixed by construction.  The SSE2
// specialisation below is the same computation, lane for lane, in intrinsics:
// compilers do not reliably vectorise the portable loop (it mixes float math,
// float64 sums and integer counts), and this loop is the whole cost of the op.
// Hands a block accumulator's counts over: the non-finite are the rest.
inline void add_counts(SignCounts& c, int64_t seen, int64_t helped, int64_t hurt,
                       int64_t zero) {
  c.helped += helped;
  c.hurt += hurt;
  c.zero += zero;
  c.nonfinite += seen - (helped + hurt + zero);
}

inline double lane_tree(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
         ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename P, typename G, typename T>
struct LcaBlocks {
  int64_t helped = 0, hurt = 0, zero = 0, seen = 0;

  static inline T lca(const P* before, const P* after, const G* grad, int64_t i) {
    return (static_cast<T>(after[i]) - static_cast<T>(before[i])) *
           static_cast<T>(grad[i]);
  }
  inline void count(T x) {
    const T big = std::numeric_limits<T>::max();
    helped += (x < T(0)) & (x >= -big);
    hurt += (x > T(0)) & (x <= big);
    zero += x == T(0);
  }
  // Store: write the values to out (needed only for histogram / state outputs)
  template <bool Store>
  inline double block(const P* __restrict before, const P* __restrict after,
                      const G* __restrict grad, int64_t n, T* __restrict out) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; ++i) {
      const T x = lca(before, after, grad, i);
      if constexpr (Store) out[i] = x;
      acc[i & 7] += static_cast<double>(x);
      count(x);
    }
    seen += n;
    return lane_tree(acc);
  }
  inline void finish(SignCounts& c) const { add_counts(c, seen, helped, hurt, zero); }
};

#if defined(__SSE2__)
// float in, float math: 8 elements per iteration as two 4-float registers.
// int32 lane counters cannot overflow: one accumulator serves one chunk.
template <>
struct LcaBlocks<float, float, float> {
  LcaBlocks()
      : helped(_mm_setzero_si128()), hurt(_mm_setzero_si128()),
        zeros(_mm_setzero_si128()) {}

  template <bool Store>
  inline double block(const float* __restrict before,
                      const float* __restrict after,
                      const float* __restrict grad, int64_t n,
                      float* __restrict out) {
    __m128d acc01 = _mm_setzero_pd(), acc23 = _mm_setzero_pd();
    __m128d acc45 = _mm_setzero_pd(), acc67 = _mm_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128 x0 = _mm_mul_ps(
          _mm_sub_ps(_mm_loadu_ps(after + i), _mm_loadu_ps(before + i)),
          _mm_loadu_ps(grad + i));
      const __m128 x1 = _mm_mul_ps(
          _mm_sub_ps(_mm_loadu_ps(after + i + 4), _mm_loadu_ps(before + i + 4)),
          _mm_loadu_ps(grad + i + 4));
      if constexpr (Store) {
        _mm_storeu_ps(out + i, x0);
        _mm_storeu_ps(out + i + 4, x1);
      }
      acc01 = _mm_add_pd(acc01, _mm_cvtps_pd(x0));
      acc23 = _mm_add_pd(acc23, _mm_cvtps_pd(_mm_movehl_ps(x0, x0)));
      acc45 = _mm_add_pd(acc45, _mm_cvtps_pd(x1));
      acc67 = _mm_add_pd(acc67, _mm_cvtps_pd(_mm_movehl_ps(x1, x1)));
      count(x0);
      count(x1);
    }
    alignas(16) double acc[8];
    _mm_store_pd(acc + 0, acc01);
    _mm_store_pd(acc + 2, acc23);
    _mm_store_pd(acc + 4, acc45);
    _mm_store_pd(acc + 6, acc67);
    for (; i < n; ++i) {  // the tail: lane i % 8, as in the portable loop
      const float x = (after[i] - before[i]) * grad[i];
      if constexpr (Store) out[i] = x;
      acc[i & 7] += static_cast<double>(x);
      tail.count(x);
    }
    seen += n;
    return lane_tree(acc);
  }

  inline void finish(SignCounts& c) const {
    add_counts(c, seen, tail.helped + horizontal(helped), tail.hurt + horizontal(hurt),
               tail.zero + horizontal(zeros));
  }

 private:
  inline void count(__m128 x) {
    // compares give all-ones (-1) lanes; subtracting adds 1 per true lane
    const __m128 zero4 = _mm_setzero_ps();
    const __m128 big = _mm_set1_ps(std::numeric_limits<float>::max());
    const __m128 neg_big = _mm_set1_ps(-std::numeric_limits<float>::max());
    const __m128 h = _mm_and_ps(_mm_cmplt_ps(x, zero4), _mm_cmpge_ps(x, neg_big));
    const __m128 u = _mm_and_ps(_mm_cmpgt_ps(x, zero4), _mm_cmple_ps(x, big));
    const __m128 z = _mm_cmpeq_ps(x, zero4);
    helped = _mm_sub_epi32(helped, _mm_castps_si128(h));
    hurt = _mm_sub_epi32(hurt, _mm_castps_si128(u));
    zeros = _mm_sub_epi32(zeros, _mm_castps_si128(z));
  }
  static inline int64_t horizontal(__m128i v) {
    alignas(16) int32_t lanes[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(lanes), v);
    return int64_t(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
  }

  __m128i helped, hurt, zeros;
  LcaBlocks<float, float, double> tail;  // scalar counting of block tails
  int64_t seen = 0;
};
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LCA_EXT_HAVE_AVX2_PATH 1
// The same block in AVX2 (8 floats per register), compiled for AVX2 through
// function attributes and chosen at run time (cpu_has_avx2), so the binary
// still runs on any x86-64.  Lanes are assigned exactly as in the SSE2 and
// portable loops, so all three give bit-identical results.
struct LcaBlocksAvx2 {
  __attribute__((target("avx2"))) LcaBlocksAvx2()
      : helped(_mm256_setzero_si256()), hurt(_mm256_setzero_si256()),
        zeros(_mm256_setzero_si256()) {}

  template <bool Store>
  __attribute__((target("avx2"))) double block(const float* __restrict before,
                                               const float* __restrict after,
                                               const float* __restrict grad,
                                               int64_t n, float* __restrict out) {
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    const __m256 zero8 = _mm256_setzero_ps();
    const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
    const __m256 neg_big = _mm256_set1_ps(-std::numeric_limits<float>::max());
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_mul_ps(
          _mm256_sub_ps(_mm256_loadu_ps(after + i), _mm256_loadu_ps(before + i)),
          _mm256_loadu_ps(grad + i));
      if constexpr (Store) _mm256_storeu_ps(out + i, x);
      acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
      acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
      const __m256 h = _mm256_and_ps(_mm256_cmp_ps(x, zero8, _CMP_LT_OQ),
                                     _mm256_cmp_ps(x, neg_big, _CMP_GE_OQ));
      const __m256 u = _mm256_and_ps(_mm256_cmp_ps(x, zero8, _CMP_GT_OQ),
                                     _mm256_cmp_ps(x, big, _CMP_LE_OQ));
      const __m256 z = _mm256_cmp_ps(x, zero8, _CMP_EQ_OQ);
      helped = _mm256_sub_epi32(helped, _mm256_castps_si256(h));
      hurt = _mm256_sub_epi32(hurt, _mm256_castps_si256(u));
      zeros = _mm256_sub_epi32(zeros, _mm256_castps_si256(z));
    }
    alignas(32) double acc[8];
    _mm256_store_pd(acc + 0, acc0);
    _mm256_store_pd(acc + 4, acc1);
    for (; i < n; ++i) {
      const float x = (after[i] - before[i]) * grad[i];
      if constexpr (Store) out[i] = x;
      acc[i & 7] += static_cast<double>(x);
      tail.count(x);
    }
    seen += n;
    return lane_tree(acc);
  }

  __attribute__((target("avx2"))) void finish(SignCounts& c) const {
    add_counts(c, seen, tail.helped + horizontal(helped), tail.hurt + horizontal(hurt),
               tail.zero + horizontal(zeros));
  }

 private:
  __attribute__((target("avx2"))) static int64_t horizontal(__m256i v) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
    int64_t s = 0;
    for (int j = 0; j < 8; ++j) s += lanes[j];
    return s;
  }

  __m256i helped, hurt, zeros;
  LcaBlocks<float, float, double> tail;
  int64_t seen = 0;
};

// LCA_EXT_DISABLE_AVX2=1 forces the SSE2 path (the tests compare the two).
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const char* off = std::getenv("LCA_EXT_DISABLE_AVX2");
    return __builtin_cpu_supports("avx2") && !(off && off[0] == '1');
  }();
  return has;
}
#endif

// Which inner loop float32 inputs use on this machine: "avx2", "sse2" or "portable".
inline const char* float_kernel_path() {
#ifdef LCA_EXT_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return "avx2";
#endif
#if defined(__SSE2__)
  return "sse2";
#else
  return "portable";
#endif
}

}  // namespace cpu
}  // namespace lca_ext
