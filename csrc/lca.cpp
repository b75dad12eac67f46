// The op schemas, declared once.  Device kernels register against them in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cpp; fake (meta) kernels for
// torch.compile live in lca_ext/ops.py.  Semantics of every argument and output
// are documented in lca_ext/ops.py and the README.
#include <torch/library.h>

TORCH_LIBRARY(lca_ext, m) {
  // acc[k] += weight * grads[k] for every k.
  m.def("accumulate_(Tensor(a!)[] acc, Tensor[] grads, float weight) -> ()");
  // The fused LCA pass.  The three state lists are either empty (not requested)
  // or hold one tensor per parameter, updated in place.
  m.def(
      "allocate(Tensor[] before, Tensor[] after, Tensor[] avg_grad, "
      "Tensor? bin_edges, bool row_sums, Tensor(a!)[] cum_lca, "
      "Tensor(b!)[] helped_steps, Tensor(c!)[] lca_out, bool check_finite) "
      "-> (Tensor sums, Tensor counts, Tensor row_sums, Tensor histogram)");
  // Oscillation counting: s = sign(x[k] - base[k]) (sign(x[k]) when base is
  // empty); changes[k] += (s * last_sign[k] < 0); last_sign[k] = s where s != 0.
  m.def(
      "sign_changes_(Tensor(a!)[] last_sign, Tensor(b!)[] changes, Tensor[] x, "
      "Tensor[] base) -> ()");
  // The per-class form: class_grads[k] has shape [C, *before[k].shape].
  m.def(
      "allocate_classes(Tensor[] before, Tensor[] after, Tensor[] class_grads, "
      "bool check_finite) -> (Tensor sums, Tensor counts)");
}
