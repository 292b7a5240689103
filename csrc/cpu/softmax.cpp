// Softmax and log-softmax forward and backward on the CPU, one row at a time.
//
// Forward, per row of n elements: the row maximum, then the sum of exp(x - max) (softmax keeps the exponentials
// and scales them by 1/sum; log-softmax writes x - max - log(sum)). The row is read from memory once and re-read
// from L1/L2, so the kernel moves n*s_in bytes in and n*s_out out and is meant to run at memory bandwidth; the
// exponentials (Sleef, vectorized) are the compute. Backward: dx = y * (dy - sum(dy * y)) for softmax and
// dx = dy - exp(y) * sum(dy) for log-softmax, reading 2n elements and writing n.
#include "softmax.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "dispatch.h"
#include "float_rows.h"

namespace lmrt::cpu {

namespace {

template <typename In, typename Out>
void softmax_fwd_rows(const In* x, int64_t x_row_stride, Out* y, int64_t rows, int64_t cols, bool log) {
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    // The float32 output row before its conversion (softmax keeps exp(x - max) there between its last two passes);
    // the output row itself for float32 output.
    std::vector<float> scratch(std::is_same_v<Out, float> ? 0 : cols);
    for (int64_t r = begin; r < end; ++r) {
      const In* xr = x + r * x_row_stride;
      Out* yr = y + r * cols;
      float max = -std::numeric_limits<float>::infinity();
      for_float_chunks(xr, cols, [&](const float* chunk, int64_t, int64_t length) {
        max = std::max(max, row_max(chunk, length));
      });
      const FloatVec max_v(max);
      float sum = 0.f;
      if (log) {
        for_float_chunks(xr, cols, [&](const float* chunk, int64_t, int64_t length) {
          sum += reduce_sum(
              chunk, length, [&](FloatVec v) { return (v - max_v).exp_u20(); }, [&](float v) { return std::exp(v - max); });
        });
        const FloatVec shift(max + std::log(sum));
        float* out = float_destination(yr, scratch.data());
        for_float_chunks(xr, cols, [&](const float* chunk, int64_t offset, int64_t length) {
          at::vec::map([&](FloatVec v) { return v - shift; }, out + offset, chunk, length);
        });
        store_row(out, yr, cols);
      } else {
        float* exps = float_destination(yr, scratch.data());
        for_float_chunks(xr, cols, [&](const float* chunk, int64_t offset, int64_t length) {
          at::vec::map([&](FloatVec v) { return (v - max_v).exp_u20(); }, exps + offset, chunk, length);
          sum += reduce_sum(exps + offset, length, [](FloatVec v) { return v; }, [](float v) { return v; });
        });
        const FloatVec inv_sum(1.f / sum);
        at::vec::map([&](FloatVec v) { return v * inv_sum; }, exps, exps, cols);
        store_row(exps, yr, cols);
      }
    }
  });
}

template <typename Out, typename In>
void softmax_bwd_rows(const Out* dy, int64_t dy_row_stride, const Out* y, int64_t y_row_stride, In* dx, int64_t rows,
                      int64_t cols, bool log) {
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    float out_chunk[kFloatChunk];  // a piece of the float32 dx row before its conversion
    for (int64_t r = begin; r < end; ++r) {
      const Out* dyr = dy + r * dy_row_stride;
      const Out* yr = y + r * y_row_stride;
      In* dxr = dx + r * cols;
      float total = 0.f;  // sum(dy) for log-softmax, sum(dy * y) for softmax
      if (log) {
        for_float_chunks(dyr, cols, [&](const float* g, int64_t, int64_t length) {
          total += reduce_sum(g, length, [](FloatVec v) { return v; }, [](float v) { return v; });
        });
      } else {
        for_float_chunks2(dyr, yr, cols, [&](const float* g, const float* v, int64_t, int64_t length) {
          total += reduce_sum2(
              g, v, length, [](FloatVec a, FloatVec b) { return a * b; }, [](float a, float b) { return a * b; });
        });
      }
      const FloatVec total_v(total);
      for_float_chunks2(dyr, yr, cols, [&](const float* g, const float* v, int64_t offset, int64_t length) {
        float* out = float_destination(dxr + offset, out_chunk);
        if (log) {
          at::vec::map2([&](FloatVec a, FloatVec b) { return a - b.exp() * total_v; }, out, g, v, length);
        } else {
          at::vec::map2([&](FloatVec a, FloatVec b) { return b * (a - total_v); }, out, g, v, length);
        }
        store_row(out, dxr + offset, length);
      });
    }
  });
}

}  // namespace

void softmax_fwd(const at::Tensor& x, bool log, const at::Tensor& y) {
  LMRT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "lmrt softmax_fwd (cpp)", [&] {
    using In = scalar_t;
    LMRT_DISPATCH_KERNEL_TYPES(y.scalar_type(), "lmrt softmax_fwd (cpp)", [&] {
      softmax_fwd_rows(x.const_data_ptr<In>(), x.stride(0), y.data_ptr<scalar_t>(), x.size(0), x.size(1), log);
    });
  });
}

void softmax_bwd(const at::Tensor& dy, const at::Tensor& y, bool log, const at::Tensor& dx) {
  LMRT_DISPATCH_KERNEL_TYPES(y.scalar_type(), "lmrt softmax_bwd (cpp)", [&] {
    using Out = scalar_t;
    LMRT_DISPATCH_KERNEL_TYPES(dx.scalar_type(), "lmrt softmax_bwd (cpp)", [&] {
      softmax_bwd_rows(dy.const_data_ptr<Out>(), dy.stride(0), y.const_data_ptr<Out>(), y.stride(0),
                       dx.data_ptr<scalar_t>(), y.size(0), y.size(1), log);
    });
  });
}

}  // namespace lmrt::cpu
