// Row helpers shared by the CPU norm and softmax kernels: rows of float32, float16 or bfloat16 read and written as
// float32, and vectorized float32 row reductions. Accumulation is float32 in several independent vector
// accumulators, which keeps the loop-carried dependency off the critical path and the summation error small.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace lmrt::cpu {

using FloatVec = at::vec::Vectorized<float>;

// dst[i] = float(src[i]) for a float16 or bfloat16 row, a vector at a time (at::vec::convert has vector forms for
// float32 to these types only).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  using ReducedVec = at::vec::Vectorized<T>;
  constexpr int64_t kWidth = ReducedVec::size();
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) {
    const auto [low, high] = at::vec::convert_to_float<T>(ReducedVec::loadu(src + i));
    low.store(dst + i);
    high.store(dst + i + kWidth / 2);
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// A row of `n` elements as float32: `src` itself for float32, else converted into `scratch`.
template <typename T>
inline const float* row_as_float(const T* src, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    to_float(src, scratch, n);
    return scratch;
  }
}

// Where to compute a float32 row that ends up in `dst`: `dst` itself for float32, else `scratch`.
template <typename T>
inline float* float_destination(T* dst, float* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return scratch;
  }
}

// Write the float32 row computed at float_destination(dst, scratch) to `dst`.
template <typename T>
inline void store_row(const float* computed, T* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    at::vec::convert(computed, dst, n);
  }
}

// Elements per piece of the row helpers below: 4 KiB of float32, which stays in L1.
constexpr int64_t kFloatChunk = 1024;

// Call fn(chunk, offset, length) over consecutive pieces of a row of `n` elements read as float32: the row itself
// for float32, else pieces converted into a small buffer that stays in L1, so that one pass over the row both
// converts and computes.
template <typename T, typename Fn>
inline void for_float_chunks(const T* src, int64_t n, const Fn& fn) {
  if constexpr (std::is_same_v<T, float>) {
    fn(src, int64_t{0}, n);
  } else {
    float chunk[kFloatChunk];
    for (int64_t offset = 0; offset < n; offset += kFloatChunk) {
      const int64_t length = std::min(kFloatChunk, n - offset);
      to_float(src + offset, chunk, length);
      fn(static_cast<const float*>(chunk), offset, length);
    }
  }
}

// The same over two rows at once: fn(chunk_a, chunk_b, offset, length).
template <typename T, typename Fn>
inline void for_float_chunks2(const T* a, const T* b, int64_t n, const Fn& fn) {
  if constexpr (std::is_same_v<T, float>) {
    fn(a, b, int64_t{0}, n);
  } else {
    float chunk_a[kFloatChunk], chunk_b[kFloatChunk];
    for (int64_t offset = 0; offset < n; offset += kFloatChunk) {
      const int64_t length = std::min(kFloatChunk, n - offset);
      to_float(a + offset, chunk_a, length);
      to_float(b + offset, chunk_b, length);
      fn(static_cast<const float*>(chunk_a), static_cast<const float*>(chunk_b), offset, length);
    }
  }
}

// Sum over i of f(x[i]) (vector form `fv`, scalar form `fs`), with four vector accumulators.
template <typename VecFn, typename ScalarFn>
inline float reduce_sum(const float* x, int64_t n, const VecFn& fv, const ScalarFn& fs) {
  constexpr int64_t kWidth = FloatVec::size();
  FloatVec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  int64_t i = 0;
  for (; i + 4 * kWidth <= n; i += 4 * kWidth) {
    acc0 += fv(FloatVec::loadu(x + i));
    acc1 += fv(FloatVec::loadu(x + i + kWidth));
    acc2 += fv(FloatVec::loadu(x + i + 2 * kWidth));
    acc3 += fv(FloatVec::loadu(x + i + 3 * kWidth));
  }
  for (; i + kWidth <= n; i += kWidth) {
    acc0 += fv(FloatVec::loadu(x + i));
  }
  float total = at::vec::vec_reduce_all<float>([](FloatVec a, FloatVec b) { return a + b; },
                                               (acc0 + acc1) + (acc2 + acc3));
  for (; i < n; ++i) {
    total += fs(x[i]);
  }
  return total;
}

// Sum over i of f(x[i], y[i]).
template <typename VecFn, typename ScalarFn>
inline float reduce_sum2(const float* x, const float* y, int64_t n, const VecFn& fv, const ScalarFn& fs) {
  constexpr int64_t kWidth = FloatVec::size();
  FloatVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * kWidth <= n; i += 2 * kWidth) {
    acc0 += fv(FloatVec::loadu(x + i), FloatVec::loadu(y + i));
    acc1 += fv(FloatVec::loadu(x + i + kWidth), FloatVec::loadu(y + i + kWidth));
  }
  for (; i + kWidth <= n; i += kWidth) {
    acc0 += fv(FloatVec::loadu(x + i), FloatVec::loadu(y + i));
  }
  float total = at::vec::vec_reduce_all<float>([](FloatVec a, FloatVec b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) {
    total += fs(x[i], y[i]);
  }
  return total;
}

inline float row_max(const float* x, int64_t n) {
  return at::vec::reduce_all<float>([](FloatVec a, FloatVec b) { return at::vec::maximum(a, b); }, x, n);
}

// Rows per parallel task, so that a task touches at least ~32K elements (parallel overhead stays small).
inline int64_t rows_per_task(int64_t cols) {
  constexpr int64_t kElementsPerTask = 32768;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
}

}  // namespace lmrt::cpu
