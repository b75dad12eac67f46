// accumulate_: acc[k] += weight * grads[k] for a whole list, one parallel pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../chunk_plan.h"
#include "../validate.h"
#include "dispatch.h"

namespace lca_ext {
namespace cpu {
namespace {

template <typename A, typename G>
void axpy(A* __restrict acc, const G* __restrict g, int64_t n, A w) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<A>(g[i]);
}

void accumulate_cpu(at::TensorList acc, at::TensorList grads, double weight) {
  check_accumulate_inputs(acc, grads, weight);

  const std::vector<at::Tensor> g = contiguous_all(grads);
  std::vector<at::Tensor> a = contiguous_all(acc);  // a copy only if acc[k] is strided
  check_outputs_apart("accumulate_", {{"acc", &a}}, {{"grads", &g}});
  const ChunkPlan plan = make_chunk_plan(numels(acc));
  at::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1,
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = plan.chunks[c];
      const at::Tensor& ak = a[ch.tensor];
      const at::Tensor& gk = g[ch.tensor];
      const int64_t n = ch.end - ch.begin;
      dispatch_float(gk.scalar_type(), [&](auto gtag) {
        using G = decltype(gtag);
        const G* gp = static_cast<const G*>(gk.const_data_ptr()) + ch.begin;
        if (ak.scalar_type() == at::kDouble) {
          axpy(static_cast<double*>(ak.data_ptr()) + ch.begin, gp, n, weight);
        } else {
          axpy(static_cast<float*>(ak.data_ptr()) + ch.begin, gp, n,
               static_cast<float>(weight));
        }
      });
    }
  });
  write_back(acc, a);
}

}  // namespace
}  // namespace cpu
}  // namespace lca_ext

TORCH_LIBRARY_IMPL(lca_ext, CPU, m) {
  m.impl("accumulate_", &lca_ext::cpu::accumulate_cpu);
}
