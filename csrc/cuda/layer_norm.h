// LayerNorm launchers (csrc/cuda/layer_norm.cu) on raw pointers; the torch glue is csrc/lmrt_ops.cpp.
//
// Layout: `x` and `dy` are rows x cols with unit column stride and the given row stride (in elements); `y` and
// `dx` are contiguous rows x cols; all four have element type `dtype`. `weight` and `bias` are float32 [cols], or
// nullptr when absent (the glue converts them). `mean` and `rstd` are float32 [rows]. Statistics and sums are
// accumulated in float32. Every launcher returns the launch's cudaError_t (cudaSuccess when rows or cols is 0).
#pragma once

#include "dtypes.h"

namespace lmrt::cuda {

cudaError_t layer_norm_fwd(DType dtype, const void* x, int64_t x_row_stride, const float* weight, const float* bias,
                           void* y, float* mean, float* rstd, int64_t rows, int64_t cols, float eps,
                           cudaStream_t stream);

// Bytes of scratch that layer_norm_bwd needs (the first stage of its deterministic weight/bias reduction).
size_t layer_norm_bwd_workspace_bytes(int64_t rows, int64_t cols);

// `dx` (or nullptr when not asked for), `dweight` and `dbias` (float32 [cols], or nullptr when not asked for).
// `workspace` holds layer_norm_bwd_workspace_bytes(rows, cols) bytes. The result is deterministic.
cudaError_t layer_norm_bwd(DType dtype, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                           const float* weight, const float* mean, const float* rstd, void* dx, float* dweight,
                           float* dbias, void* workspace, int64_t rows, int64_t cols, cudaStream_t stream);

}  // namespace lmrt::cuda
