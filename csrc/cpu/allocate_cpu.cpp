// The fused LCA pass on the CPU: allocate and allocate_classes.
//
// One parallel pass over the chunk table.  For each chunk, tile by tile:
//   stage 1 (typed on the input dtypes)  lca = (after - before) * grad into an L1 tile
//   stage 2 (typed on the tile's float)   sums, sign counts, row sums, histogram,
//                                         per-parameter state, raw LCA out
// Each chunk writes its own partials; a short serial cleanup adds them in chunk
// order, so every output is bit-identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>

#include "../chunk_plan.h"
#include "../validate.h"
#include "dispatch.h"
#include "tile.h"

namespace lca_ext {
namespace cpu {
namespace {

// A row (neuron) that a chunk covers only in part: added up in the cleanup.
struct RowPartial {
  int64_t row = -1;  // global row index, -1: none
  double sum = 0;
};

struct ChunkResult {
  double sum = 0;
  SignCounts counts;
  RowPartial head, tail;
};

// Follows the current row while tiles of one chunk stream by.  Rows wholly
// inside the chunk are written straight to the output (no other chunk touches
// them); the first and last row, when they reach outside, become partials.
struct RowTracker {
  int64_t row_len, chunk_begin, chunk_end, row_offset;
  double* out;
  ChunkResult* res;
  int64_t cur = -1;
  double cur_sum = 0;

  void add(int64_t row, double s) {
    if (row != cur) {
      flush();
      cur = row;
      cur_sum = 0;
    }
    cur_sum += s;
  }
  void flush() {
    if (cur < 0) return;
    const int64_t rs = cur * row_len, re = rs + row_len;
    if (rs >= chunk_begin && re <= chunk_end) {
      out[row_offset + cur] = cur_sum;
    } else if (rs < chunk_begin) {
      res->head = RowPartial{row_offset + cur, cur_sum};
    } else {
      res->tail = RowPartial{row_offset + cur, cur_sum};
    }
    cur = -1;
  }
};

// Everything the kernel needs about tensor k, as raw pointers.
struct TensorView {
  const void* before;
  const void* after;
  const void* grad;
  c10::ScalarType param_t, grad_t;
  int64_t row_len, row_offset;
  void* cum;  // nullptr: not requested
  c10::ScalarType cum_t;
  int32_t* helped_steps;
  void* lca_out;
  c10::ScalarType out_t;
};


template <typename T, typename S>
inline void add_into(S* __restrict dst, const T* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<S>(v[i]);
}
template <typename T, typename S>
inline void copy_into(S* __restrict dst, const T* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(v[i]);
}
template <typename T>
inline void count_helped(int32_t* __restrict dst, const T* __restrict v,
                         int64_t n) {
  const T big = std::numeric_limits<T>::max();
  for (int64_t i = 0; i < n; ++i)
    dst[i] += static_cast<int32_t>((std::abs(v[i]) <= big) & (v[i] < T(0)));
}

// Histogram slots: 0 below edges[0], j+1 for [edges[j], edges[j+1]) (the last
// bin closed on the right, as numpy does), B+1 above edges[B]; non-finite skipped.
//
// The slot is upper_bound(edges, x), found through a 4096-entry table indexed by
// the top 12 bits (sign + exponent) of x's order-preserving integer image: the
// table gives the number of edges in lower buckets, then a short scan over the
// edges inside x's bucket (one binade) finishes.  For log-spaced edges a bucket
// holds at most an edge or two; edges denser than kMaxScan per binade fall back
// to binary search.
class BinFinder {
 public:
  explicit BinFinder(const std::vector<double>& edges) : n_(static_cast<int64_t>(edges.size())) {
    if (edges.empty()) return;
    edges_ = edges;
    for (double& e : edges_) e += 0.0;  // -0.0 -> +0.0: one key for zero
    last_ = edges_.back();
    std::vector<int32_t> per_bucket(kBuckets, 0);
    for (double e : edges_) ++per_bucket[key(e)];
    start_.assign(kBuckets, 0);
    int32_t below = 0;
    for (int k = 0; k < kBuckets; ++k) {
      start_[k] = below;
      below += per_bucket[k];
      max_scan_ = std::max(max_scan_, per_bucket[k]);
    }
    use_table_ = max_scan_ <= kMaxScan;
    // +inf sentinels: the fixed-length scan below may look past the last edge
    edges_.resize(edges_.size() + kMaxScan, std::numeric_limits<double>::infinity());
  }

  // The slot of a finite x: upper_bound(edges, x), except that x == last edge
  // belongs to the last bin.  Branch-free on the table path.
  inline int64_t slot(double x) const {
    int64_t s;
    if (use_table_) {
      x += 0.0;
      s = start_[key(x)];
      for (int r = 0; r < max_scan_; ++r) s += edges_[s] <= x;
    } else {
      s = std::upper_bound(edges_.begin(), edges_.begin() + n_, x) - edges_.begin();
    }
    return s - (x == last_);
  }
  int64_t num_slots() const { return n_ + 1; }

 private:
  static constexpr int kBuckets = 4096;
  static constexpr int kMaxScan = 8;
  static inline int key(double x) {
    uint64_t u;
    std::memcpy(&u, &x, sizeof(u));
    u = (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
    return static_cast<int>(u >> 52);
  }
  int64_t n_;
  double last_ = 0;
  std::vector<double> edges_;
  std::vector<int32_t> start_;
  int32_t max_scan_ = 0;
  bool use_table_ = false;
};

// Counts go to kHistWays interleaved copies of the histogram (element i to copy
// i % kHistWays), so runs of equal slots do not serialise on one counter.
constexpr int64_t kHistWays = 4;

template <typename T>
inline void histogram(const T* v, int64_t n, const BinFinder& bins,
                      int64_t* slots) {
  const int64_t stride = bins.num_slots();
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(v[i]);
    if (std::isfinite(x)) ++slots[(i & (kHistWays - 1)) * stride + bins.slot(x)];
  }
}

struct Options {
  bool row_sums;
  const BinFinder* bins;  // nullptr: no histogram
  double* row_out;
};


// State updates and histogram on one tile of n LCA values at flat index pos.
template <typename T>
void tile_extras(const T* v, int64_t n, int64_t pos, const TensorView& tv,
                 const Options& opt, int64_t* hist_slots) {
  if (hist_slots) histogram(v, n, *opt.bins, hist_slots);
  if (tv.cum) {
    if (tv.cum_t == c10::kDouble)
      add_into(static_cast<double*>(tv.cum) + pos, v, n);
    else
      add_into(static_cast<float*>(tv.cum) + pos, v, n);
  }
  if (tv.helped_steps) count_helped(tv.helped_steps + pos, v, n);
  if (tv.lca_out) {
    if (tv.out_t == c10::kDouble)
      copy_into(static_cast<double*>(tv.lca_out) + pos, v, n);
    else
      copy_into(static_cast<float*>(tv.lca_out) + pos, v, n);
  }
}

template <typename P, typename G, bool Extras,
          typename Blocks = LcaBlocks<P, G, typename MathType<P, G>::type>>
void allocate_chunk(const Chunk& ch, const TensorView& tv, const Options& opt,
                    ChunkResult& res, int64_t* hist_slots) {
  using T = typename MathType<P, G>::type;
  alignas(64) T lca[kTile];
  const P* before = static_cast<const P*>(tv.before);
  const P* after = static_cast<const P*>(tv.after);
  const G* grad = static_cast<const G*>(tv.grad);
  RowTracker rows{tv.row_len, ch.begin, ch.end, tv.row_offset, opt.row_out, &res};
  Blocks blocks;
  for (int64_t pos = ch.begin; pos < ch.end; pos += kTile) {
    const int64_t n = std::min(kTile, ch.end - pos);
    if (opt.row_sums) {
      // one block per row segment: each row's sum comes from its own lanes
      for (int64_t i = 0; i < n;) {
        const int64_t row = (pos + i) / tv.row_len;
        const int64_t seg_end = std::min(n, (row + 1) * tv.row_len - pos);
        const double s = blocks.template block<Extras>(
            before + pos + i, after + pos + i, grad + pos + i, seg_end - i, lca + i);
        res.sum += s;
        rows.add(row, s);
        i = seg_end;
      }
    } else {
      res.sum += blocks.template block<Extras>(before + pos, after + pos,
                                               grad + pos, n, lca);
    }
    if constexpr (Extras) tile_extras(lca, n, pos, tv, opt, hist_slots);
  }
  rows.flush();
  blocks.finish(res.counts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_cpu(
    at::TensorList before, at::TensorList after, at::TensorList avg_grad,
    const c10::optional<at::Tensor>& bin_edges, bool row_sums,
    at::TensorList cum_lca, at::TensorList helped_steps, at::TensorList lca_out,
    bool check_finite_values) {
  const std::vector<double> edges =
      check_allocate_op(before, after, avg_grad, bin_edges, cum_lca, helped_steps,
                        lca_out, check_finite_values);

  const AllocateViews v =
      dense_allocate_views(before, after, avg_grad, cum_lca, helped_steps, lca_out);
  const auto &b = v.b, &a = v.a, &g = v.g, &cum = v.cum, &helped = v.helped, &out = v.out;

  const int64_t K = static_cast<int64_t>(before.size());
  const std::vector<int64_t> nrows = rows_per_tensor(before);
  int64_t total_rows = 0;
  std::vector<TensorView> views(K);
  for (int64_t k = 0; k < K; ++k) {
    TensorView& tv = views[k];
    tv.before = b[k].const_data_ptr();
    tv.after = a[k].const_data_ptr();
    tv.grad = g[k].const_data_ptr();
    tv.param_t = b[k].scalar_type();
    tv.grad_t = g[k].scalar_type();
    tv.row_len = nrows[k] > 0 ? b[k].numel() / nrows[k] : 0;
    tv.row_offset = total_rows;
    total_rows += nrows[k];
    tv.cum = cum.empty() ? nullptr : cum[k].data_ptr();
    tv.cum_t = cum.empty() ? c10::kFloat : cum[k].scalar_type();
    tv.helped_steps = helped.empty() ? nullptr : helped[k].data_ptr<int32_t>();
    tv.lca_out = out.empty() ? nullptr : out[k].data_ptr();
    tv.out_t = out.empty() ? c10::kFloat : out[k].scalar_type();
  }

  const auto f64 = before[0].options().dtype(at::kDouble);
  const auto i64 = before[0].options().dtype(at::kLong);
  at::Tensor sums = at::zeros({K}, f64);
  at::Tensor counts = at::zeros({K, 4}, i64);
  at::Tensor rows_out = at::zeros({row_sums ? total_rows : 0}, f64);
  const int64_t nslots = edges.empty() ? 0 : static_cast<int64_t>(edges.size()) + 1;
  at::Tensor hist = at::zeros({K, nslots}, i64);

  const ChunkPlan plan = make_chunk_plan(numels(before));
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  std::vector<ChunkResult> results(nchunks);
  std::vector<int64_t> hist_partials(static_cast<size_t>(nchunks * kHistWays * nslots), 0);
  const BinFinder bins(edges);
  const Options opt{row_sums, edges.empty() ? nullptr : &bins,
                    row_sums ? rows_out.data_ptr<double>() : nullptr};

  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = plan.chunks[c];
      const TensorView& tv = views[ch.tensor];
      int64_t* slots =
          nslots ? hist_partials.data() + c * kHistWays * nslots : nullptr;
      // the LCA tile is written out only for the histogram and state outputs
      const bool extras = slots || tv.cum || tv.helped_steps || tv.lca_out;
      dispatch_float(tv.param_t, [&](auto ptag) {
        dispatch_float(tv.grad_t, [&](auto gtag) {
          using P = decltype(ptag);
          using G = decltype(gtag);
#ifdef LCA_EXT_HAVE_AVX2_PATH
          if constexpr (std::is_same_v<P, float> && std::is_same_v<G, float>) {
            if (cpu_has_avx2()) {
              if (extras)
                allocate_chunk<P, G, true, LcaBlocksAvx2>(ch, tv, opt, results[c], slots);
              else
                allocate_chunk<P, G, false, LcaBlocksAvx2>(ch, tv, opt, results[c], slots);
              return;
            }
          }
#endif
          if (extras)
            allocate_chunk<P, G, true>(ch, tv, opt, results[c], slots);
          else
            allocate_chunk<P, G, false>(ch, tv, opt, results[c], slots);
        });
      });
    }
  });

  // Cleanup, serial and in chunk order.
  double* sp = sums.data_ptr<double>();
  int64_t* cp = counts.data_ptr<int64_t>();
  double* rp = row_sums ? rows_out.data_ptr<double>() : nullptr;
  int64_t* hp = hist.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = plan.first_chunk[k]; c < plan.first_chunk[k + 1]; ++c) {
      const ChunkResult& r = results[c];
      sp[k] += r.sum;
      cp[4 * k + 0] += r.counts.helped;
      cp[4 * k + 1] += r.counts.hurt;
      cp[4 * k + 2] += r.counts.zero;
      cp[4 * k + 3] += r.counts.nonfinite;
      if (rp) {
        if (r.head.row >= 0) rp[r.head.row] += r.head.sum;
        if (r.tail.row >= 0) rp[r.tail.row] += r.tail.sum;
      }
      for (int64_t w = 0; w < kHistWays * nslots; ++w)
        hp[k * nslots + w % nslots] += hist_partials[c * kHistWays * nslots + w];
    }
  }
  v.write_back_state(cum_lca, helped_steps, lca_out);
  return {sums, counts, rows_out, hist};
}

// ---------------------------------------------------------------------------
// allocate_classes: class_grads[k] is [C, *before[k].shape]; before/after are
// read once per tile, each class's gradient once.

struct ClassChunkResult {
  double sum = 0;
  SignCounts counts;
};

template <typename P, typename G>
void allocate_classes_chunk(const Chunk& ch, const void* before_v,
                            const void* after_v, const void* grad_v,
                            int64_t numel, int64_t C, ClassChunkResult* res) {
  using T = typename MathType<P, G>::type;
  alignas(64) T lca[kTile];
  const P* before = static_cast<const P*>(before_v);
  const P* after = static_cast<const P*>(after_v);
  const G* grad = static_cast<const G*>(grad_v);
  // Tile by tile, all classes: the tile of before/after stays in L1 while the
  // classes' gradients stream past it, so main memory sees before/after once.
  std::vector<LcaBlocks<P, G, T>> blocks(static_cast<size_t>(C));
  for (int64_t pos = ch.begin; pos < ch.end; pos += kTile) {
    const int64_t n = std::min(kTile, ch.end - pos);
    for (int64_t c = 0; c < C; ++c) {
      res[c].sum += blocks[c].template block<false>(before + pos, after + pos,
                                                    grad + c * numel + pos, n, lca);
    }
  }
  for (int64_t c = 0; c < C; ++c) blocks[c].finish(res[c].counts);
}

std::tuple<at::Tensor, at::Tensor> allocate_classes_cpu(
    at::TensorList before, at::TensorList after, at::TensorList class_grads,
    bool check_finite_values) {
  const int64_t C =
      check_allocate_classes_op(before, after, class_grads, check_finite_values);

  const auto b = contiguous_all(before);
  const auto a = contiguous_all(after);
  const auto g = contiguous_all(class_grads);
  const int64_t K = static_cast<int64_t>(before.size());
  const ChunkPlan plan = make_chunk_plan(numels(before));
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  std::vector<ClassChunkResult> results(static_cast<size_t>(nchunks * C));

  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = plan.chunks[c];
      const int64_t k = ch.tensor;
      dispatch_float(b[k].scalar_type(), [&](auto ptag) {
        dispatch_float(g[k].scalar_type(), [&](auto gtag) {
          allocate_classes_chunk<decltype(ptag), decltype(gtag)>(
              ch, b[k].const_data_ptr(), a[k].const_data_ptr(),
              g[k].const_data_ptr(), b[k].numel(), C, results.data() + c * C);
        });
      });
    }
  });

  const auto opts = before[0].options();
  at::Tensor sums = at::zeros({C, K}, opts.dtype(at::kDouble));
  at::Tensor counts = at::zeros({C, K, 4}, opts.dtype(at::kLong));
  double* sp = sums.data_ptr<double>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = plan.first_chunk[k]; c < plan.first_chunk[k + 1]; ++c) {
      for (int64_t j = 0; j < C; ++j) {
        const ClassChunkResult& r = results[c * C + j];
        sp[j * K + k] += r.sum;
        int64_t* q = cp + (j * K + k) * 4;
        q[0] += r.counts.helped;
        q[1] += r.counts.hurt;
        q[2] += r.counts.zero;
        q[3] += r.counts.nonfinite;
      }
    }
  }
  return {sums, counts};
}

}  // namespace
}  // namespace cpu
}  // namespace lca_ext

TORCH_LIBRARY_IMPL(lca_ext, CPU, m) {
  m.impl("allocate", &lca_ext::cpu::allocate_cpu);
  m.impl("allocate_classes", &lca_ext::cpu::allocate_classes_cpu);
}
