// RMSNorm on the CPU (csrc/cpu/rms_norm.cpp); the torch glue (csrc/lmrt_ops.cpp) checks the inputs and allocates
// the outputs. Layout as in layer_norm.h, without mean and bias.
#pragma once

#include <ATen/core/Tensor.h>

namespace lmrt::cpu {

void rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& y,
                  const at::Tensor& rstd);

void rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                  const at::Tensor& dx, const at::Tensor& dweight);

}  // namespace lmrt::cpu
