// Softmax and log-softmax forward and backward on the CPU, one row at a time.
//
// Forward, per row of n elements: the row maximum, then the sum of exp(x - max) (softmax keeps the exponentials
// and scales them by 1/sum; log-softmax writes x - max - log(sum)). The row is read from memory once and re-read
// from L1/L2, so the kernel moves n*s_in bytes in and n*s_out out and is meant to run at memory bandwidth; the
// exponentials are the compute (exp_nonpositive, vec_math.h: x - max <= 0 here, and log-softmax's y <= 0 in the
// backward; against exp_u20 and Sleef's exp, 1024 x 768 softmax forward 0.159 -> 0.139 ms, log-softmax backward in
// bfloat16 0.19 -> 0.14 ms). float16/bfloat16 elements are converted to float32 in registers as each pass reads
// them, so a pass re-reads the narrow row from cache rather than a float32 copy. Backward: dx = y * (dy - sum(dy *
// y)) for softmax and dx = dy - exp(y) * sum(dy) for log-softmax, reading 2n elements (n for log-softmax's sum) and
// writing n: narrow rows in two passes, wide ones with each row's sum formed while the previous row's dx is written
// (softmax_bwd_task). Both write their output by streaming stores when a call outgrows the cache
// (streaming_stores.h).
#include "softmax.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>

#include "dispatch.h"
#include "float_rows.h"
#include "streaming_stores.h"
#include "vec_math.h"

namespace lmrt::cpu {

namespace {

// The largest of a row's elements, NaN if any is NaN, taken a step (kStep elements) or a tail element at a time.
template <typename T>
class RowMax {
 public:
  explicit RowMax(const T* x) : x_(x) {}

  void add_step(int64_t i) {
    const auto [a, b] = load_floats(x_ + i);
    max_[0] = at::vec::maximum(max_[0], a);
    max_[1] = at::vec::maximum(max_[1], b);
  }

  void add_element(int64_t i) {
    const float v = static_cast<float>(x_[i]);
    tail_ = std::isnan(v) || v > tail_ ? v : tail_;
  }

  float total() const {
    const float max = at::vec::vec_reduce_all<float>([](FloatVec a, FloatVec b) { return at::vec::maximum(a, b); },
                                                     at::vec::maximum(max_[0], max_[1]));
    return std::isnan(tail_) || tail_ > max ? tail_ : max;
  }

 private:
  const T* x_;
  FloatVec max_[2] = {FloatVec(-std::numeric_limits<float>::infinity()),
                      FloatVec(-std::numeric_limits<float>::infinity())};
  float tail_ = -std::numeric_limits<float>::infinity();
};

// Forward over rows [begin, end). Three passes per row: the maximum; the exponentials and their sum; the output.
// The first reads the row from memory, the others from cache; the next row's maximum is taken in the loop that
// writes this row's output, so that memory streams the next row in meanwhile (as the backward does below):
// 1024 x 8192 float32 softmax 2.24 -> 1.93 ms (ATen 2.6), log-softmax 2.81 -> 2.15 ms (ATen 2.9-3.3).
template <bool kLog, typename In, typename Out, bool kHardwareRounding = false>
void softmax_fwd_task(const In* x, int64_t x_row_stride, Out* y, int64_t begin, int64_t end, int64_t cols,
                      bool stream) {
  // softmax's exp(x - max) in float32 between its last two passes: the output row itself for float32 output, unless
  // the output is streamed (its lines would otherwise be read in for the exponentials and streamed out again).
  std::vector<float> exps_scratch(kLog || (std::is_same_v<Out, float> && !stream) ? 0 : cols);
  RowMax<In> first(x + begin * x_row_stride);
  accumulate_row<kStep>(first, cols);
  float max = first.total();
  for (int64_t r = begin; r < end; ++r) {
    const In* xr = x + r * x_row_stride;
    Out* yr = y + r * cols;
    const FloatVec max_v(max);
    const auto exp_shifted = [&](FloatVec v) { return exp_nonpositive(v - max_v); };
    float* exps = stream ? exps_scratch.data() : float_destination(yr, exps_scratch.data());
    float sum = 0.f;
    if constexpr (kLog) {
      sum = sum_floats(xr, cols, exp_shifted, [&](float v) { return std::exp(v - max); });
    } else {
      FloatVec sum0(0.f), sum1(0.f);
      int64_t i = 0;
      for (; i + kStep <= cols; i += kStep) {
        const auto [a, b] = load_floats(xr + i);
        const FloatVec e0 = exp_shifted(a), e1 = exp_shifted(b);
        store_floats(exps + i, e0, e1);
        sum0 += e0;
        sum1 += e1;
      }
      sum = at::vec::vec_reduce_all<float>([](FloatVec a, FloatVec b) { return a + b; }, sum0 + sum1);
      for (; i < cols; ++i) {
        exps[i] = std::exp(static_cast<float>(xr[i]) - max);
        sum += exps[i];
      }
    }
    // y = (x - max) - log(sum) for log-softmax, exps / sum for softmax. x - max is exact near the maximum, where
    // exp(y) is largest; one shift x - (max + log(sum)) would round y there to the ulp of max, and the backward's
    // dy - exp(y) * sum(dy) would carry that error times sum(dy) (rows of 4097 logits of scale 100: gradient error
    // 1.4e-4 to 9.5e-4 against PyTorch's 3.4e-5 to 6.7e-5; now 2.1e-5 to 2.8e-5).
    const float log_sum = std::log(sum), inv_sum = 1.f / sum;
    const FloatVec log_sum_v(log_sum), inv_sum_v(inv_sum);
    // The last row of the task takes its own maximum again, from cache, for nobody: one loop serves every row.
    RowMax<In> next(x + std::min(r + 1, end - 1) * x_row_stride);
    int64_t i = 0;
    write_row_streamed_if(stream && stream_aligned(yr), [&](auto streamed) {
      constexpr bool kStream = decltype(streamed)::value;
      for (; i + kStep <= cols; i += kStep) {
        if constexpr (kLog) {
          const auto [a, b] = load_floats(xr + i);
          write_floats<kStream, kHardwareRounding>(yr + i, (a - max_v) - log_sum_v, (b - max_v) - log_sum_v);
        } else {
          write_floats<kStream, kHardwareRounding>(yr + i, FloatVec::loadu(exps + i) * inv_sum_v,
                                                   FloatVec::loadu(exps + i + FloatVec::size()) * inv_sum_v);
        }
        next.add_step(i);
      }
    });
    for (; i < cols; ++i) {
      if constexpr (kLog) {
        yr[i] = static_cast<Out>((static_cast<float>(xr[i]) - max) - log_sum);
      } else {
        yr[i] = static_cast<Out>(exps[i] * inv_sum);
      }
      next.add_element(i);
    }
    max = next.total();
  }
  if (stream) {
    end_streaming_stores();
  }
}

template <typename In, typename Out>
void softmax_fwd_rows(const In* x, int64_t x_row_stride, Out* y, int64_t rows, int64_t cols, bool log) {
  const bool stream = use_streaming_stores(rows * cols * static_cast<int64_t>(sizeof(In) + sizeof(Out)));
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    with_bfloat16_rounding<Out>([&](auto hardware_rounding) {
      constexpr bool kHardwareRounding = decltype(hardware_rounding)::value;
      if (log) {
        softmax_fwd_task<true, In, Out, kHardwareRounding>(x, x_row_stride, y, begin, end, cols, stream);
      } else {
        softmax_fwd_task<false, In, Out, kHardwareRounding>(x, x_row_stride, y, begin, end, cols, stream);
      }
    });
  });
}

inline FloatVec exp_of(const FloatVec& v) { return exp_nonpositive(v); }  // v = log-softmax <= 0
inline float exp_of(float v) { return std::exp(v); }

// A row's dy and y together up to this many bytes take two passes in the backward (below): half of the smallest
// L1 data cache of the x86 cores the kernels are built for (32 KiB), so that the second pass reads the row from L1.
constexpr int64_t kTwoPassRowBytes = 16 * 1024;

// Whether the backward reads a row of `cols` in two passes rather than in the loop that writes the previous row
// (softmax_bwd_task).
template <bool kLog, typename Out>
bool two_pass_rows(int64_t cols) {
  return (!kLog && sizeof(Out) < sizeof(float)) || 2 * cols * static_cast<int64_t>(sizeof(Out)) <= kTwoPassRowBytes;
}

// Backward over rows [begin, end): dx = y * (dy - sum(dy * y)) for softmax, dx = dy - exp(y) * sum(dy) for
// log-softmax. A row's sum needs the whole row before its first dx, so each row is read twice:
// - Rows whose dy and y fit in half of L1 (kTwoPassRowBytes) are read in two passes, the sum and then dx, the second
//   from L1. On the Zen 4 EPYC, 1024 x 1024 and 1024 x 2048 float32 from L3 (the CPU benchmark's sizes): 1.07-1.23x
//   ATen's time with the loop below, 0.95-1.10x with two passes, ATen's own way (the same bytes through L3).
// - Wider rows are read in one loop per row that writes the row's dx while it forms the next row's sum. Memory then
//   streams the next row in while the current one is re-read from cache, where a separate second pass would leave
//   it idle once the rows outgrow L1: 1024 x 8192 float32 2.82 -> 2.45 ms (ATen 2.8-2.9 ms); with dx streamed,
//   float32 softmax 512 x 16384 0.66-0.73x ATen's time against 0.79x in two passes, bfloat16 log-softmax 1024 x
//   8192 0.52x against 0.57x.
// - But softmax's float16 and bfloat16 rows take two passes at every width: that loop, which then reads and
//   converts four rows of 16-bit elements at a time (dy and y of two rows), ran at ATen's speed or slower, two
//   passes well ahead of it: bfloat16 1024 x 8192 0.94-0.97x -> 0.76-0.77x ATen's time, 1024 x 16384 0.91x ->
//   0.72x, 128 x 65536 0.88x -> 0.65x; float16 1024 x 8192 1.00x -> 0.86x.
// Every row's sum is accumulated in the same order (sum_floats2's), so dx does not depend on the task split or on
// the way the row was read. With `stream`, dx's rows that start aligned are written by streaming stores
// (streaming_stores.h: a call that moves more than half the last-level cache).
template <bool kLog, typename Out, typename In, bool kHardwareRounding = false>
void softmax_bwd_task(const Out* dy, int64_t dy_row_stride, const Out* y, int64_t y_row_stride, In* dx, int64_t begin,
                      int64_t end, int64_t cols, bool stream) {
  // The terms of a row's sum (log-softmax's reads no y), and dx from a row's elements and sum.
  const auto term = [](auto g, auto v) {
    if constexpr (kLog) {
      return g;
    } else {
      return g * v;
    }
  };
  const auto grad = [](auto g, auto v, auto total) {
    if constexpr (kLog) {
      return g - exp_of(v) * total;
    } else {
      return v * (g - total);
    }
  };
  const auto row_sum = [&](int64_t r) {
    return sum_floats2(dy + r * dy_row_stride, y + r * y_row_stride, cols, term, term);
  };
  // Writes row r's dx from its sum `total`. With sum_next (std::true_type), forms row `next`'s sum in the same loop,
  // in sum_floats2's order, and returns it.
  const auto write_row = [&](auto sum_next, int64_t r, float total, int64_t next) {
    constexpr bool kSumNext = decltype(sum_next)::value;
    const Out* dyr = dy + r * dy_row_stride;
    const Out* yr = y + r * y_row_stride;
    In* dxr = dx + r * cols;
    const Out* next_dyr = dy + next * dy_row_stride;
    const Out* next_yr = y + next * y_row_stride;
    const FloatVec total_v(total);
    FloatVec acc0(0.f), acc1(0.f);
    int64_t i = 0;
    // (A step's bytes are a multiple of the streaming alignment.)
    write_row_streamed_if(stream && stream_aligned(dxr), [&](auto streamed) {
      for (; i + kStep <= cols; i += kStep) {
        const auto [g0, g1] = load_floats(dyr + i);
        const auto [v0, v1] = load_floats(yr + i);
        write_floats<decltype(streamed)::value, kHardwareRounding>(dxr + i, grad(g0, v0, total_v),
                                                                   grad(g1, v1, total_v));
        if constexpr (kSumNext) {
          const auto [next_g0, next_g1] = load_floats(next_dyr + i);
          if constexpr (kLog) {
            acc0 += next_g0;
            acc1 += next_g1;
          } else {
            const auto [next_v0, next_v1] = load_floats(next_yr + i);
            acc0 += term(next_g0, next_v0);
            acc1 += term(next_g1, next_v1);
          }
        }
      }
    });
    float next_total = at::vec::vec_reduce_all<float>([](FloatVec a, FloatVec b) { return a + b; }, acc0 + acc1);
    for (; i < cols; ++i) {
      dxr[i] = static_cast<In>(grad(static_cast<float>(dyr[i]), static_cast<float>(yr[i]), total));
      if constexpr (kSumNext) {
        next_total += term(static_cast<float>(next_dyr[i]), static_cast<float>(next_yr[i]));
      }
    }
    return next_total;
  };
  if (two_pass_rows<kLog, Out>(cols)) {
    for (int64_t r = begin; r < end; ++r) {
      write_row(std::false_type{}, r, row_sum(r), r);
    }
  } else {
    float total = row_sum(begin);
    for (int64_t r = begin; r < end; ++r) {
      // The last row of the task sums itself again, from cache, for nobody: one loop serves every row.
      total = write_row(std::true_type{}, r, total, std::min(r + 1, end - 1));
    }
  }
  if (stream) {
    end_streaming_stores();
  }
}

template <typename Out, typename In>
void softmax_bwd_rows(const Out* dy, int64_t dy_row_stride, const Out* y, int64_t y_row_stride, In* dx, int64_t rows,
                      int64_t cols, bool log) {
  const bool stream = use_streaming_stores(rows * cols * static_cast<int64_t>(2 * sizeof(Out) + sizeof(In)));
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    // bfloat16 dx rounded by vcvtne2ps2bf16 where the CPU has it (with_bfloat16_rounding, float_rows.h): on the
    // Zen 4 EPYC, 1024 x 768 and 1024 x 1024 bfloat16 backward 1.09-1.13x ATen's time -> 0.82-0.86x.
    with_bfloat16_rounding<In>([&](auto hardware_rounding) {
      constexpr bool kHardwareRounding = decltype(hardware_rounding)::value;
      if (log) {
        softmax_bwd_task<true, Out, In, kHardwareRounding>(dy, dy_row_stride, y, y_row_stride, dx, begin, end, cols,
                                                           stream);
      } else {
        softmax_bwd_task<false, Out, In, kHardwareRounding>(dy, dy_row_stride, y, y_row_stride, dx, begin, end, cols,
                                                            stream);
      }
    });
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
