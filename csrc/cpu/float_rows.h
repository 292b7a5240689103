// Row helpers shared by the CPU norm and softmax kernels: rows of float32, float16 or bfloat16 read and written as
// float32, and vectorized float32 row reductions. Accumulation is float32 in several independent vector
// accumulators, which keeps the loop-carried dependency off the critical path and the summation error small.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "vec_math.h"

namespace lmrt::cpu {

using FloatVec = at::vec::Vectorized<float>;

// Where to compute a float32 row that ends up in `dst`: `dst` itself for float32, else `scratch`.
template <typename T>
inline float* float_destination(T* dst, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return scratch;
  }
}

// Elements per step of the loops below: one vector of float16/bfloat16, which converts to two of float32.
constexpr int64_t kStep = 2 * FloatVec::size();
static_assert(at::vec::Vectorized<c10::BFloat16>::size() == kStep && at::vec::Vectorized<c10::Half>::size() == kStep);

// kStep elements of a float32, float16 or bfloat16 row as two float32 vectors, converted in registers.
template <typename T>
inline std::tuple<FloatVec, FloatVec> load_floats(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return {FloatVec::loadu(src), FloatVec::loadu(src + FloatVec::size())};
  } else {
    return at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src));
  }
}

// Two float32 vectors as one vector of kStep float16/bfloat16 elements. kHardwareRounding: bfloat16 by AVX512-BF16's
// one instruction (the caller runs under with_bfloat16_rounding, below).
template <bool kHardwareRounding = false, typename T>
inline at::vec::Vectorized<T> narrow_floats(const FloatVec& a, const FloatVec& b) {
#if defined(LMRT_HAS_BFLOAT16_ROUNDING_PATH)
  if constexpr (kHardwareRounding && std::is_same_v<T, c10::BFloat16>) {
    return round_pairs_avx512bf16(a, b);
  }
#endif
  return at::vec::convert_from_float<T>(a, b);
}

// Store two float32 vectors as kStep elements of type T (kHardwareRounding: as in narrow_floats).
template <bool kHardwareRounding = false, typename T>
inline void store_floats(T* dst, const FloatVec& a, const FloatVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(dst);
    b.store(dst + FloatVec::size());
  } else {
    narrow_floats<kHardwareRounding, T>(a, b).store(dst);
  }
}

#if defined(LMRT_HAS_BFLOAT16_ROUNDING_PATH)
// body(std::true_type{}) with every call in it inlined (flatten) and compiled for AVX512-BF16, so that
// narrow_floats<true> rounds by vcvtne2ps2bf16 in the body's loops: a call to round_pairs_avx512bf16 from code
// compiled without the instruction set is not inlined.
template <typename Body>
__attribute__((target("avx512bf16"), flatten)) void call_with_hardware_rounding(const Body& body) {
  body(std::true_type{});
}
#endif

// body(std::true_type{}) compiled for AVX512-BF16 where T is bfloat16 and the CPU has it, else
// body(std::false_type{}): a kernel's loop that stores rows of T takes the tag as narrow_floats' (store_floats',
// write_floats') kHardwareRounding. at::vec's rounding takes about twenty integer instructions per vector: on the
// Zen 4 EPYC it was about a fifth of the bfloat16 norms' time (truncation in its place, for timing: LayerNorm
// forward 1024 x 1024 0.150 -> 0.110 ms, backward 0.241 -> 0.180 ms) and most of the softmax backward's loop.
template <typename T, typename Body>
inline void with_bfloat16_rounding(const Body& body) {
#if defined(LMRT_HAS_BFLOAT16_ROUNDING_PATH)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_bfloat16_rounding()) {
      call_with_hardware_rounding(body);
      return;
    }
  }
#endif
  body(std::false_type{});
}

// Sum over a row of n of f(x[i]), in float32.
template <typename T, typename VecFn, typename ScalarFn>
inline float sum_floats(const T* x, int64_t n, const VecFn& fv, const ScalarFn& fs) {
  FloatVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    const auto [a, b] = load_floats(x + i);
    acc0 += fv(a);
    acc1 += fv(b);
  }
  float total = at::vec::vec_reduce_all<float>([](FloatVec a, FloatVec b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) {
    total += fs(static_cast<float>(x[i]));
  }
  return total;
}

// Sum over a row of n of f(x[i], y[i]), in float32.
template <typename T, typename VecFn, typename ScalarFn>
inline float sum_floats2(const T* x, const T* y, int64_t n, const VecFn& fv, const ScalarFn& fs) {
  FloatVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    const auto [x0, x1] = load_floats(x + i);
    const auto [y0, y1] = load_floats(y + i);
    acc0 += fv(x0, y0);
    acc1 += fv(x1, y1);
  }
  float total = at::vec::vec_reduce_all<float>([](FloatVec a, FloatVec b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) {
    total += fs(static_cast<float>(x[i]), static_cast<float>(y[i]));
  }
  return total;
}

// Blocked row sums (MomentSums and BwdRowSums in row_norm.h). A float32 running sum of m terms, one after another,
// has an error that grows with m, and a lane of a vector accumulator takes n / (vector width) of a row's n terms:
// 4096 of them at 65536 columns with AVX2 (2048 with AVX-512), which put the LayerNorm/RMSNorm forward 300x off
// PyTorch's float32 error on a constant row. So a row accumulator adds kSumBlockSteps steps into its block
// accumulators, then the block into a running total with that addition's rounding error kept aside
// (add_compensated, in the accumulator's end_block): no lane sum runs through more than kSumBlockSteps plain
// float32 additions, and the totals' errors do not add up, whatever n is. The kernels' loops are blocked to match
// (blocked_steps: an inner loop of at most kSumBlockSteps steps, then end_block), so that the steps' loop stays as
// it was: a test
// of the step's offset in that loop, for the block's end, made a 16 x 4096 float32 LayerNorm forward from L2 about
// 30% slower (AVX2, one thread); the blocked loops took the time of the plain sums, within a shared machine's
// noise (+-7%), at 16 x 4096 and 4096 x 4096, float32 and bfloat16, forward and backward.
constexpr int64_t kSumBlockSteps = 16;

// total + compensation += block, lane by lane: total takes the rounded sum and compensation its rounding error
// (Knuth's TwoSum, exact whatever the operands' magnitudes; the CPU sources build with -ffp-contract=off and no
// fast-math, so the compiler keeps it as written).
inline void add_compensated(const FloatVec& block, FloatVec& total, FloatVec& compensation) {
  const FloatVec sum = total + block;
  const FloatVec block_part = sum - total;
  compensation += (total - (sum - block_part)) + (block - block_part);
  total = sum;
}

// The sum of the lanes of total + compensation. An inf or NaN term makes the compensation NaN (inf - inf), so a
// total that is not finite is taken alone: inf stays inf, as in a plain sum.
inline float reduce_compensated(const FloatVec& total, const FloatVec& compensation) {
  const auto add = [](FloatVec a, FloatVec b) { return a + b; };
  const float sum = at::vec::vec_reduce_all<float>(add, total);
  return std::isfinite(sum) ? sum + at::vec::vec_reduce_all<float>(add, compensation) : sum;
}

// step(i) for i = 0, kStep, 2 kStep, ... below vector_end, kSumBlockSteps steps at a time, each block followed by
// acc.end_block(): the loop of every kernel that feeds a blocked row sum (the step feeds acc.add_step(i)).
template <int64_t kStep, typename Accumulator, typename Step>
inline void blocked_steps(Accumulator& acc, int64_t vector_end, const Step& step) {
  for (int64_t block = 0; block < vector_end; block += kSumBlockSteps * kStep) {
    const int64_t block_end = std::min(vector_end, block + kSumBlockSteps * kStep);
    for (int64_t i = block; i < block_end; i += kStep) step(i);
    acc.end_block();
  }
}

// accumulate_row (below) for the blocked row sums.
template <int64_t kWidth, typename Accumulator>
inline void accumulate_row_blocked(Accumulator& acc, int64_t n) {
  const int64_t vector_end = n - n % kWidth;
  blocked_steps<kWidth>(acc, vector_end, [&](int64_t i) { acc.add_step(i); });
  for (int64_t i = vector_end; i < n; ++i) acc.add_element(i);
}

// Feeds a row of n to a row accumulator (softmax's RowMax; the norms' sums take accumulate_row_blocked):
// acc.add_step(i) for each kWidth-wide step, acc.add_element(i) for the elements after the last whole step. This is
// a task's first row; the kernels feed each later row's accumulator inside the loop that writes the row before it.
template <int64_t kWidth, typename Accumulator>
inline void accumulate_row(Accumulator& acc, int64_t n) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) acc.add_step(i);
  for (; i < n; ++i) acc.add_element(i);
}

// Rows per parallel task, so that a task touches at least ~32K elements (parallel overhead stays small).
inline int64_t rows_per_task(int64_t cols) {
  constexpr int64_t kElementsPerTask = 32768;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
}

}  // namespace lmrt::cpu
