// Flash-style attention on the CPU (csrc/cpu/attention.cpp); the torch glue is csrc/lmrt_ops.cpp, which checks
// the inputs before calling these.
//
// The contract is lmrt::attention_fwd / attention_bwd's (lmrt/ops/attention.py) without dropout or packed
// sequences. q is (batch, heads, q_len, head_dim), k (batch, kv_heads, k_len, head_dim), v (batch, kv_heads, k_len,
// head_dim_v), any strides with unit stride along the last dim, one dtype (float32, float16 or bfloat16); kv_heads
// divides heads. `mask` is undefined or a (batch, heads, q_len, k_len) view (broadcast dims with stride 0), bool
// (true = take part) or floating (added to the scores). Causal: key j visible to query i when j <= i, or
// j <= i + k_len - q_len when `bottom_right`. Memory stays O(length): scores are formed a block at a time with an
// online softmax, never as a q_len x k_len matrix.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace lmrt::cpu {

// (out, lse): out (batch, heads, q_len, head_dim_v) in q's dtype, stored heads-first (contiguous) when
// `heads_first_out`, else stored (batch, q_len, heads, head_dim_v) and returned transposed to heads-first; lse
// float32 (batch, heads, q_len) contiguous, natural log, +inf for a row that sees no key (whose output is 0).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& mask, bool causal, bool bottom_right, double scale,
                                                 bool heads_first_out);

// (dq, dk, dv), each allocated with at::empty_like of q, k, v and in their dtype; `out` and `lse` from the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const at::Tensor& mask, bool causal, bool bottom_right,
                                                             double scale);

}  // namespace lmrt::cpu
