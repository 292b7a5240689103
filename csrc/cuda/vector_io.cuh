// Element types on the device: float conversions, 16-byte vector loads and stores, and the DType switch that
// instantiates a launcher for each element type. Shared by the norm and softmax kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtypes.h"

namespace lmrt::cuda {

// The widest load or store one thread issues (ld.global.v4.b32): fewer, wider memory instructions are what lets
// a row kernel reach copy bandwidth.
constexpr int kVecBytes = 16;

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVecWidth = kVecBytes / static_cast<int>(sizeof(T));

// Explicit conversions only: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements that the compiler moves with one memory instruction; N * sizeof(T) is at most kVecBytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per memory instruction when moving kWidth elements: the whole run, or 16-byte pieces of it.
template <typename T, int kWidth>
constexpr int kAccessWidth = kWidth < kVecWidth<T> ? kWidth : kVecWidth<T>;

// Reads p[0, kWidth) as float. p is aligned to kAccessWidth<T, kWidth> elements (any T* when kWidth is 1).
template <int kWidth, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[kWidth]) {
  constexpr int kAccess = kAccessWidth<T, kWidth>;
#pragma unroll
  for (int i = 0; i < kWidth; i += kAccess) {
    const Pack<T, kAccess> pack = *reinterpret_cast<const Pack<T, kAccess>*>(p + i);
#pragma unroll
    for (int j = 0; j < kAccess; ++j) out[i + j] = to_float(pack.v[j]);
  }
}

// Writes in[0, kWidth) to p[0, kWidth) in T, rounding to nearest. Alignment as for load_floats.
template <int kWidth, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[kWidth]) {
  constexpr int kAccess = kAccessWidth<T, kWidth>;
#pragma unroll
  for (int i = 0; i < kWidth; i += kAccess) {
    Pack<T, kAccess> pack;
#pragma unroll
    for (int j = 0; j < kAccess; ++j) pack.v[j] = from_float<T>(in[i + j]);
    *reinterpret_cast<Pack<T, kAccess>*>(p + i) = pack;
  }
}

// Whether every row of a matrix at `base` with `row_stride` elements between rows starts on a 16-byte boundary,
// so runs of `width` elements at multiples of `width` can be moved with 16-byte accesses. A nullptr (an absent
// operand) never stands in the way.
inline bool rows_vector_aligned(const void* base, int64_t row_stride, int width) {
  return reinterpret_cast<uintptr_t>(base) % kVecBytes == 0 && row_stride % width == 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the C++ type of `dtype`; an unknown dtype is cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(TypeTag<float>{});
    case DType::kFloat16:
      return f(TypeTag<__half>{});
    case DType::kBFloat16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmrt::cuda
