// Calls f(T{}) with T the C++ type of a supported float dtype.  Kernels dispatch
// per tensor (a model may mix bf16 and fp32 parameters), once per chunk.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../validate.h"

namespace lca_ext {
namespace cpu {

template <typename F>
inline void dispatch_float(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::kFloat: f(float{}); return;
    case c10::kDouble: f(double{}); return;
    case c10::kHalf: f(c10::Half{}); return;
    case c10::kBFloat16: f(c10::BFloat16{}); return;
    default: TORCH_CHECK(false, "lca_ext: unsupported dtype ", text(t));
  }
}

}  // namespace cpu
}  // namespace lca_ext
