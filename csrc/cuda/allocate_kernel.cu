// allocate and allocate_classes on the GPU: the whole tensor list in one launch
// over the chunk table (one block per chunk), then a small cleanup kernel that
// adds the chunks' partial results in chunk order.  See launch_plan.h for the
// partial layout and why every result is bit-identical from run to run.
#include <climits>

#include "device_common.cuh"

namespace lca_ext {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------
// allocate

// Where one block counts its histogram: shared memory (added to the output at
// the end of the block) or, for very many slots, the output itself.  Either
// way only integer atomics, whose result does not depend on their order.
struct BlockHistogram {
  const double* edges;
  int64_t num_edges;           // 0: no histogram
  unsigned int* shared;        // [num_edges + 1] or nullptr
  unsigned long long* global;  // this tensor's row of the output

  __device__ __forceinline__ void add(double x) const {
    const int64_t s = histogram_slot(edges, num_edges, x);
    if (shared) {
      atomicAdd(shared + s, 1u);
    } else {
      atomicAdd(global + s, 1ull);
    }
  }
};

// Histogram and per-parameter state for one element (flat index p) of value x.
template <typename T>
__device__ __forceinline__ void element_extras(const AllocateTensor& t,
                                               const BlockHistogram& hist,
                                               int64_t p, T x) {
  if (hist.num_edges > 0 && ::isfinite(x)) hist.add(static_cast<double>(x));
  if (t.cum_lca) {
    // lca is rounded to the state's dtype first, then added (as the reference)
    if (t.cum_t == kF64) {
      double* c = static_cast<double*>(t.cum_lca) + p;
      *c = __dadd_rn(*c, static_cast<double>(x));
    } else {
      float* c = static_cast<float*>(t.cum_lca) + p;
      *c = __fadd_rn(*c, static_cast<float>(x));
    }
  }
  if (t.helped_steps) t.helped_steps[p] += is_helped(x) ? 1 : 0;
  if (t.lca_out) {
    if (t.out_t == kF64) {
      static_cast<double*>(t.lca_out)[p] = static_cast<double>(x);
    } else {
      static_cast<float*>(t.lca_out)[p] = static_cast<float>(x);
    }
  }
}

// Row sums of one warp's slice [lo, hi), walked in windows of 32 consecutive
// elements (lane l holds element win + l).  The warp carries the sum of the
// row it is in (the "carry row") from window to window:
//   - a window that lies wholly inside the carry row (the common case for
//     long rows) only adds each lane's value to that lane's lane_acc;
//   - a window that crosses row boundaries folds lane_acc into the carry sum
//     (fixed butterfly), runs a segmented scan over the window keyed by row,
//     finishes the carry row and every row that ends inside the window, and
//     makes the row of its last element the new carry row.
// A finished row is stored directly when it lies wholly in the slice;
// otherwise it becomes the warp's head or tail partial (row_fate), which the
// block combines warp by warp.  Control flow depends only on the row layout,
// never on values, and all carry state is uniform across the warp.
struct WarpRows {
  int64_t row_len, lo, hi;
  double* out;        // this tensor's row sums
  RowPartial* head;   // this warp's slots in shared memory
  RowPartial* tail;
  uint32_t rl32;      // min(row_len, 32): enough to find rows 32 elements ahead
  long long carry_row;
  int64_t carry_end;  // one past the carry row's last element
  double carry_sum;   // the carry row's sum over windows with boundaries
  double lane_acc;    // per lane: carry-row elements of boundary-free windows
  bool pending;       // lane_acc holds values not yet folded into carry_sum

  __device__ __forceinline__ void begin(int64_t row_len_, int64_t lo_, int64_t hi_,
                                        double* out_, RowPartial* head_,
                                        RowPartial* tail_) {
    row_len = row_len_;
    lo = lo_;
    hi = hi_;
    out = out_;
    head = head_;
    tail = tail_;
    rl32 = row_len < kWarpSize ? static_cast<uint32_t>(row_len) : uint32_t(kWarpSize);
    carry_row = lo / row_len;
    carry_end = (carry_row + 1) * row_len;
    carry_sum = 0.0;
    lane_acc = 0.0;
    pending = false;
  }

  __device__ __forceinline__ void flush(long long row, double s) const {
    switch (row_fate(row, row_len, lo, hi)) {
      case kRowOwned: out[row] = s; break;
      case kRowHead: *head = RowPartial{static_cast<int64_t>(row), s}; break;
      default: *tail = RowPartial{static_cast<int64_t>(row), s}; break;
    }
  }

  // Must be reached by all 32 lanes (uniform control flow).
  __device__ __forceinline__ void fold() {
    if (pending) {
      carry_sum += warp_sum(lane_acc);
      lane_acc = 0.0;
      pending = false;
    }
  }

  // One window starting at win (< hi); x: this lane's value (ignored past hi).
  // Invariant on entry: carry_row is the row of element win - 1 (or of lo for
  // the first window), so carry_end >= win and every element of the window is
  // less than 32 elements past carry_end.
  __device__ __forceinline__ void window(int64_t win, int lane, double x) {
    const int64_t last = win + (kWarpSize - 1) < hi ? win + (kWarpSize - 1) : hi - 1;
    const int lv = static_cast<int>(last - win);  // last valid lane
    const bool valid = lane <= lv;
    if (!valid) x = 0.0;
    if (last < carry_end) {  // no row boundary in this window
      lane_acc += x;
      pending = true;
      return;
    }
    fold();
    // this lane's row: the carry row, or a later one (d < 32 past carry_end)
    const int64_t d = win + lane - carry_end;
    long long key = d < 0 ? carry_row
                          : carry_row + 1 + static_cast<long long>(static_cast<uint32_t>(d) / rl32);
    if (!valid) key = LLONG_MAX;  // lanes past hi: a segment of their own
    // segmented inclusive scan (rows are contiguous, so equal keys at distance
    // `off` mean the whole span is one row)
    double s = x;
#pragma unroll
    for (int off = 1; off < kWarpSize; off <<= 1) {
      const double up = __shfl_up_sync(kFullMask, s, off);
      const long long kup = __shfl_up_sync(kFullMask, key, off);
      if (lane >= off && kup == key) s += up;
    }
    const long long next = __shfl_down_sync(kFullMask, key, 1);
    const bool seg_end = valid && (lane == lv || next != key);
    // the carry row ended before this window: it is complete
    const long long key0 = __shfl_sync(kFullMask, key, 0);
    if (key0 != carry_row) {
      if (lane == 0) flush(carry_row, carry_sum);
      carry_row = key0;
      carry_sum = 0.0;
    }
    const double total = key == carry_row ? carry_sum + s : s;
    // rows ending inside the window are complete; the last valid lane's row
    // may go on in the next window, so it becomes the carry row
    if (seg_end && lane != lv) flush(key, total);
    carry_row = __shfl_sync(kFullMask, key, lv);
    carry_sum = __shfl_sync(kFullMask, total, lv);
    carry_end = (carry_row + 1) * row_len;
  }

  // One full vector group starting at g (g + 128 <= hi): lane l holds
  // elements g + kVec*l + r in x[r].  A group wholly inside the carry row only
  // adds each lane's values to lane_acc; otherwise the group is regrouped into
  // kUnroll windows (lane l of window j gets element g + 32j + l, held by lane
  // (32j + l) / kVec) and walked window by window.  Uniform control flow.
  template <typename T>
  __device__ __forceinline__ void group(int64_t g, int lane, const T (&x)[kVec]) {
    if (g + (kVec * kWarpSize - 1) < carry_end) {
#pragma unroll
      for (int r = 0; r < kVec; ++r) lane_acc += static_cast<double>(x[r]);
      pending = true;
      return;
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int src = j * (kWarpSize / kVec) + lane / kVec;
      double xw = 0.0;
#pragma unroll
      for (int r = 0; r < kVec; ++r) {
        const double v = __shfl_sync(kFullMask, static_cast<double>(x[r]), src);
        if (lane % kVec == r) xw = v;
      }
      window(g + j * kWarpSize, lane, xw);
    }
  }

  // After the last window: the carry row is done with this slice.
  __device__ __forceinline__ void finish(int lane) {
    fold();
    if (lane == 0) flush(carry_row, carry_sum);
  }
};

// One warp's slice of the chunk, in groups of 128 elements: loads a group
// (vector loads where the tensor allows them, else kUnroll scalar windows),
// then per element the LCA value, its float64 sum (per lane, in order), sign
// counts, histogram and state; with kRows the values then go through WarpRows.
template <typename P, typename G, bool kRows>
__device__ __forceinline__ void allocate_slice(const AllocateTensor& t, const Chunk& ch,
                                               const BlockHistogram& hist,
                                               double* rows_out, RowPartial* s_head,
                                               RowPartial* s_tail, double* sum_out,
                                               SignCounts* counts_out) {
  using T = typename MathType<P, G>::type;
  const P* __restrict__ before = static_cast<const P*>(t.before);
  const P* __restrict__ after = static_cast<const P*>(t.after);
  const G* __restrict__ grad = static_cast<const G*>(t.grad);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  int64_t lo, hi;
  warp_slice(ch, warp, &lo, &hi);

  double sum = 0.0;
  SignCounts counts;
  WarpRows rows;
  if (kRows && lo < hi) rows.begin(t.row_len, lo, hi, rows_out, s_head + warp, s_tail + warp);

  for (int64_t g = lo; g < hi; g += kWarpSize * kUnroll) {
    // Full groups of 16- and 32-bit inputs: lane l takes elements g + kVec*l + r,
    // with vector loads when the tensor is aligned and element loads when not,
    // so the order of every float64 sum is the same either way (it depends on
    // the sizes and dtypes alone, never on alignment).  float64 inputs keep
    // the window layout below: their group layout needs more than the 64
    // registers two blocks per SM allow (ptxas spills).
    constexpr bool kGroupLayout = sizeof(P) <= 4 && sizeof(G) <= 4;
    if (kGroupLayout && g + kWarpSize * kUnroll <= hi) {  // uniform across the warp
      const int64_t p0 = g + kVec * lane;
      T x[kVec];
      if (t.vector) {
        P bv[kVec], av[kVec];
        G gv[kVec];
        if constexpr (kGroupLayout) {  // (never instantiated for float64)
          load_vec(before + p0, bv);
          load_vec(after + p0, av);
          load_vec(grad + p0, gv);
        }
#pragma unroll
        for (int r = 0; r < kVec; ++r) x[r] = lca_value<T>(bv[r], av[r], gv[r]);
      } else {
#pragma unroll
        for (int r = 0; r < kVec; ++r) {
          x[r] = lca_value<T>(before[p0 + r], after[p0 + r], grad[p0 + r]);
        }
      }
#pragma unroll
      for (int r = 0; r < kVec; ++r) {
        sum += static_cast<double>(x[r]);
        count_sign(x[r], counts);
        element_extras(t, hist, p0 + r, x[r]);
      }
      if constexpr (kRows) rows.group(g, lane, x);
      continue;
    }
    // float64 inputs, and the slice's last partial group: windows of 32 (lane
    // l takes element g + 32j + l), all loads of the group first (the state
    // stores below might alias them as far as the compiler knows), then the
    // arithmetic
    P bv[kUnroll], av[kUnroll];
    G gv[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t p = g + j * kWarpSize + lane;
      if (p < hi) {
        bv[j] = before[p];
        av[j] = after[p];
        gv[j] = grad[p];
      }
    }
    T x[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t p = g + j * kWarpSize + lane;
      x[j] = T(0);
      if (p < hi) {
        x[j] = lca_value<T>(bv[j], av[j], gv[j]);
        sum += static_cast<double>(x[j]);
        count_sign(x[j], counts);
        element_extras(t, hist, p, x[j]);
      }
    }
    if constexpr (kRows) {
#pragma unroll
      for (int j = 0; j < kUnroll; ++j) {
        const int64_t win = g + j * kWarpSize;
        if (win < hi) rows.window(win, lane, static_cast<double>(x[j]));  // uniform
      }
    }
  }
  if constexpr (kRows) {
    if (lo < hi) rows.finish(lane);
  }
  *sum_out = sum;
  *counts_out = counts;
}

// Without row sums the kernel fits in 64 registers without spilling, so two
// blocks share an SM; the row walk needs more registers (one block per SM).
template <bool kRows>
__global__ void __launch_bounds__(kBlockThreads, kRows ? 1 : 2)
allocate_kernel(const AllocateArgs args) {
  LCA_DYNAMIC_SHARED(double, s_dyn);  // SharedLayout: [edges] [histogram slots]
  __shared__ RowPartial s_head[kWarps], s_tail[kWarps];
  __shared__ double s_sum[kWarps];
  __shared__ int32_t s_counts[kWarps][3];

  const Chunk ch = args.chunks[blockIdx.x];
  const AllocateTensor t = args.tensors[ch.tensor];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  const int64_t nslots = args.num_edges > 0 ? args.num_edges + 1 : 0;
  const SharedLayout layout = shared_layout(args.num_edges);
  const bool shared_hist = layout.hist;
  unsigned int* s_hist =
      reinterpret_cast<unsigned int*>(reinterpret_cast<unsigned char*>(s_dyn) + layout.hist_offset);
  if (shared_hist) {
    for (int64_t s = threadIdx.x; s < nslots; s += kBlockThreads) s_hist[s] = 0u;
  }
  if (layout.edges) {
    for (int64_t e = threadIdx.x; e < args.num_edges; e += kBlockThreads) s_dyn[e] = args.edges[e];
  }
  if (threadIdx.x < kWarps) {
    s_head[threadIdx.x] = RowPartial{-1, 0.0};
    s_tail[threadIdx.x] = RowPartial{-1, 0.0};
  }
  __syncthreads();

  unsigned long long* hist_out =
      nslots > 0 ? reinterpret_cast<unsigned long long*>(args.histogram) + ch.tensor * nslots
                 : nullptr;
  const BlockHistogram hist{layout.edges ? s_dyn : args.edges, args.num_edges,
                            shared_hist ? s_hist : nullptr, hist_out};
  double* rows_out = args.row_sums ? args.row_sums + t.row_offset : nullptr;

  double sum = 0.0;
  SignCounts counts;
  dispatch_float(t.param_t, [&](auto ptag) {
    dispatch_float(t.grad_t, [&](auto gtag) {
      using P = typename decltype(ptag)::type;
      using G = typename decltype(gtag)::type;
      allocate_slice<P, G, kRows>(t, ch, hist, rows_out, s_head, s_tail, &sum, &counts);
    });
  });

  // block totals: lanes by butterfly, then warps in warp order (thread 0)
  sum = warp_sum(sum);
  const int32_t helped = warp_sum(counts.helped);
  const int32_t hurt = warp_sum(counts.hurt);
  const int32_t zero = warp_sum(counts.zero);
  if (lane == 0) {
    s_sum[warp] = sum;
    s_counts[warp][0] = helped;
    s_counts[warp][1] = hurt;
    s_counts[warp][2] = zero;
  }
  __syncthreads();  // also: every warp's rows and histogram counts are done

  if (threadIdx.x == 0) {
    ChunkPartial part;
    part.sum = 0.0;
    int64_t c[3] = {0, 0, 0};
    for (int w = 0; w < kWarps; ++w) {
      part.sum += s_sum[w];
      for (int q = 0; q < 3; ++q) c[q] += s_counts[w][q];
    }
    part.counts[0] = c[0];
    part.counts[1] = c[1];
    part.counts[2] = c[2];
    part.counts[3] = (ch.end - ch.begin) - (c[0] + c[1] + c[2]);
    RowCombiner rows(t.row_len, ch.begin, ch.end, rows_out);
    if (kRows) {
      for (int w = 0; w < kWarps; ++w) {
        if (s_head[w].row >= 0) rows.add(s_head[w].row, s_head[w].sum);
        if (s_tail[w].row >= 0) rows.add(s_tail[w].row, s_tail[w].sum);
      }
      rows.flush();
    }
    part.head = rows.head;
    part.tail = rows.tail;
    args.partials[blockIdx.x] = part;
  }
  if (shared_hist) {
    for (int64_t s = threadIdx.x; s < nslots; s += kBlockThreads) {
      const unsigned int n = s_hist[s];
      if (n) atomicAdd(hist_out + s, static_cast<unsigned long long>(n));
    }
  }
}

// One thread per tensor: its chunks' partials in chunk order.
__global__ void allocate_cleanup_kernel(const AllocateArgs args) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= args.num_tensors) return;
  double* rows = args.row_sums ? args.row_sums + args.tensors[k].row_offset : nullptr;
  combine_chunks(args.partials, args.first_chunk[k], args.first_chunk[k + 1],
                 args.sums + k, args.counts + 4 * k, rows);
}

// ---------------------------------------------------------------------------
// allocate_classes

// Threads stride over the chunk; per element, before/after are read once and
// the delta reused for the block's (up to kClassGroup) classes.  16- and
// 32-bit inputs go kVec consecutive elements per thread (vector loads when
// ClassTensor::vector, element loads otherwise: the same order of the sums
// either way), then the chunk's tail element by element; float64 inputs go
// element by element throughout.
template <typename P, typename G>
__device__ __forceinline__ void classes_chunk(const ClassTensor& t, const Chunk& ch,
                                              int64_t c0, int ng, double* sums,
                                              SignCounts* counts) {
  using T = typename MathType<P, G>::type;
  const P* __restrict__ before = static_cast<const P*>(t.before);
  const P* __restrict__ after = static_cast<const P*>(t.after);
  const G* __restrict__ grads = static_cast<const G*>(t.grads) + c0 * t.numel;
  int64_t tail = ch.begin;
  if constexpr (sizeof(P) <= 4 && sizeof(G) <= 4) {
    const int64_t nvec = (ch.end - ch.begin) / kVec;
    for (int64_t v = threadIdx.x; v < nvec; v += kBlockThreads) {
      const int64_t p = ch.begin + v * kVec;
      T d[kVec];
      P bv[kVec], av[kVec];
      if (t.vector) {
        load_vec(before + p, bv);
        load_vec(after + p, av);
      } else {
#pragma unroll
        for (int r = 0; r < kVec; ++r) {
          bv[r] = before[p + r];
          av[r] = after[p + r];
        }
      }
#pragma unroll
      for (int r = 0; r < kVec; ++r) d[r] = Arith<T>::sub(to_math<T>(av[r]), to_math<T>(bv[r]));
#pragma unroll
      for (int j = 0; j < kClassGroup; ++j) {
        if (j < ng) {
          G gv[kVec];
          if (t.vector) {
            load_vec(grads + j * t.numel + p, gv);
          } else {
#pragma unroll
            for (int r = 0; r < kVec; ++r) gv[r] = grads[j * t.numel + p + r];
          }
#pragma unroll
          for (int r = 0; r < kVec; ++r) {
            const T x = Arith<T>::mul(d[r], to_math<T>(gv[r]));
            sums[j] += static_cast<double>(x);
            count_sign(x, counts[j]);
          }
        }
      }
    }
    tail = ch.begin + nvec * kVec;
  }
  for (int64_t p = tail + threadIdx.x; p < ch.end; p += kBlockThreads) {
    const T d = Arith<T>::sub(to_math<T>(after[p]), to_math<T>(before[p]));
#pragma unroll
    for (int j = 0; j < kClassGroup; ++j) {
      if (j < ng) {
        const T x = Arith<T>::mul(d, to_math<T>(grads[j * t.numel + p]));
        sums[j] += static_cast<double>(x);
        count_sign(x, counts[j]);
      }
    }
  }
}

__global__ void __launch_bounds__(kBlockThreads)
allocate_classes_kernel(const AllocateClassesArgs args) {
  __shared__ double s_sum[kWarps][kClassGroup];
  __shared__ int32_t s_counts[kWarps][kClassGroup][3];

  const Chunk ch = args.chunks[blockIdx.x];
  const ClassTensor t = args.tensors[ch.tensor];
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kClassGroup;
  const int64_t left = args.num_classes - c0;
  const int ng = left < kClassGroup ? static_cast<int>(left) : kClassGroup;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  double sums[kClassGroup];
  SignCounts counts[kClassGroup];
#pragma unroll
  for (int j = 0; j < kClassGroup; ++j) sums[j] = 0.0;
  dispatch_float(t.param_t, [&](auto ptag) {
    dispatch_float(t.grad_t, [&](auto gtag) {
      using P = typename decltype(ptag)::type;
      using G = typename decltype(gtag)::type;
      classes_chunk<P, G>(t, ch, c0, ng, sums, counts);
    });
  });

#pragma unroll
  for (int j = 0; j < kClassGroup; ++j) {
    const double s = warp_sum(sums[j]);
    const int32_t h = warp_sum(counts[j].helped);
    const int32_t u = warp_sum(counts[j].hurt);
    const int32_t z = warp_sum(counts[j].zero);
    if (lane == 0) {
      s_sum[warp][j] = s;
      s_counts[warp][j][0] = h;
      s_counts[warp][j][1] = u;
      s_counts[warp][j][2] = z;
    }
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < ng) {
    const int j = static_cast<int>(threadIdx.x);
    ClassPartial part;
    part.sum = 0.0;
    int64_t c[3] = {0, 0, 0};
    for (int w = 0; w < kWarps; ++w) {
      part.sum += s_sum[w][j];
      for (int q = 0; q < 3; ++q) c[q] += s_counts[w][j][q];
    }
    part.counts[0] = c[0];
    part.counts[1] = c[1];
    part.counts[2] = c[2];
    part.counts[3] = (ch.end - ch.begin) - (c[0] + c[1] + c[2]);
    args.partials[static_cast<int64_t>(blockIdx.x) * args.num_classes + c0 + j] = part;
  }
}

// One thread per (class, tensor): that tensor's chunks in chunk order.
__global__ void allocate_classes_cleanup_kernel(const AllocateClassesArgs args) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = args.num_tensors;
  if (i >= args.num_classes * K) return;
  const int64_t c = i / K, k = i % K;
  combine_class_chunks(args.partials, args.first_chunk[k], args.first_chunk[k + 1],
                       args.num_classes, c, args.sums + c * K + k,
                       args.counts + (c * K + k) * 4);
}

unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace

void launch_allocate(const AllocateArgs& args, cudaStream_t stream) {
  const size_t shmem = shared_layout(args.num_edges).bytes;  // <= 40 KiB
  // gridDim.x allows 2^31 - 1 blocks: 64Ki-element chunks cover 2^47 elements.
  const unsigned grid = static_cast<unsigned>(args.num_chunks);
  if (args.row_sums) {
    LCA_LAUNCH(allocate_kernel<true>, grid, kBlockThreads, shmem, stream, args);
  } else {
    LCA_LAUNCH(allocate_kernel<false>, grid, kBlockThreads, shmem, stream, args);
  }
  LCA_LAUNCH(allocate_cleanup_kernel, blocks_for(args.num_tensors, kCleanupThreads),
             kCleanupThreads, 0, stream, args);
}

void launch_allocate_classes(const AllocateClassesArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.num_chunks),
                  static_cast<unsigned>((args.num_classes + kClassGroup - 1) / kClassGroup));
  LCA_LAUNCH(allocate_classes_kernel, grid, kBlockThreads, 0, stream, args);
  LCA_LAUNCH(allocate_classes_cleanup_kernel,
             blocks_for(args.num_classes * args.num_tensors, kCleanupThreads),
             kCleanupThreads, 0, stream, args);
}

}  // namespace cuda
}  // namespace lca_ext
