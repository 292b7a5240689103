// RMSNorm forward and backward on the CPU: the row kernels of row_norm.h without centering or bias.
#include "rms_norm.h"

#include "row_norm.h"

namespace lmrt::cpu {

void rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& y,
                  const at::Tensor& rstd) {
  norm_fwd_tensors<true>(x, weight, at::Tensor(), eps, y, at::Tensor(), rstd);
}

void rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                  const at::Tensor& dx, const at::Tensor& dweight) {
  norm_bwd_tensors<true>(dy, x, weight, at::Tensor(), rstd, dx, dweight, at::Tensor());
}

}  // namespace lmrt::cpu
