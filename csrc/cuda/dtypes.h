// The element types the lmrt CUDA launchers take. No torch header here: CI compiles csrc/cuda/ with nvcc alone.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lmrt::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace lmrt::cuda
