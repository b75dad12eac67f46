#include "validate.h"

#include <algorithm>
#include <cstdint>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <tuple>

namespace lca_ext {

std::string text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string text(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
}

void check_nonempty(const char* op, const char* arg, at::TensorList list) {
  TORCH_CHECK(!list.empty(), "lca_ext.", op, ": ", arg,
              " is an empty list; expected at least one tensor");
}

void check_same_length(const char* op, const char* arg, at::TensorList list,
                       const char* ref_arg, at::TensorList ref) {
  TORCH_CHECK(list.size() == ref.size(), "lca_ext.", op, ": ", arg, " has ",
              text(list.size()), " tensors but ", ref_arg, " has ", text(ref.size()),
              "; expected one per parameter");
}

void check_float_dtypes(const char* op, const char* arg, at::TensorList list) {
  for (size_t k = 0; k < list.size(); ++k) {
    TORCH_CHECK(list[k].defined(), "lca_ext.", op, ": ", arg, "[", text(k),
                "] is undefined (None); expected a tensor");
    TORCH_CHECK(is_supported_float(list[k].scalar_type()), "lca_ext.", op, ": ",
                arg, "[", text(k), "] has dtype ", text(list[k].scalar_type()),
                "; expected float16, bfloat16, float32 or float64");
  }
}

void check_dtypes(const char* op, const char* arg, at::TensorList list,
                  at::ScalarType dtype, at::ScalarType alt) {
  for (size_t k = 0; k < list.size(); ++k) {
    const auto t = list[k].scalar_type();
    if (dtype == alt) {
      TORCH_CHECK(t == dtype, "lca_ext.", op, ": ", arg, "[", text(k), "] has dtype ",
                  text(t), "; expected ", text(dtype));
    } else {
      TORCH_CHECK(t == dtype || t == alt, "lca_ext.", op, ": ", arg, "[", text(k),
                  "] has dtype ", text(t), "; expected ", text(dtype), " or ", text(alt));
    }
  }
}

void check_same_dtypes(const char* op, const char* arg, at::TensorList list,
                       const char* ref_arg, at::TensorList ref) {
  for (size_t k = 0; k < list.size(); ++k) {
    TORCH_CHECK(list[k].scalar_type() == ref[k].scalar_type(), "lca_ext.", op,
                ": ", arg, "[", text(k), "] has dtype ", text(list[k].scalar_type()),
                " but ", ref_arg, "[", text(k), "] has dtype ", text(ref[k].scalar_type()),
                "; expected the same dtype");
  }
}

// t's shape is `leading` followed by `rest` (compared in place: this runs for
// every tensor of every call, so it allocates nothing unless it fails)
static bool shape_is(const at::Tensor& t, at::IntArrayRef leading, at::IntArrayRef rest) {
  const at::IntArrayRef s = t.sizes();
  if (s.size() != leading.size() + rest.size()) return false;
  for (size_t i = 0; i < leading.size(); ++i)
    if (s[i] != leading[i]) return false;
  for (size_t i = 0; i < rest.size(); ++i)
    if (s[leading.size() + i] != rest[i]) return false;
  return true;
}

void check_same_shapes(const char* op, const char* arg, at::TensorList list,
                       const char* ref_arg, at::TensorList ref,
                       at::IntArrayRef leading) {
  for (size_t k = 0; k < list.size(); ++k) {
    if (shape_is(list[k], leading, ref[k].sizes())) continue;
    std::vector<int64_t> want(leading.begin(), leading.end());
    want.insert(want.end(), ref[k].sizes().begin(), ref[k].sizes().end());
    TORCH_CHECK(false, "lca_ext.", op, ": ", arg, "[", text(k), "] has shape ",
                text(list[k].sizes()), "; expected ", text(at::IntArrayRef(want)),
                leading.empty() ? " (the shape of " : " (",
                leading.empty() ? "" : "classes x the shape of ", ref_arg, "[", text(k), "])");
  }
}

void check_device(const char* op, const char* arg, at::TensorList list,
                  const at::Device& device) {
  for (size_t k = 0; k < list.size(); ++k) {
    TORCH_CHECK(list[k].device() == device, "lca_ext.", op, ": ", arg, "[", text(k),
                "] is on ", text(list[k].device()), "; expected every tensor on ",
                text(device));
  }
}

void check_finite(const char* op, const char* arg, at::TensorList list) {
  for (size_t k = 0; k < list.size(); ++k) {
    if (list[k].numel() == 0) continue;
    const bool ok = at::isfinite(list[k]).all().item<bool>();
    TORCH_CHECK(ok, "lca_ext.", op, ": ", arg, "[", text(k),
                "] contains NaN or Inf (check_finite=True)");
  }
}

std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

void write_back(at::TensorList caller, const std::vector<at::Tensor>& dense) {
  for (size_t k = 0; k < caller.size(); ++k)
    if (!dense[k].is_same(caller[k])) caller[k].copy_(dense[k]);
}

void check_outputs_apart(const char* op, const std::vector<NamedList>& outputs,
                         const std::vector<NamedList>& inputs) {
  struct Span {
    uintptr_t lo, hi;
    bool output;
    const char* arg;
    size_t k;
  };
  // no output tensor (e.g. allocate without state lists): nothing can overlap
  bool any_output = false;
  for (const NamedList& l : outputs) any_output = any_output || !l.tensors->empty();
  if (!any_output) return;
  std::vector<Span> spans;
  auto collect = [&](const std::vector<NamedList>& lists, bool output) {
    for (const NamedList& l : lists) {
      for (size_t k = 0; k < l.tensors->size(); ++k) {
        const at::Tensor& t = (*l.tensors)[k];
        if (!t.defined() || t.numel() == 0) continue;
        const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
        spans.push_back(Span{lo, lo + static_cast<uintptr_t>(t.numel() * t.element_size()),
                             output, l.arg, k});
      }
    }
  };
  collect(outputs, true);
  collect(inputs, false);
  if (spans.size() < 2) return;
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.lo < b.lo; });
  for (size_t i = 0; i < spans.size(); ++i) {
    for (size_t j = i + 1; j < spans.size() && spans[j].lo < spans[i].hi; ++j) {
      const Span &a = spans[i], &b = spans[j];
      if (!a.output && !b.output) continue;  // inputs may share memory
      const bool same = a.lo == b.lo && a.hi == b.hi && a.k == b.k && a.output != b.output;
      TORCH_CHECK(same, "lca_ext.", op, ": ", a.arg, "[", text(a.k), "] and ", b.arg, "[",
                  text(b.k),
                  "] share memory; an output may only be the very same tensor as the input "
                  "of its own index (e.g. lca_out[k] = avg_grad[k]), never overlap another");
    }
  }
}

AllocateViews dense_allocate_views(at::TensorList before, at::TensorList after,
                                   at::TensorList avg_grad, at::TensorList cum_lca,
                                   at::TensorList helped_steps, at::TensorList lca_out) {
  AllocateViews v{contiguous_all(before),  contiguous_all(after),
                  contiguous_all(avg_grad), contiguous_all(cum_lca),
                  contiguous_all(helped_steps), contiguous_all(lca_out)};
  check_outputs_apart("allocate",
                      {{"cum_lca", &v.cum}, {"helped_steps", &v.helped}, {"lca_out", &v.out}},
                      {{"before", &v.b}, {"after", &v.a}, {"avg_grad", &v.g}});
  return v;
}

void AllocateViews::write_back_state(at::TensorList cum_lca, at::TensorList helped_steps,
                                     at::TensorList lca_out) const {
  write_back(cum_lca, cum);
  write_back(helped_steps, helped);
  write_back(lca_out, out);
}

std::vector<int64_t> rows_per_tensor(at::TensorList list) {
  std::vector<int64_t> rows;
  rows.reserve(list.size());
  for (const auto& t : list) rows.push_back(t.dim() == 0 ? 1 : t.size(0));
  return rows;
}

std::vector<int64_t> numels(at::TensorList list) {
  std::vector<int64_t> n;
  n.reserve(list.size());
  for (const auto& t : list) n.push_back(t.numel());
  return n;
}

std::vector<double> checked_bin_edges(const char* op,
                                      const c10::optional<at::Tensor>& edges,
                                      const at::Device& device) {
  if (!edges.has_value() || !edges->defined()) return {};
  const at::Tensor& e = *edges;
  TORCH_CHECK(e.dim() == 1 && e.numel() >= 2, "lca_ext.", op,
              ": bin_edges has shape ", text(e.sizes()),
              "; expected a 1-D tensor of at least 2 edges");
  TORCH_CHECK(e.is_floating_point(), "lca_ext.", op, ": bin_edges has dtype ",
              text(e.scalar_type()), "; expected a floating dtype");
  // Host edges are read directly (they travel to the GPU with the op's tables,
  // so no synchronisation); edges on the device are copied here (a sync).
  TORCH_CHECK(e.device() == device || e.device().is_cpu(), "lca_ext.", op,
              ": bin_edges is on ", text(e.device()), "; expected the CPU or ", text(device),
              " (the device of before)");
  const at::Tensor host = e.to(at::kCPU, at::kDouble).contiguous();
  const double* p = host.data_ptr<double>();
  std::vector<double> out(p, p + host.numel());
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(std::isfinite(out[i]), "lca_ext.", op, ": bin_edges[", text(i),
                "] is ", text(out[i]), "; expected finite edges");
    TORCH_CHECK(i == 0 || out[i] > out[i - 1], "lca_ext.", op, ": bin_edges[",
                text(i), "] = ", text(out[i]), " is not greater than bin_edges[",
                text(i - 1), "] = ", text(out[i - 1]), "; expected strictly increasing edges");
  }
  return out;
}

void check_allocate_inputs(const char* op, at::TensorList before,
                           at::TensorList after, const char* grad_arg,
                           at::TensorList grads, at::IntArrayRef leading,
                           bool check_finite_values) {
  check_nonempty(op, "before", before);
  check_same_length(op, "after", after, "before", before);
  check_same_length(op, grad_arg, grads, "before", before);
  check_float_dtypes(op, "before", before);
  check_float_dtypes(op, "after", after);
  check_float_dtypes(op, grad_arg, grads);
  check_same_dtypes(op, "after", after, "before", before);
  check_same_shapes(op, "after", after, "before", before);
  check_same_shapes(op, grad_arg, grads, "before", before, leading);
  const at::Device device = before[0].device();
  check_device(op, "before", before, device);
  check_device(op, "after", after, device);
  check_device(op, grad_arg, grads, device);
  if (check_finite_values) {
    check_finite(op, "before", before);
    check_finite(op, "after", after);
    check_finite(op, grad_arg, grads);
  }
}

std::vector<double> check_allocate_op(at::TensorList before, at::TensorList after,
                                      at::TensorList avg_grad,
                                      const c10::optional<at::Tensor>& bin_edges,
                                      at::TensorList cum_lca,
                                      at::TensorList helped_steps,
                                      at::TensorList lca_out, bool check_finite_values) {
  const char* op = "allocate";
  check_allocate_inputs(op, before, after, "avg_grad", avg_grad, {},
                        check_finite_values);
  check_state_list(op, "cum_lca", cum_lca, before, at::kFloat, at::kDouble);
  check_state_list(op, "helped_steps", helped_steps, before, at::kInt, at::kInt);
  check_state_list(op, "lca_out", lca_out, before, at::kFloat, at::kDouble);
  return checked_bin_edges(op, bin_edges, before[0].device());
}

int64_t check_allocate_classes_op(at::TensorList before, at::TensorList after,
                                  at::TensorList class_grads, bool check_finite_values) {
  const char* op = "allocate_classes";
  check_nonempty(op, "class_grads", class_grads);
  for (size_t k = 0; k < class_grads.size(); ++k) {
    TORCH_CHECK(class_grads[k].defined() && class_grads[k].dim() >= 1,
                "lca_ext.allocate_classes: class_grads[", text(k),
                "] must have a leading class dimension (shape [C, *before[", text(k),
                "].shape])");
  }
  const int64_t C = class_grads[0].size(0);
  check_allocate_inputs(op, before, after, "class_grads", class_grads, {C},
                        check_finite_values);
  return C;
}

void check_accumulate_inputs(at::TensorList acc, at::TensorList grads,
                             double weight) {
  const char* op = "accumulate_";
  check_nonempty(op, "acc", acc);
  check_same_length(op, "grads", grads, "acc", acc);
  for (size_t k = 0; k < acc.size(); ++k) {
    TORCH_CHECK(acc[k].defined(), "lca_ext.accumulate_: acc[", text(k),
                "] is undefined (None); expected a tensor");
  }
  check_dtypes(op, "acc", acc, at::kFloat, at::kDouble);
  check_float_dtypes(op, "grads", grads);
  check_same_shapes(op, "grads", grads, "acc", acc);
  check_device(op, "acc", acc, acc[0].device());
  check_device(op, "grads", grads, acc[0].device());
  TORCH_CHECK(std::isfinite(weight), "lca_ext.accumulate_: weight is ", text(weight),
              "; expected a finite number");
}

void check_sign_changes_inputs(at::TensorList last_sign, at::TensorList changes,
                               at::TensorList x, at::TensorList base) {
  const char* op = "sign_changes_";
  check_nonempty(op, "x", x);
  check_float_dtypes(op, "x", x);
  const at::Device device = x[0].device();
  check_device(op, "x", x, device);
  if (!base.empty()) {
    check_same_length(op, "base", base, "x", x);
    check_float_dtypes(op, "base", base);
    check_same_dtypes(op, "base", base, "x", x);
    check_same_shapes(op, "base", base, "x", x);
    check_device(op, "base", base, device);
  }
  for (const auto& [name, list, dtype] :
       {std::make_tuple("last_sign", last_sign, at::kChar),
        std::make_tuple("changes", changes, at::kInt)}) {
    check_same_length(op, name, list, "x", x);
    for (size_t k = 0; k < list.size(); ++k) {
      TORCH_CHECK(list[k].defined(), "lca_ext.", op, ": ", name, "[", text(k),
                  "] is undefined (None); expected a tensor");
    }
    check_dtypes(op, name, list, dtype, dtype);
    check_same_shapes(op, name, list, "x", x);
    check_device(op, name, list, device);
  }
}

void check_state_list(const char* op, const char* arg, at::TensorList list,
                      at::TensorList before, at::ScalarType dtype,
                      at::ScalarType alt) {
  if (list.empty()) return;
  check_same_length(op, arg, list, "before", before);
  for (size_t k = 0; k < list.size(); ++k) {
    TORCH_CHECK(list[k].defined(), "lca_ext.", op, ": ", arg, "[", text(k),
                "] is undefined (None); expected a tensor");
  }
  check_dtypes(op, arg, list, dtype, alt);
  check_same_shapes(op, arg, list, "before", before);
  check_device(op, arg, list, before[0].device());
}

}  // namespace lca_ext
