// Softmax and log-softmax on the CPU (csrc/cpu/softmax.cpp) along the rows of a matrix; the torch glue
// (csrc/lmrt_ops.cpp) moves the softmax dim last, checks the inputs and allocates the outputs.
//
// Forward: `x` (rows, cols) with unit column stride, `y` contiguous in the output dtype (which may differ from
// x's, as F.softmax's `dtype` allows). Backward: `dy` and `y` (rows, cols) with unit column stride in the output
// dtype, `dx` contiguous in the input dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace lmrt::cpu {

void softmax_fwd(const at::Tensor& x, bool log, const at::Tensor& y);

void softmax_bwd(const at::Tensor& dy, const at::Tensor& y, bool log, const at::Tensor& dx);

}  // namespace lmrt::cpu
