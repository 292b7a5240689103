// Row teams: the threads that share one row of a row-wise kernel (norms, softmax), and their reductions.
//
// A team is a power-of-two number of threads. Up to a warp, a team is an aligned group of lanes and a block holds
// several teams, one row each; beyond a warp, the team is the whole block. Thread `rank` of a team owns the runs
// of kWidth elements that start at (rank + k * team) * kWidth for k = 0, 1, ...: consecutive threads read
// consecutive 16-byte pieces, so every warp-wide access is coalesced whatever the team size.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "vector_io.cuh"

namespace lmrt::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxBlockThreads = 1024;
constexpr int kMaxWarps = kMaxBlockThreads / kWarpSize;
// Block size for teams of at most a warp; several rows per block amortize the block's scheduling.
constexpr int kSmallTeamBlockThreads = 256;
// gridDim.x's hardware limit. The kernels take one row (or a few) per block without looping over rows: a loop
// would let the compiler hoist every run's address out of it, at a register each.
constexpr int64_t kMaxGridBlocks = 0x7fffffff;
// Rows too wide to hold in registers are streamed by one block per row, in tiles of kStreamThreads threads x
// kStreamItems elements: 16 independent loads in flight per thread even when the rows are too misaligned for
// 16-byte vectors.
constexpr int kStreamThreads = 512;
constexpr int kStreamItems = 16;
constexpr int64_t kStreamTile = kStreamThreads * kStreamItems;

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

struct MaxOp {
  // fmaxf drops a NaN operand; the softmax kernels rely on the NaN reaching the sum instead.
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduces each v[i] over aligned groups of `width` lanes (a power of two, at most 32), leaving the result in every
// lane of the group. Every lane of the warp calls it, so the full mask is exact.
template <int N, typename Op>
__device__ __forceinline__ void lane_group_reduce(float (&v)[N], int width, Op op) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = op(v[i], __shfl_xor_sync(kFullMask, v[i], offset));
  }
}

// Reduces each v[i] over the row team of `team` threads, leaving the result in every thread of the team. Every
// thread of the block calls it with the same `team`, so the branch below is uniform and the barriers are reached
// by all threads. `scratch` is shared memory of at least N rows. The cross-warp step combines the warps' values
// in warp order: every thread gets the same bits, and the same inputs always give the same result.
template <int N, typename Op>
__device__ __forceinline__ void team_reduce(float (&v)[N], int team, float (*scratch)[kMaxWarps], Op op) {
  lane_group_reduce(v, team < kWarpSize ? team : kWarpSize, op);
  if (team <= kWarpSize) return;
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i][warp] = v[i];
  }
  __syncthreads();
  const int warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = scratch[i][0];
    for (int w = 1; w < warps; ++w) v[i] = op(v[i], scratch[i][w]);
  }
  // The scratch is reused by the next reduction.
  __syncthreads();
}

// A thread's share of a span of a row: kRuns runs of kWidth elements, run k starting at element first + k * step,
// of which the first `count` lie inside the row. A run is all in or all out: with kWidth > 1 the launchers only
// choose vectors when cols is a multiple of kWidth. Index is int where rows are known to be short (the
// register-resident kernels: fewer registers, 32-bit compares), int64_t where they are not.
template <int kRuns, int kWidth, typename Index>
struct Runs {
  Index first;
  int step;
  int count;

  // The runs of thread `rank` of a team of `team` threads, over the span that starts at element `span_start`.
  __device__ __forceinline__ Runs(Index span_start, Index cols, int rank, int team)
      : first(span_start + rank * kWidth), step(team * kWidth) {
    const Index left = cols - first;
    // The division runs once per thread for a resident row and on the last span of a streamed one, in 32 bits
    // (left < kRuns * step there): a 64-bit division is a call, whose saved registers count as spills.
    count = left <= 0                                 ? 0
            : left >= static_cast<Index>(kRuns) * step ? kRuns
                                                       : (static_cast<int>(left) + step - 1) / step;
  }
  __device__ __forceinline__ bool inside(int k) const { return k < count; }
  __device__ __forceinline__ Index col(int k) const { return first + static_cast<Index>(k) * step; }
};

// Loads the runs from `row` as float; runs outside the row, or all of them when the row does not exist, are `fill`.
template <int kRuns, int kWidth, typename Index, typename T>
__device__ __forceinline__ void load_runs(const T* row, const Runs<kRuns, kWidth, Index>& runs, bool row_exists,
                                          float fill, float (&v)[kRuns][kWidth]) {
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
    if (row_exists && runs.inside(k)) {
      load_floats<kWidth>(row + runs.col(k), v[k]);
    } else {
#pragma unroll
      for (int j = 0; j < kWidth; ++j) v[k][j] = fill;
    }
  }
}

// Stores the runs that lie inside the row.
template <int kRuns, int kWidth, typename Index, typename T>
__device__ __forceinline__ void store_runs(T* row, const Runs<kRuns, kWidth, Index>& runs,
                                           const float (&v)[kRuns][kWidth]) {
#pragma unroll
  for (int k = 0; k < kRuns; ++k) {
    if (runs.inside(k)) store_floats<kWidth>(row + runs.col(k), v[k]);
  }
}

// Host-side sizing helpers.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// The team size that holds a row of `cols` elements in registers at `items` floats per thread, or 0 when it would
// take more than `max_team` threads.
inline int resident_team(int64_t cols, int items, int max_team) {
  const int64_t needed = ceil_div(cols, items);
  return needed > max_team ? 0 : next_pow2(needed);
}

// Threads per block for a team: a warp's worth of small teams share a block, a larger team is the block.
inline int team_block_threads(int team) { return team <= kWarpSize ? kSmallTeamBlockThreads : team; }

}  // namespace lmrt::cuda
