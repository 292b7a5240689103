// What the extension's C++ files (lmrt_ops.cpp, autograd.cpp, eager_calls.cpp) share about its operators.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/ScalarType.h>

namespace lmrt {

// The element types lmrt's kernels take; anything else goes to the reference.
inline bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// The operator `name` ("lmrt_C::..."), called through the dispatcher so that any tensor (a CUDA one, a fake one)
// reaches the kernel registered for it, and autograd sees the differentiable ones.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_operator(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace lmrt
