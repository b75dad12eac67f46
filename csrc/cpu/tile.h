// Small loops over an L1-resident tile that the CPU kernels compose.  Each loop
// is plain C++ written so gcc/clang vectorise it at -O3 (independent lanes, no
// reassociation needed), which keeps every result deterministic: the order of
// additions depends only on where a tile starts, never on the thread count.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

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

// out[i] = after[i] - before[i], in T.
template <typename P, typename T>
inline void load_delta(const P* __restrict before, const P* __restrict after,
                       int64_t n, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(after[i]) - static_cast<T>(before[i]);
}

// out[i] = delta[i] * grad[i], in T.
template <typename G, typename T>
inline void mul_grad(const T* __restrict delta, const G* __restrict grad,
                     int64_t n, T* __restrict out) {
  for (int64_t i = 0; i < n; ++i) out[i] = delta[i] * static_cast<T>(grad[i]);
}

// Sum in double with 8 independent lanes, combined in a fixed tree.
template <typename T>
inline double lane_sum(const T* __restrict v, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(v[i + j]);
  for (int j = 0; i < n; ++i, ++j) acc[j] += static_cast<double>(v[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) +
         ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// helped (< 0), hurt (> 0), zero (== 0) and non-finite counts of a tile.
// NaN and +-Inf count only as non-finite.
struct SignCounts {
  int64_t helped = 0, hurt = 0, zero = 0, nonfinite = 0;
};

template <typename T>
inline void count_signs(const T* __restrict v, int64_t n, SignCounts& c) {
  const T big = std::numeric_limits<T>::max();
  int32_t helped = 0, hurt = 0, zero = 0, finite = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T x = v[i];
    const int32_t fin = std::abs(x) <= big;  // false for NaN and Inf
    finite += fin;
    helped += fin & (x < T(0));
    hurt += fin & (x > T(0));
    zero += x == T(0);
  }
  c.helped += helped;
  c.hurt += hurt;
  c.zero += zero;
  c.nonfinite += n - finite;
}

}  // namespace cpu
}  // namespace lca_ext
