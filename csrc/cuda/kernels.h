// Launchers of the CUDA kernels: plain C++ declarations (no torch headers), so
// the .cu files compile quickly and the torch binding lives in ops_cuda.cpp.
// Every launcher runs asynchronously on `stream`; every pointer is a device
// pointer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../chunk_plan.h"
#include "launch_plan.h"

namespace lca_ext {
namespace cuda {

// dtype codes shared by host and device
enum DType : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct AccumulateTensor {
  void* acc;         // float32 or float64
  const void* grad;  // any DType
  int32_t acc_t, grad_t;
  int32_t vector;    // 1: float32 acc, 16/32-bit grad, both vector_aligned
};

// acc[k] += weight * grad[k] over every chunk (device arrays), one launch.
void launch_accumulate(const AccumulateTensor* tensors, const Chunk* chunks,
                       int64_t num_chunks, double weight, cudaStream_t stream);

// ---------------------------------------------------------------------------
// allocate

// Tensor k of allocate, as raw dense (contiguous) pointers.
struct AllocateTensor {
  const void* before;  // param_t
  const void* after;   // param_t
  const void* grad;    // grad_t
  int32_t param_t, grad_t;
  int64_t row_len;     // elements per row of dim 0 (numel / rows; 0 if empty)
  int64_t row_offset;  // index of this tensor's first row in row_sums
  void* cum_lca;       // cum_t (float32/float64) or nullptr: not requested
  int32_t* helped_steps;  // or nullptr
  void* lca_out;       // out_t (float32/float64) or nullptr
  int32_t cum_t, out_t;
  int32_t vector;      // 1: 16/32-bit before, after, grad, all vector_aligned (launch_plan.h)
};

struct AllocateArgs {
  const AllocateTensor* tensors;  // [num_tensors]
  const Chunk* chunks;            // [num_chunks], from make_chunk_plan
  const int64_t* first_chunk;     // [num_tensors + 1]
  ChunkPartial* partials;         // [num_chunks] scratch
  int64_t num_tensors, num_chunks;
  const double* edges;            // [num_edges] bin edges, validated
  int64_t num_edges;              // 0: no histogram
  // outputs (zero-initialised by the caller)
  double* sums;      // [num_tensors]
  int64_t* counts;   // [num_tensors, 4]
  double* row_sums;  // [total rows], or nullptr: row sums not requested
  int64_t* histogram;  // [num_tensors, num_edges + 1] when num_edges > 0
};

// The fused LCA pass: one block per chunk, then one cleanup kernel that adds
// the chunks' partials in chunk order.  num_chunks must be > 0.
void launch_allocate(const AllocateArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------
// allocate_classes

struct ClassTensor {
  const void* before;  // param_t, [numel]
  const void* after;   // param_t, [numel]
  const void* grads;   // grad_t, [num_classes, numel]
  int32_t param_t, grad_t;
  int64_t numel;
  int32_t vector;  // 1: 16/32-bit inputs, all vector_aligned, numel % kVec == 0
};

struct AllocateClassesArgs {
  const ClassTensor* tensors;   // [num_tensors]
  const Chunk* chunks;          // [num_chunks]
  const int64_t* first_chunk;   // [num_tensors + 1]
  ClassPartial* partials;       // [num_chunks * num_classes] scratch
  int64_t num_tensors, num_chunks, num_classes;
  double* sums;     // [num_classes, num_tensors]
  int64_t* counts;  // [num_classes, num_tensors, 4]
};

// Grid (chunk, group of kClassGroup classes), then the cleanup in chunk order.
// num_chunks and num_classes must be > 0.
void launch_allocate_classes(const AllocateClassesArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------
// sign_changes_

struct SignChangesTensor {
  int8_t* last_sign;
  int32_t* changes;
  const void* x;     // x_t
  const void* base;  // x_t, or nullptr: compare with 0
  int32_t x_t;
  int32_t vector;    // 1: 16/32-bit x; x, base, last_sign, changes all vector_aligned
};

// One block per chunk, elementwise; num_chunks must be > 0.
void launch_sign_changes(const SignChangesTensor* tensors, const Chunk* chunks,
                         int64_t num_chunks, cudaStream_t stream);

}  // namespace cuda
}  // namespace lca_ext
