// sign_changes_: per-element oscillation counters for a whole tensor list.
// s = sign(x - base) is found by comparison (exact in any dtype, no rounding):
// s = (x > base) - (x < base); NaN gives 0 and leaves the state as it was.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "../chunk_plan.h"
#include "../validate.h"
#include "dispatch.h"

namespace lca_ext {
namespace cpu {
namespace {

template <typename T, bool HasBase>
void sign_changes_chunk(int8_t* __restrict last, int32_t* __restrict changes,
                        const T* __restrict x, const T* __restrict base,
                        int64_t n) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t i = 0; i < n; ++i) {
    const C v = static_cast<C>(x[i]);
    const C b = HasBase ? static_cast<C>(base[i]) : C(0);
    const int8_t s = static_cast<int8_t>((v > b) - (v < b));
    changes[i] += (s * last[i]) < 0;
    last[i] = s != 0 ? s : last[i];
  }
}

void sign_changes_cpu(at::TensorList last_sign, at::TensorList changes,
                      at::TensorList x, at::TensorList base) {
  check_sign_changes_inputs(last_sign, changes, x, base);
  const auto xs = contiguous_all(x);
  const auto bs = contiguous_all(base);
  auto ls = contiguous_all(last_sign);
  auto cs = contiguous_all(changes);
  check_outputs_apart("sign_changes_", {{"last_sign", &ls}, {"changes", &cs}},
                      {{"x", &xs}, {"base", &bs}});
  const bool has_base = !base.empty();
  const ChunkPlan plan = make_chunk_plan(numels(x));
  at::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1,
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Chunk& ch = plan.chunks[c];
      const int64_t k = ch.tensor, n = ch.end - ch.begin;
      int8_t* lp = ls[k].data_ptr<int8_t>() + ch.begin;
      int32_t* cp = cs[k].data_ptr<int32_t>() + ch.begin;
      dispatch_float(xs[k].scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const T* xp = static_cast<const T*>(xs[k].const_data_ptr()) + ch.begin;
        const T* bp = has_base ? static_cast<const T*>(bs[k].const_data_ptr()) + ch.begin
                               : nullptr;
        has_base ? sign_changes_chunk<T, true>(lp, cp, xp, bp, n)
                 : sign_changes_chunk<T, false>(lp, cp, xp, bp, n);
      });
    }
  });
  write_back(last_sign, ls);
  write_back(changes, cs);
}

}  // namespace
}  // namespace cpu
}  // namespace lca_ext

TORCH_LIBRARY_IMPL(lca_ext, CPU, m) {
  m.impl("sign_changes_", &lca_ext::cpu::sign_changes_cpu);
}
