// Softmax and log-softmax launchers (csrc/cuda/softmax.cu) on raw pointers; the torch glue is csrc/lmrt_ops.cpp.
//
// The softmax runs along each row of a rows x cols matrix with unit column stride and the given row stride (the
// glue moves the softmax dim last). `y` and `dx` are contiguous rows x cols. The forward reads `x` in `in_dtype`
// and writes `y` in `out_dtype` (F.softmax's `dtype` argument); the backward reads `dy` and `y` in `out_dtype`
// and writes `dx` in `in_dtype`. Arithmetic is float32. `log` selects log-softmax.
#pragma once

#include "dtypes.h"

namespace lmrt::cuda {

cudaError_t softmax_fwd(DType in_dtype, DType out_dtype, const void* x, int64_t x_row_stride, void* y, int64_t rows,
                        int64_t cols, bool log, cudaStream_t stream);

cudaError_t softmax_bwd(DType out_dtype, DType in_dtype, const void* dy, int64_t dy_row_stride, const void* y,
                        int64_t y_row_stride, void* dx, int64_t rows, int64_t cols, bool log, cudaStream_t stream);

}  // namespace lmrt::cuda
