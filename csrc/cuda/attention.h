// Flash-attention launchers (csrc/cuda/attention.cu) on raw pointers; the torch glue is csrc/lmrt_ops.cpp.
//
// The contract is lmrt::attention_fwd / attention_bwd's (lmrt/ops/attention.py) without dropout or packed
// sequences: q is (batch, heads, q_len, head_dim), k is (batch, kv_heads, k_len, head_dim), v is (batch, kv_heads,
// k_len, head_dim_v), out is (batch, heads, q_len, head_dim_v), each with unit stride along its last dim and the
// strides given in elements; kv_heads divides heads (query head h reads key/value head h / (heads / kv_heads)).
// Scores are scale * q k^T, plus an additive mask or hidden by a boolean one (true = take part), hidden by
// causality when `causal` (key j visible to query i when j <= i, or j <= i + k_len - q_len when `bottom_right`).
// lse is float32 (batch, heads, q_len), contiguous: the natural-log log-sum-exp of each query row's scores, +inf
// for a row that sees no key (whose output is zero), NaN for a row with a NaN score. Arithmetic is float32 (float32
// inputs sum dP and delta in float64); the products of float16 and bfloat16 inputs run on tensor cores, float32's
// on CUDA-core FMAs.
#pragma once

#include "dtypes.h"

namespace lmrt::cuda {

// A (batch, heads, rows, dim) tensor with unit stride along dim.
struct AttentionTensor {
  void* data;
  int64_t batch_stride, head_stride, row_stride;
};

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

// A (batch, heads, q_len, k_len) mask, broadcast dims with stride 0; `dtype` is the additive mask's element type
// (a boolean mask is one byte per element, nonzero = take part).
struct AttentionMask {
  const void* data = nullptr;
  MaskKind kind = MaskKind::kNone;
  DType dtype = DType::kFloat32;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0, col_stride = 0;
};

struct AttentionShape {
  int64_t batch, heads, kv_heads, q_len, k_len, head_dim, head_dim_v;
  bool causal, bottom_right;
  float scale;
};

// nullptr when the kernels can serve this shape, else a sentence saying why not (a head dim they lack, say).
const char* attention_unsupported(const AttentionShape& shape);

cudaError_t attention_fwd(DType dtype, const AttentionShape& shape, AttentionTensor q, AttentionTensor k,
                          AttentionTensor v, const AttentionMask& mask, AttentionTensor out, float* lse,
                          cudaStream_t stream);

// Bytes of scratch that attention_bwd needs (float32 row sums of dout * out, dq accumulators, per-query-head dk/dv
// for grouped heads: whatever the implementation uses).
size_t attention_bwd_workspace_bytes(const AttentionShape& shape);

// dq, dk, dv in `dtype` with the shapes of q, k, v (strides given); dout and out shaped like out. The result is
// deterministic. With no query heads (or no batch) it writes nothing: zero dk and dv there.
cudaError_t attention_bwd(DType dtype, const AttentionShape& shape, AttentionTensor dout, AttentionTensor q,
                          AttentionTensor k, AttentionTensor v, AttentionTensor out, const float* lse,
                          const AttentionMask& mask, AttentionTensor dq, AttentionTensor dk, AttentionTensor dv,
                          void* workspace, cudaStream_t stream);

}  // namespace lmrt::cuda
