// Softmax and log-softmax along rows, forward and backward.
//
// Forward, per row: m = max(x), s = sum(exp(x - m)); softmax y = exp(x - m) / s, log-softmax y = x - m - log(s).
// A row held in registers (up to 16384 columns, 8192 unaligned: a team of up to 32 threads per row below 512
// columns, a block per row above) reads x once and writes y once: N*s_in bytes read and N*s_out written per row
// (s_in, s_out the element sizes), about 4*N FLOPs and N exponentials. A longer row takes one online pass, the
// running max and the running sum rescaled whenever the max grows ("Online normalizer calculation for softmax",
// Milakov & Gimelshein 2018), then an output pass: x is read twice, from L2 while the row fits there.
// A row of -inf gives NaN, as F.softmax does: exp(x - m) with m = -inf is exp(NaN). So does a row holding a NaN:
// the max (fmaxf) skips it, but exp(NaN - m) carries it into the sum, and so into every output of the row.
//
// Backward, from the output y: softmax dx = y * (dy - sum(dy * y)), log-softmax dx = dy - exp(y) * sum(dy). A row
// held in registers (up to 8192 columns, 4096 unaligned) reads dy and y once and writes dx once: 2*N*s_out bytes
// read and N*s_in written per row, about 3*N FLOPs. Longer rows read dy and y twice.
//
// Both are memory bound: the aim is ~90% of the device's device-to-device copy bandwidth.
#include "softmax.h"

#include <algorithm>
#include <cmath>

#include "row_team.cuh"
#include "vector_io.cuh"

namespace lmrt::cuda {

namespace {

// Floats of a row per thread in registers (half as many with scalar accesses, whose per-element addresses take
// registers of their own), sized to stay well within the 64 registers per thread that a full SM of threads
// allows. The backward holds dy and y, so it gets half as many floats of each.
template <int kWidth>
constexpr int kFwdItems = kWidth == 1 ? 8 : 16;
template <int kWidth>
constexpr int kBwdItems = kWidth == 1 ? 4 : 8;
constexpr int kMaxTeam = 1024;

// Elements per run: 16 bytes of the narrower of the two element types; the wider one moves in 16-byte pieces.
template <typename A, typename B>
constexpr int kPairVecWidth = std::max(kVecWidth<A>, kVecWidth<B>);

// 1 / s for a softmax denominator (s >= 1: its largest term is exp(0)): the hardware reciprocal refined by one
// Newton step, within an ulp, without the call that a float division makes on its slow path (the registers it
// saves count as spills).
__device__ __forceinline__ float reciprocal(float s) {
  const float r = __fdividef(1.f, s);
  return fmaf(r, fmaf(-s, r, 1.f), r);
}

template <typename TIn, typename TOut, int kWidth>
__global__ void __launch_bounds__(kMaxTeam, 1)
    softmax_fwd_resident_kernel(const TIn* __restrict__ x, int64_t x_stride, TOut* __restrict__ y, int64_t rows,
                                int cols, bool log_softmax, int team) {
  constexpr int kRuns = kFwdItems<kWidth> / kWidth;
  __shared__ float scratch[1][kMaxWarps];
  const Runs<kRuns, kWidth, int> runs(0, cols, threadIdx.x % team, team);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const bool row_exists = row < rows;
  // Elements outside the row read as -inf: they move no max and add exp(-inf) = 0 to the sum.
  float v[kRuns][kWidth];
  load_runs(x + row * x_stride, runs, row_exists, -INFINITY, v);

  float row_max[1] = {-INFINITY};
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) row_max[0] = fmaxf(row_max[0], v[k][j]);
  }
  team_reduce(row_max, team, scratch, MaxOp{});
  // v becomes x - max for log-softmax, exp(x - max) for softmax.
  float row_sum[1] = {0.f};
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      v[k][j] -= row_max[0];
      const float e = expf(v[k][j]);
      row_sum[0] += e;
      if (!log_softmax) v[k][j] = e;
    }
  }
  team_reduce(row_sum, team, scratch, SumOp{});

  if (!row_exists) return;
  const float shift = log_softmax ? logf(row_sum[0]) : 0.f;
  const float scale = log_softmax ? 1.f : reciprocal(row_sum[0]);
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) v[k][j] = (v[k][j] - shift) * scale;
  }
  store_runs(y + row * cols, runs, v);
}

template <typename TIn, typename TOut, int kWidth>
__global__ void __launch_bounds__(kStreamThreads, 1)
    softmax_fwd_streaming_kernel(const TIn* __restrict__ x, int64_t x_stride, TOut* __restrict__ y, int64_t cols,
                                 bool log_softmax) {
  constexpr int kRuns = kStreamItems / kWidth;
  using StreamRuns = Runs<kRuns, kWidth, int64_t>;
  __shared__ float scratch[1][kMaxWarps];
  const int64_t row = blockIdx.x;
  const TIn* x_row = x + row * x_stride;

  // This thread's running max, and its sum of exp(x - running max), rescaled whenever the max grows.
  float thread_max = -INFINITY;
  float thread_sum = 0.f;
  for (int64_t first = 0; first < cols; first += kStreamTile) {
    const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
    float v[kRuns][kWidth];
    load_runs(x_row, runs, true, -INFINITY, v);
    float tile_max = thread_max;
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) tile_max = fmaxf(tile_max, v[k][j]);
    }
    // Until the thread has seen a value above -inf, its values are shifted by 0 instead of tile_max = -inf: a -inf
    // adds exp(-inf) = 0 (not exp(-inf - -inf) = NaN), and a NaN, which fmaxf left out of tile_max, adds NaN, as
    // every NaN must: skipping such a tile lost the NaN of a thread that had seen only NaN and -inf.
    const float shift = tile_max == -INFINITY ? 0.f : tile_max;
    thread_sum *= expf(thread_max - shift);
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) thread_sum += expf(v[k][j] - shift);
    }
    thread_max = tile_max;
  }
  float row_max[1] = {thread_max};
  team_reduce(row_max, kStreamThreads, scratch, MaxOp{});
  // A thread that saw only -inf adds 0 * exp(-inf) = 0, and one whose sum is NaN adds NaN whatever its max; a row of
  // -inf sums to NaN, and its outputs are NaN anyway.
  float row_sum[1] = {thread_sum * expf(thread_max - row_max[0])};
  team_reduce(row_sum, kStreamThreads, scratch, SumOp{});

  const float log_sum = logf(row_sum[0]);
  const float inv_sum = reciprocal(row_sum[0]);
  for (int64_t first = 0; first < cols; first += kStreamTile) {
    const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
    float v[kRuns][kWidth];
    load_runs(x_row, runs, true, 0.f, v);
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float shifted = v[k][j] - row_max[0];
        v[k][j] = log_softmax ? shifted - log_sum : expf(shifted) * inv_sum;
      }
    }
    store_runs(y + row * cols, runs, v);
  }
}

// The row sum the backward needs: sum(dy) for log-softmax, sum(dy * y) for softmax.
template <int kRuns, int kWidth>
__device__ __forceinline__ float thread_grad_sum(const float (&dy)[kRuns][kWidth], const float (&y)[kRuns][kWidth],
                                                 bool log_softmax) {
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) sum += log_softmax ? dy[k][j] : dy[k][j] * y[k][j];
  }
  return sum;
}

// dx in place of dy: dy - exp(y) * sum for log-softmax, y * (dy - sum) for softmax.
template <int kRuns, int kWidth>
__device__ __forceinline__ void input_grad(float (&dy)[kRuns][kWidth], const float (&y)[kRuns][kWidth], float sum,
                                           bool log_softmax) {
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      dy[k][j] = log_softmax ? dy[k][j] - expf(y[k][j]) * sum : y[k][j] * (dy[k][j] - sum);
    }
  }
}

template <typename TOut, typename TIn, int kWidth>
__global__ void __launch_bounds__(kMaxTeam, 1)
    softmax_bwd_resident_kernel(const TOut* __restrict__ dy, int64_t dy_stride, const TOut* __restrict__ y,
                                int64_t y_stride, TIn* __restrict__ dx, int64_t rows, int cols, bool log_softmax,
                                int team) {
  constexpr int kRuns = kBwdItems<kWidth> / kWidth;
  __shared__ float scratch[1][kMaxWarps];
  const Runs<kRuns, kWidth, int> runs(0, cols, threadIdx.x % team, team);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const bool row_exists = row < rows;
  // Outside the row dy = y = 0, which adds nothing to the sum.
  float g[kRuns][kWidth], out[kRuns][kWidth];
  load_runs(dy + row * dy_stride, runs, row_exists, 0.f, g);
  load_runs(y + row * y_stride, runs, row_exists, 0.f, out);
  float sum[1] = {thread_grad_sum(g, out, log_softmax)};
  team_reduce(sum, team, scratch, SumOp{});
  if (!row_exists) return;
  input_grad(g, out, sum[0], log_softmax);
  store_runs(dx + row * cols, runs, g);
}

template <typename TOut, typename TIn, int kWidth>
__global__ void __launch_bounds__(kStreamThreads, 1)
    softmax_bwd_streaming_kernel(const TOut* __restrict__ dy, int64_t dy_stride, const TOut* __restrict__ y,
                                 int64_t y_stride, TIn* __restrict__ dx, int64_t cols, bool log_softmax) {
  constexpr int kRuns = kStreamItems / kWidth;
  using StreamRuns = Runs<kRuns, kWidth, int64_t>;
  __shared__ float scratch[1][kMaxWarps];
  const int64_t row = blockIdx.x;
  const TOut* dy_row = dy + row * dy_stride;
  const TOut* y_row = y + row * y_stride;
  float sum[1] = {0.f};
  for (int64_t first = 0; first < cols; first += kStreamTile) {
    const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
    float g[kRuns][kWidth], out[kRuns][kWidth];
    load_runs(dy_row, runs, true, 0.f, g);
    load_runs(y_row, runs, true, 0.f, out);
    sum[0] += thread_grad_sum(g, out, log_softmax);
  }
  team_reduce(sum, kStreamThreads, scratch, SumOp{});
  for (int64_t first = 0; first < cols; first += kStreamTile) {
    const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
    float g[kRuns][kWidth], out[kRuns][kWidth];
    load_runs(dy_row, runs, true, 0.f, g);
    load_runs(y_row, runs, true, 0.f, out);
    input_grad(g, out, sum[0], log_softmax);
    store_runs(dx + row * cols, runs, g);
  }
}

template <typename TIn, typename TOut, int kWidth>
cudaError_t launch_fwd_kernel(const TIn* x, int64_t x_stride, TOut* y, int64_t rows, int64_t cols, bool log_softmax,
                              cudaStream_t stream) {
  const int team = resident_team(cols, kFwdItems<kWidth>, kMaxTeam);
  if (team > 0) {
    const int block_threads = team_block_threads(team);
    const int64_t blocks = ceil_div(rows, block_threads / team);
    if (blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
    softmax_fwd_resident_kernel<TIn, TOut, kWidth><<<static_cast<unsigned>(blocks), block_threads, 0, stream>>>(
        x, x_stride, y, rows, static_cast<int>(cols), log_softmax, team);
  } else {
    if (rows > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
    softmax_fwd_streaming_kernel<TIn, TOut, kWidth><<<static_cast<unsigned>(rows), kStreamThreads, 0, stream>>>(
        x, x_stride, y, cols, log_softmax);
  }
  return cudaGetLastError();
}

template <typename TIn, typename TOut>
cudaError_t launch_fwd(const TIn* x, int64_t x_stride, TOut* y, int64_t rows, int64_t cols, bool log_softmax,
                       cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  constexpr int kVec = kPairVecWidth<TIn, TOut>;
  // y is contiguous: its row stride is cols.
  const bool vec = rows_vector_aligned(x, x_stride, kVec) && rows_vector_aligned(y, cols, kVec);
  return vec ? launch_fwd_kernel<TIn, TOut, kVec>(x, x_stride, y, rows, cols, log_softmax, stream)
             : launch_fwd_kernel<TIn, TOut, 1>(x, x_stride, y, rows, cols, log_softmax, stream);
}

template <typename TOut, typename TIn, int kWidth>
cudaError_t launch_bwd_kernel(const TOut* dy, int64_t dy_stride, const TOut* y, int64_t y_stride, TIn* dx,
                              int64_t rows, int64_t cols, bool log_softmax, cudaStream_t stream) {
  const int team = resident_team(cols, kBwdItems<kWidth>, kMaxTeam);
  if (team > 0) {
    const int block_threads = team_block_threads(team);
    const int64_t blocks = ceil_div(rows, block_threads / team);
    if (blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
    softmax_bwd_resident_kernel<TOut, TIn, kWidth><<<static_cast<unsigned>(blocks), block_threads, 0, stream>>>(
        dy, dy_stride, y, y_stride, dx, rows, static_cast<int>(cols), log_softmax, team);
  } else {
    if (rows > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
    softmax_bwd_streaming_kernel<TOut, TIn, kWidth><<<static_cast<unsigned>(rows), kStreamThreads, 0, stream>>>(
        dy, dy_stride, y, y_stride, dx, cols, log_softmax);
  }
  return cudaGetLastError();
}

template <typename TOut, typename TIn>
cudaError_t launch_bwd(const TOut* dy, int64_t dy_stride, const TOut* y, int64_t y_stride, TIn* dx, int64_t rows,
                       int64_t cols, bool log_softmax, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  constexpr int kVec = kPairVecWidth<TOut, TIn>;
  // dx is contiguous: its row stride is cols.
  const bool vec = rows_vector_aligned(dy, dy_stride, kVec) && rows_vector_aligned(y, y_stride, kVec) &&
                   rows_vector_aligned(dx, cols, kVec);
  return vec ? launch_bwd_kernel<TOut, TIn, kVec>(dy, dy_stride, y, y_stride, dx, rows, cols, log_softmax, stream)
             : launch_bwd_kernel<TOut, TIn, 1>(dy, dy_stride, y, y_stride, dx, rows, cols, log_softmax, stream);
}

}  // namespace

cudaError_t softmax_fwd(DType in_dtype, DType out_dtype, const void* x, int64_t x_row_stride, void* y, int64_t rows,
                        int64_t cols, bool log, cudaStream_t stream) {
  return dispatch_dtype(in_dtype, [&](auto in_tag) {
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using TIn = typename decltype(in_tag)::type;
      using TOut = typename decltype(out_tag)::type;
      return launch_fwd(static_cast<const TIn*>(x), x_row_stride, static_cast<TOut*>(y), rows, cols, log, stream);
    });
  });
}

cudaError_t softmax_bwd(DType out_dtype, DType in_dtype, const void* dy, int64_t dy_row_stride, const void* y,
                        int64_t y_row_stride, void* dx, int64_t rows, int64_t cols, bool log, cudaStream_t stream) {
  return dispatch_dtype(out_dtype, [&](auto out_tag) {
    return dispatch_dtype(in_dtype, [&](auto in_tag) {
      using TOut = typename decltype(out_tag)::type;
      using TIn = typename decltype(in_tag)::type;
      return launch_bwd(static_cast<const TOut*>(dy), dy_row_stride, static_cast<const TOut*>(y), y_row_stride,
                        static_cast<TIn*>(dx), rows, cols, log, stream);
    });
  });
}

}  // namespace lmrt::cuda
