// The torch side of the CUDA ops, written once over a Backend: argument checks
// (shared with the CPU), dense views, the tensor and chunk tables packed and
// uploaded, the launch, the in-place results written back.  ops_cuda.cpp
// instantiates it with the CUDA backend (device guard, pinned upload, current
// stream); the tests instantiate it with the CPU emulator of the kernels
// (tests/cuda_emu), so this glue runs in every test run, GPU or not.
//
// A Backend provides:
//   Guard                          RAII device guard, constructed from at::Device
//   check_not_capturing(op)        refuses stream capture (CUDA graphs)
//   upload(bytes, device)          the bytes as a device tensor (kUInt8)
//   stream()                       the cudaStream_t to launch on
//   check_launch()                 raises if the launch failed
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../chunk_plan.h"
#include "../validate.h"
#include "kernels.h"
#include "launch_plan.h"

namespace lca_ext {
namespace cuda {

inline int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "lca_ext: unsupported dtype ", text(t));
  }
}

// The device address of the array that UploadBlob::add placed at `offset`.
template <typename T>
inline T* blob_at(const at::Tensor& blob, size_t offset) {
  return reinterpret_cast<T*>(static_cast<unsigned char*>(blob.data_ptr()) + offset);
}

// LCA_EXT_TABLE_CACHE=0 turns the table cache off (every call uploads), so a
// benchmark can measure what it brings side by side; read once per call.
inline bool table_cache_enabled() {
  const char* v = std::getenv("LCA_EXT_TABLE_CACHE");
  return v == nullptr || std::string(v) != "0";
}

// The device copies of the last few tables uploaded, so that a training loop
// that passes the same tensor lists every step uploads its tables once.  The
// key is the packed bytes themselves (every pointer, size, dtype, flag and the
// chunk plan) with the device and the stream: equal bytes are the same table,
// so a hit cannot be stale, even for a tensor freed and allocated again at the
// same address.  A table is reused only on the stream it was uploaded on, so
// every kernel that reads it is ordered after its copy, and freeing an evicted
// one (the caching allocator, on that stream) waits for them too.  (The key is
// the stream's handle: a user stream destroyed and another created with the
// same handle would find the old table, whose copy ran long before; PyTorch's
// own streams are pooled and never destroyed.)  Bounded:
// kEntries tables of at most kMaxTableBytes each (about 0.1 MB for 500 tensors
// of 100M parameters).  Never destroyed: its device tensors must not be freed
// after the CUDA runtime has shut down at exit.
class TableCache {
 public:
  static constexpr size_t kEntries = 8;
  static constexpr size_t kMaxTableBytes = size_t(8) << 20;

  static TableCache& instance() {
    static TableCache* cache = new TableCache();
    return *cache;
  }

  // The device table for `bytes`, from the cache or from `upload(bytes)`.
  template <class Upload>
  at::Tensor get(const std::vector<unsigned char>& bytes, const at::Device& device,
                 uintptr_t stream, Upload upload) {
    if (bytes.size() > kMaxTableBytes || !table_cache_enabled()) return upload(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->stream == stream && it->bytes.size() == bytes.size() &&
          std::memcmp(it->bytes.data(), bytes.data(), bytes.size()) == 0) {
        entries_.splice(entries_.begin(), entries_, it);  // most recent first
        return entries_.front().blob;
      }
    }
    at::Tensor blob = upload(bytes);
    entries_.push_front(Entry{device, stream, bytes, blob});
    if (entries_.size() > kEntries) entries_.pop_back();
    return blob;
  }

 private:
  struct Entry {
    at::Device device;
    uintptr_t stream;
    std::vector<unsigned char> bytes;
    at::Tensor blob;
  };
  std::mutex mu_;
  std::list<Entry> entries_;
};

// An op's small tables (per-tensor descriptors, the chunk table, each tensor's
// first chunk, the bin edges if any) packed into one buffer and uploaded in one
// copy, or found in the TableCache; the accessors give their device addresses.
template <class Backend, typename T>
struct UploadedTables {
  at::Tensor blob;
  size_t o_tensors, o_chunks, o_first, o_edges;
  bool has_edges;

  UploadedTables(const std::vector<T>& tensors, const ChunkPlan& plan, const at::Device& device,
                 const std::vector<double>& edges = {}) {
    UploadBlob packed;
    o_tensors = packed.add(tensors);
    o_chunks = packed.add(plan.chunks);
    o_first = packed.add(plan.first_chunk);
    o_edges = packed.add(edges);
    has_edges = !edges.empty();
    blob = TableCache::instance().get(
        packed.bytes(), device, reinterpret_cast<uintptr_t>(Backend::stream()),
        [&](const std::vector<unsigned char>& b) { return Backend::upload(b, device); });
  }
  const T* tensors() const { return blob_at<const T>(blob, o_tensors); }
  const Chunk* chunks() const { return blob_at<const Chunk>(blob, o_chunks); }
  const int64_t* first_chunk() const { return blob_at<const int64_t>(blob, o_first); }
  const double* edges() const { return has_edges ? blob_at<const double>(blob, o_edges) : nullptr; }
};

// Device scratch for n plain structs (the per-chunk partials); every kernel
// that reads an entry runs after the one that wrote it, on the same stream.
template <typename T>
inline at::Tensor scratch(int64_t n, const at::Device& device) {
  return at::empty({n * static_cast<int64_t>(sizeof(T))},
                   at::TensorOptions().dtype(at::kByte).device(device));
}

// LCA_EXT_CUDA_VECTOR=0 turns the vector loads off (scalar loads only), so a
// benchmark can measure what they bring side by side; read once per call (a
// getenv per tensor cost ~0.1 us each, 500 of them a call).
inline bool vector_loads_enabled() {
  const char* v = std::getenv("LCA_EXT_CUDA_VECTOR");
  return v == nullptr || std::string(v) != "0";
}

// n table entries with every byte 0, padding included (a vector's value
// initialisation may copy a temporary and leave the padding undefined), to be
// filled field by field: equal tables then have equal bytes, the TableCache's key.
template <typename T>
inline std::vector<T> zeroed_entries(size_t n) {
  std::vector<T> v(n);
  if (n) std::memset(static_cast<void*>(v.data()), 0, n * sizeof(T));
  return v;
}

inline void* data_or_null(const std::vector<at::Tensor>& list, size_t k) {
  return list.empty() ? nullptr : list[k].data_ptr();
}

template <class Backend>
void accumulate_impl(at::TensorList acc, at::TensorList grads, double weight) {
  check_accumulate_inputs(acc, grads, weight);

  const typename Backend::Guard guard(acc[0].device());
  Backend::check_not_capturing("accumulate_");
  const auto g = contiguous_all(grads);
  auto a = contiguous_all(acc);
  check_outputs_apart("accumulate_", {{"acc", &a}}, {{"grads", &g}});
  const bool vec = vector_loads_enabled();
  auto tensors = zeroed_entries<AccumulateTensor>(a.size());
  for (size_t k = 0; k < a.size(); ++k) {
    AccumulateTensor& t = tensors[k];   // (field by field: see zeroed_entries)
    t.acc = a[k].data_ptr();
    t.grad = g[k].const_data_ptr();
    t.acc_t = dtype_code(a[k].scalar_type());
    t.grad_t = dtype_code(g[k].scalar_type());
    t.vector = vec && t.acc_t == kF32 && g[k].element_size() <= 4 &&
               vector_aligned(t.acc, 4) && vector_aligned(t.grad, g[k].element_size());
  }
  const ChunkPlan plan = make_chunk_plan(numels(acc));
  const int64_t n = static_cast<int64_t>(plan.chunks.size());
  if (n > 0) {
    const UploadedTables<Backend, AccumulateTensor> tables(tensors, plan, acc[0].device());
    launch_accumulate(tables.tensors(), tables.chunks(), n, weight, Backend::stream());
    Backend::check_launch();
  }
  write_back(acc, a);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> allocate_impl(
    at::TensorList before, at::TensorList after, at::TensorList avg_grad,
    const c10::optional<at::Tensor>& bin_edges, bool row_sums,
    at::TensorList cum_lca, at::TensorList helped_steps, at::TensorList lca_out,
    bool check_finite_values) {
  const std::vector<double> edges =
      check_allocate_op(before, after, avg_grad, bin_edges, cum_lca, helped_steps,
                        lca_out, check_finite_values);
  const at::Device device = before[0].device();
  const typename Backend::Guard guard(device);
  Backend::check_not_capturing("allocate");

  const AllocateViews v =
      dense_allocate_views(before, after, avg_grad, cum_lca, helped_steps, lca_out);
  const auto &b = v.b, &a = v.a, &g = v.g, &cum = v.cum, &helped = v.helped, &out = v.out;

  const int64_t K = static_cast<int64_t>(before.size());
  const std::vector<int64_t> nrows = rows_per_tensor(before);
  auto tensors = zeroed_entries<AllocateTensor>(K);
  int64_t total_rows = 0;
  const bool vec = vector_loads_enabled();
  for (int64_t k = 0; k < K; ++k) {
    AllocateTensor& t = tensors[k];
    t.before = b[k].const_data_ptr();
    t.after = a[k].const_data_ptr();
    t.grad = g[k].const_data_ptr();
    t.param_t = dtype_code(b[k].scalar_type());
    t.grad_t = dtype_code(g[k].scalar_type());
    t.row_len = nrows[k] > 0 ? b[k].numel() / nrows[k] : 0;
    t.row_offset = total_rows;
    total_rows += nrows[k];
    t.cum_lca = data_or_null(cum, k);
    t.cum_t = cum.empty() ? kF32 : dtype_code(cum[k].scalar_type());
    t.helped_steps = helped.empty() ? nullptr : helped[k].data_ptr<int32_t>();
    t.lca_out = data_or_null(out, k);
    t.out_t = out.empty() ? kF32 : dtype_code(out[k].scalar_type());
    // vector loads: 16- and 32-bit inputs on aligned addresses (see allocate_slice)
    t.vector = vec && b[k].element_size() <= 4 && g[k].element_size() <= 4 &&
               vector_aligned(t.before, b[k].element_size()) &&
               vector_aligned(t.after, a[k].element_size()) &&
               vector_aligned(t.grad, g[k].element_size());
  }

  const auto f64 = before[0].options().dtype(at::kDouble);
  const auto i64 = before[0].options().dtype(at::kLong);
  at::Tensor sums = at::zeros({K}, f64);
  at::Tensor counts = at::zeros({K, 4}, i64);
  // zeros matter: rows no block owns are added up by the cleanup kernel, and
  // rows of empty tensors and histogram slots start at 0
  at::Tensor rows_out = at::zeros({row_sums ? total_rows : 0}, f64);
  const int64_t num_edges = static_cast<int64_t>(edges.size());
  at::Tensor hist = at::zeros({K, num_edges ? num_edges + 1 : 0}, i64);

  const ChunkPlan plan = make_chunk_plan(numels(before));
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  if (nchunks > 0) {
    const UploadedTables<Backend, AllocateTensor> tables(tensors, plan, device, edges);
    const at::Tensor d_partials = scratch<ChunkPartial>(nchunks, device);

    AllocateArgs args{};
    args.tensors = tables.tensors();
    args.chunks = tables.chunks();
    args.first_chunk = tables.first_chunk();
    args.partials = static_cast<ChunkPartial*>(d_partials.data_ptr());
    args.num_tensors = K;
    args.num_chunks = nchunks;
    args.edges = tables.edges();
    args.num_edges = num_edges;
    args.sums = sums.data_ptr<double>();
    args.counts = counts.data_ptr<int64_t>();
    args.row_sums = row_sums ? rows_out.data_ptr<double>() : nullptr;
    args.histogram = num_edges ? hist.data_ptr<int64_t>() : nullptr;
    launch_allocate(args, Backend::stream());
    Backend::check_launch();
  }
  v.write_back_state(cum_lca, helped_steps, lca_out);
  return {sums, counts, rows_out, hist};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> allocate_classes_impl(
    at::TensorList before, at::TensorList after, at::TensorList class_grads,
    bool check_finite_values) {
  const int64_t C =
      check_allocate_classes_op(before, after, class_grads, check_finite_values);
  const at::Device device = before[0].device();
  const typename Backend::Guard guard(device);
  Backend::check_not_capturing("allocate_classes");

  const int64_t K = static_cast<int64_t>(before.size());
  const auto opts = before[0].options();
  at::Tensor sums = at::zeros({C, K}, opts.dtype(at::kDouble));
  at::Tensor counts = at::zeros({C, K, 4}, opts.dtype(at::kLong));
  const ChunkPlan plan = make_chunk_plan(numels(before));
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  if (C == 0 || nchunks == 0) return {sums, counts};  // nothing to add up: zeros
  const int64_t groups = (C + kClassGroup - 1) / kClassGroup;
  TORCH_CHECK(groups <= 65535, "lca_ext.allocate_classes: ", text(C),
              " classes; the CUDA kernel handles at most ", text(int64_t{65535} * kClassGroup));

  const auto b = contiguous_all(before);
  const auto a = contiguous_all(after);
  const auto g = contiguous_all(class_grads);
  auto tensors = zeroed_entries<ClassTensor>(K);
  const bool vec = vector_loads_enabled();
  for (int64_t k = 0; k < K; ++k) {
    ClassTensor& t = tensors[k];   // (field by field: see zeroed_entries)
    t.before = b[k].const_data_ptr();
    t.after = a[k].const_data_ptr();
    t.grads = g[k].const_data_ptr();
    t.param_t = dtype_code(b[k].scalar_type());
    t.grad_t = dtype_code(g[k].scalar_type());
    t.numel = b[k].numel();
    // every class's gradient row must start aligned too: numel % kVec == 0
    t.vector = vec && b[k].element_size() <= 4 &&
               g[k].element_size() <= 4 && b[k].numel() % kVec == 0 &&
               vector_aligned(t.before, b[k].element_size()) &&
               vector_aligned(t.after, a[k].element_size()) &&
               vector_aligned(t.grads, g[k].element_size());
  }
  const UploadedTables<Backend, ClassTensor> tables(tensors, plan, device);
  const at::Tensor d_partials = scratch<ClassPartial>(nchunks * C, device);

  AllocateClassesArgs args{};
  args.tensors = tables.tensors();
  args.chunks = tables.chunks();
  args.first_chunk = tables.first_chunk();
  args.partials = static_cast<ClassPartial*>(d_partials.data_ptr());
  args.num_tensors = K;
  args.num_chunks = nchunks;
  args.num_classes = C;
  args.sums = sums.data_ptr<double>();
  args.counts = counts.data_ptr<int64_t>();
  launch_allocate_classes(args, Backend::stream());
  Backend::check_launch();
  return {sums, counts};
}

template <class Backend>
void sign_changes_impl(at::TensorList last_sign, at::TensorList changes,
                       at::TensorList x, at::TensorList base) {
  check_sign_changes_inputs(last_sign, changes, x, base);
  const at::Device device = x[0].device();
  const typename Backend::Guard guard(device);
  Backend::check_not_capturing("sign_changes_");
  const auto xs = contiguous_all(x);
  const auto bs = contiguous_all(base);
  auto ls = contiguous_all(last_sign);
  auto cs = contiguous_all(changes);
  check_outputs_apart("sign_changes_", {{"last_sign", &ls}, {"changes", &cs}},
                      {{"x", &xs}, {"base", &bs}});
  auto tensors = zeroed_entries<SignChangesTensor>(xs.size());
  const bool vec = vector_loads_enabled();
  for (size_t k = 0; k < xs.size(); ++k) {
    SignChangesTensor& t = tensors[k];   // (field by field: see zeroed_entries)
    t.last_sign = ls[k].data_ptr<int8_t>();
    t.changes = cs[k].data_ptr<int32_t>();
    t.x = xs[k].const_data_ptr();
    t.base = bs.empty() ? nullptr : bs[k].const_data_ptr();
    t.x_t = dtype_code(xs[k].scalar_type());
    const size_t xsize = xs[k].element_size();
    t.vector = vec && xsize <= 4 && vector_aligned(t.x, xsize) &&
               (t.base == nullptr || vector_aligned(t.base, xsize)) &&
               vector_aligned(t.last_sign, 1) && vector_aligned(t.changes, 4);
  }
  const ChunkPlan plan = make_chunk_plan(numels(x));
  const int64_t nchunks = static_cast<int64_t>(plan.chunks.size());
  if (nchunks > 0) {
    const UploadedTables<Backend, SignChangesTensor> tables(tensors, plan, device);
    launch_sign_changes(tables.tensors(), tables.chunks(), nchunks, Backend::stream());
    Backend::check_launch();
  }
  write_back(last_sign, ls);
  write_back(changes, cs);
}

}  // namespace cuda
}  // namespace lca_ext
