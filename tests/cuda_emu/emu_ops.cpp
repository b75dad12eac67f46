// The CUDA ops' torch glue (csrc/cuda/ops_impl.h) over the CPU emulator of the
// kernels: torch.ops.lca_ext_emu.* take CPU tensors and run exactly the code
// path torch.ops.lca_ext.* takes on a GPU, minus the device itself.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "cuda/ops_impl.h"
#include "schemas.h"

namespace lca_emu {
void set_schedule_seed(uint64_t seed);
int64_t launch_count();
void run_selftest(int which, int* out);
}  // namespace lca_emu

namespace {

int64_t g_uploads = 0;  // tables uploaded (the TableCache's misses)

struct EmuBackend {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static void check_not_capturing(const char*) {}
  static at::Tensor upload(const std::vector<unsigned char>& bytes, const at::Device& device) {
    TORCH_CHECK(device.is_cpu(), "the CUDA emulator runs on CPU tensors, got ", device);
    ++g_uploads;
    at::Tensor t = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
    if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    return t;
  }
  static cudaStream_t stream() { return nullptr; }
  static void check_launch() {}
};

// allocate on the last elements of a virtual 1-row-per-`row_len` tensor of
// offset + before.numel() elements: only [offset, offset + n) is backed by
// memory (the base pointer is shifted back by `offset` elements) and only the
// chunks covering it are in the chunk table.  With offset >= 2^31 this runs
// the kernels' 64-bit indexing (flat index, chunk bounds, row numbers) without
// allocating 2^31 elements.  float32 inputs, dense; offset a multiple of the
// chunk size.  Returns (sums [1], counts [1, 4], row_sums of the rows
// [offset / row_len, (offset + n) / row_len) — the first may be partial).
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_far(const at::Tensor& before,
                                                             const at::Tensor& after,
                                                             const at::Tensor& grad,
                                                             int64_t offset, int64_t row_len) {
  using namespace lca_ext;
  using namespace lca_ext::cuda;
  TORCH_CHECK(before.is_contiguous() && after.is_contiguous() && grad.is_contiguous());
  TORCH_CHECK(before.scalar_type() == at::kFloat && after.scalar_type() == at::kFloat &&
              grad.scalar_type() == at::kFloat);
  TORCH_CHECK(offset % kChunkSize == 0 && row_len > 0);
  const int64_t n = before.numel();
  const int64_t numel = offset + n;
  const int64_t nrows = (numel + row_len - 1) / row_len;
  const int64_t first_row = offset / row_len;
  // only rows from first_row on are touched: give the kernel a row array whose
  // base is shifted back by first_row as well
  at::Tensor rows = at::zeros({nrows - first_row}, at::kDouble);
  at::Tensor sums = at::zeros({1}, at::kDouble);
  at::Tensor counts = at::zeros({1, 4}, at::kLong);
  auto shift = [&](const at::Tensor& t) {
    return static_cast<const void*>(static_cast<const float*>(t.const_data_ptr()) - offset);
  };
  AllocateTensor t{};
  t.before = shift(before);
  t.after = shift(after);
  t.grad = shift(grad);
  t.param_t = kF32;
  t.grad_t = kF32;
  t.row_len = row_len;
  t.row_offset = -first_row;
  t.vector = vector_aligned(t.before, 4) && vector_aligned(t.after, 4) &&
             vector_aligned(t.grad, 4);
  std::vector<Chunk> chunks;
  for (int64_t b = offset; b < numel; b += kChunkSize) {
    chunks.push_back(Chunk{0, b, b + kChunkSize < numel ? b + kChunkSize : numel});
  }
  const std::vector<int64_t> first = {0, static_cast<int64_t>(chunks.size())};
  std::vector<ChunkPartial> partials(chunks.size());
  AllocateArgs args{};
  args.tensors = &t;
  args.chunks = chunks.data();
  args.first_chunk = first.data();
  args.partials = partials.data();
  args.num_tensors = 1;
  args.num_chunks = static_cast<int64_t>(chunks.size());
  args.sums = sums.data_ptr<double>();
  args.counts = counts.data_ptr<int64_t>();
  args.row_sums = rows.data_ptr<double>();
  launch_allocate(args, nullptr);
  return {sums, counts, rows};
}

void set_schedule(int64_t seed) { lca_emu::set_schedule_seed(static_cast<uint64_t>(seed)); }
int64_t launches() { return lca_emu::launch_count(); }
// Runs one of the emulator's self-test kernels (emu_kernels.cpp); returns
// what thread 0 wrote.
int64_t uploads() { return g_uploads; }

int64_t selftest(int64_t which) {
  std::vector<int> out(128, 0);
  lca_emu::run_selftest(static_cast<int>(which), out.data());
  return out[0];
}

}  // namespace

TORCH_LIBRARY(lca_ext_emu, m) {
  m.def(lca_ext::schema::kAccumulate);
  m.def(lca_ext::schema::kAllocate);
  m.def(lca_ext::schema::kSignChanges);
  m.def(lca_ext::schema::kAllocateClasses);
  m.def("set_schedule(int seed) -> ()", &set_schedule);
  m.def("launches() -> int", &launches);
  m.def("selftest(int which) -> int", &selftest);
  m.def("uploads() -> int", &uploads);
  m.def("allocate_far(Tensor before, Tensor after, Tensor grad, int offset, int row_len) -> "
        "(Tensor, Tensor, Tensor)", &allocate_far);
}

TORCH_LIBRARY_IMPL(lca_ext_emu, CPU, m) {
  using lca_ext::cuda::accumulate_impl;
  using lca_ext::cuda::allocate_classes_impl;
  using lca_ext::cuda::allocate_impl;
  using lca_ext::cuda::sign_changes_impl;
  m.impl("accumulate_", &accumulate_impl<EmuBackend>);
  m.impl("allocate", &allocate_impl<EmuBackend>);
  m.impl("allocate_classes", &allocate_classes_impl<EmuBackend>);
  m.impl("sign_changes_", &sign_changes_impl<EmuBackend>);
}
