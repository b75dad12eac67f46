// The op schemas, declared once (text in schemas.h).  Device kernels register
// against them in csrc/cpu/*_cpu.cpp and csrc/cuda/ops_cuda.cpp; fake (meta)
// kernels for torch.compile live in lca_ext/ops.py.  Semantics of every
// argument and output are documented in lca_ext/ops.py and the README.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(lca_ext, m) {
  m.def(lca_ext::schema::kAccumulate);
  m.def(lca_ext::schema::kAllocate);
  m.def(lca_ext::schema::kSignChanges);
  m.def(lca_ext::schema::kAllocateClasses);
}
