// Argument checks shared by every device.  Each failure is a TORCH_CHECK whose
// message names the op, the argument, the list index and what was expected, so a
// caller of torch.ops.lca_ext.* gets the same clear error as a caller of lca_ext.ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <string>
#include <type_traits>
#include <vector>

namespace lca_ext {

// Message pieces as text, so that no number reaches std::ostream's formatting in
// this library.  Where a toolchain links libstdc++ statically into an extension
// (the GPU machine's did), the extension's copy of the number formatting meets
// torch's shared copy of the locale: on the CPU the message was cut at the
// first number, on the GPU the process crashed.  Strings are copied verbatim,
// so every TORCH_CHECK here passes numbers, dtypes, devices and shapes through
// text() (tests: the -static-libstdc++ build in .ci/run).
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string text(T v) {
  return std::to_string(v);
}
std::string text(double v);                 // like ostream's default (%g)
std::string text(at::IntArrayRef shape);    // [2, 3]
inline const char* text(at::ScalarType t) { return c10::toString(t); }
inline std::string text(const at::Device& d) { return d.str(); }

// The input dtypes every op reads: float16, bfloat16, float32, float64.
bool is_supported_float(at::ScalarType t);

// list must hold at least one tensor.
void check_nonempty(const char* op, const char* arg, at::TensorList list);
// list and ref must hold the same number of tensors.
void check_same_length(const char* op, const char* arg, at::TensorList list,
                       const char* ref_arg, at::TensorList ref);
// Every tensor is float16/bfloat16/float32/float64.
void check_float_dtypes(const char* op, const char* arg, at::TensorList list);
// Every tensor has exactly dtype `dtype` or `alt` (pass the same twice for one).
void check_dtypes(const char* op, const char* arg, at::TensorList list,
                  at::ScalarType dtype, at::ScalarType alt);
// list[k].dtype == ref[k].dtype for every k.
void check_same_dtypes(const char* op, const char* arg, at::TensorList list,
                       const char* ref_arg, at::TensorList ref);
// list[k].shape == (leading..., *ref[k].shape) for every k.
void check_same_shapes(const char* op, const char* arg, at::TensorList list,
                       const char* ref_arg, at::TensorList ref,
                       at::IntArrayRef leading = {});
// Every tensor lives on `device`.
void check_device(const char* op, const char* arg, at::TensorList list,
                  const at::Device& device);
// No tensor holds NaN or +-Inf (reads every element; synchronises on CUDA).
void check_finite(const char* op, const char* arg, at::TensorList list);

// Dense row-major views of a list (a copy only for tensors that need one).
std::vector<at::Tensor> contiguous_all(at::TensorList list);

// After a kernel wrote into dense copies (contiguous_all) of in-place outputs:
// copies each back into the caller's tensor where that was not dense itself.
void write_back(at::TensorList caller, const std::vector<at::Tensor>& dense);

// Dense views of allocate's lists: the three inputs and the three in-place
// state lists (a copy only of a strided caller tensor; write_back_state puts
// those copies back into the caller's tensors after the kernel).
struct AllocateViews {
  std::vector<at::Tensor> b, a, g, cum, helped, out;
  void write_back_state(at::TensorList cum_lca, at::TensorList helped_steps,
                        at::TensorList lca_out) const;
};
// (also checks that the state lists do not share memory with the inputs or each
// other: check_outputs_apart)
AllocateViews dense_allocate_views(at::TensorList before, at::TensorList after,
                                   at::TensorList avg_grad, at::TensorList cum_lca,
                                   at::TensorList helped_steps, at::TensorList lca_out);

// A list of dense tensors and the argument name it came from.
struct NamedList {
  const char* arg;
  const std::vector<at::Tensor>* tensors;
};
// Refuses, naming both arguments and indices, an output that shares memory with
// an input or another output: a kernel would read or write memory that another
// thread writes.  Allowed: inputs sharing memory with each other, and an
// output that is exactly the same memory as the input of the same index (every
// element is read before it is written, by the same thread).  Takes the dense
// views the kernel gets (contiguous_all).  O(n log n) in the number of tensors.
void check_outputs_apart(const char* op, const std::vector<NamedList>& outputs,
                         const std::vector<NamedList>& inputs);

// Number of "rows" (neurons) of each tensor: size(0), or 1 for a 0-d tensor.
std::vector<int64_t> rows_per_tensor(at::TensorList list);
std::vector<int64_t> numels(at::TensorList list);

// Validated, host-side copy of histogram bin edges: 1-D, >= 2 values, finite,
// strictly increasing, on the CPU (no synchronisation) or on `device` (copied
// to the host: a sync).  An undefined tensor gives an empty vector (no histogram).
std::vector<double> checked_bin_edges(const char* op,
                                      const c10::optional<at::Tensor>& edges,
                                      const at::Device& device);

// The checks all allocate* ops share for before/after/a per-tensor gradient list.
// grads[k] has shape (leading..., *before[k].shape).
void check_allocate_inputs(const char* op, at::TensorList before,
                           at::TensorList after, const char* grad_arg,
                           at::TensorList grads, at::IntArrayRef leading,
                           bool check_finite_values);

// The checks of accumulate_(acc, grads, weight), on any device.
void check_accumulate_inputs(at::TensorList acc, at::TensorList grads,
                             double weight);

// The checks of sign_changes_(last_sign, changes, x, base), on any device.
void check_sign_changes_inputs(at::TensorList last_sign, at::TensorList changes,
                               at::TensorList x, at::TensorList base);

// Every check of allocate (inputs, state lists, bin edges); returns the
// validated host copy of the bin edges.  Shared by the CPU and CUDA kernels.
std::vector<double> check_allocate_op(at::TensorList before, at::TensorList after,
                                      at::TensorList avg_grad,
                                      const c10::optional<at::Tensor>& bin_edges,
                                      at::TensorList cum_lca,
                                      at::TensorList helped_steps,
                                      at::TensorList lca_out, bool check_finite_values);

// Every check of allocate_classes; returns the number of classes C.
int64_t check_allocate_classes_op(at::TensorList before, at::TensorList after,
                                  at::TensorList class_grads, bool check_finite_values);

// The optional per-parameter state lists of allocate: each empty (not requested)
// or one tensor per parameter, of that parameter's shape, on its device.
void check_state_list(const char* op, const char* arg, at::TensorList list,
                      at::TensorList before, at::ScalarType dtype,
                      at::ScalarType alt);

}  // namespace lca_ext
