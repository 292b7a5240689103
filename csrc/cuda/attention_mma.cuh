// Warp-level building blocks of the attention kernels (csrc/cuda/attention.cu): cp.async copies, ldmatrix and
// mma.sync.m16n8k16 for float16/bfloat16, and the two warp GEMMs the kernels are written in, with a float32 twin
// of each on CUDA-core FMAs that keeps the same register layout, so one kernel body serves every dtype.
//
// Register layout (PTX ISA, "Matrix Fragments for mma.m16n8k16"). Lane l = 4 g + t (g = l / 4, t = l % 4):
//   accumulator C (16 x 8, float): c[0], c[1] = (row g, cols 2t, 2t+1); c[2], c[3] = (row g+8, same cols).
//   A (16 x 16, 16-bit pairs): a[0] = (row g, k 2t..2t+1), a[1] = (row g+8, k 2t..), a[2] = (row g, k 2t+8..),
//     a[3] = (row g+8, k 2t+8..).
//   B (16 x 8): b[0] = (k 2t..2t+1, col g), b[1] = (k 2t+8..2t+9, col g).
// A warp's (16 M) x (8 N) accumulator is float acc[M][N][4] (m-tile, n-tile, c). Two neighbouring C tiles hold
// exactly the A fragment of a 16-wide k-step (tile 2i gives a[0], a[1]; tile 2i+1 gives a[2], a[3]), which is
// why probabilities computed in registers feed the next product without a trip through shared memory.
//
// Shared-memory tiles are row-major with rows padded by 16 bytes (see kSmemPad in attention.cu): ldmatrix reads 8
// rows of 16 bytes per 8x8 matrix, and a row pitch that is an odd number of 16-byte units puts those 8 rows in 8
// different bank quads, so neither ldmatrix nor the 16-byte cp.async stores conflict.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lmrt::cuda::attention_mma {

constexpr int kWarpSize = 32;

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, asynchronously; bytes past `src_bytes` (0..16) are zero-filled and not read.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// 4 bytes global -> shared, asynchronously; zero-filled when `src_bytes` is 0.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `kPending` of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, which lands in r[i].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// As ldmatrix_x4, each matrix transposed: lane 4g+t receives (row 2t, col g) and (row 2t+1, col g).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// c += a b on the tensor cores, 16-bit inputs, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16 takes __half or __nv_bfloat16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T and packed as one 32-bit register, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&pair);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
}

// c + a b in the accumulator's precision; float products are exact in double.
template <typename Acc>
__device__ __forceinline__ Acc fma_acc(float a, float b, Acc c) {
  if constexpr (std::is_same_v<Acc, double>) {
    return fma(static_cast<double>(a), static_cast<double>(b), c);
  } else {
    return fmaf(a, b, c);
  }
}

// acc (16 M x N) += A B^T for one warp, both operands in shared memory and contiguous along k: A is 16 M rows x K
// (row pitch kPitchA elements), B is N rows x K (row pitch kPitchB): S = Q K^T and its kin. The warp's M m16 tiles
// share every B fragment: shared-memory traffic per mma falls as M grows (one B fragment of 512 bytes feeds 2 M
// mma), which is what keeps a warp's products tensor-core bound rather than bound by shared-memory bandwidth.
// Acc is float, or double for float32 operands (the backward's dP, see attention.cu).
template <typename T, int M, int N, int K, int kPitchA, int kPitchB, typename Acc>
__device__ __forceinline__ void gemm_smem_smem(Acc (&acc)[M][N / 8][4], const T* a, const T* b) {
  const int lane = threadIdx.x % kWarpSize;
  if constexpr (std::is_same_v<T, float>) {
    // Float32: each lane forms its own four outputs per 8-column tile with sequential FMAs over k (the order
    // of a plain dot product, so the error matches PyTorch's float32 matmul), 16 FMAs per pair of 16-byte loads.
    const int g = lane / 4, t = lane % 4;
#pragma unroll 4
    for (int k = 0; k < K; k += 4) {
      float4 x0[M], x1[M];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        x0[m] = *reinterpret_cast<const float4*>(a + (16 * m + g) * kPitchA + k);
        x1[m] = *reinterpret_cast<const float4*>(a + (16 * m + g + 8) * kPitchA + k);
      }
#pragma unroll
      for (int j = 0; j < N / 8; ++j) {
        const float* b0 = b + (j * 8 + 2 * t) * kPitchB + k;
        const float4 y0 = *reinterpret_cast<const float4*>(b0);
        const float4 y1 = *reinterpret_cast<const float4*>(b0 + kPitchB);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          Acc* c = acc[m][j];
          c[0] = fma_acc(x0[m].x, y0.x, c[0]); c[0] = fma_acc(x0[m].y, y0.y, c[0]);
          c[0] = fma_acc(x0[m].z, y0.z, c[0]); c[0] = fma_acc(x0[m].w, y0.w, c[0]);
          c[1] = fma_acc(x0[m].x, y1.x, c[1]); c[1] = fma_acc(x0[m].y, y1.y, c[1]);
          c[1] = fma_acc(x0[m].z, y1.z, c[1]); c[1] = fma_acc(x0[m].w, y1.w, c[1]);
          c[2] = fma_acc(x1[m].x, y0.x, c[2]); c[2] = fma_acc(x1[m].y, y0.y, c[2]);
          c[2] = fma_acc(x1[m].z, y0.z, c[2]); c[2] = fma_acc(x1[m].w, y0.w, c[2]);
          c[3] = fma_acc(x1[m].x, y1.x, c[3]); c[3] = fma_acc(x1[m].y, y1.y, c[3]);
          c[3] = fma_acc(x1[m].z, y1.z, c[3]); c[3] = fma_acc(x1[m].w, y1.w, c[3]);
        }
      }
    }
  } else {
    static_assert(N % 16 == 0 && K % 16 == 0, "16-bit warp GEMMs work on 16 x 16 fragments");
    static_assert(std::is_same_v<Acc, float>, "the tensor cores accumulate in float32");
    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = a[0..3].
    const T* a_row = a + (lane % 16) * kPitchA + (lane / 16) * 8;
    // B: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of two n-tiles.
    const T* b_row = b + (lane % 8 + (lane / 16) * 8) * kPitchB + ((lane / 8) % 2) * 8;
#pragma unroll
    for (int k = 0; k < K; k += 16) {
      uint32_t af[M][4];
#pragma unroll
      for (int m = 0; m < M; ++m) ldmatrix_x4(af[m], a_row + 16 * m * kPitchA + k);
#pragma unroll
      for (int n = 0; n < N / 16; ++n) {
        uint32_t bf[4];
        ldmatrix_x4(bf, b_row + n * 16 * kPitchB + k);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          mma_m16n8k16<T>(acc[m][2 * n], af[m], bf[0], bf[1]);
          mma_m16n8k16<T>(acc[m][2 * n + 1], af[m], bf[2], bf[3]);
        }
      }
    }
  }
}

// acc (16 M x N) += P B for one warp: P (16 M x K) is a float accumulator in registers (M x K / 8 tiles of the C
// layout) and B is K rows x N in shared memory, contiguous along n (row pitch kPitchB): O += P V, dV += P^T dO and
// kin; every B fragment again serves the M m-tiles. 16-bit types round P to T, as every flash attention does
// before its second product.
template <typename T, int M, int N, int K, int kPitchB>
__device__ __forceinline__ void gemm_reg_smem(float (&acc)[M][N / 8][4], const float (&p)[M][K / 8][4], const T* b) {
  const int lane = threadIdx.x % kWarpSize;
  if constexpr (std::is_same_v<T, float>) {
    // Float32: row g of P is spread over the 4 lanes of a quad; each lane fetches the quad's values of one
    // 8-wide k tile by shuffles, then accumulates its own columns in k order.
    const int t = lane % 4;
    const int quad = lane & ~3;
#pragma unroll
    for (int kt = 0; kt < K / 8; ++kt) {
#pragma unroll
      for (int src = 0; src < 4; ++src) {
        float pk[M][4];  // (row g, k 2 src), (row g, k 2 src + 1), (row g + 8, k 2 src), (row g + 8, k 2 src + 1)
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
          for (int e = 0; e < 4; ++e) pk[m][e] = __shfl_sync(0xffffffffu, p[m][kt][e], quad + src);
        }
        const float* b0 = b + (kt * 8 + 2 * src) * kPitchB + 2 * t;
#pragma unroll
        for (int j = 0; j < N / 8; ++j) {
          const float2 x = *reinterpret_cast<const float2*>(b0 + j * 8);
          const float2 y = *reinterpret_cast<const float2*>(b0 + kPitchB + j * 8);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float* c = acc[m][j];
            c[0] = fmaf(pk[m][1], y.x, fmaf(pk[m][0], x.x, c[0]));
            c[1] = fmaf(pk[m][1], y.y, fmaf(pk[m][0], x.y, c[1]));
            c[2] = fmaf(pk[m][3], y.x, fmaf(pk[m][2], x.x, c[2]));
            c[3] = fmaf(pk[m][3], y.y, fmaf(pk[m][2], x.y, c[3]));
          }
        }
      }
    }
  } else {
    static_assert(N % 16 == 0 && K % 16 == 0, "16-bit warp GEMMs work on 16 x 16 fragments");
    // B transposed on load: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
    const T* b_row = b + (lane % 8 + ((lane / 8) % 2) * 8) * kPitchB + (lane / 16) * 8;
#pragma unroll
    for (int k = 0; k < K / 16; ++k) {
      uint32_t af[M][4];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        af[m][0] = pack2<T>(p[m][2 * k][0], p[m][2 * k][1]);
        af[m][1] = pack2<T>(p[m][2 * k][2], p[m][2 * k][3]);
        af[m][2] = pack2<T>(p[m][2 * k + 1][0], p[m][2 * k + 1][1]);
        af[m][3] = pack2<T>(p[m][2 * k + 1][2], p[m][2 * k + 1][3]);
      }
#pragma unroll
      for (int n = 0; n < N / 16; ++n) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, b_row + k * 16 * kPitchB + n * 16);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          mma_m16n8k16<T>(acc[m][2 * n], af[m], bf[0], bf[1]);
          mma_m16n8k16<T>(acc[m][2 * n + 1], af[m], bf[2], bf[3]);
        }
      }
    }
  }
}

// The maximum and the sum over the 4 lanes of a quad, which together hold one accumulator row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// 2^x on the special-function unit (2 ulp; results below 2^-126 flush to 0, -inf gives 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace lmrt::cuda::attention_mma
