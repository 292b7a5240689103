// Flash attention on tensor cores: the FlashAttention-2 forward, and a backward with separate dK/dV and dQ passes
// (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023). The contract is
// attention.h's; kernels/attention.py is the Triton implementation of the same algorithm and masks.
//
// Work. The forward does 4 B H Lq Lk D FLOPs (S = Q K^T and O = P V, 2 Lq Lk D each per head, D the head dim;
// about half when causal). It reads q once and writes out and lse once; k and v are read once per query block
// (Lq / BLOCK_M times, mostly from L2). The backward's useful work is 2.5x the forward's (five products: S again,
// dP, dV, dK, dQ); these kernels execute seven (3.5x), as the dQ pass recomputes S and dP, the price of writing
// every gradient once without atomics. The dK/dV pass reads k and v once and q, dout, lse and delta once per key
// block; the dQ pass reads q and dout once and k and v once per query block; delta reads out and dout once. Nothing
// of size Lq x Lk is stored; the backward's only scratch is delta, B H Lq floats.
//
// Bound. Tensor-core throughput at the head dims that matter (64, 128): the aim is FlashAttention-2's 50-70% of
// the mma.sync peak on A100 (H100 runs these sm_80 instructions; its full rate needs wgmma). Each mma also needs a
// B fragment from shared memory, one per two mma per m-tile a warp owns, so warps own two m-tiles (32 rows) where
// their registers allow it, halving those reads (see the tile shapes below).
//
// Forward. One block per (query block of BLOCK_M rows, batch * head); each warp owns 16 or 32 query rows. The
// block streams key blocks of BLOCK_N keys: S = Q K^T on the tensor cores, an online softmax in float32 (running
// row max m and sum l, base-2 scores with log2(e) folded into the scale so exp2 does the work), O += P V with P
// rounded to the input type. K and V blocks are double-buffered: block j + 1 streams in (cp.async) during the whole
// of block j's iteration, which at these tile sizes (64 mma per warp) is what covers a load's latency. Causal
// attention visits only the key blocks a row can see; only blocks that cross the diagonal or the end of the
// keys pay for masking, and a mask, when given, is read per score. A row that sees no key writes zeros and +inf as
// its log-sum-exp, so that the backward's exp(s - lse) is 0 there; a row with a NaN score writes NaN to both.
//
// Backward. delta = rowsum(dO * O) first (float32, in the workspace). Then, with P = exp(S - lse) recomputed from
// Q, K and the saved log-sum-exp, dP = dO V^T and dS = P (dP - delta):
//   the dK/dV kernel gives a block BLOCK_N keys of one key/value head (each warp 16 keys) and streams every
//   query block of every query head of its group past them (double-buffered cp.async), accumulating
//   dV += P^T dO and dK += dS^T Q in registers: grouped heads are summed inside the block, in a fixed order;
//   the dQ kernel gives a block BLOCK_M query rows and streams the key blocks (double-buffered), accumulating
//   dQ += dS K.
// Each gradient element is written once by one thread: no atomics, so the backward is bitwise deterministic.
//
// Types. float16 and bfloat16 multiply on the tensor cores (mma.sync m16n8k16, float32 accumulators). float32
// keeps float32 accuracy on CUDA-core FMAs in the same register layout (attention_mma.cuh), with dP and delta
// summed in float64 (see DpAcc): about 16x slower per FLOP than the tensor cores, with tiles small enough that
// its doubled shared memory fits.
//
// Head dims. Both head dims are padded to one compiled size (32, 64, 96 or 128 for 16-bit types, 64 or 128 for
// float32) by zero-filling the columns past them on load; zero columns add nothing to any product.
//
// Loads. Tiles go global -> shared with 16-byte cp.async when every pointer and stride allows it, zero-filling
// rows past the sequence and columns past the head dim; otherwise element by element through registers.
#include "attention.h"

#include <cfloat>
#include <climits>
#include <cstdio>

#include "attention_mma.cuh"
#include "vector_io.cuh"

namespace lmrt::cuda {
namespace {

using attention_mma::cp_async_16;
using attention_mma::cp_async_4;
using attention_mma::cp_async_commit;
using attention_mma::cp_async_wait;
using attention_mma::fast_exp2;
using attention_mma::gemm_reg_smem;
using attention_mma::gemm_smem_smem;
using attention_mma::kWarpSize;
using attention_mma::quad_max;
using attention_mma::quad_sum;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();
constexpr int kMaxHeadDim = 128;
// Rows, as sequence positions, stay below 2^30 so that i + (Lk - Lq) and the like never overflow an int.
constexpr int64_t kMaxSeqLen = int64_t{1} << 30;
// Bytes of padding after every shared-memory row: see attention_mma.cuh (an odd number of 16-byte units per row).
constexpr int kSmemPad = 16;
// Shared memory a block may take on any sm_80+ GPU (sm_86/sm_89 allow 99 KiB per block, opt-in).
constexpr int kMaxSmemBytes = 99 * 1024;
constexpr int kDeltaThreads = 128;  // the delta kernel: one thread per row
// No occupancy demand on ptxas: the tiles' accumulators want up to ~250 registers, and capping them for a second
// block per SM spills. Stated explicitly: given only the thread count, ptxas chose a lower cap for some kernels
// and spilled. 8 warps per SM (one block of 8 or two of 4) is FlashAttention-2's occupancy too.
constexpr int kMinBlocksPerSm = 1;

// Everything a kernel reads. Tensors are (batch, heads, rows, dim) with unit dim stride, strides in elements.
struct Params {
  AttentionTensor q, k, v;
  AttentionTensor out;   // forward: written; backward: read by the delta kernel
  AttentionTensor dout;  // backward only
  AttentionTensor dq, dk, dv;
  AttentionMask mask;
  float* lse;    // float32 (batch, heads, q_len) contiguous: written by the forward, read by the backward
  float* delta;  // the backward's workspace: rowsum(dout * out), laid out like lse
  int batch, heads, kv_heads;
  int group;  // heads / kv_heads: query head h reads key/value head h / group
  int q_len, k_len;
  int dim, dim_v;  // the real head dims; the kernels compute on them zero-padded to their compiled size
  int shift;       // causal: key j is visible to query i when j <= i + shift
  bool causal;
  bool vec16;        // every tensor's pointer and (non-trivial) strides allow 16-byte accesses
  float scale;       // softmax scale (natural units), for dq and dk
  float scale_log2;  // scale * log2(e): scores in base-2 units
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Elements per shared-memory row of a tile with head dim `kHeadDim`.
template <typename T, int kHeadDim>
constexpr int kPitch = kHeadDim + kSmemPad / static_cast<int>(sizeof(T));

// Tile shapes. Each warp owns kMTiles x 16 rows of the tile the block keeps (query rows in the forward and the dQ
// pass, keys in the dK/dV pass) and streams the other operand's blocks past them. Two m-tiles per warp halve the
// shared-memory reads per mma (attention_mma.cuh) but double the warp's accumulators (O or dQ: 16 x D floats per
// m-tile; dK and dV: twice that), so only the smaller head dims take two. Float32 tiles fit kMaxSmemBytes with
// twice the bytes per element. Every shape here compiles without register spills for sm_80 and sm_90a; the larger
// alternatives (two m-tiles with 32-key blocks at D = 128, or 64-key blocks at D = 64) spill.
template <typename T, int kHeadDim>
struct FwdTiles {
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int kWarps = 4;
  static constexpr int kMTiles = kHalf ? 2 : 1;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kWarps;
  static constexpr int kBlockN = kHeadDim > 96 ? 16 : 32;
  static constexpr int kThreads = kWarps * kWarpSize;
  // Q, then two stages of (K, V).
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kPitch<T, kHeadDim> * sizeof(T);
};

template <typename T, int kHeadDim>
struct DqTiles {
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int kWarps = kHalf || kHeadDim <= 64 ? 4 : 2;
  static constexpr int kMTiles = kHalf && kHeadDim <= 64 ? 2 : 1;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kBlockM = kWarpRows * kWarps;
  static constexpr int kBlockN = kHalf || kHeadDim <= 64 ? 32 : 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  // Q and dO, then two stages of (K, V).
  static constexpr int kSmemBytes = (2 * kBlockM + 4 * kBlockN) * kPitch<T, kHeadDim> * sizeof(T);
};

template <typename T, int kHeadDim>
struct DkdvTiles {
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int kWarps = kHalf || kHeadDim <= 64 ? 4 : 2;
  static constexpr int kMTiles = 1;
  static constexpr int kWarpRows = 16 * kMTiles;  // keys
  static constexpr int kBlockN = kWarpRows * kWarps;
  static constexpr int kBlockM = kHalf ? (kHeadDim <= 64 ? 64 : 32) : 16;
  static constexpr int kThreads = kWarps * kWarpSize;
  // K and V, then two stages of (Q, dO, lse, delta).
  static constexpr int kSmemBytes =
      (2 * kBlockN + 4 * kBlockM) * kPitch<T, kHeadDim> * sizeof(T) + 4 * kBlockM * sizeof(float);
};

// The accumulator of the backward's dP = dO V^T. dS = P (dP - delta) subtracts nearly equal numbers, so their
// rounding errors dominate dS: with float32 inputs both are summed in float64 and rounded once (float products
// are exact in double), which keeps dQ and dK as accurate as PyTorch's float32 backward (whose delta, formed from
// the same dP, cancels exactly where a row sees a single key: so does this one). 16-bit inputs take dP from the
// tensor cores in float32, as every flash attention does.
template <typename T>
using DpAcc = std::conditional_t<std::is_same_v<T, float>, double, float>;

// Rows [row0, row0 + kRows) x columns [0, kHeadDim) of a (rows, dim) matrix with `row_stride`, into a shared tile
// of pitch kPitch. Rows >= n_rows and columns >= dim are zero-filled, so padding adds nothing to any product.
// vec16: 16-byte cp.async (asynchronous: commit and wait); else synchronous element loads.
template <typename T, int kRows, int kHeadDim, int kThreads>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t row_stride, int row0, int n_rows, int dim,
                                          bool vec16) {
  constexpr int kChunk = 16 / sizeof(T);  // elements per 16 bytes
  constexpr int kChunksPerRow = kHeadDim / kChunk;
  constexpr int kChunks = kRows * kChunksPerRow;
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, uint32_t>;
#pragma unroll
  for (int pass = 0; pass < ceil_div(kChunks, kThreads); ++pass) {
    const int i = pass * kThreads + static_cast<int>(threadIdx.x);
    if (kChunks % kThreads != 0 && i >= kChunks) break;
    const int r = i / kChunksPerRow;
    const int col = (i % kChunksPerRow) * kChunk;
    const int row = row0 + r;
    T* dst = tile + r * kPitch<T, kHeadDim> + col;
    const T* from = src + static_cast<int64_t>(row) * row_stride + col;
    const int valid = row < n_rows ? min(max(dim - col, 0), kChunk) : 0;  // elements to read
    if (vec16) {
      cp_async_16(dst, valid > 0 ? from : src, valid * static_cast<int>(sizeof(T)));
    } else {
      const Bits* from_bits = reinterpret_cast<const Bits*>(from);
      uint32_t words[4];
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        if constexpr (sizeof(T) == 2) {
          const uint32_t lo = 2 * w < valid ? from_bits[2 * w] : 0u;
          const uint32_t hi = 2 * w + 1 < valid ? from_bits[2 * w + 1] : 0u;
          words[w] = lo | hi << 16;
        } else {
          words[w] = w < valid ? from_bits[w] : 0u;
        }
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
    }
  }
}

// Two neighbouring elements (col, col + 1) of one output row, those below `dim`.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int col, int dim, float a, float b, bool vec16) {
  if (vec16 && col + 1 < dim) {  // vec16 makes row 16-byte aligned; col is even
    if constexpr (std::is_same_v<T, float>) {
      *reinterpret_cast<float2*>(row + col) = make_float2(a, b);
    } else if constexpr (std::is_same_v<T, __half>) {
      *reinterpret_cast<__half2*>(row + col) = __floats2half2_rn(a, b);
    } else {
      *reinterpret_cast<__nv_bfloat162*>(row + col) = __floats2bfloat162_rn(a, b);
    }
  } else {
    if (col < dim) row[col] = from_float<T>(a);
    if (col + 1 < dim) row[col + 1] = from_float<T>(b);
  }
}

template <typename T>
__device__ __forceinline__ const T* head_rows(const AttentionTensor& x, int b, int h) {
  return static_cast<const T*>(x.data) + b * x.batch_stride + h * x.head_stride;
}

template <typename T>
__device__ __forceinline__ T* head_rows_out(const AttentionTensor& x, int b, int h) {
  return static_cast<T*>(x.data) + b * x.batch_stride + h * x.head_stride;
}

// The (b, h) plane of the mask, as bytes; nullptr without a mask.
__device__ __forceinline__ const unsigned char* mask_plane(const AttentionMask& mask, int b, int h) {
  if (mask.kind == MaskKind::kNone) return nullptr;
  const int bytes = mask.kind == MaskKind::kBool ? 1 : mask.dtype == DType::kFloat32 ? 4 : 2;
  return static_cast<const unsigned char*>(mask.data) + (b * mask.batch_stride + h * mask.head_stride) * bytes;
}

// An additive mask value in base-2 units. A finite value beyond FLT_MAX / log2 e would overflow: the dtype's minimum,
// which Hugging Face masks use, to -inf, which means "no key", so a row masked that way would give zeros where
// PyTorch averages the values, and the dtype's maximum to +inf, whose row max made the row NaN. Such values become
// -FLT_MAX or FLT_MAX instead. Infinities and NaN stay as they are.
__device__ __forceinline__ float mask_log2(float value) {
  const float scaled = value * kLog2e;
  return isinf(scaled) && !isinf(value) ? copysignf(FLT_MAX, value) : scaled;
}

// The backward's P = 2^(s - lse2), at most 1, from s - lse2. lse2 is the forward's natural-log lse times log2 e, and
// past |lse| ~ 2^31 (scores near 1e12, or a mask of the dtype's maximum) the two roundings differ by more than exp2's
// range: a score above its row's lse2 gave inf, and inf times a zero dP NaN. NaN stays NaN.
__device__ __forceinline__ float probability(float s_minus_lse2) {
  return fast_exp2(s_minus_lse2 > 0.f ? 0.f : s_minus_lse2);
}

// Base-2 scores of one warp's (16 kMTiles) x (8 kTiles) tile: the additive mask added (times log2 e), and -inf
// where a boolean mask, causality or the end of the keys hides a key. Lane 4g+t holds rows row + 16 m + {0, 8} and
// columns col0 + 8j + 2t + {0, 1}; with kKeyRows the rows are keys and the columns queries (the dK/dV pass's S^T).
// bounds: this tile may cross the causal diagonal or the end of the keys (with kKeyRows: of the queries, whose rows
// past the end hold q = 0, and 0 times an infinite key would be a NaN that reaches dK and dV).
template <int kMTiles, int kTiles, bool kKeyRows>
__device__ __forceinline__ void mask_scores(float (&s)[kMTiles][kTiles][4], int row, int col0, const Params& p,
                                            const unsigned char* mask, bool bounds) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = row + 16 * m + (e / 2) * 8;
        const int c = col0 + j * 8 + 2 * t + e % 2;
        const int query = kKeyRows ? c : r;
        const int key = kKeyRows ? r : c;
        float x = s[m][j][e];
        if (mask != nullptr && query < p.q_len && key < p.k_len) {
          const int64_t at = query * p.mask.row_stride + key * p.mask.col_stride;
          if (p.mask.kind == MaskKind::kBool) {
            if (mask[at] == 0) x = -kInf;
          } else if (p.mask.dtype == DType::kFloat32) {
            x += mask_log2(reinterpret_cast<const float*>(mask)[at]);
          } else if (p.mask.dtype == DType::kFloat16) {
            x += mask_log2(to_float(reinterpret_cast<const __half*>(mask)[at]));
          } else {
            x += mask_log2(to_float(reinterpret_cast<const __nv_bfloat16*>(mask)[at]));
          }
        }
        if (bounds && (key >= p.k_len || (kKeyRows && query >= p.q_len) || (p.causal && key > query + p.shift))) {
          x = -kInf;
        }
        s[m][j][e] = x;
      }
    }
  }
}

template <int kMTiles, int kTiles>
__device__ __forceinline__ void scale_scores(float (&s)[kMTiles][kTiles][4], float scale) {
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[m][j][e] *= scale;
    }
  }
}

// The keys a block of query rows [m0, m0 + block_m) needs: [0, end) in all, of which [0, full_end) are visible to
// every row (no causal or bounds masking).
__device__ __forceinline__ void key_spans(const Params& p, int m0, int block_m, int& end, int& full_end) {
  if (p.causal) {
    const int last_row = min(m0 + block_m, p.q_len) - 1;
    end = min(max(last_row + p.shift + 1, 0), p.k_len);
    full_end = min(max(m0 + p.shift + 1, 0), p.k_len);
  } else {
    end = p.k_len;
    full_end = p.k_len;
  }
}

// In the kernels below a lane's accumulator rows are row + 8 r for r < 2 kMTiles ("row slots"): slot r is half
// r % 2 (elements 2 (r % 2) and 2 (r % 2) + 1) of m-tile r / 2.

// Forward. Grid: ceil(q_len / BLOCK_M) * batch * heads blocks, query blocks fastest and in reverse (the causal
// blocks with the most keys start first). Writes p.out and p.lse.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(FwdTiles<T, kHeadDim>::kThreads, kMinBlocksPerSm)
    attention_fwd_kernel(const Params p) {
  using Tiles = FwdTiles<T, kHeadDim>;
  constexpr int kM = Tiles::kBlockM, kN = Tiles::kBlockN, kThreads = Tiles::kThreads;
  constexpr int kMT = Tiles::kMTiles, kRows = Tiles::kWarpRows;
  constexpr int kP = kPitch<T, kHeadDim>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + kM * kP;      // [2][kN][kP]
  T* s_v = s_k + 2 * kN * kP;  // [2][kN][kP]

  const int m_blocks = ceil_div(p.q_len, kM);
  const int m0 = (m_blocks - 1 - static_cast<int>(blockIdx.x % m_blocks)) * kM;
  const int bh = blockIdx.x / m_blocks;
  const int h = bh % p.heads, b = bh / p.heads;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row = m0 + warp * kRows + lane / 4;

  const T* q = head_rows<T>(p.q, b, h);
  const T* k = head_rows<T>(p.k, b, h / p.group);
  const T* v = head_rows<T>(p.v, b, h / p.group);
  const unsigned char* mask = mask_plane(p.mask, b, h);
  int end, full_end;
  key_spans(p, m0, kM, end, full_end);
  const int n_blocks = ceil_div(end, kN);

  float o[kMT][kHeadDim / 8][4] = {};
  float m[2 * kMT];  // running row max, base 2
  float l[2 * kMT];  // running row sum of this lane's columns (the quad's sum is taken at the end)
#pragma unroll
  for (int r = 0; r < 2 * kMT; ++r) {
    m[r] = -kInf;
    l[r] = 0.0f;
  }
  if (n_blocks > 0) {
    load_tile<T, kM, kHeadDim, kThreads>(s_q, q, p.q.row_stride, m0, p.q_len, p.dim, p.vec16);
    load_tile<T, kN, kHeadDim, kThreads>(s_k, k, p.k.row_stride, 0, p.k_len, p.dim, p.vec16);
    load_tile<T, kN, kHeadDim, kThreads>(s_v, v, p.v.row_stride, 0, p.k_len, p.dim_v, p.vec16);
    cp_async_commit();
  }
  for (int j = 0; j < n_blocks; ++j) {
    const int n0 = j * kN;
    if (j + 1 < n_blocks) {  // the next block streams in during this one's whole iteration
      const int next = (j + 1) % 2;
      load_tile<T, kN, kHeadDim, kThreads>(s_k + next * kN * kP, k, p.k.row_stride, n0 + kN, p.k_len, p.dim,
                                           p.vec16);
      load_tile<T, kN, kHeadDim, kThreads>(s_v + next * kN * kP, v, p.v.row_stride, n0 + kN, p.k_len, p.dim_v,
                                           p.vec16);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // this block's K and V are in
    const T* k_tile = s_k + (j % 2) * kN * kP;
    const T* v_tile = s_v + (j % 2) * kN * kP;

    float s[kMT][kN / 8][4] = {};
    gemm_smem_smem<T, kMT, kN, kHeadDim, kP, kP>(s, s_q + warp * kRows * kP, k_tile);
    scale_scores(s, p.scale_log2);
    const bool bounds = n0 + kN > full_end;
    if (bounds || mask != nullptr) mask_scores<kMT, kN / 8, false>(s, row, n0, p, mask, bounds);

#pragma unroll
    for (int r = 0; r < 2 * kMT; ++r) {
      float(&sr)[kN / 8][4] = s[r / 2];
      const int c0 = 2 * (r % 2);
      float m_new = m[r];
#pragma unroll
      for (int i = 0; i < kN / 8; ++i) m_new = fmaxf(m_new, fmaxf(sr[i][c0], sr[i][c0 + 1]));
      m_new = quad_max(m_new);
      // While a row has seen only hidden keys its max is -inf: subtract 0 instead, so exp2 gives 0, not NaN.
      const float base = m_new == -kInf ? 0.0f : m_new;
      const float alpha = fast_exp2(m[r] - base);
      m[r] = m_new;
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kN / 8; ++i) {
        sr[i][c0] = fast_exp2(sr[i][c0] - base);
        sr[i][c0 + 1] = fast_exp2(sr[i][c0 + 1] - base);
        sum += sr[i][c0] + sr[i][c0 + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) {
        o[r / 2][i][c0] *= alpha;
        o[r / 2][i][c0 + 1] *= alpha;
      }
    }
    gemm_reg_smem<T, kMT, kHeadDim, kN, kP>(o, s, v_tile);
    __syncthreads();  // every warp is done with this stage before the next block refills it
  }

  T* out = head_rows_out<T>(p.out, b, h);
  const int t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2 * kMT; ++r) {
    const float sum = quad_sum(l[r]);
    const int i = row + 8 * r;
    if (i >= p.q_len) continue;
    // sum == 0 only when every key was hidden (the max itself contributes exp2(0) = 1): then o is 0 too, and
    // dividing by 1 writes the zeros. A NaN score, which fmaxf kept out of the max but not out of the sum, makes
    // sum NaN: the output and lse are NaN, as on the CPU and in Triton, and the NaN lse carries it into the
    // backward's P = exp(s - lse) and so into dK and dV (+inf, the mark of a row that sees no key, would make P 0).
    // A true division, not a reciprocal: float32 outputs keep half an ulp.
    const float divisor = sum == 0.0f ? 1.0f : sum;
    const int c0 = 2 * (r % 2);
    T* out_row = out + i * p.out.row_stride;
#pragma unroll
    for (int c = 0; c < kHeadDim / 8; ++c) {
      store_pair(out_row, c * 8 + 2 * t, p.dim_v, o[r / 2][c][c0] / divisor, o[r / 2][c][c0 + 1] / divisor,
                 p.vec16);
    }
    if (t == 0) {
      p.lse[(static_cast<int64_t>(b) * p.heads + h) * p.q_len + i] =
          sum == 0.0f ? kInf : fmaf(m[r], kLn2, logf(sum));
    }
  }
}

// delta = rowsum(dout * out), one thread per (batch, head, query) row; grid: ceil(rows / 128) blocks. Summed in
// float64 and rounded once to the float32 workspace, as float32 inputs form dP (see DpAcc): a row that sees one
// key (out = v exactly) then gets dP - delta = 0 exactly, and otherwise the two are as close as float32 allows.
template <typename T>
__global__ void __launch_bounds__(kDeltaThreads) attention_bwd_delta_kernel(const Params p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_len;
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kDeltaThreads + threadIdx.x;
  if (index >= rows) return;
  const int i = static_cast<int>(index % p.q_len);
  const int bh = static_cast<int>(index / p.q_len);
  const int h = bh % p.heads, b = bh / p.heads;
  const T* out = head_rows<T>(p.out, b, h) + i * p.out.row_stride;
  const T* dout = head_rows<T>(p.dout, b, h) + i * p.dout.row_stride;
  double sum = 0.0;
  for (int c = 0; c < p.dim_v; ++c) {
    sum = fma(static_cast<double>(to_float(dout[c])), static_cast<double>(to_float(out[c])), sum);
  }
  p.delta[index] = static_cast<float>(sum);
}

// dK and dV of BLOCK_N keys of one key/value head, summed over the query heads of its group. Grid:
// ceil(k_len / BLOCK_N) * batch * kv_heads blocks, key blocks fastest. Reads q, k, v, dout, lse and delta.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(DkdvTiles<T, kHeadDim>::kThreads, kMinBlocksPerSm)
    attention_bwd_dkdv_kernel(const Params p) {
  using Tiles = DkdvTiles<T, kHeadDim>;
  constexpr int kM = Tiles::kBlockM, kN = Tiles::kBlockN, kThreads = Tiles::kThreads;
  constexpr int kMT = Tiles::kMTiles, kRows = Tiles::kWarpRows;
  constexpr int kP = kPitch<T, kHeadDim>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kN * kP;
  T* s_q = s_v + kN * kP;       // [2][kM][kP]
  T* s_do = s_q + 2 * kM * kP;  // [2][kM][kP]
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * kM * kP);  // [2][kM]
  float* s_delta = s_lse + 2 * kM;                               // [2][kM]

  const int n_blocks = ceil_div(p.k_len, kN);
  const int n0 = static_cast<int>(blockIdx.x % n_blocks) * kN;
  const int bh = blockIdx.x / n_blocks;
  const int hk = bh % p.kv_heads, b = bh / p.kv_heads;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int key = n0 + warp * kRows + lane / 4;  // this lane's keys: key + 8 r (row slots)

  // Query blocks m_lo.. see some key of this block; causal masking applies to those that start before row
  // diagonal_end (the first row that sees every key of the block).
  int m_lo = 0, diagonal_end = 0;
  if (p.causal) {
    const int last_key = min(n0 + kN, p.k_len) - 1;
    m_lo = max(n0 - p.shift, 0) / kM;
    diagonal_end = max(last_key - p.shift, 0);
  }
  const int m_blocks = ceil_div(p.q_len, kM);
  const int per_head = max(m_blocks - m_lo, 0);
  const int steps = per_head * p.group;

  // Step `step` covers query block m_lo + step % per_head of query head hk * group + step / per_head.
  auto load_step = [&](int step) {
    const int h = hk * p.group + step / per_head;
    const int q0 = (m_lo + step % per_head) * kM;
    const int stage = step % 2;
    load_tile<T, kM, kHeadDim, kThreads>(s_q + stage * kM * kP, head_rows<T>(p.q, b, h), p.q.row_stride, q0,
                                         p.q_len, p.dim, p.vec16);
    load_tile<T, kM, kHeadDim, kThreads>(s_do + stage * kM * kP, head_rows<T>(p.dout, b, h), p.dout.row_stride,
                                         q0, p.q_len, p.dim_v, p.vec16);
    if (threadIdx.x < kM) {
      // Rows past q_len read 0 for both: harmless, as their Q and dO rows are zero, so P^T dO and dS^T Q get 0.
      const int64_t first = (static_cast<int64_t>(b) * p.heads + h) * p.q_len;
      const int bytes = q0 + static_cast<int>(threadIdx.x) < p.q_len ? 4 : 0;
      const int64_t at = bytes ? first + q0 + threadIdx.x : first;
      cp_async_4(s_lse + stage * kM + threadIdx.x, p.lse + at, bytes);
      cp_async_4(s_delta + stage * kM + threadIdx.x, p.delta + at, bytes);
    }
  };

  float dk[kMT][kHeadDim / 8][4] = {};
  float dv[kMT][kHeadDim / 8][4] = {};
  if (steps > 0) {
    load_tile<T, kN, kHeadDim, kThreads>(s_k, head_rows<T>(p.k, b, hk), p.k.row_stride, n0, p.k_len, p.dim,
                                         p.vec16);
    load_tile<T, kN, kHeadDim, kThreads>(s_v, head_rows<T>(p.v, b, hk), p.v.row_stride, n0, p.k_len, p.dim_v,
                                         p.vec16);
    load_step(0);
    cp_async_commit();
  }
  const int t = lane % 4;
  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) load_step(step + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // this step's stage is in

    const int h = hk * p.group + step / per_head;
    const int q0 = (m_lo + step % per_head) * kM;
    const int stage = step % 2;
    const T* q_tile = s_q + stage * kM * kP;
    const T* do_tile = s_do + stage * kM * kP;
    const float* lse = s_lse + stage * kM;
    const float* delta = s_delta + stage * kM;

    // P^T = exp2(S^T - lse) with S^T = K Q^T: the warp's keys x kM queries.
    float pt[kMT][kM / 8][4] = {};
    gemm_smem_smem<T, kMT, kM, kHeadDim, kP, kP>(pt, s_k + warp * kRows * kP, q_tile);
    scale_scores(pt, p.scale_log2);
    const unsigned char* mask = mask_plane(p.mask, b, h);
    const bool bounds = (p.causal && q0 < diagonal_end) || q0 + kM > p.q_len;
    if (bounds || mask != nullptr) mask_scores<kMT, kM / 8, true>(pt, key, q0, p, mask, bounds);
#pragma unroll
    for (int i = 0; i < kM / 8; ++i) {
      const float2 lse_pair = *reinterpret_cast<const float2*>(lse + i * 8 + 2 * t);
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pt[m][i][e] = probability(pt[m][i][e] - (e % 2 ? lse_pair.y : lse_pair.x) * kLog2e);
        }
      }
    }

    // dP^T = V dO^T; dV += P^T dO; then dS^T = P^T (dP^T - delta) in place of P^T; dK += dS^T Q.
    DpAcc<T> dpt[kMT][kM / 8][4] = {};
    gemm_smem_smem<T, kMT, kM, kHeadDim, kP, kP>(dpt, s_v + warp * kRows * kP, do_tile);
    gemm_reg_smem<T, kMT, kHeadDim, kM, kP>(dv, pt, do_tile);
#pragma unroll
    for (int i = 0; i < kM / 8; ++i) {
      const float2 delta_pair = *reinterpret_cast<const float2*>(delta + i * 8 + 2 * t);
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pt[m][i][e] *= static_cast<float>(dpt[m][i][e]) - (e % 2 ? delta_pair.y : delta_pair.x);
        }
      }
    }
    gemm_reg_smem<T, kMT, kHeadDim, kM, kP>(dk, pt, q_tile);
    __syncthreads();  // every warp is done with this stage before the next step refills it
  }

  T* dk_out = head_rows_out<T>(p.dk, b, hk);
  T* dv_out = head_rows_out<T>(p.dv, b, hk);
#pragma unroll
  for (int r = 0; r < 2 * kMT; ++r) {
    const int j = key + 8 * r;
    if (j >= p.k_len) continue;
    const int c0 = 2 * (r % 2);
    T* dk_row = dk_out + j * p.dk.row_stride;
    T* dv_row = dv_out + j * p.dv.row_stride;
#pragma unroll
    for (int c = 0; c < kHeadDim / 8; ++c) {
      store_pair(dk_row, c * 8 + 2 * t, p.dim, dk[r / 2][c][c0] * p.scale, dk[r / 2][c][c0 + 1] * p.scale,
                 p.vec16);
      store_pair(dv_row, c * 8 + 2 * t, p.dim_v, dv[r / 2][c][c0], dv[r / 2][c][c0 + 1], p.vec16);
    }
  }
}

// dQ of BLOCK_M query rows of one head. Grid: ceil(q_len / BLOCK_M) * batch * heads blocks, query blocks fastest
// and in reverse. Reads q, k, v, dout, lse and delta.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(DqTiles<T, kHeadDim>::kThreads, kMinBlocksPerSm)
    attention_bwd_dq_kernel(const Params p) {
  using Tiles = DqTiles<T, kHeadDim>;
  constexpr int kM = Tiles::kBlockM, kN = Tiles::kBlockN, kThreads = Tiles::kThreads;
  constexpr int kMT = Tiles::kMTiles, kRows = Tiles::kWarpRows;
  constexpr int kP = kPitch<T, kHeadDim>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + kM * kP;
  T* s_k = s_do + kM * kP;     // [2][kN][kP]
  T* s_v = s_k + 2 * kN * kP;  // [2][kN][kP]

  const int m_blocks = ceil_div(p.q_len, kM);
  const int m0 = (m_blocks - 1 - static_cast<int>(blockIdx.x % m_blocks)) * kM;
  const int bh = blockIdx.x / m_blocks;
  const int h = bh % p.heads, b = bh / p.heads;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int row = m0 + warp * kRows + lane / 4;  // this lane's rows: row + 8 r (row slots)

  const T* k = head_rows<T>(p.k, b, h / p.group);
  const T* v = head_rows<T>(p.v, b, h / p.group);
  const unsigned char* mask = mask_plane(p.mask, b, h);
  int end, full_end;
  key_spans(p, m0, kM, end, full_end);
  const int n_blocks = ceil_div(end, kN);

  float dq[kMT][kHeadDim / 8][4] = {};
  if (n_blocks > 0) {
    // Base-2 lse and delta of this lane's rows; rows past q_len take lse = +inf, so their P is 0.
    float lse2[2 * kMT], delta[2 * kMT];
    const int64_t stats = (static_cast<int64_t>(b) * p.heads + h) * p.q_len;
#pragma unroll
    for (int r = 0; r < 2 * kMT; ++r) {
      const int i = row + 8 * r;
      lse2[r] = i < p.q_len ? p.lse[stats + i] * kLog2e : kInf;
      delta[r] = i < p.q_len ? p.delta[stats + i] : 0.0f;
    }
    load_tile<T, kM, kHeadDim, kThreads>(s_q, head_rows<T>(p.q, b, h), p.q.row_stride, m0, p.q_len, p.dim,
                                         p.vec16);
    load_tile<T, kM, kHeadDim, kThreads>(s_do, head_rows<T>(p.dout, b, h), p.dout.row_stride, m0, p.q_len,
                                         p.dim_v, p.vec16);
    load_tile<T, kN, kHeadDim, kThreads>(s_k, k, p.k.row_stride, 0, p.k_len, p.dim, p.vec16);
    load_tile<T, kN, kHeadDim, kThreads>(s_v, v, p.v.row_stride, 0, p.k_len, p.dim_v, p.vec16);
    cp_async_commit();

    for (int j = 0; j < n_blocks; ++j) {
      const int n0 = j * kN;
      if (j + 1 < n_blocks) {
        const int next = (j + 1) % 2;
        load_tile<T, kN, kHeadDim, kThreads>(s_k + next * kN * kP, k, p.k.row_stride, n0 + kN, p.k_len, p.dim,
                                             p.vec16);
        load_tile<T, kN, kHeadDim, kThreads>(s_v + next * kN * kP, v, p.v.row_stride, n0 + kN, p.k_len,
                                             p.dim_v, p.vec16);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();  // this block's K and V are in
      const T* k_tile = s_k + (j % 2) * kN * kP;
      const T* v_tile = s_v + (j % 2) * kN * kP;

      float s[kMT][kN / 8][4] = {};
      gemm_smem_smem<T, kMT, kN, kHeadDim, kP, kP>(s, s_q + warp * kRows * kP, k_tile);
      scale_scores(s, p.scale_log2);
      const bool bounds = n0 + kN > full_end;
      if (bounds || mask != nullptr) mask_scores<kMT, kN / 8, false>(s, row, n0, p, mask, bounds);
      DpAcc<T> dp[kMT][kN / 8][4] = {};
      gemm_smem_smem<T, kMT, kN, kHeadDim, kP, kP>(dp, s_do + warp * kRows * kP, v_tile);
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
#pragma unroll
        for (int i = 0; i < kN / 8; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {  // dS = P (dP - delta), in place of S
            const int r = 2 * m + e / 2;
            s[m][i][e] = probability(s[m][i][e] - lse2[r]) * (static_cast<float>(dp[m][i][e]) - delta[r]);
          }
        }
      }
      gemm_reg_smem<T, kMT, kHeadDim, kN, kP>(dq, s, k_tile);
      __syncthreads();  // every warp is done with this stage before the next block refills it
    }
  }

  T* dq_out = head_rows_out<T>(p.dq, b, h);
  const int t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2 * kMT; ++r) {
    const int i = row + 8 * r;
    if (i >= p.q_len) continue;
    const int c0 = 2 * (r % 2);
    T* dq_row = dq_out + i * p.dq.row_stride;
#pragma unroll
    for (int c = 0; c < kHeadDim / 8; ++c) {
      store_pair(dq_row, c * 8 + 2 * t, p.dim, dq[r / 2][c][c0] * p.scale, dq[r / 2][c][c0 + 1] * p.scale,
                 p.vec16);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

// Whether a tensor of (batch, heads, rows, dim) allows 16-byte accesses at every row start: an aligned pointer and
// strides that are multiples of 16 bytes (a stride of a size-1 dim never moves the pointer, so it does not count).
bool allows_vec16(const AttentionTensor& x, int element_bytes, int64_t batch, int64_t heads, int64_t rows) {
  const int64_t chunk = 16 / element_bytes;
  return reinterpret_cast<uintptr_t>(x.data) % 16 == 0 && (batch <= 1 || x.batch_stride % chunk == 0) &&
         (heads <= 1 || x.head_stride % chunk == 0) && (rows <= 1 || x.row_stride % chunk == 0);
}

int element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

Params make_params(const AttentionShape& shape, const AttentionMask& mask) {
  Params p{};
  p.mask = mask;
  p.batch = static_cast<int>(shape.batch);
  p.heads = static_cast<int>(shape.heads);
  p.kv_heads = static_cast<int>(shape.kv_heads);
  p.group = static_cast<int>(shape.heads / shape.kv_heads);
  p.q_len = static_cast<int>(shape.q_len);
  p.k_len = static_cast<int>(shape.k_len);
  p.dim = static_cast<int>(shape.head_dim);
  p.dim_v = static_cast<int>(shape.head_dim_v);
  p.causal = shape.causal;
  p.shift = shape.causal && shape.bottom_right ? p.k_len - p.q_len : 0;
  p.scale = shape.scale;
  p.scale_log2 = shape.scale * kLog2e;
  return p;
}

// The compiled head dim that serves head dims d and d_v (both zero-padded to it).
int padded_head_dim(DType dtype, int64_t d, int64_t d_v) {
  const int64_t widest = d > d_v ? d : d_v;
  if (dtype == DType::kFloat32) return widest <= 64 ? 64 : 128;
  return widest <= 32 ? 32 : widest <= 64 ? 64 : widest <= 96 ? 96 : 128;
}

// Opts a kernel into `bytes` of dynamic shared memory when that is over the default 48 KiB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int kHeadDim>
cudaError_t launch_fwd(const Params& p, cudaStream_t stream) {
  using Tiles = FwdTiles<T, kHeadDim>;
  static_assert(Tiles::kSmemBytes <= kMaxSmemBytes);
  const auto kernel = attention_fwd_kernel<T, kHeadDim>;
  if (const cudaError_t error = allow_smem(kernel, Tiles::kSmemBytes); error != cudaSuccess) return error;
  const int64_t blocks = int64_t{ceil_div(p.q_len, Tiles::kBlockM)} * p.batch * p.heads;
  kernel<<<static_cast<unsigned>(blocks), Tiles::kThreads, Tiles::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kHeadDim>
cudaError_t launch_bwd(const Params& p, cudaStream_t stream) {
  using Dkdv = DkdvTiles<T, kHeadDim>;
  using Dq = DqTiles<T, kHeadDim>;
  static_assert(Dkdv::kSmemBytes <= kMaxSmemBytes && Dq::kSmemBytes <= kMaxSmemBytes);
  if (p.q_len > 0) {
    const int64_t rows = int64_t{p.batch} * p.heads * p.q_len;
    attention_bwd_delta_kernel<T>
        <<<static_cast<unsigned>((rows + kDeltaThreads - 1) / kDeltaThreads), kDeltaThreads, 0, stream>>>(p);
    if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  }
  if (p.k_len > 0) {  // with q_len == 0 this writes zeros
    const auto kernel = attention_bwd_dkdv_kernel<T, kHeadDim>;
    if (const cudaError_t error = allow_smem(kernel, Dkdv::kSmemBytes); error != cudaSuccess) return error;
    const int64_t blocks = int64_t{ceil_div(p.k_len, Dkdv::kBlockN)} * p.batch * p.kv_heads;
    kernel<<<static_cast<unsigned>(blocks), Dkdv::kThreads, Dkdv::kSmemBytes, stream>>>(p);
    if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  }
  if (p.q_len > 0) {  // with k_len == 0 this writes zeros
    const auto kernel = attention_bwd_dq_kernel<T, kHeadDim>;
    if (const cudaError_t error = allow_smem(kernel, Dq::kSmemBytes); error != cudaSuccess) return error;
    const int64_t blocks = int64_t{ceil_div(p.q_len, Dq::kBlockM)} * p.batch * p.heads;
    kernel<<<static_cast<unsigned>(blocks), Dq::kThreads, Dq::kSmemBytes, stream>>>(p);
    if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

// Calls launch<T, kHeadDim>(p, stream) for the dtype and the compiled head dim that serves the shape.
template <template <typename, int> class Launch>
cudaError_t dispatch(DType dtype, const AttentionShape& shape, const Params& p, cudaStream_t stream) {
  const int head_dim = padded_head_dim(dtype, shape.head_dim, shape.head_dim_v);
  switch (dtype) {
    case DType::kFloat16:
      switch (head_dim) {
        case 32: return Launch<__half, 32>::run(p, stream);
        case 64: return Launch<__half, 64>::run(p, stream);
        case 96: return Launch<__half, 96>::run(p, stream);
        default: return Launch<__half, 128>::run(p, stream);
      }
    case DType::kBFloat16:
      switch (head_dim) {
        case 32: return Launch<__nv_bfloat16, 32>::run(p, stream);
        case 64: return Launch<__nv_bfloat16, 64>::run(p, stream);
        case 96: return Launch<__nv_bfloat16, 96>::run(p, stream);
        default: return Launch<__nv_bfloat16, 128>::run(p, stream);
      }
    case DType::kFloat32:
      return head_dim == 64 ? Launch<float, 64>::run(p, stream) : Launch<float, 128>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int kHeadDim>
struct FwdLaunch {
  static cudaError_t run(const Params& p, cudaStream_t stream) { return launch_fwd<T, kHeadDim>(p, stream); }
};

template <typename T, int kHeadDim>
struct BwdLaunch {
  static cudaError_t run(const Params& p, cudaStream_t stream) { return launch_bwd<T, kHeadDim>(p, stream); }
};

}  // namespace

const char* attention_unsupported(const AttentionShape& shape) {
  // The sentence is formatted per thread; it stays valid until this thread's next call.
  thread_local char reason[200];
  if (shape.batch < 0 || shape.heads < 0 || shape.q_len < 0 || shape.k_len < 0) {
    return "the CUDA attention kernels need non-negative sizes";
  }
  if (shape.kv_heads <= 0 || shape.heads % shape.kv_heads != 0) {
    snprintf(reason, sizeof(reason),
             "the CUDA attention kernels need the query heads (%lld) to be a multiple of the key/value heads (%lld)",
             static_cast<long long>(shape.heads), static_cast<long long>(shape.kv_heads));
    return reason;
  }
  for (const int64_t dim : {shape.head_dim, shape.head_dim_v}) {
    if (dim < 1 || dim > kMaxHeadDim) {
      snprintf(reason, sizeof(reason), "the CUDA attention kernels take head dims from 1 to %d, not %lld",
               kMaxHeadDim, static_cast<long long>(dim));
      return reason;
    }
  }
  if (shape.q_len >= kMaxSeqLen || shape.k_len >= kMaxSeqLen) {
    return "the CUDA attention kernels take sequences shorter than 2^30";
  }
  const int64_t longest = shape.q_len > shape.k_len ? shape.q_len : shape.k_len;
  if (shape.batch * shape.heads > INT_MAX || shape.batch * shape.heads * longest > INT_MAX) {
    return "the CUDA attention kernels take fewer than 2^31 rows of (batch * heads * sequence)";
  }
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();  // the failed query must not surface as a later launch's error
    return "the CUDA attention kernels found no CUDA device";
  }
  if (major < 8) {
    snprintf(reason, sizeof(reason),
             "the CUDA attention kernels need compute capability 8.0 or newer (bfloat16 mma.sync, cp.async), not "
             "%d.x",
             major);
    return reason;
  }
  return nullptr;
}

cudaError_t attention_fwd(DType dtype, const AttentionShape& shape, AttentionTensor q, AttentionTensor k,
                          AttentionTensor v, const AttentionMask& mask, AttentionTensor out, float* lse,
                          cudaStream_t stream) {
  if (attention_unsupported(shape) != nullptr) return cudaErrorInvalidValue;
  if (shape.batch * shape.heads * shape.q_len == 0) return cudaSuccess;
  Params p = make_params(shape, mask);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  const int bytes = element_bytes(dtype);
  p.vec16 = allows_vec16(q, bytes, shape.batch, shape.heads, shape.q_len) &&
            allows_vec16(k, bytes, shape.batch, shape.kv_heads, shape.k_len) &&
            allows_vec16(v, bytes, shape.batch, shape.kv_heads, shape.k_len) &&
            allows_vec16(out, bytes, shape.batch, shape.heads, shape.q_len);
  return dispatch<FwdLaunch>(dtype, shape, p, stream);
}

size_t attention_bwd_workspace_bytes(const AttentionShape& shape) {
  return static_cast<size_t>(shape.batch * shape.heads * shape.q_len) * sizeof(float);  // delta
}

cudaError_t attention_bwd(DType dtype, const AttentionShape& shape, AttentionTensor dout, AttentionTensor q,
                          AttentionTensor k, AttentionTensor v, AttentionTensor out, const float* lse,
                          const AttentionMask& mask, AttentionTensor dq, AttentionTensor dk, AttentionTensor dv,
                          void* workspace, cudaStream_t stream) {
  if (attention_unsupported(shape) != nullptr) return cudaErrorInvalidValue;
  if (shape.batch * shape.heads == 0 || shape.q_len + shape.k_len == 0) return cudaSuccess;
  Params p = make_params(shape, mask);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.dout = dout;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.lse = const_cast<float*>(lse);
  p.delta = static_cast<float*>(workspace);
  const int bytes = element_bytes(dtype);
  p.vec16 = allows_vec16(q, bytes, shape.batch, shape.heads, shape.q_len) &&
            allows_vec16(k, bytes, shape.batch, shape.kv_heads, shape.k_len) &&
            allows_vec16(v, bytes, shape.batch, shape.kv_heads, shape.k_len) &&
            allows_vec16(out, bytes, shape.batch, shape.heads, shape.q_len) &&
            allows_vec16(dout, bytes, shape.batch, shape.heads, shape.q_len) &&
            allows_vec16(dq, bytes, shape.batch, shape.heads, shape.q_len) &&
            allows_vec16(dk, bytes, shape.batch, shape.kv_heads, shape.k_len) &&
            allows_vec16(dv, bytes, shape.batch, shape.kv_heads, shape.k_len);
  return dispatch<BwdLaunch>(dtype, shape, p, stream);
}

}  // namespace lmrt::cuda
