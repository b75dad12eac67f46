// The project's CUDA kernel sources, compiled by the host compiler against the
// CPU emulator (emu_runtime.h).  Nothing here is a copy: the #includes below
// are the very files nvcc compiles for the GPU.
#include "emu_runtime.h"

#include "cuda/accumulate_kernel.cu"
#include "cuda/allocate_kernel.cu"
#include "cuda/sign_changes_kernel.cu"

namespace lca_emu {

void set_schedule_seed(uint64_t seed) { set_schedule(seed); }
int64_t launch_count() { return rt().launches; }

// A kernel with a collective that only some lanes reach: the emulator must
// report it (the tests check that it does, so a silent emulator cannot pass).
namespace {
__global__ void divergent_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}
__global__ void missing_syncthreads_kernel(int* out) {
  if (threadIdx.x == 0) __syncthreads();  // the other threads never arrive... then exit
  out[threadIdx.x] = 1;
}
__global__ void misaligned_vector_load_kernel(int* out) {
  alignas(16) static float buf[8] = {};
  float v[lca_ext::cuda::kVec];
  lca_ext::cuda::load_vec(buf + 1, v);  // 4 bytes past a 16-byte boundary
  out[threadIdx.x] = static_cast<int>(v[0]);
}
__global__ void shared_overrun_kernel(int* out) {
  LCA_DYNAMIC_SHARED(int, s);  // launched with 64 ints
  s[threadIdx.x] = 1;          // 128 threads
  out[threadIdx.x] = 0;
}
__global__ void uninitialised_shared_kernel(int* out) {
  __shared__ int never_written[4];
  out[threadIdx.x] = never_written[threadIdx.x % 4];
}
}  // namespace

void run_selftest(int which, int* out) {
  switch (which) {
    case 0: LCA_EMU_LAUNCH(divergent_shuffle_kernel, 1, 64, 0, out); break;
    case 1: LCA_EMU_LAUNCH(missing_syncthreads_kernel, 1, 64, 0, out); break;
    case 2: LCA_EMU_LAUNCH(misaligned_vector_load_kernel, 1, 32, 0, out); break;
    case 3: LCA_EMU_LAUNCH(shared_overrun_kernel, 1, 128, 64 * sizeof(int), out); break;
    default: LCA_EMU_LAUNCH(uninitialised_shared_kernel, 1, 64, 0, out); break;
  }
}

}  // namespace lca_emu
