// The flattened chunk table every kernel walks: a list of tensors is cut into
// fixed-size pieces that never cross a tensor boundary.  The cut depends only on
// the tensors' sizes (never on the thread count or the device), so per-chunk
// partial sums combined in chunk order give bit-identical results everywhere.
// Plain C++ with no torch headers: the CPU kernels, the CUDA launcher and the
// tests (through the CPU ops) all use this one piece of planning code.
#pragma once

#include <cstdint>
#include <vector>

namespace lca_ext {

// Elements per chunk.  64Ki elements keep each chunk's inputs (<= 768 KiB for
// three fp32 streams) large enough to amortise the per-chunk bookkeeping and
// small enough that even a 200-tensor model gives both threads many chunks.
constexpr int64_t kChunkSize = int64_t(1) << 16;

struct Chunk {
  int64_t tensor;  // index into the tensor list
  int64_t begin;   // first element (flat index inside the tensor)
  int64_t end;     // one past the last element
};

struct ChunkPlan {
  std::vector<Chunk> chunks;
  // chunks of tensor k are chunks[first_chunk[k] .. first_chunk[k + 1])
  std::vector<int64_t> first_chunk;
};

inline ChunkPlan make_chunk_plan(const std::vector<int64_t>& numels,
                                 int64_t chunk_size = kChunkSize) {
  ChunkPlan plan;
  plan.first_chunk.reserve(numels.size() + 1);
  int64_t total_chunks = 0;
  for (int64_t n : numels) total_chunks += (n + chunk_size - 1) / chunk_size;
  plan.chunks.reserve(static_cast<size_t>(total_chunks));
  for (size_t k = 0; k < numels.size(); ++k) {
    plan.first_chunk.push_back(static_cast<int64_t>(plan.chunks.size()));
    for (int64_t b = 0; b < numels[k]; b += chunk_size) {
      const int64_t e = b + chunk_size < numels[k] ? b + chunk_size : numels[k];
      plan.chunks.push_back(Chunk{static_cast<int64_t>(k), b, e});
    }
  }
  plan.first_chunk.push_back(static_cast<int64_t>(plan.chunks.size()));
  return plan;
}

}  // namespace lca_ext
