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
#include <optional>
#include <tuple>
#include <vector>

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "operators.h"

namespace {

using at::Tensor;
using lmrt::typed_operator;
using torch::autograd::AutogradContext;
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
  if (x.dim() == 2 && (x.stride(1) == 1 || cols <= 1)) {
    return x;  // already the matrix: no view to make (each costs a dispatch and a TensorImpl)
  }
  Tensor matrix = x.reshape({rows, cols});
  return matrix.stride(1) == 1 || cols <= 1 ? matrix : matrix.contiguous();
}

// The contiguous tensor `t` with shape `sizes` (its own when it has it).
Tensor with_shape(const Tensor& t, at::IntArrayRef sizes) {
  return t.sizes() == sizes ? t : t.view(sizes);
}

// Whether backward must return the gradient of the `position`-th tensor argument; `present` says which tensor
// arguments were given (an absent optional tensor has no autograd edge, so the edges after it shift down).
template <size_t N>
bool needs_grad(AutogradContext* ctx, const std::array<bool, N>& present, size_t position) {
  return present[position] && ctx->needs_input_grad(std::count(present.begin(), present.begin() + position, true));
}

// A parameter's float32 gradient (the kernels reduce in float32) in the parameter's dtype and shape.
Tensor parameter_grad(const Tensor& grad, const Tensor& param) {
  return with_shape(grad.to(param.scalar_type()), param.sizes());
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

struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
    auto [y, mean, rstd] = layer_norm_forward(input, normalized_shape.size(), weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, rstd});
    ctx->saved_data["col_dims"] = static_cast<int64_t>(normalized_shape.size());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_operator<LayerNormBwd>("lmrt_C::layer_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2];
    const int64_t col_dims = ctx->saved_data["col_dims"].toInt();
    const std::array<bool, 3> present{true, weight.defined(), bias.defined()};
    const std::array<bool, 3> mask{needs_grad(ctx, present, 0), needs_grad(ctx, present, 1),
                                   needs_grad(ctx, present, 2)};
    auto [dx, dw, db] = bwd.call(as_rows(grads[0], col_dims), as_rows(input, col_dims),
                                 weight.defined() ? std::optional<Tensor>(weight) : std::nullopt, saved[3], saved[4],
                                 mask);
    return {mask[0] ? with_shape(dx, input.sizes()) : Tensor(), Tensor(),
            mask[1] ? parameter_grad(dw, weight) : Tensor(), mask[2] ? parameter_grad(db, bias) : Tensor(), Tensor()};
  }
};

Tensor layer_norm(const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, double eps) {
  return std::get<0>(layer_norm_forward(input, normalized_shape.size(), weight, bias, eps));
}

Tensor layer_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                           const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  return LayerNormFunction::apply(input, normalized_shape, weight, bias, eps);
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

struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, at::IntArrayRef normalized_shape,
                        const std::optional<Tensor>& weight, double eps) {
    auto [y, rstd] = rms_norm_forward(input, normalized_shape.size(), weight, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), rstd});
    ctx->saved_data["col_dims"] = static_cast<int64_t>(normalized_shape.size());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_operator<RmsNormBwd>("lmrt_C::rms_norm_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1];
    const int64_t col_dims = ctx->saved_data["col_dims"].toInt();
    const std::array<bool, 2> present{true, weight.defined()};
    const std::array<bool, 2> mask{needs_grad(ctx, present, 0), needs_grad(ctx, present, 1)};
    auto [dx, dw] = bwd.call(as_rows(grads[0], col_dims), as_rows(input, col_dims),
                             weight.defined() ? std::optional<Tensor>(weight) : std::nullopt, saved[2], mask);
    return {mask[0] ? with_shape(dx, input.sizes()) : Tensor(), Tensor(),
            mask[1] ? parameter_grad(dw, weight) : Tensor(), Tensor()};
  }
};

Tensor rms_norm(const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                double eps) {
  return std::get<0>(rms_norm_forward(input, normalized_shape.size(), weight, eps));
}

Tensor rms_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape, const std::optional<Tensor>& weight,
                         double eps) {
  return RmsNormFunction::apply(input, normalized_shape, weight, eps);
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

struct SoftmaxFunction : torch::autograd::Function<SoftmaxFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, int64_t dim, at::ScalarType out_dtype, bool log) {
    dim = c10::maybe_wrap_dim(dim, input.dim());
    const Tensor y = softmax(input, dim, out_dtype, log);
    ctx->save_for_backward({y});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["input_dtype"] = input.scalar_type();
    ctx->saved_data["log"] = log;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_operator<SoftmaxBwd>("lmrt_C::softmax_bwd");
    const Tensor y = ctx->get_saved_variables()[0];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const Tensor dx = bwd.call(dim_last_rows(grads[0], dim), dim_last_rows(y, dim),
                               ctx->saved_data["input_dtype"].toScalarType(), ctx->saved_data["log"].toBool());
    return {from_dim_last_rows(dx, y, dim), Tensor(), Tensor(), Tensor()};
  }
};

Tensor softmax_autograd(const Tensor& input, int64_t dim, at::ScalarType out_dtype, bool log) {
  return SoftmaxFunction::apply(input, dim, out_dtype, log);
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

// The mask takes no gradient: lmrt.ops sends a call whose float mask requires grad to a backend that gives one.
struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const std::optional<Tensor>& mask, bool causal, double scale) {
    auto [out, lse] = attention_forward(q, k, v, mask, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse, mask.value_or(Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_operator<AttentionBwd>("lmrt_C::attention_bwd");
    const auto saved = ctx->get_saved_variables();
    const Tensor& mask = saved[5];
    auto [dq, dk, dv] = bwd.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                 mask.defined() ? std::optional<Tensor>(mask) : std::nullopt,
                                 ctx->saved_data["causal"].toBool(), /*bottom_right=*/false,
                                 ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, Tensor(), Tensor(), Tensor()};
  }
};

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask, bool causal,
                 double scale) {
  return std::get<0>(attention_forward(q, k, v, mask, causal, scale));
}

Tensor attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                          bool causal, double scale) {
  return AttentionFunction::apply(q, k, v, mask, causal, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmrt_C, m) {
  m.def("layer_norm(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  m.def("rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float eps) -> Tensor");
  m.def("softmax(Tensor input, int dim, ScalarType out_dtype, bool log) -> Tensor");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, float scale) -> Tensor");
}

// Without autograd (inference mode), the forward alone; with it, the Functions above.
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
