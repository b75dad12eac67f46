// Planning shared by the CUDA launchers (host) and kernels (device): launch
// shape, the per-chunk partial results and how they are combined.  Plain C++
// with no torch or CUDA headers, so it can be read (and compiled into a host
// test, tests/test_cuda_plan.py) on its own.
//
// Determinism.  Every float64 sum is formed in an order fixed by the tensor
// sizes alone: a lane adds its own elements in order, a warp combines lanes in
// a fixed shuffle tree, a block combines warps in warp order, and the cleanup
// kernel adds the per-chunk partials of a tensor in chunk order.  No float
// atomics anywhere; integer counts may use atomics (integer addition is exact,
// so its order does not matter).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../chunk_plan.h"

#if defined(__CUDACC__)
#define LCA_HD __host__ __device__ __forceinline__
#else
#define LCA_HD inline
#endif

namespace lca_ext {
namespace cuda {

// One block per chunk.  512 threads = 16 warps: each warp walks its own
// contiguous slice of the chunk (4096 elements of a full chunk), so a block
// keeps enough loads in flight even when there are few chunks per SM.
constexpr int kBlockThreads = 512;
constexpr int kWarpSize = 32;
constexpr int kWarps = kBlockThreads / kWarpSize;
// Windows of 32 elements that one warp loads before it reduces them (ILP).
constexpr int kUnroll = 4;
// Group layout of 16- and 32-bit inputs: a warp's group of kUnroll windows
// (128 elements) is kVec consecutive elements per lane, loaded at once where
// the tensor is aligned (fp32: one 128-bit load, fp16/bf16: one 64-bit load)
// and element by element where not; the row walk regroups it into windows
// with shuffles (WarpRows::group).  float64 inputs use the window layout.
constexpr int kVec = 4;
static_assert(kVec == kUnroll, "a vector group is the same elements as kUnroll windows");
static_assert(kWarpSize % kVec == 0 && kChunkSize % kVec == 0, "groups start kVec-aligned");
// allocate_classes: classes one block handles together (their float64 sums and
// counts live in registers); blockIdx.y walks the groups.
constexpr int kClassGroup = 8;
// Histograms of at most this many slots are counted in shared memory (32 KiB)
// and added to the output once per block; larger ones count straight into the
// output with global integer atomics.
constexpr int64_t kMaxSharedSlots = 8192;
// Bin edges are copied to shared memory (8 KiB at most) when there are at most
// this many, so the per-element binary search reads shared, not global, memory.
constexpr int64_t kMaxSharedEdges = 1024;
static_assert(kMaxSharedEdges * 8 + kMaxSharedSlots * 4 <= 48 * 1024,
              "dynamic shared memory within the default 48 KiB per block");
// Threads per block of the small cleanup kernels.
constexpr int kCleanupThreads = 128;

static_assert(kBlockThreads % kWarpSize == 0, "whole warps");
// per-lane int32 counters: a lane sees at most kChunkSize / kWarpSize elements
static_assert(kChunkSize / kWarpSize < (int64_t(1) << 31), "int32 lane counts");

// The part of a row (rows of dim 0 of a tensor) that one block or warp summed,
// when that range did not cover the whole row.  `row` is the tensor-local row
// index (the cleanup adds the tensor's row offset); -1 means none.
struct RowPartial {
  int64_t row;
  double sum;
};

// What one block of allocate leaves for the cleanup kernel about its chunk.
// Each block writes its own entry in full, so the buffer needs no zeroing.
struct ChunkPartial {
  double sum;
  int64_t counts[4];  // helped, hurt, zero, nonfinite
  RowPartial head;    // the row that started before the chunk, if any
  RowPartial tail;    // the row that starts in the chunk and ends after it
};

// What one block of allocate_classes leaves per (chunk, class):
// entry [chunk * num_classes + class].
struct ClassPartial {
  double sum;
  int64_t counts[4];
};

// Warp w's slice [lo, hi) of a chunk: contiguous, a multiple of 32 elements
// long (except at the chunk's end), empty for trailing warps of a small chunk.
LCA_HD void warp_slice(const Chunk& ch, int w, int64_t* lo, int64_t* hi) {
  const int64_t n = ch.end - ch.begin;
  const int64_t per = ((n + kWarps - 1) / kWarps + kWarpSize - 1) / kWarpSize * kWarpSize;
  const int64_t a = ch.begin + w * per;
  const int64_t b = a + per;
  *lo = a < ch.end ? a : ch.end;
  *hi = b < ch.end ? b : ch.end;
}

// The alignment the vector path needs of a tensor's base pointer: kVec
// elements, at most 16 bytes.  Every group starts a multiple of 32 elements
// past the base (chunks start at multiples of kChunkSize, warp slices at
// multiples of 32 inside them, groups every 128 elements inside a slice), so
// an aligned base makes every group's loads aligned.
LCA_HD size_t vector_alignment(size_t elem_size) {
  return elem_size * kVec < 16 ? elem_size * kVec : 16;
}
LCA_HD bool vector_aligned(const void* p, size_t elem_size) {
  return reinterpret_cast<uintptr_t>(p) % vector_alignment(elem_size) == 0;
}

// The dynamic shared memory of one allocate block: [edges (double)] then
// [histogram slots (unsigned)], each present only when small enough.  The host
// sizes the launch with it and the kernel finds its arrays with it.
struct SharedLayout {
  bool edges;           // bin edges staged in shared memory
  bool hist;            // histogram counted in shared memory
  size_t hist_offset;   // bytes from the start to the slots
  size_t bytes;         // total dynamic shared memory
};

LCA_HD SharedLayout shared_layout(int64_t num_edges) {
  SharedLayout l{false, false, 0, 0};
  if (num_edges <= 0) return l;
  l.edges = num_edges <= kMaxSharedEdges;
  l.hist = num_edges + 1 <= kMaxSharedSlots;
  l.hist_offset = l.edges ? static_cast<size_t>(num_edges) * sizeof(double) : 0;
  l.bytes = l.hist_offset + (l.hist ? static_cast<size_t>(num_edges + 1) * sizeof(unsigned) : 0);
  return l;
}

// Where the sum of `row` goes once the range [lo, hi) that computed it is done
// with the row (the same rule as the CPU's RowTracker):
//   kRowOwned: the row lies wholly inside [lo, hi): nobody else touches it, so
//              the sum is final and is stored directly;
//   kRowHead:  the row started before lo (it may also end after hi);
//   kRowTail:  the row starts inside [lo, hi) and ends after hi.
// A range has at most one head and one tail row.
enum RowFate : int { kRowOwned = 0, kRowHead = 1, kRowTail = 2 };

LCA_HD int row_fate(int64_t row, int64_t row_len, int64_t lo, int64_t hi) {
  const int64_t rs = row * row_len;
  const int64_t re = rs + row_len;
  if (rs >= lo && re <= hi) return kRowOwned;
  return rs < lo ? kRowHead : kRowTail;
}

// Combines, in order, row pieces summed over consecutive sub-ranges of [lo, hi)
// (rows non-decreasing): equal consecutive rows are added up, and each row is
// then stored (owned) or kept as the range's head/tail partial.  A block uses it
// on its warps' head/tail partials, warp by warp.
struct RowCombiner {
  int64_t row_len, lo, hi;
  double* out;  // this tensor's row sums (tensor-local row index)
  int64_t cur;
  double cur_sum;
  RowPartial head, tail;

  LCA_HD RowCombiner(int64_t row_len_, int64_t lo_, int64_t hi_, double* out_)
      : row_len(row_len_), lo(lo_), hi(hi_), out(out_), cur(-1), cur_sum(0.0),
        head{-1, 0.0}, tail{-1, 0.0} {}

  LCA_HD void add(int64_t row, double s) {
    if (row != cur) {
      flush();
      cur = row;
      cur_sum = 0.0;
    }
    cur_sum += s;
  }
  LCA_HD void flush() {
    if (cur < 0) return;
    switch (row_fate(cur, row_len, lo, hi)) {
      case kRowOwned: out[cur] = cur_sum; break;
      case kRowHead: head = RowPartial{cur, cur_sum}; break;
      default: tail = RowPartial{cur, cur_sum}; break;
    }
    cur = -1;
  }
};

// The cleanup of allocate for one tensor: its chunks' partials, in chunk
// order.  rows (the tensor's row sums, or nullptr) already holds the rows that
// some block owned, and zeros for the rows only partials contribute to.
LCA_HD void combine_chunks(const ChunkPartial* parts, int64_t first, int64_t last,
                           double* sum, int64_t* counts, double* rows) {
  double s = 0.0;
  int64_t c[4] = {0, 0, 0, 0};
  for (int64_t i = first; i < last; ++i) {
    const ChunkPartial& p = parts[i];
    s += p.sum;
    for (int q = 0; q < 4; ++q) c[q] += p.counts[q];
    if (rows) {
      if (p.head.row >= 0) rows[p.head.row] += p.head.sum;
      if (p.tail.row >= 0) rows[p.tail.row] += p.tail.sum;
    }
  }
  *sum = s;
  for (int q = 0; q < 4; ++q) counts[q] = c[q];
}

// The cleanup of allocate_classes for (class c, one tensor): entries
// [chunk * num_classes + c] of that tensor's chunks, in chunk order.
LCA_HD void combine_class_chunks(const ClassPartial* parts, int64_t first,
                                 int64_t last, int64_t num_classes, int64_t c,
                                 double* sum, int64_t* counts) {
  double s = 0.0;
  int64_t n[4] = {0, 0, 0, 0};
  for (int64_t i = first; i < last; ++i) {
    const ClassPartial& p = parts[i * num_classes + c];
    s += p.sum;
    for (int q = 0; q < 4; ++q) n[q] += p.counts[q];
  }
  *sum = s;
  for (int q = 0; q < 4; ++q) counts[q] = n[q];
}

// Histogram slot of a finite x for edges e[0..n) (n >= 2, increasing):
// upper_bound(e, x), i.e. the number of edges <= x, except that x == e[n-1]
// goes to the last bin (closed on the right, as numpy.histogram).  Comparisons
// treat -0.0 and 0.0 as equal, as the CPU kernel's normalisation does.
LCA_HD int64_t histogram_slot(const double* e, int64_t n, double x) {
  int64_t lo = 0, len = n;
  while (len > 0) {
    const int64_t half = len >> 1;
    if (e[lo + half] <= x) {
      lo += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  return lo - (x == e[n - 1] ? 1 : 0);
}

// Host side: the small per-call tables (tensor descriptors, chunk table,
// first_chunk, bin edges) packed into one byte buffer, each array 16-byte
// aligned, so one pinned staging buffer and one copy bring them to the device.
class UploadBlob {
 public:
  template <typename T>
  size_t add(const T* data, size_t n) {
    const size_t off = (bytes_.size() + 15) / 16 * 16;
    bytes_.resize(off + n * sizeof(T));
    if (n) std::memcpy(bytes_.data() + off, data, n * sizeof(T));
    return off;
  }
  template <typename T>
  size_t add(const std::vector<T>& v) {
    return add(v.data(), v.size());
  }
  const std::vector<unsigned char>& bytes() const { return bytes_; }

 private:
  std::vector<unsigned char> bytes_;
};

}  // namespace cuda
}  // namespace lca_ext
