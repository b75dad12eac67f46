// A small CUDA execution emulator for the tests: it runs the project's real
// kernel sources (csrc/cuda/*.cu, compiled as C++ by the host compiler) on the
// CPU, so their indexing, warp collectives and block reductions are tested on
// machines without a GPU.  What it models and what it does not:
//   - A launch runs its blocks one after another (in index order, or in a
//     seeded random order).  Inside a block every thread is a fiber
//     (ucontext) on one OS thread; a thread runs until it reaches a collective
//     (__syncthreads, __shfl_*_sync), then the scheduler moves on.  With a
//     seed, threads are resumed in a random order, so results that depend on
//     the interleaving of threads or the order of blocks show up as
//     differences between seeds.
//   - Collectives are checked: every lane of a warp must reach the same kind
//     of shuffle with the full mask, every thread of a block the same
//     __syncthreads; a thread that exits while others wait for it, or a block
//     whose threads can no longer all meet, is an error.  Each is an error of the launch, naming the
//     kernel, the block and the lanes.
//   - Memory is host memory; atomics are plain read-modify-writes (only one
//     fiber runs at a time).  Dynamic shared memory is filled with garbage
//     (0xA5 bytes) before each block.  Not modelled: the memory model (races
//     between fibers that the interleaving does not expose), timing, occupancy,
//     register limits, partial-warp masks.  Checked besides: vector loads
//     from misaligned addresses, writes past the dynamic shared memory.
#pragma once

#define LCA_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// Host mode of the CUDA headers defines __shared__ as nothing; in the emulator
// a __shared__ array is a static local: one copy for the block that is running.
#undef __shared__
// All __shared__ arrays go to one ELF section, which the runtime fills with
// garbage (0xA5 bytes) before each block, as shared memory is undefined when a
// block starts on a GPU: a kernel that reads shared memory before writing it
// gets garbage here too, not a zero or the previous block's value.
#define __shared__ static __attribute__((section("lca_emu_shared"), aligned(16)))
#define __launch_bounds__(...)

// bounds of the section, defined by the linker
extern "C" char __start_lca_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_lca_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace lca_emu {

constexpr int kWarpSize = 32;
// Dynamic shared memory lives at the start of a buffer of this size (a GPU
// block can have at most 48 KiB without opting in); the rest of the buffer is a
// guard: a write past the launch's shmem bytes is found there and reported.
constexpr size_t kSharedBuffer = size_t(64) << 10;

enum WaitKind : int { kNone = 0, kWarpWait = 1, kBlockWait = 2 };
enum ShuffleKind : int { kXor = 1, kUp = 2, kDown = 3, kIdx = 4 };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int lane = 0, warp = 0;
  bool done = false;
  WaitKind wait = kNone;
  uint64_t wait_gen = 0;
};

struct WarpState {
  int live = 0;     // lanes that have not exited
  int arrived = 0;  // lanes waiting at the current shuffle
  uint64_t gen = 0;
  int kind = 0;
  int size = 0;
  uint64_t slots[2][kWarpSize];
};

struct Runtime {
  // the launch and block being run
  const char* kernel = "";
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  int block_live = 0, block_arrived = 0;
  uint64_t block_gen = 0;
  ucontext_t sched;
  Fiber* current = nullptr;
  std::vector<unsigned char> dyn_shared;
  std::function<void()> body;
  std::string error;
  // settings and statistics
  uint64_t seed = 0;  // 0: blocks and threads in index order
  std::mt19937_64 rng;
  int64_t launches = 0;
  // fiber stacks: one mapping, a guard page below each stack
  unsigned char* stacks = nullptr;
  size_t stack_count = 0;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

constexpr size_t kStackBytes = size_t(256) << 10;

inline void ensure_stacks(size_t n) {
  Runtime& r = rt();
  if (r.stack_count >= n) return;
  if (r.stacks) munmap(r.stacks, r.stack_count * kStackBytes);
  void* p = mmap(nullptr, n * kStackBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda emulator: cannot map fiber stacks");
  r.stacks = static_cast<unsigned char*>(p);
  r.stack_count = n;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (size_t i = 0; i < n; ++i) mprotect(r.stacks + i * kStackBytes, page, PROT_NONE);
}

inline std::string where() {
  const Runtime& r = rt();
  std::string s = std::string(r.kernel) + " block (" + std::to_string(r.block_idx.x) + "," +
                  std::to_string(r.block_idx.y) + "," + std::to_string(r.block_idx.z) + ")";
  if (r.current) {
    s += " thread " + std::to_string(r.current->tid.x) + " (warp " +
         std::to_string(r.current->warp) + ", lane " + std::to_string(r.current->lane) + ")";
  }
  return s;
}

// Stack switches are announced to AddressSanitizer when the emulator is built
// with it (scripts/emulator_asan.sh), so it knows which stack is live.
#if defined(__SANITIZE_ADDRESS__)
}  // namespace lca_emu
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
namespace lca_emu {
struct AsanStacks {
  const void* sched_bottom = nullptr;  // the scheduler's (the caller's) stack
  size_t sched_size = 0;
};
inline AsanStacks& asan_stacks() {
  static AsanStacks s;
  return s;
}
#endif

// Switches from the scheduler to fiber f (stack i), and back when it yields.
inline void switch_to_fiber(Fiber& f, unsigned i) {
  Runtime& r = rt();
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, r.stacks + i * kStackBytes, kStackBytes);
  swapcontext(&r.sched, &f.ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)i;
  swapcontext(&r.sched, &f.ctx);
#endif
}

// Back to the scheduler from a fiber.
inline void yield() {
  Runtime& r = rt();
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, asan_stacks().sched_bottom, asan_stacks().sched_size);
  swapcontext(&r.current->ctx, &r.sched);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&r.current->ctx, &r.sched);
#endif
}

// Records an error and leaves the fiber for good: the scheduler stops the
// launch and throws (exceptions never cross the fiber boundary).
[[noreturn]] inline void fail(const std::string& what) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = "cuda emulator: " + what + " in " + where();
  for (;;) yield();  // never resumed once error is set
}

inline void fiber_entry() {
  Runtime& r = rt();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &asan_stacks().sched_bottom, &asan_stacks().sched_size);
#endif
  r.body();
  Fiber& f = *r.current;
  WarpState& w = r.warps[f.warp];
  if (w.arrived > 0) fail("a lane exited while its warp waits at a shuffle");
  // __syncthreads must be reached by every thread of the block (the CUDA
  // programming guide calls a conditional one undefined)
  if (r.block_arrived > 0) fail("a thread exited while others wait at __syncthreads");
  f.done = true;
  --w.live;  // a later full-mask shuffle in this warp is an error
#if defined(__SANITIZE_ADDRESS__)
  // this fiber's stack is done with: switch to the scheduler for good
  __sanitizer_start_switch_fiber(nullptr, asan_stacks().sched_bottom, asan_stacks().sched_size);
#endif
  // block_live stays: a later __syncthreads waits for this thread forever,
  // which the scheduler reports as a deadlock
  // returning switches to uc_link (the scheduler)
}

inline bool released(const Fiber& f) {
  const Runtime& r = rt();
  if (f.wait == kWarpWait) return r.warps[f.warp].gen > f.wait_gen;
  if (f.wait == kBlockWait) return r.block_gen > f.wait_gen;
  return true;
}

inline std::string describe_waits() {
  const Runtime& r = rt();
  std::string s;
  int shown = 0;
  for (const Fiber& f : r.fibers) {
    if (f.done || shown >= 8) continue;
    s += " thread " + std::to_string(f.tid.x) +
         (f.wait == kWarpWait ? " at a shuffle;" : f.wait == kBlockWait ? " at __syncthreads;" : " runnable;");
    ++shown;
  }
  return s;
}

inline void run_block(const uint3& bidx, size_t shmem) {
  Runtime& r = rt();
  const unsigned nthreads = r.block.x * r.block.y * r.block.z;
  r.block_idx = bidx;
  r.fibers.assign(nthreads, Fiber{});
  r.warps.assign((nthreads + kWarpSize - 1) / kWarpSize, WarpState{});
  r.block_live = static_cast<int>(nthreads);
  r.block_arrived = 0;
  r.block_gen = 0;
  if (shmem > 48 * 1024) throw std::runtime_error("cuda emulator: more than 48 KiB of dynamic shared memory");
  r.dyn_shared.assign(kSharedBuffer, 0xA5);
  if (__start_lca_emu_shared && __stop_lca_emu_shared) {
#if defined(__SANITIZE_ADDRESS__)
    // under ASan the section also holds guard zones: fill only the arrays
    for (char* p = __start_lca_emu_shared; p < __stop_lca_emu_shared; ++p) {
      if (!__asan_address_is_poisoned(p)) *p = static_cast<char>(0xA5);
    }
#else
    std::memset(__start_lca_emu_shared, 0xA5,
                static_cast<size_t>(__stop_lca_emu_shared - __start_lca_emu_shared));
#endif
  }
  ensure_stacks(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) {
    Fiber& f = r.fibers[i];
    f.tid = uint3{i % r.block.x, (i / r.block.x) % r.block.y, i / (r.block.x * r.block.y)};
    f.lane = static_cast<int>(i % kWarpSize);
    f.warp = static_cast<int>(i / kWarpSize);
    ++r.warps[f.warp].live;
#if defined(__SANITIZE_ADDRESS__)
    // a fiber abandoned by fail() may have left its frames' guard zones marked
    __asan_unpoison_memory_region(r.stacks + i * kStackBytes, kStackBytes);
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks + i * kStackBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<unsigned> order(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = i;
  for (;;) {
    if (r.seed) std::shuffle(order.begin(), order.end(), r.rng);
    bool progressed = false;
    unsigned remaining = 0;
    for (unsigned i : order) {
      Fiber& f = r.fibers[i];
      if (f.done) continue;
      if (!released(f)) {
        ++remaining;
        continue;
      }
      f.wait = kNone;
      r.current = &f;
      switch_to_fiber(f, i);
      r.current = nullptr;
      if (!r.error.empty()) throw std::runtime_error(r.error);
      progressed = true;
      if (!f.done) ++remaining;
    }
    if (remaining == 0) {
      for (size_t i = shmem; i < kSharedBuffer; ++i) {
        if (r.dyn_shared[i] != 0xA5) {
          throw std::runtime_error("cuda emulator: a write past the end of the " +
                                   std::to_string(shmem) + " bytes of dynamic shared memory in " +
                                   where());
        }
      }
      return;
    }
    if (!progressed) {
      throw std::runtime_error("cuda emulator: deadlock in " + where() + ":" + describe_waits());
    }
  }
}

// Runs `body` (one thread's work: the kernel call) for every thread of every
// block of the grid.
inline void launch(const char* name, dim3 grid, dim3 block, size_t shmem,
                   std::function<void()> body) {
  Runtime& r = rt();
  r.kernel = name;
  r.grid = grid;
  r.block = block;
  r.body = std::move(body);
  r.error.clear();
  ++r.launches;
  std::vector<uint3> blocks;
  blocks.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back(uint3{x, y, z});
  if (r.seed) std::shuffle(blocks.begin(), blocks.end(), r.rng);
  for (const uint3& b : blocks) run_block(b, shmem);
  r.body = nullptr;
}

inline void set_schedule(uint64_t seed) {
  Runtime& r = rt();
  r.seed = seed;
  r.rng.seed(seed);
}

// --- collectives ------------------------------------------------------------

inline void syncthreads() {
  Runtime& r = rt();
  Fiber& f = *r.current;
  if (r.warps[f.warp].arrived > 0) fail("__syncthreads while lanes of the warp wait at a shuffle");
  if (++r.block_arrived == r.block_live) {
    ++r.block_gen;
    r.block_arrived = 0;
    return;
  }
  f.wait = kBlockWait;
  f.wait_gen = r.block_gen;
  yield();
}

template <typename T>
T shuffle(int kind, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Runtime& r = rt();
  Fiber& f = *r.current;
  WarpState& w = r.warps[f.warp];
  if (mask != 0xffffffffu) fail("partial shuffle masks are not emulated");
  if (width != kWarpSize) fail("shuffle widths other than 32 are not emulated");
  if (w.live != kWarpSize) fail("full-mask shuffle in a warp with exited lanes");
  if (w.arrived == 0) {
    w.kind = kind;
    w.size = static_cast<int>(sizeof(T));
  } else if (w.kind != kind || w.size != static_cast<int>(sizeof(T))) {
    fail("lanes of one warp reached different shuffles (divergent collective)");
  }
  const uint64_t gen = w.gen;
  const int parity = static_cast<int>(gen & 1);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slots[parity][f.lane] = bits;
  if (++w.arrived == w.live) {
    ++w.gen;
    w.arrived = 0;
  } else {
    f.wait = kWarpWait;
    f.wait_gen = gen;
    yield();
  }
  int src = f.lane;
  switch (kind) {
    case kXor: src = f.lane ^ arg; break;
    case kUp: src = f.lane - arg >= 0 ? f.lane - arg : f.lane; break;
    case kDown: src = f.lane + arg < kWarpSize ? f.lane + arg : f.lane; break;
    default: src = ((arg % kWarpSize) + kWarpSize) % kWarpSize; break;
  }
  if (src < 0 || src >= kWarpSize) src = f.lane;
  T out;
  std::memcpy(&out, &w.slots[parity][src], sizeof(T));
  return out;
}

}  // namespace lca_emu

// --- the CUDA names the kernels use -------------------------------------------

#define threadIdx (::lca_emu::rt().current->tid)
#define blockIdx (::lca_emu::rt().block_idx)
#define blockDim (::lca_emu::rt().block)
#define gridDim (::lca_emu::rt().grid)

// LCA_LAUNCH and LCA_DYNAMIC_SHARED (csrc/cuda/device_common.cuh) in emulation
#define LCA_EMU_LAUNCH(kernel, grid, block, shmem, ...) \
  ::lca_emu::launch(#kernel, dim3(grid), dim3(block), (shmem), [&]() { kernel(__VA_ARGS__); })
#define LCA_EMU_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::lca_emu::rt().dyn_shared.data())
#define LCA_EMU_CHECK_ALIGNED(p, n)                                                     \
  do {                                                                                  \
    if (reinterpret_cast<uintptr_t>(p) % (n) != 0)                                      \
      ::lca_emu::fail("a " #n "-byte vector load from a misaligned address");          \
  } while (0)

// read-only loads: plain loads on the host
inline float4 __ldg(const float4* p) { return *p; }
inline uint2 __ldg(const uint2* p) { return *p; }

// device code calls the global ::isfinite (CUDA's math API)
using std::isfinite;

inline void __syncthreads() { ::lca_emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::lca_emu::shuffle(::lca_emu::kXor, mask, v, lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::lca_emu::shuffle(::lca_emu::kUp, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::lca_emu::shuffle(::lca_emu::kDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::lca_emu::shuffle(::lca_emu::kIdx, mask, v, src_lane, width);
}

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

// Round-to-nearest arithmetic (the emulator is compiled with -ffp-contract=off,
// so these stay separate roundings, as on the GPU).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
