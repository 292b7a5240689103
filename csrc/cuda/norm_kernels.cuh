// LayerNorm and RMSNorm kernels and launchers, shared by layer_norm.cu and rms_norm.cu. RMSNorm is LayerNorm
// without centering and without bias, so one set of kernels serves both through kIsRms.
//
// Forward, per row: mean = sum(x) / N (LayerNorm), var = sum((x - mean)^2) / N (biased; RMSNorm: sum(x^2) / N),
// rstd = rsqrt(var + eps), y = (x - mean) * rstd * w + b, by the corrected two-pass algorithm: after the mean pass,
// one pass sums (x - mean) and (x - mean)^2, and the first sum corrects the mean's rounding (large when |mean| is
// far above the spread). A row that fits in registers is read once, by a team of threads (a few lanes, a warp or a
// block, row_team.cuh), which takes both passes over the values it holds; a wider row is streamed by one block: a
// mean pass, the centered pass and an output pass.
//
// Backward, with x_hat = (x - mean) * rstd and g = dy * w:
//     dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))       (RMSNorm: no mean(g) term)
//     dweight = sum over rows of dy * x_hat,  dbias = sum over rows of dy.
// Stage 1 splits the rows into units (a warp or a block each); a unit computes dx for its rows and sums
// dy * x_hat and dy over them into its own row of a float32 workspace. Stage 2 (column_sum_kernel) adds the units'
// rows column by column in a fixed order. No atomics: the same inputs give bitwise the same gradients.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "row_team.cuh"
#include "vector_io.cuh"

namespace lmrt::cuda::norm {

// Register budgets. A memory-bound kernel wants many threads in flight, so each kernel states the occupancy it
// is built for in its launch bounds, and the floats it keeps per thread leave the allocator headroom under that
// budget: ptxas trades a few spilled bytes for an occupancy step when a kernel sits just above one.
//
// Forward: 16 floats of the row per thread (8 with scalar accesses, whose per-element addresses take registers of
// their own), within 64 registers, a full SM of threads: one warp per row up to 512 columns, one block of up to
// 1024 threads per row up to 16384 columns (8192 unaligned).
template <int kWidth>
constexpr int kFwdItems = kWidth == 1 ? 8 : 16;
constexpr int kFwdMaxTeam = 1024;
// Backward: x_hat, g, the weight and the dweight and dbias accumulators are all live: two 16-byte runs of each
// per thread (16 floats for 16-bit types, 8 for float32; 8 with scalar accesses), within 128 registers and so at
// most 512 threads per block: rows up to 8192 columns (4096 for float32 or unaligned rows) stay in registers.
template <int kWidth>
constexpr int kBwdItems = kWidth == 1 ? 8 : 2 * kWidth;
constexpr int kBwdMaxTeam = 512;
// Stage 1 splits the rows into units, each writing one row of partial sums per gradient: as many units as keep
// them within kMaxPartials floats (4 MiB) in all, but at most kMaxUnits so that stage 2 stays short for narrow
// rows, and at least one, whose row is cols floats however wide. A unit has about cols / kBwdItems threads, so
// that is 64K to 128K threads in flight, enough to cover memory latency on an A100 or H100 at the backward's
// occupancy.
constexpr int64_t kMaxPartials = 1 << 20;
constexpr int64_t kMaxUnits = 2048;
// A unit takes at most kMaxRowsPerUnit rows: a streamed unit keeps two float sums per row in shared memory (8 KiB).
// Past that the units multiply, to ceil(rows / kMaxRowsPerUnit). So a gradient's workspace is at most
// max(kMaxPartials, ceil(rows / kMaxRowsPerUnit) * cols) floats: cols alone for a few rows wider than kMaxPartials,
// about 1 / kMaxRowsPerUnit of x's element count for many rows.
constexpr int64_t kMaxRowsPerUnit = 1024;
// Stage 2: a block adds the partial sums of kWarpSize columns with kColumnSumLanes threads down each column.
constexpr int kColumnSumLanes = 16;

// Reads run k of a float32 per-column parameter (weight, bias); absent (nullptr) or outside the row reads as
// `fill`.
template <int kRuns, int kWidth, typename Index>
__device__ __forceinline__ void load_param(const float* param, const Runs<kRuns, kWidth, Index>& runs, int k,
                                           float fill, float (&out)[kWidth]) {
  if (param != nullptr && runs.inside(k)) {
    load_floats<kWidth>(param + runs.col(k), out);
  } else {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) out[j] = fill;
  }
}

// rsqrt(var + eps) for var = mean_square - correction^2: LayerNorm's mean square about the first pass's mean, less
// the square of that mean's rounding error; RMSNorm's mean square, with correction 0. Rounding can take var below
// 0, so it is clamped at 0 by a comparison, which lets a NaN through: a NaN in the row makes rstd and every output
// of the row NaN, as on the CPU (std::max(var, 0.f)) and in PyTorch. fmaxf(NaN, 0) would be 0: RMSNorm outputs
// finite beside the NaN, and LayerNorm a finite saved rstd.
__device__ __forceinline__ float clamped_rstd(float mean_square, float correction, float eps) {
  const float var = mean_square - correction * correction;
  return rsqrtf((var < 0.f ? 0.f : var) + eps);
}

// Adds up the accumulators of the teams that share a warp: lanes `team` apart own the same columns.
template <int kRuns, int kWidth>
__device__ __forceinline__ void combine_warp_teams(float (&acc)[kRuns][kWidth], int team) {
  for (int offset = team; offset < kWarpSize; offset *= 2) {
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) acc[k][j] += __shfl_xor_sync(kFullMask, acc[k][j], offset);
    }
  }
}

// Writes the runs of column sums to `partial` (one unit's workspace row); scalar stores, as the workspace row
// need not be 16-byte aligned and this happens once per unit and span.
template <int kRuns, int kWidth, typename Index>
__device__ __forceinline__ void store_partial(float* partial, const Runs<kRuns, kWidth, Index>& runs,
                                              const float (&acc)[kRuns][kWidth]) {
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
    if (!runs.inside(k)) continue;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) partial[runs.col(k) + j] = acc[k][j];
  }
}

template <typename T, bool kIsRms, int kWidth>
__global__ void __launch_bounds__(kFwdMaxTeam, 1)
    norm_fwd_resident_kernel(const T* __restrict__ x, int64_t x_stride, const float* __restrict__ weight,
                             const float* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean,
                             float* __restrict__ rstd, int64_t rows, int cols, float inv_cols, float eps,
                             int team) {
  constexpr int kRuns = kFwdItems<kWidth> / kWidth;
  __shared__ float scratch[2][kMaxWarps];
  const Runs<kRuns, kWidth, int> runs(0, cols, threadIdx.x % team, team);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const bool row_exists = row < rows;
  float v[kRuns][kWidth];
  load_runs(x + row * x_stride, runs, row_exists, 0.f, v);

  float row_mean = 0.f;
  if constexpr (!kIsRms) {
    float sum[1] = {0.f};
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) sum[0] += v[k][j];
    }
    team_reduce(sum, team, scratch, SumOp{});
    row_mean = sum[0] * inv_cols;
    // Centered in place; runs outside the row stay 0 so that they add nothing to the sums below.
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) v[k][j] = runs.inside(k) ? v[k][j] - row_mean : 0.f;
    }
  }
  // LayerNorm: sums[0] = sum(x - mean), the rounding error of the mean (large when |mean| >> std), sums[1] =
  // sum((x - mean)^2). RMSNorm: sums[0] = sum(x^2) alone.
  constexpr int kSquares = kIsRms ? 0 : 1;
  float sums[kSquares + 1] = {};
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      if constexpr (!kIsRms) sums[0] += v[k][j];
      sums[kSquares] += v[k][j] * v[k][j];
    }
  }
  team_reduce(sums, team, scratch, SumOp{});
  // The corrected two-pass algorithm, as in the streamed kernel: mean and variance about the corrected mean.
  const float correction = kIsRms ? 0.f : sums[0] * inv_cols;
  row_mean += correction;
  const float row_rstd = clamped_rstd(sums[kSquares] * inv_cols, correction, eps);

  if (!row_exists) return;
  if (threadIdx.x % team == 0) {
    if constexpr (!kIsRms) mean[row] = row_mean;
    rstd[row] = row_rstd;
  }
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
    float w[kWidth], b[kWidth] = {};
    load_param(weight, runs, k, 1.f, w);
    if constexpr (!kIsRms) load_param(bias, runs, k, 0.f, b);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) v[k][j] = (v[k][j] - correction) * row_rstd * w[j] + b[j];
  }
  store_runs(y + row * cols, runs, v);
}

template <typename T, bool kIsRms, int kWidth>
__global__ void __launch_bounds__(kStreamThreads, 1)
    norm_fwd_streaming_kernel(const T* __restrict__ x, int64_t x_stride, const float* __restrict__ weight,
                              const float* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean,
                              float* __restrict__ rstd, int64_t cols, float inv_cols, float eps) {
  constexpr int kRuns = kStreamItems / kWidth;
  using StreamRuns = Runs<kRuns, kWidth, int64_t>;
  __shared__ float scratch[2][kMaxWarps];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_stride;
  float shift = 0.f;
  if constexpr (!kIsRms) {
    float sum[1] = {0.f};
    for (int64_t first = 0; first < cols; first += kStreamTile) {
      const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
      float v[kRuns][kWidth];
      load_runs(x_row, runs, true, 0.f, v);
#pragma unroll
      for (int k = 0; k < kRuns; ++k) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) sum[0] += v[k][j];
      }
    }
    team_reduce(sum, kStreamThreads, scratch, SumOp{});
    shift = sum[0] * inv_cols;
  }
  // Sums of d = x - shift (LayerNorm only) and d^2; elements past the row read as `shift`, so d = 0 there.
  constexpr int kSquares = kIsRms ? 0 : 1;
  float sums[kSquares + 1] = {};
  for (int64_t first = 0; first < cols; first += kStreamTile) {
    const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
    float v[kRuns][kWidth];
    load_runs(x_row, runs, true, shift, v);
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        const float d = v[k][j] - shift;
        if constexpr (!kIsRms) sums[0] += d;
        sums[kSquares] += d * d;
      }
    }
  }
  team_reduce(sums, kStreamThreads, scratch, SumOp{});
  // LayerNorm: sum(x - shift) / N is the rounding error of the first pass's mean, and the variance is the mean
  // square about the corrected mean. RMSNorm: shift = 0 and no correction.
  const float correction = kIsRms ? 0.f : sums[0] * inv_cols;
  const float row_mean = shift + correction;
  const float row_rstd = clamped_rstd(sums[kSquares] * inv_cols, correction, eps);
  if (threadIdx.x == 0) {
    if constexpr (!kIsRms) mean[row] = row_mean;
    rstd[row] = row_rstd;
  }

  for (int64_t first = 0; first < cols; first += kStreamTile) {
    const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
    float v[kRuns][kWidth];
    load_runs(x_row, runs, true, 0.f, v);
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
      float w[kWidth], b[kWidth] = {};
      load_param(weight, runs, k, 1.f, w);
      if constexpr (!kIsRms) load_param(bias, runs, k, 0.f, b);
#pragma unroll
      for (int j = 0; j < kWidth; ++j) v[k][j] = (v[k][j] - row_mean) * row_rstd * w[j] + b[j];
    }
    store_runs(y + row * cols, runs, v);
  }
}

// Stage 1 for rows that fit in registers. A unit is a warp (teams of up to 32 threads, several per warp) or a
// block (one larger team); unit u takes rows [u * rows_per_unit, (u + 1) * rows_per_unit), its teams taking every
// teams-per-unit'th row, and writes its column sums to row u of dweight_partial and dbias_partial (nullptr when
// not asked for).
template <typename T, bool kIsRms, int kWidth>
__global__ void __launch_bounds__(kBwdMaxTeam, 1)
    norm_bwd_resident_kernel(const T* __restrict__ dy, int64_t dy_stride, const T* __restrict__ x, int64_t x_stride,
                             const float* __restrict__ weight, const float* __restrict__ mean,
                             const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dweight_partial,
                             float* __restrict__ dbias_partial, int64_t rows, int cols, float inv_cols, int team,
                             int64_t units, int64_t rows_per_unit) {
  constexpr int kRuns = kBwdItems<kWidth> / kWidth;
  constexpr int kSums = kIsRms ? 1 : 2;
  __shared__ float scratch[kSums][kMaxWarps];
  const int unit_threads = team < kWarpSize ? kWarpSize : team;
  const int64_t unit =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / unit_threads) + threadIdx.x / unit_threads;
  const int teams_per_unit = unit_threads / team;
  const int team_in_unit = threadIdx.x % unit_threads / team;
  const Runs<kRuns, kWidth, int> runs(0, cols, threadIdx.x % team, team);
  // A warp past the last unit (the tail of the last block) has no rows but still joins its warp's shuffles.
  const int64_t row_begin = unit * rows_per_unit;
  const int64_t row_end = min(rows, row_begin + rows_per_unit);

  float w[kRuns][kWidth];
  load_runs(weight, runs, weight != nullptr, 1.f, w);
  float dw_acc[kRuns][kWidth] = {};
  float db_acc[kRuns][kWidth] = {};
  // The loop bound is uniform over the unit, so all of its threads reach every reduction.
  for (int64_t unit_row = row_begin; unit_row < row_end; unit_row += teams_per_unit) {
    const int64_t row = unit_row + team_in_unit;
    const bool row_exists = row < row_end;
    // Loaded as x and dy, turned in place into x_hat and g. Outside the row dy = 0, so g = 0 there and those
    // elements add nothing to any sum.
    float x_hat[kRuns][kWidth], g[kRuns][kWidth];
    load_runs(x + row * x_stride, runs, row_exists, 0.f, x_hat);
    load_runs(dy + row * dy_stride, runs, row_exists, 0.f, g);
    const float row_rstd = row_exists ? rstd[row] : 0.f;
    const float row_mean = kIsRms || !row_exists ? 0.f : mean[row];

    float sums[kSums] = {};  // sum(g * x_hat), then sum(g) for LayerNorm
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) {
        x_hat[k][j] = (x_hat[k][j] - row_mean) * row_rstd;
        dw_acc[k][j] += g[k][j] * x_hat[k][j];
        if constexpr (!kIsRms) db_acc[k][j] += g[k][j];
        g[k][j] *= w[k][j];
        sums[0] += g[k][j] * x_hat[k][j];
        if constexpr (!kIsRms) sums[1] += g[k][j];
      }
    }
    team_reduce(sums, team, scratch, SumOp{});
    const float mean_g_x_hat = sums[0] * inv_cols;
    float mean_g = 0.f;
    if constexpr (!kIsRms) mean_g = sums[1] * inv_cols;

    if (dx == nullptr || !row_exists) continue;
#pragma unroll
    for (int k = 0; k < kRuns; ++k) {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) g[k][j] = (g[k][j] - mean_g - x_hat[k][j] * mean_g_x_hat) * row_rstd;
    }
    store_runs(dx + row * cols, runs, g);
  }

  if (team < kWarpSize) {
    if (dweight_partial != nullptr) combine_warp_teams(dw_acc, team);
    if constexpr (!kIsRms) {
      if (dbias_partial != nullptr) combine_warp_teams(db_acc, team);
    }
  }
  if (unit >= units || team_in_unit != 0) return;
  if (dweight_partial != nullptr) store_partial(dweight_partial + unit * cols, runs, dw_acc);
  if constexpr (!kIsRms) {
    if (dbias_partial != nullptr) store_partial(dbias_partial + unit * cols, runs, db_acc);
  }
}

// Stage 1 for rows too wide for registers; one block is one unit. First each row's mean(g * x_hat) and mean(g)
// into shared memory, then tile by tile: dx for every row of the unit, and the tile's column sums, accumulated in
// registers over the unit's rows and written once. x and dy are read twice, dx written once.
template <typename T, bool kIsRms, int kWidth>
__global__ void __launch_bounds__(kStreamThreads, 1)
    norm_bwd_streaming_kernel(const T* __restrict__ dy, int64_t dy_stride, const T* __restrict__ x,
                              int64_t x_stride, const float* __restrict__ weight, const float* __restrict__ mean,
                              const float* __restrict__ rstd, T* __restrict__ dx,
                              float* __restrict__ dweight_partial, float* __restrict__ dbias_partial, int64_t rows,
                              int64_t cols, float inv_cols, int64_t rows_per_unit) {
  constexpr int kRuns = kStreamItems / kWidth;
  constexpr int kSums = kIsRms ? 1 : 2;
  using StreamRuns = Runs<kRuns, kWidth, int64_t>;
  __shared__ float scratch[kSums][kMaxWarps];
  __shared__ float row_means[kSums][kMaxRowsPerUnit];
  const int64_t unit = blockIdx.x;
  const int64_t row_begin = unit * rows_per_unit;
  const int64_t row_end = min(rows, row_begin + rows_per_unit);

  for (int64_t row = row_begin; row < row_end; ++row) {
    const float row_rstd = rstd[row];
    const float row_mean = kIsRms ? 0.f : mean[row];
    float sums[kSums] = {};  // sum(g * x_hat), then sum(g) for LayerNorm
    for (int64_t first = 0; first < cols; first += kStreamTile) {
      const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
      float xs[kRuns][kWidth], dys[kRuns][kWidth];
      load_runs(x + row * x_stride, runs, true, 0.f, xs);
      load_runs(dy + row * dy_stride, runs, true, 0.f, dys);
#pragma unroll
      for (int k = 0; k < kRuns; ++k) {
        float w[kWidth];
        load_param(weight, runs, k, 1.f, w);
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          const float g = dys[k][j] * w[j];
          sums[0] += g * (xs[k][j] - row_mean) * row_rstd;
          if constexpr (!kIsRms) sums[1] += g;
        }
      }
    }
    team_reduce(sums, kStreamThreads, scratch, SumOp{});
    if (threadIdx.x == 0) {
#pragma unroll
      for (int i = 0; i < kSums; ++i) row_means[i][row - row_begin] = sums[i] * inv_cols;
    }
  }
  __syncthreads();

  for (int64_t first = 0; first < cols; first += kStreamTile) {
    const StreamRuns runs(first, cols, threadIdx.x, kStreamThreads);
    float dw_acc[kRuns][kWidth] = {};
    float db_acc[kRuns][kWidth] = {};
    float w[kRuns][kWidth];
    load_runs(weight, runs, weight != nullptr, 1.f, w);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const float row_rstd = rstd[row];
      const float row_mean = kIsRms ? 0.f : mean[row];
      const float mean_g_x_hat = row_means[0][row - row_begin];
      float mean_g = 0.f;
      if constexpr (!kIsRms) mean_g = row_means[1][row - row_begin];
      float x_hat[kRuns][kWidth], g[kRuns][kWidth];
      load_runs(x + row * x_stride, runs, true, 0.f, x_hat);
      load_runs(dy + row * dy_stride, runs, true, 0.f, g);
#pragma unroll
      for (int k = 0; k < kRuns; ++k) {
#pragma unroll
        for (int j = 0; j < kWidth; ++j) {
          x_hat[k][j] = (x_hat[k][j] - row_mean) * row_rstd;
          dw_acc[k][j] += g[k][j] * x_hat[k][j];
          if constexpr (!kIsRms) db_acc[k][j] += g[k][j];
          g[k][j] = (g[k][j] * w[k][j] - mean_g - x_hat[k][j] * mean_g_x_hat) * row_rstd;
        }
      }
      if (dx != nullptr) store_runs(dx + row * cols, runs, g);
    }
    if (dweight_partial != nullptr) store_partial(dweight_partial + unit * cols, runs, dw_acc);
    if constexpr (!kIsRms) {
      if (dbias_partial != nullptr) store_partial(dbias_partial + unit * cols, runs, db_acc);
    }
  }
}

// Stage 2: out[c] = sum over p of partial[p][c], p ascending within each of the kColumnSumLanes lanes, then the
// lanes in order. Static: layer_norm.cu and rms_norm.cu each compile their own copy of this non-template kernel,
// which would otherwise be defined twice in lmrt._C.
static __global__ void __launch_bounds__(kWarpSize * kColumnSumLanes)
    column_sum_kernel(const float* __restrict__ partial, int64_t parts, int64_t cols, float* __restrict__ out) {
  __shared__ float lane_sums[kColumnSumLanes][kWarpSize];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  float sum = 0.f;
  if (col < cols) {
    for (int64_t p = threadIdx.y; p < parts; p += kColumnSumLanes) sum += partial[p * cols + col];
  }
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  for (int lane = 1; lane < kColumnSumLanes; ++lane) sum += lane_sums[lane][threadIdx.x];
  out[col] = sum;
}

// 1 / cols, correctly rounded. The kernels multiply by it: a float division on the device is a call on its slow
// path, whose saved registers count as spills. sum * (1 / N) is within an ulp of sum / N, as in PyTorch's kernels.
inline float reciprocal(int64_t cols) { return static_cast<float>(1.0 / static_cast<double>(cols)); }

// How stage 1 splits the rows: a function of the shape alone, so the workspace size needs no device query and the
// summation order, hence the result, is the same on every GPU.
struct BwdPlan {
  int64_t units;  // rows of partial sums in the workspace, per gradient
  int64_t rows_per_unit;
};

inline BwdPlan plan_bwd(int64_t rows, int64_t cols) {
  const int64_t max_units = std::clamp(kMaxPartials / cols, int64_t{1}, kMaxUnits);
  const int64_t rows_per_unit = std::min(ceil_div(rows, std::min(rows, max_units)), kMaxRowsPerUnit);
  // Recounted so that no unit is left without rows.
  return {ceil_div(rows, rows_per_unit), rows_per_unit};
}

// Stage 1's workspace: `gradients` float32 arrays of units x cols (dweight's partial sums, then dbias's).
inline size_t bwd_workspace_bytes(int64_t rows, int64_t cols, int gradients) {
  if (rows <= 0 || cols <= 0) return 0;
  return static_cast<size_t>(plan_bwd(rows, cols).units) * static_cast<size_t>(cols) * sizeof(float) * gradients;
}

template <bool kIsRms, int kWidth, typename T>
cudaError_t launch_fwd_kernel(const T* x, int64_t x_stride, const float* weight, const float* bias, T* y,
                              float* mean, float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  const int team = resident_team(cols, kFwdItems<kWidth>, kFwdMaxTeam);
  if (team > 0) {
    const int block_threads = team_block_threads(team);
    const int64_t blocks = ceil_div(rows, block_threads / team);
    if (blocks > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
    norm_fwd_resident_kernel<T, kIsRms, kWidth><<<static_cast<unsigned>(blocks), block_threads, 0, stream>>>(
        x, x_stride, weight, bias, y, mean, rstd, rows, static_cast<int>(cols), reciprocal(cols), eps, team);
  } else {
    if (rows > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
    norm_fwd_streaming_kernel<T, kIsRms, kWidth><<<static_cast<unsigned>(rows), kStreamThreads, 0, stream>>>(
        x, x_stride, weight, bias, y, mean, rstd, cols, reciprocal(cols), eps);
  }
  return cudaGetLastError();
}

template <bool kIsRms, typename T>
cudaError_t launch_fwd(const T* x, int64_t x_stride, const float* weight, const float* bias, T* y, float* mean,
                       float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  constexpr int kVec = kVecWidth<T>;
  // y is contiguous, so its row stride is cols; weight and bias are single rows.
  const bool vec = rows_vector_aligned(x, x_stride, kVec) && rows_vector_aligned(y, cols, kVec) &&
                   rows_vector_aligned(weight, 0, kVec) && rows_vector_aligned(bias, 0, kVec);
  return vec ? launch_fwd_kernel<kIsRms, kVec>(x, x_stride, weight, bias, y, mean, rstd, rows, cols, eps, stream)
             : launch_fwd_kernel<kIsRms, 1>(x, x_stride, weight, bias, y, mean, rstd, rows, cols, eps, stream);
}

template <bool kIsRms, int kWidth, typename T>
cudaError_t launch_bwd_kernel(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, const float* weight,
                              const float* mean, const float* rstd, T* dx, float* dweight_partial,
                              float* dbias_partial, int64_t rows, int64_t cols, const BwdPlan& plan,
                              cudaStream_t stream) {
  const int team = resident_team(cols, kBwdItems<kWidth>, kBwdMaxTeam);
  if (team > 0) {
    const int unit_threads = std::max(team, kWarpSize);
    const int block_threads = team_block_threads(team);
    const int64_t blocks = ceil_div(plan.units, block_threads / unit_threads);
    norm_bwd_resident_kernel<T, kIsRms, kWidth><<<static_cast<unsigned>(blocks), block_threads, 0, stream>>>(
        dy, dy_stride, x, x_stride, weight, mean, rstd, dx, dweight_partial, dbias_partial, rows,
        static_cast<int>(cols), reciprocal(cols), team, plan.units, plan.rows_per_unit);
  } else {
    norm_bwd_streaming_kernel<T, kIsRms, kWidth><<<static_cast<unsigned>(plan.units), kStreamThreads, 0, stream>>>(
        dy, dy_stride, x, x_stride, weight, mean, rstd, dx, dweight_partial, dbias_partial, rows, cols,
        reciprocal(cols), plan.rows_per_unit);
  }
  return cudaGetLastError();
}

template <bool kIsRms, typename T>
cudaError_t launch_bwd(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, const float* weight,
                       const float* mean, const float* rstd, T* dx, float* dweight, float* dbias, void* workspace,
                       int64_t rows, int64_t cols, cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  if (rows <= 0) {
    // The sum over no rows is 0.
    const size_t bytes = static_cast<size_t>(cols) * sizeof(float);
    cudaError_t err = cudaSuccess;
    if (dweight != nullptr) err = cudaMemsetAsync(dweight, 0, bytes, stream);
    if (err == cudaSuccess && dbias != nullptr) err = cudaMemsetAsync(dbias, 0, bytes, stream);
    return err;
  }
  if (dx == nullptr && dweight == nullptr && dbias == nullptr) return cudaSuccess;

  const BwdPlan plan = plan_bwd(rows, cols);
  if (plan.units > kMaxGridBlocks) return cudaErrorInvalidConfiguration;
  float* dweight_partial = dweight != nullptr ? static_cast<float*>(workspace) : nullptr;
  float* dbias_partial = dbias != nullptr ? static_cast<float*>(workspace) + plan.units * cols : nullptr;
  constexpr int kVec = kVecWidth<T>;
  const bool vec = rows_vector_aligned(dy, dy_stride, kVec) && rows_vector_aligned(x, x_stride, kVec) &&
                   rows_vector_aligned(dx, cols, kVec) && rows_vector_aligned(weight, 0, kVec);
  cudaError_t err = vec ? launch_bwd_kernel<kIsRms, kVec>(dy, dy_stride, x, x_stride, weight, mean, rstd, dx,
                                                          dweight_partial, dbias_partial, rows, cols, plan, stream)
                        : launch_bwd_kernel<kIsRms, 1>(dy, dy_stride, x, x_stride, weight, mean, rstd, dx,
                                                       dweight_partial, dbias_partial, rows, cols, plan, stream);
  const dim3 sum_block(kWarpSize, kColumnSumLanes);
  const unsigned sum_blocks = static_cast<unsigned>(ceil_div(cols, kWarpSize));
  if (err == cudaSuccess && dweight != nullptr) {
    column_sum_kernel<<<sum_blocks, sum_block, 0, stream>>>(dweight_partial, plan.units, cols, dweight);
    err = cudaGetLastError();
  }
  if (err == cudaSuccess && dbias != nullptr) {
    column_sum_kernel<<<sum_blocks, sum_block, 0, stream>>>(dbias_partial, plan.units, cols, dbias);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace lmrt::cuda::norm
