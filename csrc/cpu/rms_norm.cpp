// RMSNorm forward and backward on the CPU: the row kernels of row_norm.h without centering, dispatched on the
// element type.
#include "rms_norm.h"

#include <ATen/ops/empty.h>

#include "dispatch.h"
#include "row_norm.h"

namespace lmrt::cpu {

void rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& y,
                  const at::Tensor& rstd) {
  LMRT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "lmrt rms_norm_fwd (cpp)", [&] {
    norm_fwd<true>(x.const_data_ptr<scalar_t>(), x.stride(0), data_or_null<float>(weight), nullptr,
                   y.data_ptr<scalar_t>(), nullptr, rstd.data_ptr<float>(), x.size(0), x.size(1),
                   static_cast<float>(eps));
  });
}

void rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                  const at::Tensor& dx, const at::Tensor& dweight) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t tasks = (rows + bwd_rows_per_task(rows, cols) - 1) / bwd_rows_per_task(rows, cols);
  at::Tensor dweight_partial =
      dweight.defined() ? at::empty({tasks, cols}, x.options().dtype(at::kFloat)) : at::Tensor();
  LMRT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "lmrt rms_norm_bwd (cpp)", [&] {
    norm_bwd<true>(dy.const_data_ptr<scalar_t>(), dy.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
                   data_or_null<float>(weight), nullptr, rstd.const_data_ptr<float>(), data_or_null<scalar_t>(dx),
                   data_or_null<float>(dweight_partial), nullptr, rows, cols);
  });
  if (dweight.defined()) sum_partials(dweight_partial.const_data_ptr<float>(), tasks, cols, dweight.data_ptr<float>());
}

}  // namespace lmrt::cpu
