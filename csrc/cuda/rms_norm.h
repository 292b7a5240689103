// RMSNorm launchers (csrc/cuda/rms_norm.cu) on raw pointers; the torch glue is csrc/lmrt_ops.cpp.
//
// Layout as in layer_norm.h: `x` and `dy` rows x cols with unit column stride and the given row stride; `y` and
// `dx` contiguous; element type `dtype`; `weight` float32 [cols] or nullptr; `rstd` float32 [rows].
#pragma once

#include "dtypes.h"

namespace lmrt::cuda {

cudaError_t rms_norm_fwd(DType dtype, const void* x, int64_t x_row_stride, const float* weight, void* y, float* rstd,
                         int64_t rows, int64_t cols, float eps, cudaStream_t stream);

size_t rms_norm_bwd_workspace_bytes(int64_t rows, int64_t cols);

// `dx` or nullptr; `dweight` float32 [cols] or nullptr. Deterministic.
cudaError_t rms_norm_bwd(DType dtype, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                         const float* weight, const float* rstd, void* dx, float* dweight, void* workspace,
                         int64_t rows, int64_t cols, cudaStream_t stream);

}  // namespace lmrt::cuda
