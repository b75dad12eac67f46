// The op schemas, written once: csrc/lca.cpp declares them for lca_ext, and the
// tests' CPU emulator of the CUDA kernels (tests/cuda_emu) declares the same
// ones under its own namespace.
#pragma once

namespace lca_ext {
namespace schema {

// acc[k] += weight * grads[k] for every k.
constexpr const char* kAccumulate =
    "accumulate_(Tensor(a!)[] acc, Tensor[] grads, float weight) -> ()";
// The fused LCA pass.  The three state lists are either empty (not requested)
// or hold one tensor per parameter, updated in place.
constexpr const char* kAllocate =
    "allocate(Tensor[] before, Tensor[] after, Tensor[] avg_grad, "
    "Tensor? bin_edges, bool row_sums, Tensor(a!)[] cum_lca, "
    "Tensor(b!)[] helped_steps, Tensor(c!)[] lca_out, bool check_finite) "
    "-> (Tensor sums, Tensor counts, Tensor row_sums, Tensor histogram)";
// Oscillation counting: s = sign(x[k] - base[k]) (sign(x[k]) when base is
// empty); changes[k] += (s * last_sign[k] < 0); last_sign[k] = s where s != 0.
constexpr const char* kSignChanges =
    "sign_changes_(Tensor(a!)[] last_sign, Tensor(b!)[] changes, Tensor[] x, "
    "Tensor[] base) -> ()";
// The per-class form: class_grads[k] has shape [C, *before[k].shape].
constexpr const char* kAllocateClasses =
    "allocate_classes(Tensor[] before, Tensor[] after, Tensor[] class_grads, "
    "bool check_finite) -> (Tensor sums, Tensor counts)";

}  // namespace schema
}  // namespace lca_ext
