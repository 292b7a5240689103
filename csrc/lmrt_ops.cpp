// The extension lmrt._C: the schemas of the torch.ops.lmrt_C operators, their input checks, and the glue that
// runs them on the CPU kernels (csrc/cpu/) or, in a CUDA build (LMRT_WITH_CUDA), on the CUDA launchers
// (csrc/cuda/) under the tensors' device and current stream.
//
// These are the kernel-level operators behind lmrt.ops' `cpp` and `cuda` backends: the Python custom ops of
// lmrt/ops/ keep the public signatures, the autograd formulas and the fake tensors, and call these with the
// layouts the kernels take (norms and softmax on (rows, cols) matrices with unit column stride; attention on
// (batch, heads, rows, dim) tensors with unit stride along dim).
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "operators.h"
#include "cpu/attention.h"
#include "cpu/layer_norm.h"
#include "cpu/rms_norm.h"
#include "cpu/softmax.h"

#ifdef LMRT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/attention.h"
#include "cuda/layer_norm.h"
#include "cuda/rms_norm.h"
#include "cuda/softmax.h"
#endif

namespace {

using at::Tensor;
using lmrt::is_kernel_dtype;

// ---------------------------------------------------------------------------------------------------- checks

void check_kernel_dtype(const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(is_kernel_dtype(dtype), "lmrt_C::", op, ": `", name, "` must be float32, float16 or bfloat16, got ",
              dtype);
}

void check_kernel_dtype(const char* op, const char* name, const Tensor& t) {
  check_kernel_dtype(op, name, t.scalar_type());
}

void check_device(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "lmrt_C::", op, ": `", name, "` is on ", t.device(),
              " but the input is on ", like.device());
}

// A (rows, cols) matrix whose columns are adjacent in memory, as the norm and softmax kernels read.
void check_rows(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "lmrt_C::", op, ": `", name, "` must be a (rows, cols) matrix, got ", t.dim(), " dims");
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1 || t.numel() == 0, "lmrt_C::", op, ": `", name,
              "` must have unit column stride, got strides ", t.strides());
  check_kernel_dtype(op, name, t);
}

void check_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.sizes() == like.sizes(), "lmrt_C::", op, ": `", name, "` has shape ", t.sizes(),
              " but must have the input's shape ", like.sizes());
  check_device(op, name, t, like);
}

// One float32 statistic per row (mean or rstd), contiguous.
void check_row_stats(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(),
              "lmrt_C::", op, ": `", name, "` must be a contiguous float32 vector of ", x.size(0),
              " entries (one per row), got ", t.scalar_type(), " of shape ", t.sizes());
  check_device(op, name, t, x);
}

// A weight or bias as the kernels take it: float32, contiguous, one entry per column; undefined when absent.
Tensor float_parameter(const char* op, const char* name, const std::optional<Tensor>& param, const Tensor& x) {
  if (!param.has_value() || !param->defined()) {
    return Tensor();
  }
  TORCH_CHECK(param->numel() == x.size(1), "lmrt_C::", op, ": `", name, "` has ", param->numel(),
              " elements but the rows have ", x.size(1));
  TORCH_CHECK(param->is_floating_point(), "lmrt_C::", op, ": `", name, "` must be floating point, got ",
              param->scalar_type());
  check_device(op, name, *param, x);
  const Tensor flat = param->to(at::kFloat).contiguous();
  return flat.dim() == 1 ? flat : flat.view({x.size(1)});
}

// A gradient the backward computed, or an empty tensor for one that its output mask did not ask for.
Tensor defined_or_empty(const Tensor& grad, const Tensor& like) {
  return grad.defined() ? grad : like.new_empty({0});
}

Tensor empty_rows(const Tensor& like, at::ScalarType dtype) {
  return at::empty({like.size(0), like.size(1)}, like.options().dtype(dtype));
}

Tensor row_stats(const Tensor& x) {
  Tensor stats = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  if (x.size(1) == 0) {
    stats.fill_(std::numeric_limits<float>::quiet_NaN());  // the mean and variance of no elements
  }
  return stats;
}

#ifdef LMRT_WITH_CUDA
lmrt::cuda::DType cuda_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return lmrt::cuda::DType::kFloat16;
    case at::kBFloat16:
      return lmrt::cuda::DType::kBFloat16;
    default:
      return lmrt::cuda::DType::kFloat32;
  }
}

void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "lmrt_C::", op, ": the CUDA kernel failed: ", cudaGetErrorString(error));
}

const float* float_data(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

float* mutable_float_data(const Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

Tensor workspace(const Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}
#endif

// ------------------------------------------------------------------------------------------------ LayerNorm

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps) {
  constexpr const char* op = "layer_norm_fwd";
  check_rows(op, "x", x);
  const Tensor w = float_parameter(op, "weight", weight, x), b = float_parameter(op, "bias", bias, x);
  Tensor y = empty_rows(x, x.scalar_type()), mean = row_stats(x), rstd = row_stats(x);
  if (x.numel() == 0) {
    return {y, mean, rstd};
  }
#ifdef LMRT_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(op, lmrt::cuda::layer_norm_fwd(cuda_dtype(x.scalar_type()), x.const_data_ptr(), x.stride(0),
                                                float_data(w), float_data(b), y.data_ptr(), mean.data_ptr<float>(),
                                                rstd.data_ptr<float>(), x.size(0), x.size(1),
                                                static_cast<float>(eps), at::cuda::getCurrentCUDAStream()));
    return {y, mean, rstd};
  }
#endif
  lmrt::cpu::layer_norm_fwd(x, w, b, eps, y, mean, rstd);
  return {y, mean, rstd};
}

// (dx, dweight, dbias); dweight and dbias are float32; an output that `output_mask` does not ask for is empty.
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x,
                                                  const std::optional<Tensor>& weight, const Tensor& mean,
                                                  const Tensor& rstd, std::array<bool, 3> output_mask) {
  constexpr const char* op = "layer_norm_bwd";
  check_rows(op, "x", x);
  check_rows(op, "dy", dy);
  check_same_shape(op, "dy", dy, x);
  check_row_stats(op, "mean", mean, x);
  check_row_stats(op, "rstd", rstd, x);
  const Tensor w = float_parameter(op, "weight", weight, x);
  const auto float_cols = x.options().dtype(at::kFloat);
  Tensor dx = output_mask[0] ? empty_rows(x, x.scalar_type()) : Tensor();
  Tensor dw = output_mask[1] ? at::empty({x.size(1)}, float_cols) : Tensor();
  Tensor db = output_mask[2] ? at::empty({x.size(1)}, float_cols) : Tensor();
  const Tensor dy_x = dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type());
#ifdef LMRT_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const Tensor scratch = workspace(x, lmrt::cuda::layer_norm_bwd_workspace_bytes(x.size(0), x.size(1)));
    check_launch(op, lmrt::cuda::layer_norm_bwd(
                         cuda_dtype(x.scalar_type()), dy_x.const_data_ptr(), dy_x.stride(0), x.const_data_ptr(),
                         x.stride(0), float_data(w), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                         dx.defined() ? dx.data_ptr() : nullptr, mutable_float_data(dw), mutable_float_data(db),
                         scratch.data_ptr(), x.size(0), x.size(1), at::cuda::getCurrentCUDAStream()));
  } else
#endif
  {
    lmrt::cpu::layer_norm_bwd(dy_x, x, w, mean, rstd, dx, dw, db);
  }
  return {defined_or_empty(dx, x), defined_or_empty(dw, x), defined_or_empty(db, x)};
}

// -------------------------------------------------------------------------------------------------- RMSNorm

std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const std::optional<Tensor>& weight, double eps) {
  constexpr const char* op = "rms_norm_fwd";
  check_rows(op, "x", x);
  const Tensor w = float_parameter(op, "weight", weight, x);
  Tensor y = empty_rows(x, x.scalar_type()), rstd = row_stats(x);
  if (x.numel() == 0) {
    return {y, rstd};
  }
#ifdef LMRT_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(op, lmrt::cuda::rms_norm_fwd(cuda_dtype(x.scalar_type()), x.const_data_ptr(), x.stride(0),
                                              float_data(w), y.data_ptr(), rstd.data_ptr<float>(), x.size(0),
                                              x.size(1), static_cast<float>(eps), at::cuda::getCurrentCUDAStream()));
    return {y, rstd};
  }
#endif
  lmrt::cpu::rms_norm_fwd(x, w, eps, y, rstd);
  return {y, rstd};
}

// (dx, dweight); dweight is float32; an output that `output_mask` does not ask for is empty.
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
                                        const Tensor& rstd, std::array<bool, 2> output_mask) {
  constexpr const char* op = "rms_norm_bwd";
  check_rows(op, "x", x);
  check_rows(op, "dy", dy);
  check_same_shape(op, "dy", dy, x);
  check_row_stats(op, "rstd", rstd, x);
  const Tensor w = float_parameter(op, "weight", weight, x);
  Tensor dx = output_mask[0] ? empty_rows(x, x.scalar_type()) : Tensor();
  Tensor dw = output_mask[1] ? at::empty({x.size(1)}, x.options().dtype(at::kFloat)) : Tensor();
  const Tensor dy_x = dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type());
#ifdef LMRT_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    const Tensor scratch = workspace(x, lmrt::cuda::rms_norm_bwd_workspace_bytes(x.size(0), x.size(1)));
    check_launch(op, lmrt::cuda::rms_norm_bwd(cuda_dtype(x.scalar_type()), dy_x.const_data_ptr(), dy_x.stride(0),
                                              x.const_data_ptr(), x.stride(0), float_data(w),
                                              rstd.const_data_ptr<float>(), dx.defined() ? dx.data_ptr() : nullptr,
                                              mutable_float_data(dw), scratch.data_ptr(), x.size(0), x.size(1),
                                              at::cuda::getCurrentCUDAStream()));
  } else
#endif
  {
    lmrt::cpu::rms_norm_bwd(dy_x, x, w, rstd, dx, dw);
  }
  return {defined_or_empty(dx, x), defined_or_empty(dw, x)};
}

// -------------------------------------------------------------------------------------------------- softmax

Tensor softmax_fwd(const Tensor& x, at::ScalarType out_dtype, bool log) {
  constexpr const char* op = "softmax_fwd";
  check_rows(op, "x", x);
  check_kernel_dtype(op, "out_dtype", out_dtype);
  Tensor y = empty_rows(x, out_dtype);
  if (x.numel() == 0) {
    return y;
  }
#ifdef LMRT_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(op, lmrt::cuda::softmax_fwd(cuda_dtype(x.scalar_type()), cuda_dtype(out_dtype), x.const_data_ptr(),
                                             x.stride(0), y.data_ptr(), x.size(0), x.size(1), log,
                                             at::cuda::getCurrentCUDAStream()));
    return y;
  }
#endif
  lmrt::cpu::softmax_fwd(x, log, y);
  return y;
}

Tensor softmax_bwd(const Tensor& dy, const Tensor& y, at::ScalarType input_dtype, bool log) {
  constexpr const char* op = "softmax_bwd";
  check_rows(op, "y", y);
  check_rows(op, "dy", dy);
  check_same_shape(op, "dy", dy, y);
  check_kernel_dtype(op, "input_dtype", input_dtype);
  const Tensor dy_y = dy.scalar_type() == y.scalar_type() ? dy : dy.to(y.scalar_type());
  Tensor dx = empty_rows(y, input_dtype);
  if (y.numel() == 0) {
    return dx;
  }
#ifdef LMRT_WITH_CUDA
  if (y.is_cuda()) {
    const c10::cuda::CUDAGuard guard(y.device());
    check_launch(op, lmrt::cuda::softmax_bwd(cuda_dtype(y.scalar_type()), cuda_dtype(input_dtype),
                                             dy_y.const_data_ptr(), dy_y.stride(0), y.const_data_ptr(), y.stride(0),
                                             dx.data_ptr(), y.size(0), y.size(1), log,
                                             at::cuda::getCurrentCUDAStream()));
    return dx;
  }
#endif
  lmrt::cpu::softmax_bwd(dy_y, y, log, dx);
  return dx;
}

// ------------------------------------------------------------------------------------------------ attention

// A (batch, heads, rows, dim) tensor with unit stride along dim: `t` itself when it already has it.
Tensor unit_last_stride(const Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous();
}

void check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                     const std::optional<Tensor>& mask) {
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.dim() == 4, "lmrt_C::", op, ": `", name, "` must be (batch, heads, rows, dim), got ", t.dim(),
                " dims");
    check_kernel_dtype(op, name, t);
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "lmrt_C::", op, ": `", name, "` has dtype ", t.scalar_type(),
                " but `q` has ", q.scalar_type());
    check_device(op, name, t, q);
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "lmrt_C::", op,
              ": q, k and v must have the same batch size, got ", q.size(0), ", ", k.size(0), " and ", v.size(0));
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0, "lmrt_C::", op,
              ": k and v must have the same number of heads, dividing q's ", q.size(1), "; got ", k.size(1), " and ",
              v.size(1));
  TORCH_CHECK(k.size(2) == v.size(2), "lmrt_C::", op, ": k has ", k.size(2), " keys but v has ", v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), "lmrt_C::", op, ": the head dim of k (", k.size(3), ") must equal q's (",
              q.size(3), ")");
  if (mask.has_value() && mask->defined()) {
    const std::array<int64_t, 4> scores{q.size(0), q.size(1), q.size(2), k.size(2)};
    TORCH_CHECK(mask->sizes() == at::IntArrayRef(scores), "lmrt_C::", op, ": `attn_mask` must have the scores' shape ",
                at::IntArrayRef(scores), " (broadcast dims as stride 0), got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool || is_kernel_dtype(mask->scalar_type()), "lmrt_C::", op,
                ": `attn_mask` must be bool, float32, float16 or bfloat16, got ", mask->scalar_type());
    check_device(op, "attn_mask", *mask, q);
  }
}

Tensor defined_or_empty(const std::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

#ifdef LMRT_WITH_CUDA
lmrt::cuda::AttentionTensor attention_tensor(const Tensor& t) {
  return {const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

lmrt::cuda::AttentionMask attention_mask(const Tensor& mask) {
  lmrt::cuda::AttentionMask m;
  if (mask.defined()) {
    m.data = mask.const_data_ptr();
    m.kind = mask.scalar_type() == at::kBool ? lmrt::cuda::MaskKind::kBool : lmrt::cuda::MaskKind::kAdditive;
    m.dtype = cuda_dtype(mask.scalar_type());
    m.batch_stride = mask.stride(0);
    m.head_stride = mask.stride(1);
    m.row_stride = mask.stride(2);
    m.col_stride = mask.stride(3);
  }
  return m;
}

lmrt::cuda::AttentionShape attention_shape(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                           bool bottom_right, double scale) {
  return {q.size(0), q.size(1), k.size(1),    q.size(2),    k.size(2),
          q.size(3), v.size(3), causal, bottom_right, static_cast<float>(scale)};
}

void check_cuda_attention_shape(const char* op, const lmrt::cuda::AttentionShape& shape) {
  const char* reason = lmrt::cuda::attention_unsupported(shape);
  TORCH_CHECK(reason == nullptr, "lmrt_C::", op, ": ", reason == nullptr ? "" : reason);
}
#endif

// (out, lse): out (batch, heads, q_len, head_dim_v), stored heads-first when `heads_first_out`, else stored
// (batch, q_len, heads, head_dim_v) and viewed heads-first; lse float32 (batch, heads, q_len).
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                         const std::optional<Tensor>& attn_mask, bool causal, bool bottom_right,
                                         double scale, bool heads_first_out) {
  constexpr const char* op = "attention_fwd";
  check_attention(op, q_in, k_in, v_in, attn_mask);
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Tensor mask = defined_or_empty(attn_mask);
#ifdef LMRT_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    const auto shape = attention_shape(q, k, v, causal, bottom_right, scale);
    check_cuda_attention_shape(op, shape);
    const int64_t batch = q.size(0), heads = q.size(1), rows = q.size(2), dim_v = v.size(3);
    Tensor out = heads_first_out ? at::empty({batch, heads, rows, dim_v}, q.options())
                                 : at::empty({batch, rows, heads, dim_v}, q.options()).transpose(1, 2);
    Tensor lse = at::empty({batch, heads, rows}, q.options().dtype(at::kFloat));
    if (out.numel() == 0 && lse.numel() == 0) {
      return {out, lse};
    }
    check_launch(op, lmrt::cuda::attention_fwd(cuda_dtype(q.scalar_type()), shape, attention_tensor(q),
                                               attention_tensor(k), attention_tensor(v), attention_mask(mask),
                                               attention_tensor(out), lse.data_ptr<float>(),
                                               at::cuda::getCurrentCUDAStream()));
    return {out, lse};
  }
#endif
  return lmrt::cpu::attention_fwd(q, k, v, mask, causal, bottom_right, scale, heads_first_out);
}

// (dq, dk, dv), laid out like q, k and v.
std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& out_in, const Tensor& lse,
                                                 const std::optional<Tensor>& attn_mask, bool causal,
                                                 bool bottom_right, double scale) {
  constexpr const char* op = "attention_bwd";
  check_attention(op, q_in, k_in, v_in, attn_mask);
  const std::array<int64_t, 4> out_shape{q_in.size(0), q_in.size(1), q_in.size(2), v_in.size(3)};
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"dout", dout_in}, {"out", out_in}}) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(out_shape), "lmrt_C::", op, ": `", name, "` must have shape ",
                at::IntArrayRef(out_shape), ", got ", t.sizes());
    check_device(op, name, t, q_in);
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(out_shape).slice(0, 3) &&
                  lse.is_contiguous(),
              "lmrt_C::", op, ": `lse` must be contiguous float32 of shape ", at::IntArrayRef(out_shape).slice(0, 3),
              ", got ", lse.scalar_type(), " of shape ", lse.sizes());
  check_device(op, "lse", lse, q_in);
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const Tensor out = unit_last_stride(out_in.to(q.scalar_type()));
  const Tensor dout = unit_last_stride(dout_in.to(q.scalar_type()));
  const Tensor mask = defined_or_empty(attn_mask);
#ifdef LMRT_WITH_CUDA
  if (q.is_cuda()) {
    const c10::cuda::CUDAGuard guard(q.device());
    const auto shape = attention_shape(q, k, v, causal, bottom_right, scale);
    check_cuda_attention_shape(op, shape);
    Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    if (shape.heads == 0) {  // no query sees the keys, and the launcher writes nothing then
      return {dq, dk.zero_(), dv.zero_()};
    }
    const Tensor scratch = workspace(q, lmrt::cuda::attention_bwd_workspace_bytes(shape));
    check_launch(op, lmrt::cuda::attention_bwd(cuda_dtype(q.scalar_type()), shape, attention_tensor(dout),
                                               attention_tensor(q), attention_tensor(k), attention_tensor(v),
                                               attention_tensor(out), lse.const_data_ptr<float>(),
                                               attention_mask(mask), attention_tensor(dq), attention_tensor(dk),
                                               attention_tensor(dv), scratch.data_ptr(),
                                               at::cuda::getCurrentCUDAStream()));
    return {dq, dk, dv};
  }
#endif
  return lmrt::cpu::attention_bwd(dout, q, k, v, out, lse, mask, causal, bottom_right, scale);
}

// --------------------------------------------------------------------------------------------- build facts

bool built_with_cuda() {
#ifdef LMRT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Why the CUDA attention kernels cannot serve these (batch, heads, length, head dim) q, k and v (their head dims,
// lengths and row count, on q's device, whose compute capability they check), or "" when they can.
std::string cuda_attention_unsupported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "lmrt_C::cuda_attention_unsupported: q, k and v must be 4-D (batch, heads, length, head dim), not ",
              q.dim(), "-D, ", k.dim(), "-D and ", v.dim(), "-D");
#ifdef LMRT_WITH_CUDA
  if (!q.is_cuda()) {
    return "the CUDA attention kernels run on CUDA devices, not " + q.device().str();
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const lmrt::cuda::AttentionShape shape{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3),
                                         v.size(3), false, false, 1.f};
  const char* reason = lmrt::cuda::attention_unsupported(shape);
  return reason == nullptr ? "" : reason;
#else
  return "lmrt._C was built without CUDA";
#endif
}

}  // namespace

TORCH_LIBRARY(lmrt_C, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("softmax_fwd(Tensor x, ScalarType out_dtype, bool log) -> Tensor");
  m.def("softmax_bwd(Tensor dy, Tensor y, ScalarType input_dtype, bool log) -> Tensor");
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool causal, bool bottom_right, float scale, "
      "bool heads_first_out) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
      "bool causal, bool bottom_right, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("cuda_attention_unsupported(Tensor q, Tensor k, Tensor v) -> str", &cuda_attention_unsupported);
}

// One implementation per operator serves both devices: it checks the inputs once and picks the kernel by device.
#define LMRT_REGISTER_KERNELS(m)                  \
  m.impl("layer_norm_fwd", &layer_norm_fwd);      \
  m.impl("layer_norm_bwd", &layer_norm_bwd);      \
  m.impl("rms_norm_fwd", &rms_norm_fwd);          \
  m.impl("rms_norm_bwd", &rms_norm_bwd);          \
  m.impl("softmax_fwd", &softmax_fwd);            \
  m.impl("softmax_bwd", &softmax_bwd);            \
  m.impl("attention_fwd", &attention_fwd);        \
  m.impl("attention_bwd", &attention_bwd)

TORCH_LIBRARY_IMPL(lmrt_C, CPU, m) {
  LMRT_REGISTER_KERNELS(m);
}

#ifdef LMRT_WITH_CUDA
TORCH_LIBRARY_IMPL(lmrt_C, CUDA, m) {
  LMRT_REGISTER_KERNELS(m);
}
#endif
