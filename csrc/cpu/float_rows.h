// Row helpers shared by the CPU norm and softmax kernels: rows of float32, float16 or bfloat16 read and written as
// float32, and vectorized float32 row reductions. Accumulation is float32 in several independent vector
// accumulators, which keeps the loop-carried dependency off the critical path and the summation error small.
#pragma once

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

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

// Store two float32 vectors as kStep elements of type T.
template <typename T>
inline void store_floats(T* dst, const FloatVec& a, const FloatVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(dst);
    b.store(dst + FloatVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(dst);
  }
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

// Feeds a row of n to a row accumulator (RowMax, MomentSums, BwdRowSums): acc.add_step(i) for each kWidth-wide
// step, acc.add_element(i) for the elements after the last whole step. This is a task's first row; the kernels feed
// each later row's accumulator inside the loop that writes the row before it.
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
