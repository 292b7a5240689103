// LayerNorm forward and backward on the CPU: the row kernels of row_norm.h, dispatched on the element type.
#include "layer_norm.h"

#include <ATen/ops/empty.h>

#include "dispatch.h"
#include "row_norm.h"

namespace lmrt::cpu {

void layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  LMRT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "lmrt layer_norm_fwd (cpp)", [&] {
    norm_fwd<false>(x.const_data_ptr<scalar_t>(), x.stride(0), data_or_null<float>(weight), data_or_null<float>(bias),
                    y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), x.size(0), x.size(1),
                    static_cast<float>(eps));
  });
}

void layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                    const at::Tensor& rstd, const at::Tensor& dx, const at::Tensor& dweight,
                    const at::Tensor& dbias) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t tasks = (rows + bwd_rows_per_task(rows, cols) - 1) / bwd_rows_per_task(rows, cols);
  const auto partial_options = x.options().dtype(at::kFloat);
  at::Tensor dweight_partial = dweight.defined() ? at::empty({tasks, cols}, partial_options) : at::Tensor();
  at::Tensor dbias_partial = dbias.defined() ? at::empty({tasks, cols}, partial_options) : at::Tensor();
  LMRT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "lmrt layer_norm_bwd (cpp)", [&] {
    norm_bwd<false>(dy.const_data_ptr<scalar_t>(), dy.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
                    data_or_null<float>(weight), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                    data_or_null<scalar_t>(dx), data_or_null<float>(dweight_partial),
                    data_or_null<float>(dbias_partial), rows, cols);
  });
  if (dweight.defined()) sum_partials(dweight_partial.const_data_ptr<float>(), tasks, cols, dweight.data_ptr<float>());
  if (dbias.defined()) sum_partials(dbias_partial.const_data_ptr<float>(), tasks, cols, dbias.data_ptr<float>());
}

}  // namespace lmrt::cpu
