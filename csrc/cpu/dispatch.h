// Element-type dispatch and pointer access shared by the CPU kernels' tensor-level entry points.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

// Run the lambda `...` with `scalar_t` bound to the element type of `TYPE`: float32, float16 or bfloat16, the
// types lmrt's kernels take (the glue sends anything else to the reference).
#define LMRT_DISPATCH_KERNEL_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace lmrt::cpu {

// The data of an optional tensor, or null when it is undefined.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace lmrt::cpu
