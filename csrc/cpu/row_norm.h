// LayerNorm and RMSNorm on the CPU, one template for both (kRms drops the centering and the bias), used by
// layer_norm.cpp and rms_norm.cpp.
//
// Forward, per row of n elements: the sums of the row and of its squares in one pass (for LayerNorm shifted by an
// estimate of the mean, for accuracy; RMSNorm needs only the squares), then the normalized, scaled and shifted row.
// The row is read from memory once and re-read from L1/L2 by the second pass (float16 and bfloat16 converted in
// registers as they are read), so the kernel moves n*s bytes in and n*s out (s = element size) and is meant to run
// at memory bandwidth. y, and the backward's dx, are written by streaming stores when a call moves more bytes than
// half the last-level cache (streaming_stores.h), and rounded to bfloat16 by AVX512-BF16 where the CPU has it
// (with_bfloat16_rounding, float_rows.h).
// Backward, per row: dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(x_hat * w*dy)), the mean(w*dy) term for
// LayerNorm only; each row's two means are summed in the loop that writes the previous row's dx (see norm_bwd).
// The row sums of both passes are blocked, with compensated totals (kSumBlockSteps, float_rows.h), so that their
// float32 error does not grow with the row's length.
// The weight and bias gradients (sums over rows of dy*x_hat and dy) are deterministic: each task
// owns a fixed range of rows and writes its partial column sums, which are then added pairwise. A task sums
// its rows kBlockRows at a time and adds each block's sums to its partial, so that no column's sum runs through
// more than a few hundred float32 additions in a row (see norm_bwd).
#pragma once

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "dispatch.h"
#include "float_rows.h"
#include "streaming_stores.h"

namespace lmrt::cpu {

// The moments of a row for the forward, accumulated a step (kStep elements) or a tail element at a time: the sums
// of (x - shift) and (x - shift)^2 for LayerNorm, of x^2 for RMSNorm (whose shift is 0). float16 and bfloat16 rows
// are converted in registers as they are read, the two halves of a step into two vector accumulators, which are
// blocked sums (float_rows.h): every kSumBlockSteps steps they go into compensated totals, so that the moments'
// error does not grow with the row's length. float32 errors (float64 truth), before -> after (PyTorch's), AVX2:
// RMSNorm of a constant row of 65536 2.0e-5 -> 6.0e-8 (6.0e-8), of a two-valued row of 16384 1.7e-5 -> 2.7e-8
// (2.1e-7); LayerNorm of a two-valued row of 65536 1.9e-5 -> 2.4e-7 (3.4e-8, the 4-ulp floor of tests/tolerance.py
// 6.7e-7), 1.5e-7 at 4096 columns as at 65536.
template <bool kRms, typename T>
class MomentSums {
 public:
  MomentSums(const T* x, float shift) : x_(x), shift_(shift), shift_v_(shift) {}

  // Elements [i, i + kStep), into the block's sums; end_block after at most kSumBlockSteps of them.
  void add_step(int64_t i) {
    const auto [a, b] = load_floats(x_ + i);
    add_vector(a, sum_[0], square_[0]);
    add_vector(b, sum_[1], square_[1]);
  }

  void add_element(int64_t i) {
    const float d = static_cast<float>(x_[i]) - shift_;
    sum_tail_ += d;
    square_tail_ = std::fma(d, d, square_tail_);
  }

  float shift() const { return shift_; }

  // The block's sums into the totals, and the block to 0.
  void end_block() {
    if constexpr (!kRms) {
      add_compensated(sum_[0] + sum_[1], sum_total_, sum_error_);
      sum_[0] = sum_[1] = FloatVec(0.f);
    }
    add_compensated(square_[0] + square_[1], square_total_, square_error_);
    square_[0] = square_[1] = FloatVec(0.f);
  }

  // {sum(x - shift), sum((x - shift)^2)} (the first is 0 for RMSNorm).
  std::pair<float, float> totals() const {
    MomentSums done = *this;
    done.end_block();
    const float sum = kRms ? 0.f : reduce_compensated(done.sum_total_, done.sum_error_) + sum_tail_;
    return {sum, reduce_compensated(done.square_total_, done.square_error_) + square_tail_};
  }

 private:
  void add_vector(FloatVec v, FloatVec& sum, FloatVec& square) const {
    const FloatVec d = kRms ? v : v - shift_v_;
    if constexpr (!kRms) {
      sum += d;
    }
    square = at::vec::fmadd(d, d, square);
  }

  const T* x_;
  float shift_;
  FloatVec shift_v_;
  FloatVec sum_[2] = {FloatVec(0.f), FloatVec(0.f)};
  FloatVec square_[2] = {FloatVec(0.f), FloatVec(0.f)};
  FloatVec sum_total_ = FloatVec(0.f), sum_error_ = FloatVec(0.f);
  FloatVec square_total_ = FloatVec(0.f), square_error_ = FloatVec(0.f);
  float sum_tail_ = 0.f, square_tail_ = 0.f;
};

// How many of a row's first elements estimate its mean for the shifted moments of the LayerNorm forward.
constexpr int64_t kShiftEstimateElements = 4 * kStep;

// The moment sums of a row, not yet accumulated: LayerNorm's shifted by the mean of the row's first elements.
template <bool kRms, typename T>
MomentSums<kRms, T> start_moments(const T* x, int64_t n) {
  if constexpr (kRms) {
    return MomentSums<kRms, T>(x, 0.f);
  } else {
    const int64_t head = std::min<int64_t>(n, kShiftEstimateElements);
    return MomentSums<kRms, T>(x, sum_floats(x, head, [](FloatVec v) { return v; }, [](float v) { return v; }) / head);
  }
}

// {mean, variance} of a row of n from its accumulated moment sums. The shifted sums' rounding error grows with the
// shift's distance from the row's mean: when that is more than a standard deviation (the first elements are not
// like the rest), a second pass shifts by the mean found, which makes the residual small and the variance
// accurate.
template <bool kRms, typename T>
std::pair<float, float> row_moments(const MomentSums<kRms, T>& moments, const T* x, int64_t n) {
  const float inv_n = 1.f / static_cast<float>(n);
  auto [residual_sum, square_sum] = moments.totals();
  float residual = residual_sum * inv_n;
  float var = std::max(square_sum * inv_n - residual * residual, 0.f);
  if (kRms || residual * residual <= var) {
    return {moments.shift() + residual, var};
  }
  MomentSums<kRms, T> again(x, moments.shift() + residual);
  accumulate_row_blocked<kStep>(again, n);
  std::tie(residual_sum, square_sum) = again.totals();
  residual = residual_sum * inv_n;
  return {again.shift() + residual, std::max(square_sum * inv_n - residual * residual, 0.f)};
}

// Forward. Each row is read twice, for its moments, then for y; a row's moments are accumulated in the loop that
// writes the previous row's y, so that memory streams the next row in while the current one is re-read from
// cache (as the backward does, see norm_bwd): 1024 x 8192 float32 LayerNorm 1.60 -> 1.34 ms (ATen 1.71), RMSNorm
// 1.41 -> 1.23 ms, 4096 float32 LayerNorm 0.77 -> 0.63 ms (ATen 0.77).
template <bool kRms, typename T>
void norm_fwd(const T* x, int64_t x_row_stride, const float* weight, const float* bias, T* y, float* mean,
              float* rstd, int64_t rows, int64_t cols, float eps) {
  constexpr int64_t kWidth = FloatVec::size();
  const bool stream = use_streaming_stores(2 * rows * cols * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, rows, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    with_bfloat16_rounding<T>([&](auto hardware_rounding) {
      constexpr bool kHardwareRounding = decltype(hardware_rounding)::value;
      auto moments = start_moments<kRms>(x + begin * x_row_stride, cols);
      accumulate_row_blocked<kStep>(moments, cols);
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = x + r * x_row_stride;
        const auto [mu, var] = row_moments(moments, xr, cols);
        const float rs = 1.f / std::sqrt(var + eps);
        if constexpr (!kRms) {
          mean[r] = mu;
        }
        rstd[r] = rs;
        // The last row of the task sums itself again, from cache, for nobody: one loop serves every row.
        moments = start_moments<kRms>(x + std::min(r + 1, end - 1) * x_row_stride, cols);
        // y = (x - mean) * rstd * weight + bias (LayerNorm), or x * rstd * weight (RMSNorm), in float32 whatever T
        // is; `weight` and `bias` may be null.
        T* yr = y + r * cols;
        const FloatVec mean_v(mu), rstd_v(rs);
        const auto normalize = [&](FloatVec v, int64_t i) {
          v = (kRms ? v : v - mean_v) * rstd_v;
          if (weight != nullptr) v = v * FloatVec::loadu(weight + i);
          if (bias != nullptr) v = v + FloatVec::loadu(bias + i);
          return v;
        };
        const int64_t vector_end = cols - cols % kStep;
        write_row_streamed_if(stream && stream_aligned(yr), [&](auto streamed) {
          blocked_steps<kStep>(moments, vector_end, [&](int64_t i) {
            const auto [a, b] = load_floats(xr + i);
            write_floats<decltype(streamed)::value, kHardwareRounding>(yr + i, normalize(a, i),
                                                                       normalize(b, i + kWidth));
            moments.add_step(i);
          });
        });
        for (int64_t i = vector_end; i < cols; ++i) {
          const float v = (kRms ? static_cast<float>(xr[i]) : static_cast<float>(xr[i]) - mu) * rs;
          yr[i] = static_cast<T>((weight != nullptr ? v * weight[i] : v) + (bias != nullptr ? bias[i] : 0.f));
          moments.add_element(i);
        }
      }
    });
    if (stream) {
      end_streaming_stores();
    }
  });
}

// Rows per task of the backward: a fixed number of tasks (at most kMaxTasks) so that the partial weight/bias
// sums, and hence the result, do not depend on the number of threads.
inline int64_t bwd_rows_per_task(int64_t rows, int64_t cols) {
  constexpr int64_t kMaxTasks = 64;
  return std::max<int64_t>((rows + kMaxTasks - 1) / kMaxTasks, rows_per_task(cols));
}

inline int64_t bwd_task_count(int64_t rows, int64_t cols) {
  const int64_t task_rows = bwd_rows_per_task(rows, cols);
  return (rows + task_rows - 1) / task_rows;
}

// Elements per step of the backward's loops: float32 rows a vector at a time (about 5% faster at 8192 columns than
// two), others a vector of T, converted to a pair of float32 vectors.
template <typename T>
constexpr int64_t kBwdStep = std::is_same_v<T, float> ? FloatVec::size() : kStep;

// The row sums of the backward, sum(g * x_hat) and, for LayerNorm, sum(g), where g = dy * weight (dy without a
// weight) and x_hat = (x - mean) * rstd, accumulated a step (or a tail element) at a time; float16 and bfloat16
// rows are converted in registers as they are read, the two halves of a step into two vector accumulators. Blocked
// sums, as the forward's (MomentSums): float32 dx error on a two-valued row of 65536 (1 and -0.5) with a constant
// dy, given the exact mean and rstd, before -> after (PyTorch's): RMSNorm 2.2e-5 -> 6.8e-8 (1.3e-7), LayerNorm
// 4.6e-5 -> 1.7e-7 (2.6e-5).
template <bool kRms, typename T>
class BwdRowSums {
 public:
  BwdRowSums(const T* x, const T* dy, const float* weight, float mean, float rstd)
      : x_(x), dy_(dy), weight_(weight), mean_(mean), rstd_(rstd), mean_v_(mean), rstd_v_(rstd) {}

  // Elements [i, i + kBwdStep<T>), into the block's sums; end_block after at most kSumBlockSteps of them.
  void add_step(int64_t i) {
    if constexpr (std::is_same_v<T, float>) {
      add_vector(FloatVec::loadu(dy_ + i), FloatVec::loadu(x_ + i), i, g_xhat_[0], g_sum_[0]);
    } else {
      const auto [x0, x1] = load_floats(x_ + i);
      const auto [d0, d1] = load_floats(dy_ + i);
      add_vector(d0, x0, i, g_xhat_[0], g_sum_[0]);
      add_vector(d1, x1, i + FloatVec::size(), g_xhat_[1], g_sum_[1]);
    }
  }

  void add_element(int64_t i) {
    const float d = static_cast<float>(dy_[i]), xv = static_cast<float>(x_[i]);
    const float g = weight_ != nullptr ? d * weight_[i] : d;
    g_xhat_tail_ = std::fma(g, (kRms ? xv : xv - mean_) * rstd_, g_xhat_tail_);
    if constexpr (!kRms) {
      g_sum_tail_ += g;
    }
  }

  // The block's sums into the totals, and the block to 0 (float32 rows use only the first accumulators).
  void end_block() {
    constexpr bool kTwo = !std::is_same_v<T, float>;
    add_compensated(kTwo ? g_xhat_[0] + g_xhat_[1] : g_xhat_[0], g_xhat_total_, g_xhat_error_);
    g_xhat_[0] = g_xhat_[1] = FloatVec(0.f);
    if constexpr (!kRms) {
      add_compensated(kTwo ? g_sum_[0] + g_sum_[1] : g_sum_[0], g_sum_total_, g_sum_error_);
      g_sum_[0] = g_sum_[1] = FloatVec(0.f);
    }
  }

  // {sum(g * x_hat), sum(g)} (sum(g) is 0 for RMSNorm).
  std::pair<float, float> totals() const {
    BwdRowSums done = *this;
    done.end_block();
    const float g_xhat = reduce_compensated(done.g_xhat_total_, done.g_xhat_error_) + g_xhat_tail_;
    const float g_sum = kRms ? 0.f : reduce_compensated(done.g_sum_total_, done.g_sum_error_) + g_sum_tail_;
    return {g_xhat, g_sum};
  }

 private:
  void add_vector(FloatVec d, FloatVec xv, int64_t i, FloatVec& g_xhat, FloatVec& g_sum) const {
    const FloatVec g = weight_ != nullptr ? d * FloatVec::loadu(weight_ + i) : d;
    g_xhat = at::vec::fmadd(g, (kRms ? xv : xv - mean_v_) * rstd_v_, g_xhat);
    if constexpr (!kRms) {
      g_sum += g;
    }
  }

  const T* x_;
  const T* dy_;
  const float* weight_;
  float mean_, rstd_;
  FloatVec mean_v_, rstd_v_;
  FloatVec g_xhat_[2] = {FloatVec(0.f), FloatVec(0.f)};
  FloatVec g_sum_[2] = {FloatVec(0.f), FloatVec(0.f)};
  FloatVec g_xhat_total_ = FloatVec(0.f), g_xhat_error_ = FloatVec(0.f);
  FloatVec g_sum_total_ = FloatVec(0.f), g_sum_error_ = FloatVec(0.f);
  float g_xhat_tail_ = 0.f, g_sum_tail_ = 0.f;
};

// sums += block, then block = 0; nothing where block is sums itself (a task's first block, or null: not asked for).
inline void add_block_sums(float* block, float* sums, int64_t cols) {
  if (block == sums) return;
  at::vec::map2<float>([](FloatVec a, FloatVec b) { return a + b; }, sums, sums, block, cols);
  std::fill(block, block + cols, 0.f);
}

// Rows per block of the weight and bias gradients' sums: a column's running float32 sum takes at most this many
// terms before it is added to the task's partial (a task of 2048 rows: 32 + 64 additions rather than 2048), and the
// tasks' partials are added pairwise (sum_partials). float32 dweight errors, before -> after (PyTorch's): RMSNorm
// 65536 x 16 3.2e-3 -> 8.4e-4 (8.4e-4), 98304 x 64 5.0e-3 -> 1.6e-3 (3.0e-3), 8192 x 768 4.7e-4 -> 2.2e-4 (2.5e-4);
// LayerNorm's dbias 8192 x 768 1.3e-3 -> 3.1e-4 (5.3e-3).
constexpr int64_t kBlockRows = 32;

// dx (or null), and the float32 partial column sums of dy*x_hat (dweight_partial) and dy (dbias_partial), one
// row of `cols` per task, or null when not asked for.
//
// Each row is read twice: once for its sums (BwdRowSums), which every output needs, then for the outputs. x_hat is
// recomputed rather than stored. A row's sums are formed in the loop that writes the previous row's outputs, so
// that memory streams the next row in while the current one is re-read from cache, where a separate pass of sums
// would leave the outputs' pass waiting on memory alone: 1024 x 8192 float32 LayerNorm 4.12 -> 3.18 ms, 4096 1.49 ->
// 1.25 ms, 8192 bfloat16 1.94 -> 1.68 ms (as softmax's backward does, softmax.cpp).
template <bool kRms, typename T>
void norm_bwd(const T* dy, int64_t dy_row_stride, const T* x, int64_t x_row_stride, const float* weight,
              const float* mean, const float* rstd, T* dx, float* dweight_partial, float* dbias_partial, int64_t rows,
              int64_t cols) {
  constexpr int64_t kWidth = FloatVec::size();
  constexpr int64_t kBwd = kBwdStep<T>;
  const int64_t vector_end = cols - cols % kBwd;
  const int64_t task_rows = bwd_rows_per_task(rows, cols);
  const bool stream = dx != nullptr && use_streaming_stores(3 * rows * cols * static_cast<int64_t>(sizeof(T)));
  const auto row_sums = [&](int64_t r) {
    return BwdRowSums<kRms, T>(x + r * x_row_stride, dy + r * dy_row_stride, weight, kRms ? 0.f : mean[r], rstd[r]);
  };
  at::parallel_for(0, bwd_task_count(rows, cols), 1, [&](int64_t task_begin, int64_t task_end) {
    with_bfloat16_rounding<T>([&](auto hardware_rounding) {
      constexpr bool kHardwareRounding = decltype(hardware_rounding)::value;
      // dw and db sum a block of rows: the task's first block straight into the task's partial sums, each later one
      // into block_sums (zero whenever unused), then added to the partial sums. A task of at most kBlockRows rows
      // (every task of a 2048 x 1024 input, say) thus never touches block_sums.
      std::vector<float> block_sums;
      for (int64_t task = task_begin; task < task_end; ++task) {
        float* dw_task = dweight_partial != nullptr ? dweight_partial + task * cols : nullptr;
        float* db_task = dbias_partial != nullptr ? dbias_partial + task * cols : nullptr;
        for (float* sums : {dw_task, db_task}) {
          if (sums != nullptr) std::fill(sums, sums + cols, 0.f);
        }
        float* dw = dw_task;
        float* db = db_task;
        const int64_t row_begin = task * task_rows, row_end = std::min(rows, (task + 1) * task_rows);
        auto first = row_sums(row_begin);
        accumulate_row_blocked<kBwd>(first, cols);
        auto [g_xhat_sum, g_sum] = first.totals();
        for (int64_t r = row_begin; r < row_end; ++r) {
          const T* xr = x + r * x_row_stride;
          const T* dyr = dy + r * dy_row_stride;
          const float mu = kRms ? 0.f : mean[r];
          const float rs = rstd[r];
          const float inv_n = 1.f / static_cast<float>(cols);
          const float xhat_g = g_xhat_sum * inv_n, g_mean = g_sum * inv_n;
          T* dxr = dx != nullptr ? dx + r * cols : nullptr;
          // The last row of the task sums itself again, from cache, for nobody: one loop serves every row.
          auto next = row_sums(std::min(r + 1, row_end - 1));
          // One pass for every output: dx = (g - mean(g) - x_hat * mean(g * x_hat)) * rstd, dweight += dy * x_hat,
          // dbias += dy.
          const FloatVec mu_v(mu), rs_v(rs), g_mean_v(g_mean), xhat_g_v(xhat_g);
          const auto column_outputs = [&](FloatVec d, FloatVec xv, int64_t i) {
            const FloatVec x_hat = (kRms ? xv : xv - mu_v) * rs_v;
            if (dw != nullptr) at::vec::fmadd(d, x_hat, FloatVec::loadu(dw + i)).store(dw + i);
            if (db != nullptr) (FloatVec::loadu(db + i) + d).store(db + i);
            const FloatVec g = weight != nullptr ? d * FloatVec::loadu(weight + i) : d;
            return (g - g_mean_v - x_hat * xhat_g_v) * rs_v;
          };
          write_row_streamed_if(stream && stream_aligned(dxr), [&](auto streamed) {
            constexpr bool kStream = decltype(streamed)::value;
            blocked_steps<kBwd>(next, vector_end, [&](int64_t i) {
              if constexpr (std::is_same_v<T, float>) {
                const FloatVec dx_v = column_outputs(FloatVec::loadu(dyr + i), FloatVec::loadu(xr + i), i);
                if (dxr != nullptr) write_vector<kStream>(dxr + i, dx_v);
              } else {
                const auto [x0, x1] = load_floats(xr + i);
                const auto [d0, d1] = load_floats(dyr + i);
                const FloatVec dx0 = column_outputs(d0, x0, i), dx1 = column_outputs(d1, x1, i + kWidth);
                if (dxr != nullptr) write_floats<kStream, kHardwareRounding>(dxr + i, dx0, dx1);
              }
              next.add_step(i);
            });
          });
          for (int64_t i = vector_end; i < cols; ++i) {
            const float d = static_cast<float>(dyr[i]);
            const float x_hat = (kRms ? static_cast<float>(xr[i]) : static_cast<float>(xr[i]) - mu) * rs;
            if (dw != nullptr) dw[i] = std::fma(d, x_hat, dw[i]);
            if (db != nullptr) db[i] += d;
            if (dxr != nullptr) {
              const float g = weight != nullptr ? d * weight[i] : d;
              dxr[i] = static_cast<T>((g - g_mean - x_hat * xhat_g) * rs);
            }
            next.add_element(i);
          }
          std::tie(g_xhat_sum, g_sum) = next.totals();
          const bool block_ends = (r - row_begin) % kBlockRows == kBlockRows - 1 || r + 1 == row_end;
          if (block_ends && (dw != nullptr || db != nullptr)) {
            add_block_sums(dw, dw_task, cols);
            add_block_sums(db, db_task, cols);
            if (dw == dw_task && db == db_task && r + 1 < row_end) {  // the first block ends: the next sum apart
              block_sums.resize(2 * cols);
              dw = dw_task != nullptr ? block_sums.data() : nullptr;
              db = db_task != nullptr ? block_sums.data() + cols : nullptr;
            }
          }
        }
      }
    });
    if (stream) {
      end_streaming_stores();
    }
  });
}

// out[c] = the sum over tasks t of partial[t * cols + c], added pairwise (tasks 0 and 1, 2 and 3, ..., then those
// pairs' sums, and so on), so that each column's sum takes about log2(tasks) float32 additions rather than one per
// task in a row. `partial` is overwritten.
inline void sum_partials(float* partial, int64_t tasks, int64_t cols, float* out) {
  constexpr int64_t kChunk = 256;  // columns summed together: the tree's levels re-read a chunk from L1
  at::parallel_for(0, cols, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      for (int64_t stride = 1; stride < tasks; stride *= 2) {
        for (int64_t t = 0; t + stride < tasks; t += 2 * stride) {
          float* sum = partial + t * cols + c0;
          at::vec::map2<float>([](FloatVec a, FloatVec b) { return a + b; }, sum, sum, sum + stride * cols, n);
        }
      }
      if (tasks == 0) {
        std::fill(out + c0, out + c0 + n, 0.f);
      } else {
        std::copy(partial + c0, partial + c0 + n, out + c0);
      }
    }
  });
}

// The tensor-level forward of both norms (layout in layer_norm.h): `bias` and `mean` are undefined for RMSNorm.
template <bool kRms>
void norm_fwd_tensors(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                      const at::Tensor& y, const at::Tensor& mean, const at::Tensor& rstd) {
  LMRT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "lmrt norm forward (cpp)", [&] {
    norm_fwd<kRms>(x.const_data_ptr<scalar_t>(), x.stride(0), data_or_null<float>(weight), data_or_null<float>(bias),
                   y.data_ptr<scalar_t>(), data_or_null<float>(mean), rstd.data_ptr<float>(), x.size(0), x.size(1),
                   static_cast<float>(eps));
  });
}

// The tensor-level backward of both norms: the outputs that are defined, dweight and dbias added up from the
// tasks' float32 partial sums.
template <bool kRms>
void norm_bwd_tensors(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                      const at::Tensor& rstd, const at::Tensor& dx, const at::Tensor& dweight,
                      const at::Tensor& dbias) {
  const int64_t rows = x.size(0), cols = x.size(1), tasks = bwd_task_count(rows, cols);
  const auto partial_options = x.options().dtype(at::kFloat);
  const at::Tensor dweight_partial = dweight.defined() ? at::empty({tasks, cols}, partial_options) : at::Tensor();
  const at::Tensor dbias_partial = dbias.defined() ? at::empty({tasks, cols}, partial_options) : at::Tensor();
  LMRT_DISPATCH_KERNEL_TYPES(x.scalar_type(), "lmrt norm backward (cpp)", [&] {
    norm_bwd<kRms>(dy.const_data_ptr<scalar_t>(), dy.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
                   data_or_null<float>(weight), data_or_null<float>(mean), rstd.const_data_ptr<float>(),
                   data_or_null<scalar_t>(dx), data_or_null<float>(dweight_partial),
                   data_or_null<float>(dbias_partial), rows, cols);
  });
  if (dweight.defined()) sum_partials(dweight_partial.data_ptr<float>(), tasks, cols, dweight.data_ptr<float>());
  if (dbias.defined()) sum_partials(dbias_partial.data_ptr<float>(), tasks, cols, dbias.data_ptr<float>());
}

}  // namespace lmrt::cpu
