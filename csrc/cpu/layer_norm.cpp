// LayerNorm forward and backward on the CPU: the row kernels of row_norm.h with centering and bias.
#include "layer_norm.h"

#include "row_norm.h"

namespace lmrt::cpu {

void layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  norm_fwd_tensors<false>(x, weight, bias, eps, y, mean, rstd);
}

void layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                    const at::Tensor& rstd, const at::Tensor& dx, const at::Tensor& dweight,
                    const at::Tensor& dbias) {
  norm_bwd_tensors<false>(dy, x, weight, mean, rstd, dx, dweight, dbias);
}

}  // namespace lmrt::cpu
