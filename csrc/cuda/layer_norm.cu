// LayerNorm forward and backward (the kernels are in norm_kernels.cuh, shared with RMSNorm).
//
// Forward: a row held in registers (up to 16384 columns, 8192 when unaligned) reads x once: N*s bytes read and
// N*s written per row (s the element size), plus 8 bytes of mean and rstd; the weight and bias stay in L2 across
// rows. About 7*N FLOPs per row (sum, center, square, scale, affine). Wider rows read x three times, from L2 while
// the row fits there.
// Backward: reads x and dy (2*N*s) and writes dx (N*s) per row, about 12*N FLOPs; rows past 8192 columns (4096
// for float32 or unaligned rows) read x and dy twice. dweight and dbias add 2 * units * N * 4 bytes, written by
// stage 1 and read by stage 2, with units * N at most max(2^20, ceil(rows / 1024) * N) (norm_kernels.cuh): N for
// up to 1024 rows wider than 2^20.
// Both are memory bound: the aim is ~90% of the device's device-to-device copy bandwidth.
#include "layer_norm.h"

#include "norm_kernels.cuh"

namespace lmrt::cuda {

namespace {
// Stage 1 of the backward writes dweight's partial sums, then dbias's.
constexpr int kLayerNormGradients = 2;
}  // namespace

cudaError_t layer_norm_fwd(DType dtype, const void* x, int64_t x_row_stride, const float* weight, const float* bias,
                           void* y, float* mean, float* rstd, int64_t rows, int64_t cols, float eps,
                           cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return norm::launch_fwd<false>(static_cast<const T*>(x), x_row_stride, weight, bias, static_cast<T*>(y), mean,
                                   rstd, rows, cols, eps, stream);
  });
}

size_t layer_norm_bwd_workspace_bytes(int64_t rows, int64_t cols) {
  return norm::bwd_workspace_bytes(rows, cols, kLayerNormGradients);
}

cudaError_t layer_norm_bwd(DType dtype, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                           const float* weight, const float* mean, const float* rstd, void* dx, float* dweight,
                           float* dbias, void* workspace, int64_t rows, int64_t cols, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return norm::launch_bwd<false>(static_cast<const T*>(dy), dy_row_stride, static_cast<const T*>(x), x_row_stride,
                                   weight, mean, rstd, static_cast<T*>(dx), dweight, dbias, workspace, rows, cols,
                                   stream);
  });
}

}  // namespace lmrt::cuda
