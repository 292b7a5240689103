// The differentiable operators of lmrt._C: lmrt_C::layer_norm, rms_norm and softmax take the tensors of the
// torch.nn.functional call (any shape, any strides), lay them out as the kernel-level operators of lmrt_ops.cpp
// take them, and register their backward in C++; lmrt_C::attention takes (batch, heads, rows, dim) tensors in any
// strides, as the kernel-level attention_fwd does.
//
// They are lmrt.ops' eager path on the cpp and cuda backends: one dispatch into C++ per call and per backward,
// where the Python custom ops of lmrt/ops/ (which torch.compile and opcheck see) cost some 40 us of Python each.
// The forward and backward formulas are the same kernel calls the custom ops make, so the two paths agree bit for
// bit (tests/ops check both).
#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include "operators.h"

namespace {

using at::Tensor;
using lmrt::typed_operator;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// `x` as a (rows, cols) matrix with unit column stride, the columns being its last `col_dims` dims: a view when
// the strides allow one.
Tensor as_rows(const Tensor& x, int64_t col_dims) {
  const auto sizes = x.sizes();
  const int64_t split = x.dim() - col_dims;
  int64_t rows = 1, cols = 1;
  for (int64_t d = 0; d < x.dim(); ++d) {
    (d < split ? rows : cols) *= sizes[d];
  }
  if (x.dim() == 2 && col_dims == 1 && (x.stride(1) == 1 || cols <= 1)) {
    return x;  // already the matrix: no view to make (each costs a dispatch and a TensorImpl)
  }
  Tensor matrix = x.reshape({rows, cols});
  return matrix.stride(1) == 1 || cols <= 1 ? matrix : matrix.contiguous();
}

// The number of trailing dims a norm normalizes over, once `normalized_shape` is checked to be the last dims of
// `input`'s shape (one at least), as F.layer_norm and F.rms_norm require.
int64_t normalized_dims(const char* op, const Tensor& input, at::IntArrayRef normalized_shape) {
  const int64_t dims = static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(dims >= 1 && dims <= input.dim() && input.sizes().slice(input.dim() - dims) == normalized_shape,
              "lmrt_C::", op, ": `normalized_shape` must be the last dims of the input's shape ", input.sizes(),
              " (one at least), got ", normalized_shape);
  return dims;
}

// The contiguous tensor `t` with shape `sizes` (its own when it has it).
Tensor with_shape(const Tensor& t, at::IntArrayRef sizes) {
  return t.sizes() == sizes ? t : t.view(sizes);
}

// A parameter's float32 gradient (the kernels reduce in float32) in the parameter's dtype and shape.
Tensor parameter_grad(const Tensor& grad, const Tensor& param) {
  return with_shape(grad.to(param.scalar_type()), param.sizes());
}

// ------------------------------------------------------------------------------------------- autograd nodes
//
// Each operator's backward is a hand-written autograd Node with its saved tensors as members, as torch's generated
// backward functions are, rather than a torch::autograd::Function: that one's CppNode keeps its saved values in a
// hash map of IValues, records each input's and output's metadata once more and wraps the outputs through generic
// code. After a kernel that streamed a few MB (its code and data out of the caches) that cost some 15 us: a training
// forward of a 1024 x 1024 float32 LayerNorm took 167 us against F.layer_norm's 155, and with this node 151 against
// 157.

// A new node of type T, held as this torch's node pointer: c10::intrusive_ptr since torch 2.12 (Node derives from
// c10::intrusive_ptr_target there), std::shared_ptr before, freed through torch's deleteNode (found by
// argument-dependent lookup, as it exists only there), which frees long chains of nodes without deep recursion.
template <typename T>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>();
  } else {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  }
}

// Whether the tensors need a backward node: grad mode is on and one of them requires grad. Forward-mode AD has
// no formula here, so a dual tensor is refused, as torch::autograd::Function refuses it.
template <typename... Tensors>
bool needs_node(const char* op, const Tensors&... tensors) {
  TORCH_CHECK(!(torch::autograd::isFwGradDefined(tensors) || ...), "lmrt_C::", op,
              ": forward-mode AD is not supported; use the reverse mode (backward)");
  return torch::autograd::compute_requires_grad(tensors...);
}

// A backward whose gradients would need a graph of their own (create_graph=True over tensors that require grad, for
// higher-order gradients) is refused: the kernels have no double-backward formula, and returning their gradients
// without one would make the higher-order gradients silently wrong. compute_requires_grad is false outside grad
// mode, as in every backward without create_graph.
template <typename... Tensors>
void refuse_double_backward(const char* op, const Tensors&... tensors) {
  TORCH_CHECK(!torch::autograd::compute_requires_grad(tensors...), "lmrt_C::", op,
              ": no double backward (a backward with create_graph=True, as for higher-order gradients and under "
              "torch.func.grad, vjp and jacrev, which build one); use the torch.nn.functional op there");
}

// Frees a node's saved tensors (release_variables: the graph is not kept for another backward).
template <typename... Saved>
void reset_data(Saved&... saved) {
  (saved.reset_data(), ...);
}

// A saved tensor that may be undefined, as an optional operator argument.
std::optional<Tensor> optional_tensor(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// The gradient a node was given for its output: every node here has one output; an undefined gradient (a hook
// returned None) makes every input's undefined.
bool has_grad(const variable_list& grads) {
  return !grads.empty() && grads[0].defined();
}

// ------------------------------------------------------------------------------------------------ LayerNorm

using LayerNormFwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&,
                                                        const std::optional<Tensor>&, double);
using LayerNormBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                        const Tensor&, const Tensor&, std::array<bool, 3>);

// (y in the input's shape, mean, rstd).
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& input, int64_t col_dims,
                                                      const std::optional<Tensor>& weight,
                                                      const std::optional<Tensor>& bias, double eps) {
  static const auto fwd = typed_operator<LayerNormFwd>("lmrt_C::layer_norm_fwd");
  auto [y, mean, rstd] = fwd.call(as_rows(input, col_dims), weight, bias, eps);
  return {with_shape(y, input.sizes()), mean, rstd};
}

// Inputs (next edges): input, weight, bias.
struct LayerNormBackward : Node {
  SavedVariable input, weight, mean, rstd;
  at::ScalarType bias_dtype = at::kFloat;
  std::vector<int64_t> bias_sizes;
  int64_t col_dims = 1;

  std::string name() const override { return "LmrtLayerNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    reset_data(input, weight, mean, rstd);
  }

  variable_list apply(variable_list&& grads) override {
    static const auto bwd = typed_operator<LayerNormBwd>("lmrt_C::layer_norm_bwd");
    std::lock_guard<std::mutex> lock(mutex_);
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2)};
    if (!has_grad(grads)) {
      return variable_list(3);
    }
    const Tensor x = input.unpack(), w = weight.unpack();
    refuse_double_backward("layer_norm", grads[0], x, w);
    auto [dx, dw, db] = bwd.call(as_rows(grads[0], col_dims), as_rows(x, col_dims),
                                 optional_tensor(w), mean.unpack(), rstd.unpack(), mask);
    return {mask[0] ? with_shape(dx, x.sizes()) : Tensor(), mask[1] ? parameter_grad(dw, w) : Tensor(),
            mask[2] ? with_shape(db.to(bias_dtype), bias_sizes) : Tensor()};
  }
};

Tensor layer_norm(const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, double eps) {
  return std::get<0>(layer_norm_forward(input, normalized_dims("layer_norm", input, normalized_shape), weight, bias,
                                        eps));
}

Tensor layer_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                           const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  auto [y, mean, rstd] = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_norm_forward(input, normalized_dims("layer_norm", input, normalized_shape), weight, bias, eps);
  }();
  if (needs_node("layer_norm", input, weight, bias)) {
    auto node = make_node<LayerNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    node->input = SavedVariable(input, false);
    node->weight = SavedVariable(weight, false);
    node->mean = SavedVariable(mean, false);
    node->rstd = SavedVariable(rstd, false);
    if (bias.has_value() && bias->defined()) {
      node->bias_dtype = bias->scalar_type();
      node->bias_sizes = bias->sizes().vec();
    }
    node->col_dims = static_cast<int64_t>(normalized_shape.size());
    torch::autograd::set_history(y, node);
  }
  return y;
}

// -------------------------------------------------------------------------------------------------- RMSNorm

using RmsNormFwd = std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, double);
using RmsNormBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                              const Tensor&, std::array<bool, 2>);

// (y in the input's shape, rstd).
std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& input, int64_t col_dims, const std::optional<Tensor>& weight,
                                            double eps) {
  static const auto fwd = typed_operator<RmsNormFwd>("lmrt_C::rms_norm_fwd");
  auto [y, rstd] = fwd.call(as_rows(input, col_dims), weight, eps);
  return {with_shape(y, input.sizes()), rstd};
}

// Inputs (next edges): input, weight.
struct RmsNormBackward : Node {
  SavedVariable input, weight, rstd;
  int64_t col_dims = 1;

  std::string name() const override { return "LmrtRmsNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    reset_data(input, weight, rstd);
  }

  variable_list apply(variable_list&& grads) override {
    static const auto bwd = typed_operator<RmsNormBwd>("lmrt_C::rms_norm_bwd");
    std::lock_guard<std::mutex> lock(mutex_);
    const std::array<bool, 2> mask{task_should_compute_output(0), task_should_compute_output(1)};
    if (!has_grad(grads)) {
      return variable_list(2);
    }
    const Tensor x = input.unpack(), w = weight.unpack();
    refuse_double_backward("rms_norm", grads[0], x, w);
    auto [dx, dw] = bwd.call(as_rows(grads[0], col_dims), as_rows(x, col_dims),
                             optional_tensor(w), rstd.unpack(), mask);
    return {mask[0] ? with_shape(dx, x.sizes()) : Tensor(), mask[1] ? parameter_grad(dw, w) : Tensor()};
  }
};

Tensor rms_norm(const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                double eps) {
  return std::get<0>(rms_norm_forward(input, normalized_dims("rms_norm", input, normalized_shape), weight, eps));
}

Tensor rms_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                         double eps) {
  auto [y, rstd] = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rms_norm_forward(input, normalized_dims("rms_norm", input, normalized_shape), weight, eps);
  }();
  if (needs_node("rms_norm", input, weight)) {
    auto node = make_node<RmsNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight));
    node->input = SavedVariable(input, false);
    node->weight = SavedVariable(weight, false);
    node->rstd = SavedVariable(rstd, false);
    node->col_dims = static_cast<int64_t>(normalized_shape.size());
    torch::autograd::set_history(y, node);
  }
  return y;
}

// -------------------------------------------------------------------------------------------------- softmax

using SoftmaxFwd = Tensor(const Tensor&, at::ScalarType, bool);
using SoftmaxBwd = Tensor(const Tensor&, const Tensor&, at::ScalarType, bool);

// `x` with `dim` moved last, as (rows, size of `dim`): the row kernels' layout (a view when `dim` is last).
Tensor dim_last_rows(const Tensor& x, int64_t dim) {
  return as_rows(dim == x.dim() - 1 ? x : x.movedim(dim, -1), 1);
}

// The contiguous tensor of `like`'s shape whose `dim`, moved last, the (rows, size of `dim`) matrix `rows` holds.
Tensor from_dim_last_rows(const Tensor& rows, const Tensor& like, int64_t dim) {
  if (dim == like.dim() - 1) {
    return with_shape(rows, like.sizes());
  }
  std::vector<int64_t> moved_shape = like.sizes().vec();
  moved_shape.erase(moved_shape.begin() + dim);
  moved_shape.push_back(like.size(dim));
  return rows.view(moved_shape).movedim(-1, dim).contiguous();
}

Tensor softmax(const Tensor& input, int64_t dim, at::ScalarType out_dtype, bool log) {
  static const auto fwd = typed_operator<SoftmaxFwd>("lmrt_C::softmax_fwd");
  dim = c10::maybe_wrap_dim(dim, input.dim());
  return from_dim_last_rows(fwd.call(dim_last_rows(input, dim), out_dtype, log), input, dim);
}

// Input (next edge): input. The backward needs the output alone.
struct SoftmaxBackward : Node {
  SavedVariable output;
  int64_t dim = -1;
  at::ScalarType input_dtype = at::kFloat;
  bool log = false;

  std::string name() const override { return "LmrtSoftmaxBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    reset_data(output);
  }

  variable_list apply(variable_list&& grads) override {
    static const auto bwd = typed_operator<SoftmaxBwd>("lmrt_C::softmax_bwd");
    std::lock_guard<std::mutex> lock(mutex_);
    if (!has_grad(grads) || !task_should_compute_output(0)) {
      return variable_list(1);
    }
    const Tensor y = output.unpack(getptr());
    refuse_double_backward("softmax", grads[0], y);
    return {from_dim_last_rows(bwd.call(dim_last_rows(grads[0], dim), dim_last_rows(y, dim), input_dtype, log), y,
                               dim)};
  }
};

Tensor softmax_autograd(const Tensor& input, int64_t dim, at::ScalarType out_dtype, bool log) {
  dim = c10::maybe_wrap_dim(dim, input.dim());
  Tensor y = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return softmax(input, dim, out_dtype, log);
  }();
  if (needs_node("softmax", input)) {
    auto node = make_node<SoftmaxBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input));
    node->dim = dim;
    node->input_dtype = input.scalar_type();
    node->log = log;
    torch::autograd::set_history(y, node);
    node->output = SavedVariable(y, true);
  }
  return y;
}

// ------------------------------------------------------------------------------------------------ attention

using AttentionFwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                const std::optional<Tensor>&, bool, bool, double, bool);
using AttentionBwd = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                        const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                                        bool, bool, double);

// (out (batch, heads, q_len, head_dim_v) contiguous, lse): causal masking top-left aligned, as in PyTorch.
std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const std::optional<Tensor>& mask, bool causal, double scale) {
  static const auto fwd = typed_operator<AttentionFwd>("lmrt_C::attention_fwd");
  return fwd.call(q, k, v, mask, causal, /*bottom_right=*/false, scale, /*heads_first_out=*/true);
}

// Inputs (next edges): q, k, v. The mask takes no gradient: lmrt.ops sends a call whose float mask requires grad
// to a backend that gives one.
struct AttentionBackward : Node {
  SavedVariable q, k, v, out, lse, mask;
  bool causal = false;
  double scale = 1;

  std::string name() const override { return "LmrtAttentionBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    reset_data(q, k, v, out, lse, mask);
  }

  variable_list apply(variable_list&& grads) override {
    static const auto bwd = typed_operator<AttentionBwd>("lmrt_C::attention_bwd");
    std::lock_guard<std::mutex> lock(mutex_);
    const std::array<bool, 3> wanted{task_should_compute_output(0), task_should_compute_output(1),
                                     task_should_compute_output(2)};
    if (!has_grad(grads)) {
      return variable_list(3);
    }
    const Tensor q_saved = q.unpack(), k_saved = k.unpack(), v_saved = v.unpack();
    refuse_double_backward("attention", grads[0], q_saved, k_saved, v_saved);
    auto [dq, dk, dv] = bwd.call(grads[0], q_saved, k_saved, v_saved, out.unpack(getptr()), lse.unpack(),
                                 optional_tensor(mask.unpack()), causal, /*bottom_right=*/false, scale);
    return {wanted[0] ? dq : Tensor(), wanted[1] ? dk : Tensor(), wanted[2] ? dv : Tensor()};
  }
};

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask, bool causal,
                 double scale) {
  return std::get<0>(attention_forward(q, k, v, mask, causal, scale));
}

Tensor attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                          bool causal, double scale) {
  auto [out, lse] = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return attention_forward(q, k, v, mask, causal, scale);
  }();
  if (needs_node("attention", q, k, v)) {
    auto node = make_node<AttentionBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(q, k, v));
    node->q = SavedVariable(q, false);
    node->k = SavedVariable(k, false);
    node->v = SavedVariable(v, false);
    node->lse = SavedVariable(lse, false);
    node->mask = SavedVariable(mask, false);
    node->causal = causal;
    node->scale = scale;
    torch::autograd::set_history(out, node);
    node->out = SavedVariable(out, true);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmrt_C, m) {
  m.def("layer_norm(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float eps) -> Tensor");
  m.def("softmax(Tensor input, int dim, ScalarType out_dtype, bool log) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float scale) -> Tensor");
}

// Without autograd (inference mode), the forward alone; with it, the forward and a node above.
TORCH_LIBRARY_IMPL(lmrt_C, CompositeExplicitAutograd, m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("rms_norm", &rms_norm);
  m.impl("softmax", &softmax);
  m.impl("attention", &attention);
}

TORCH_LIBRARY_IMPL(lmrt_C, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("softmax", &softmax_autograd);
  m.impl("attention", &attention_autograd);
}
