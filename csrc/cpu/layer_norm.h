// LayerNorm on the CPU (csrc/cpu/layer_norm.cpp); the torch glue (csrc/lmrt_ops.cpp) checks the inputs and
// allocates the outputs.
//
// `x` and `dy` are (rows, cols) with unit column stride; `weight` and `bias` are float32 [cols] contiguous or
// undefined; `y` and `dx` are contiguous in x's dtype; `mean` and `rstd` float32 [rows]. The backward writes the
// outputs that are defined: `dx`, and the float32 [cols] `dweight` and `dbias`.
#pragma once

#include <ATen/core/Tensor.h>

namespace lmrt::cpu {

void layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd);

void layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                    const at::Tensor& rstd, const at::Tensor& dx, const at::Tensor& dweight,
                    const at::Tensor& dbias);

}  // namespace lmrt::cpu
