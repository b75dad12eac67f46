// The CUDA ops' torch glue (csrc/cuda/ops_impl.h) over the CPU emulator of the
// kernels: torch.ops.lca_ext_emu.* take CPU tensors and run exactly the code
// path torch.ops.lca_ext.* takes on a GPU, minus the device itself.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "cuda/ops_impl.h"
#include "schemas.h"

namespace lca_emu {
void set_schedule_seed(uint64_t seed);
int64_t launch_count();
void run_selftest(int which, int* out);
}  // namespace lca_emu

namespace {

struct EmuBackend {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static void check_not_capturing(const char*) {}
  static at::Tensor upload(const std::vector<unsigned char>& bytes, const at::Device& device) {
    TORCH_CHECK(device.is_cpu(), "the CUDA emulator runs on CPU tensors, got ", device);
    at::Tensor t = at::empty({static_cast<int64_t>(bytes.size())}, at::kByte);
    if (!bytes.empty()) std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    return t;
  }
  static cudaStream_t stream() { return nullptr; }
  static void check_launch() {}
};

void set_schedule(int64_t seed) { lca_emu::set_schedule_seed(static_cast<uint64_t>(seed)); }
int64_t launches() { return lca_emu::launch_count(); }
void selftest(int64_t which) {
  std::vector<int> out(64, 0);
  lca_emu::run_selftest(static_cast<int>(which), out.data());
}

}  // namespace

TORCH_LIBRARY(lca_ext_emu, m) {
  m.def(lca_ext::schema::kAccumulate);
  m.def(lca_ext::schema::kAllocate);
  m.def(lca_ext::schema::kSignChanges);
  m.def(lca_ext::schema::kAllocateClasses);
  m.def("set_schedule(int seed) -> ()", &set_schedule);
  m.def("launches() -> int", &launches);
  m.def("selftest(int which) -> ()", &selftest);
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
