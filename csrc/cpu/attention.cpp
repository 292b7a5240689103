// Flash-style attention forward and backward on the CPU (the contract is in attention.h).
//
// Algorithm: FlashAttention's blocked online softmax (Dao et al., 2022). The forward takes kQueryBlock query rows
// at a time and walks the keys kKeyBlock at a time: S = Q K^T for the block pair (a gemm), the running row max m
// and row sum l updated from it, P = exp(scale S - m) added into O = O * exp(m_old - m) + P V (a second gemm); at
// the end O / l, and lse = m + log(l) kept for the backward. The backward recomputes P = exp(scale S - lse) block
// by block and, with dP = dO V^T, delta = rowsum(dO * O) and dS = P (dP - delta), accumulates dV += P^T dO,
// dK += scale dS^T Q and dQ += scale dS K.
//
// Memory: O(length). No q_len x k_len matrix is formed: scores exist a kQueryBlock x kKeyBlock block at a time, and
// each thread holds operand copies of one head's rows (transposed where a gemm needs that layout).
// FLOPs: 4 B H Lq Lk D forward (two gemms per block pair) and 10 B H Lq Lk D backward (five: S, dP, dV, dK, dQ),
// about half of that causal, whose fully hidden blocks are skipped.
// Bound: gemm throughput in float32. The block products run in oneDNN's brgemm microkernel (ATen's
// cpublas::brgemm; without oneDNN, BLAS sgemm); the score passes (scale, mask, max, exp, sum) are SIMD. Operands are
// float32, or bfloat16 for bfloat16 inputs where the CPU has a bfloat16 brgemm kernel (then P and dS are rounded to
// bfloat16 for the products they feed, as in FlashAttention): on the benchmarks' Xeon that took the 2x4x1024x64
// forward from 8.2 to 4.9 ms, and to 3.7 ms with the right operands in the VNNI layout those kernels read (see
// Layout), and the backward from 17.2 to 10.4 ms, and to 8.0 ms with VNNI operands (P and dS interleaved by row
// pairs as they are rounded). There, on AMX, the score passes then took over twice the products' time. They now
// take exp_nonpositive's 12 instructions a vector (vec_math.h; exp_u20 takes 19), round P and dS to bfloat16 with
// AVX512-BF16's vcvtne2ps2bf16 where the CPU has it (one instruction for 32 values; at::vec's rounding is integer
// arithmetic), find the row maximum with one vmaxps a vector, and K^T and V are relaid as 32-bit words: forward
// 3.5 -> 2.6 ms, backward 7.1 -> 6.1 ms, and the forward's products and score passes now take about equal time.
//
// Parallelism. Forward: (batch, head, query block) tasks. Backward: (batch, kv head, key chunk) tasks; a task owns
// its keys' dK and dV (all query heads of the group and all query rows feed them) and adds its share of dQ into a
// float32 buffer of its chunk; the chunks' buffers are summed in chunk order afterwards. No element has two
// writers, and the results do not depend on scheduling (the chunk count follows the thread count, so the dQ
// summation order does too). Keys are split into chunks only when batch x kv heads alone would leave threads idle.
// Build with -fopenmp: under ATen's OpenMP backend at::parallel_for's parallel region is in a header, and without
// the flag it runs on one thread.
//
// SIMD: the score passes use at::vec, so they take the registers of the CPU capability the extension is built for
// (setup.py's CPU_CAPABILITY flags, as ATen builds its own kernels per capability). A build for the DEFAULT
// capability works anywhere but pays for it: its exp is a scalar libm call, and the forward measured 3.6x slower.

#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include "dispatch.h"
#include "float_rows.h"
#include "vec_math.h"

namespace lmrt::cpu {
namespace {

// Query rows and keys per block, tuned on an AVX-512 Xeon (64 x 128 to 256 x 512 measured, at 256 to 2048
// tokens, head dim 64): the 128 KiB float score block and the key block's operands stay in L2, long key blocks
// amortize the per-row softmax bookkeeping, and 64 query rows keep the causal diagonal's wasted work small and
// give the threads enough tasks.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 512;
// The backward wants at least this many tasks per thread before it splits keys into chunks.
constexpr int64_t kTasksPerThread = 2;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------------------
// Score passes.

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = Vec::size();

// One query row's scores over one key block.
struct ScoreRow {
  const float* s;     // the row's raw scores q.k
  int64_t n;          // keys in the block
  int64_t visible;    // how many of them, from the first, pass causality
  const float* bias;  // the mask's row (n floats), or null
  float scale;
};

// x = scale s + bias, rounded to float32, over the row's keys [j, j + kWidth): one multiply without a mask, one
// fused multiply-add with one.
static inline Vec score_values(const ScoreRow& row, int64_t j) {
  const Vec s = Vec::loadu(row.s + j);
  if (row.bias == nullptr) return s * Vec(row.scale);
  return at::vec::fmadd(s, Vec(row.scale), Vec::loadu(row.bias + j));
}

// x over the row's keys [j, j + count), count <= kWidth; the lanes past count are 0 or the bias's, for the caller
// to set.
static inline Vec score_values(const ScoreRow& row, int64_t j, int64_t count) {
  const Vec s = Vec::loadu(row.s + j, count);
  if (row.bias == nullptr) return s * Vec(row.scale);
  return at::vec::fmadd(s, Vec(row.scale), Vec::loadu(row.bias + j, count));
}

// x - shift over the row's keys [j, j + kWidth), the shift the row max (forward) or lse (backward). x is the
// rounded value the max was taken over, so the max's own key gets exp(0) = 1 and no key's x - max is positive. A
// fused multiply-add of the exact product, scale s - max, saves an instruction but is off from the rounded x by up
// to half an ulp of x: past |max| ~ 2^31 (scores of 1e12, or q and k near 1e6 at the default scale, which
// F.scaled_dot_product_attention takes) that is more than 88 either way, and exp of the max's own key overflowed
// to inf or underflowed to 0, which made the row NaN (inf / inf or 0 / 0), forward and backward. Clamping that
// fused argument at 0 costs the same instruction and fixes only the overflow.
static inline Vec scores(const ScoreRow& row, int64_t j, float shift) {
  return score_values(row, j) - Vec(shift);
}

// x - shift over the row's keys [j, j + count), count <= kWidth, and -inf in the lanes past count.
static inline Vec scores(const ScoreRow& row, int64_t j, int64_t count, float shift) {
  return Vec::set(Vec(-kInf), score_values(row, j, count) - Vec(shift), count);
}

static inline float max_lane(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}

static inline float sum_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>(std::plus<Vec>(), v);
}

// The largest x over the row's visible keys that is not NaN (-inf if none), by clamp_min(max, x), which keeps max
// when x is NaN: one vmaxps a vector where a NaN-propagating maximum takes four. A NaN x still makes its row NaN, as
// exp(NaN) does in exp_row. Four running maxima, so that the loop is not bound by the latency of one chain.
static float visible_max(const ScoreRow& row) {
  Vec m0(-kInf), m1(-kInf), m2(-kInf), m3(-kInf);
  int64_t j = 0;
  for (; j + 4 * kWidth <= row.visible; j += 4 * kWidth) {
    m0 = at::vec::clamp_min(m0, score_values(row, j));
    m1 = at::vec::clamp_min(m1, score_values(row, j + kWidth));
    m2 = at::vec::clamp_min(m2, score_values(row, j + 2 * kWidth));
    m3 = at::vec::clamp_min(m3, score_values(row, j + 3 * kWidth));
  }
  for (; j < row.visible; j += kWidth) {
    const int64_t count = std::min(kWidth, row.visible - j);
    m0 = at::vec::clamp_min(m0, Vec::set(Vec(-kInf), score_values(row, j, count), count));
  }
  return max_lane(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// Whether any visible x is NaN.
static bool any_visible_nan(const ScoreRow& row) {
  for (int64_t j = 0; j < row.visible; ++j) {
    if (std::isnan(row.s[j] * row.scale + (row.bias == nullptr ? 0.0f : row.bias[j]))) return true;
  }
  return false;
}

// p = exp(x - m) over the row's keys, 0 for the hidden ones, to p[0, n) (which may be the scores themselves); returns
// the sum of p. Two keys' vectors per step, for two running sums and one pass of the loop on short causal rows.
static float exp_row(const ScoreRow& row, float m, float* p) {
  Vec sum0(0.0f), sum1(0.0f);
  for (int64_t j = 0; j < row.visible; j += 2 * kWidth) {
    const int64_t count = std::min(2 * kWidth, row.visible - j);
    const Vec lo = count >= kWidth ? scores(row, j, m) : scores(row, j, count, m);
    const Vec hi = count == 2 * kWidth ? scores(row, j + kWidth, m)
                   : count > kWidth    ? scores(row, j + kWidth, count - kWidth, m)
                                       : Vec(-kInf);
    const Vec p_lo = exp_nonpositive(lo), p_hi = exp_nonpositive(hi);  // exp(-inf) = 0 past count
    p_lo.store(p + j, static_cast<int>(std::min(count, kWidth)));
    if (count > kWidth) p_hi.store(p + j + kWidth, static_cast<int>(count - kWidth));
    sum0 += p_lo;
    sum1 += p_hi;
  }
  std::fill(p + row.visible, p + row.n, 0.0f);
  return sum_lanes(sum0 + sum1);
}

// Forward online-softmax step of one query row over one key block: writes p = exp(scale s + bias - m) to p[0, n) (0
// for hidden keys; p may be the scores themselves) under the updated running max *m; updates the running sum *l; and
// returns exp(m_old - m), the factor by which the row's output accumulator must be rescaled.
static float online_softmax_row(const ScoreRow& row, float* m, float* l, float* p) {
  const float m_old = *m;
  float m_new = std::max(m_old, visible_max(row));  // NaN once a block had a NaN x and no other (see below)
  if (m_new == -kInf) {
    if (!any_visible_nan(row)) {  // no key seen yet: p = 0, and the accumulator (still 0) needs no rescaling
      std::fill(p, p + row.n, 0.0f);
      return 1.0f;
    }
    m_new = std::numeric_limits<float>::quiet_NaN();  // x NaN or -inf: the row is NaN, from here on too
  }
  const float sum = exp_row(row, m_new, p);
  const float alpha = std::exp(m_old - m_new);
  *m = m_new;
  *l = *l * alpha + sum;
  return alpha;
}

// Backward step of one query row over one key block: with dp[0, n) = dO.v on entry, writes p = exp(scale s + bias -
// lse) to p[0, n) (0 for hidden keys, and for every key when lse = +inf) and overwrites dp with dS = p (dp - delta).
static void softmax_grad_row(const ScoreRow& row, float* p, float* dp, float lse, float delta) {
  for (int64_t j = 0; j < row.visible; j += kWidth) {
    const int64_t count = std::min(kWidth, row.visible - j);
    const Vec p_j = exp_nonpositive(scores(row, j, count, lse));
    const Vec ds = p_j * (Vec::loadu(dp + j, count) - Vec(delta));
    p_j.store(p + j, static_cast<int>(count));
    ds.store(dp + j, static_cast<int>(count));
  }
  std::fill(p + row.visible, p + row.n, 0.0f);
  std::fill(dp + row.visible, dp + row.n, 0.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks and layouts.

// How a gemm's right operand B (k x n, depth k) is laid out with leading dimension ld. kRowMajor: element (i, j) at
// i * ld + j. kVnni, for bfloat16: pairs of depth rows interleaved, [k / 2][ld][2] with the depth padded to even by a
// zero row, the layout oneDNN's bfloat16 brgemm kernels (AMX, AVX512-BF16) read directly; given B row-major they
// go to BLAS, which repacks it on every call: measured on the benchmarks' Xeon (AMX), one core, 64 x 512 x 64 (Q K^T)
// 812 vs 432 GFLOPS and 64 x 64 x 512 (P V) 1676 vs 487.
enum class Layout { kRowMajor, kVnni };

template <Layout layout>
static inline int64_t b_offset(int64_t i, int64_t j, int64_t ld) {
  return layout == Layout::kVnni ? (i / 2) * 2 * ld + 2 * j + i % 2 : i * ld + j;
}

// The depth of a product whose right operand has this layout: k, or k rounded up to even for kVnni.
template <Layout layout>
static inline int64_t product_depth(int64_t k) {
  return layout == Layout::kVnni ? k + k % 2 : k;
}

// C (m x n) = A (m x k) B (k x n), plus C when `accumulate`; A row-major, B in `layout`, with leading dims, float32
// or bfloat16 operands and a float32 C. Through cpublas::brgemm, which libtorch exports (its gemm is not): float32
// operands, and bfloat16 ones with B in kVnni, run a oneDNN brgemm microkernel, JIT-compiled and cached per shape
// (float32 measured 165-195 GFLOPS on one AVX-512 core, faster than sgemm on these small blocks).
template <Layout layout, typename T>
static void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, float* c,
                 int64_t ldc, bool accumulate) {
  static_assert(layout == Layout::kRowMajor || std::is_same_v<T, at::BFloat16>, "VNNI operands are bfloat16");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: brgemm does not take k = 0
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    }
    return;
  }
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, layout == Layout::kVnni);
}

// Whether bfloat16 inputs multiply in bfloat16: where the CPU multiplies bfloat16 in hardware (AMX, or AVX512-BF16's
// vdpbf16ps) and ATen's brgemm runs oneDNN's bfloat16 kernel for it; elsewhere they are converted to float32 (oneDNN
// would emulate the products on other AVX-512 CPUs). ATen runs that kernel where oneDNN's ISA is AVX-512 or better and
// its microkernel API was built, and raises otherwise, so one small product is tried once (cpublas::could_pack, the
// test before, holds only with AMX: it missed AVX512-BF16 CPUs). torch.backends.mkldnn.enabled = False turns the
// kernel off in ATen, and the bfloat16 products here with it. On the benchmarks' Xeon (AMX), one core: 360-760
// GFLOPS with a row-major B, 810-1850 with a VNNI one, against 165-195 in float32. On an AMD EPYC of the Zen 4
// generation (AVX512-BF16), 2 cores: the 2x4x1024x64 forward went from 11.4 to 6.9 ms.
static bool bfloat16_gemm_available() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool kernel_runs = [] {
    if (!cpu_has_avx512_bf16() && !at::native::cpublas::could_pack(at::kBFloat16)) return false;  // the latter: AMX
    // C (1 x 16) = A (1 x 2) B (2 x 16, VNNI: row pairs interleaved), all ones: every element of C is 2.
    const std::vector<at::BFloat16> a(2, at::BFloat16(1.0f)), b(2 * 16, at::BFloat16(1.0f));
    std::vector<float> c(16, 0.0f);
    try {
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a.data(), b.data(), c.data(), /*is_vnni=*/true);
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);
    } catch (const c10::Error&) {
      return false;
    }
    return std::all_of(c.begin(), c.end(), [](float x) { return x == 2.0f; });
  }();
  return kernel_runs;
}

// Calls fn(op_t{}) with the gemm operands' type for inputs of scalar_t: bfloat16 for bfloat16 inputs where
// bfloat16_gemm_available(), else float.
template <typename scalar_t, typename Fn>
static void with_operand_type(const Fn& fn) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (bfloat16_gemm_available()) {
      fn(at::BFloat16{});
      return;
    }
  }
  fn(float{});
}

static int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Buffer lengths rounded to whole cache lines of the narrowest buffer element (bfloat16), so that every buffer
// carved from one allocation, of float32 or of bfloat16 operands, stays 64-byte aligned.
static int64_t padded(int64_t n) {
  constexpr int64_t kLineElements = 64 / sizeof(at::BFloat16);
  return ceil_div(n, kLineElements) * kLineElements;
}

// The t-th of n blocks in the order 0, n-1, 1, n-2, ...: consecutive tasks pair cheap and costly causal blocks, so
// the contiguous task ranges that threads get carry similar work.
static int64_t zigzag(int64_t t, int64_t n) {
  return t % 2 == 0 ? t / 2 : n - 1 - t / 2;
}

// One head of a (batch, heads, rows, cols) tensor as a strided (rows, cols) matrix.
template <typename scalar_t>
struct Matrix {
  const scalar_t* data;
  int64_t row_stride;
  int64_t col_stride;

  // The rows from r0 on.
  Matrix from_row(int64_t r0) const {
    return {data + r0 * row_stride, row_stride, col_stride};
  }
};

template <typename scalar_t>
static Matrix<scalar_t> head_of(const at::Tensor& t, int64_t b, int64_t h) {
  return {t.const_data_ptr<scalar_t>() + b * t.stride(0) + h * t.stride(1), t.stride(2), t.stride(3)};
}

// One row of n floats of a P or dS block rounded to bfloat16 at dst, as a row of a left operand of depth
// product_depth<layout>(n): with a zero after an odd n when the layout pads the depth.
template <Layout layout>
static void round_row_operand(const float* row, int64_t n, at::BFloat16* dst) {
  round_to_bfloat16(row, dst, n);
  if (product_depth<layout>(n) > n) dst[n] = at::BFloat16(0.0f);
}

// The first `rows` x `n` of a kQueryBlock x kKeyBlock float32 block (P or dS) as a row-major left operand of type
// op_t and depth product_depth<layout>(n): the block itself for float operands, else rounded into `scratch`, laid out
// alike.
template <Layout layout, typename op_t>
static const op_t* block_operand(const float* block, int64_t rows, int64_t n, op_t* scratch) {
  if constexpr (std::is_same_v<op_t, float>) {
    return block;
  } else {
    for (int64_t r = 0; r < rows; ++r) round_row_operand<layout>(block + r * kKeyBlock, n, scratch + r * kKeyBlock);
    return scratch;
  }
}

// The same block as a right operand of depth `rows` in `layout` (leading dimension kKeyBlock): for kVnni, rows
// interleaved in pairs and rounded to bfloat16 in registers, with a zero row after an odd `rows`.
template <Layout layout, typename op_t>
static const op_t* right_block_operand(const float* block, int64_t rows, int64_t n, op_t* scratch) {
  if constexpr (layout == Layout::kRowMajor) {
    return block_operand<layout>(block, rows, n, scratch);
  } else {
    for (int64_t r = 0; r < rows; r += 2) {
      const float* even = block + r * kKeyBlock;
      interleave_round_to_bfloat16(even, r + 1 < rows ? even + kKeyBlock : nullptr,
                                   scratch + b_offset<layout>(r, 0, kKeyBlock), n);
    }
    return scratch;
  }
}

// A gemm operand's memory and leading dimension, of float32 or bfloat16.
template <typename T>
struct Rows {
  const T* data;
  int64_t ld;
};

// Rows [r0, r0 + n) of `m` (cols wide) as a row-major left operand of type T and depth `depth` >= cols: the
// tensor's own memory when it is T with unit column stride, rows that do not overlap and depth = cols, else a
// converted copy in `scratch` (n x depth, columns [cols, depth) zero).
template <typename T, typename scalar_t>
static Rows<T> operand_rows(const Matrix<scalar_t>& m, int64_t r0, int64_t n, int64_t cols, int64_t depth,
                            T* scratch) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (m.col_stride == 1 && m.row_stride >= cols && depth == cols) {
      return {m.data + r0 * m.row_stride, m.row_stride};
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = m.data + (r0 + r) * m.row_stride;
    for (int64_t c = 0; c < cols; ++c) scratch[r * depth + c] = static_cast<T>(src[c * m.col_stride]);
    std::fill(scratch + r * depth + cols, scratch + (r + 1) * depth, T(0.0f));
  }
  return {scratch, depth};
}

// Two bfloat16 values as the 32-bit word that holds them in memory, `low` at the lower address (x86 is little-endian).
static inline uint32_t bfloat16_pair(at::BFloat16 low, at::BFloat16 high) {
  return static_cast<uint32_t>(low.x) | static_cast<uint32_t>(high.x) << 16;
}

// Rows [0, rows) of `m` (cols wide) as a right operand of depth `rows` in `layout`, leading dimension cols.
template <Layout layout, typename scalar_t, typename T>
static void pack_rows(const Matrix<scalar_t>& m, int64_t rows, int64_t cols, T* dst) {
  if constexpr (layout == Layout::kVnni && std::is_same_v<scalar_t, T>) {
    if (m.col_stride == 1) {  // bfloat16 as it is: each pair of rows interleaved, a 32-bit word per column
      uint32_t* words = reinterpret_cast<uint32_t*>(dst);
      for (int64_t r = 0; r < rows; r += 2) {
        const scalar_t* even = m.data + r * m.row_stride;
        const scalar_t* odd = even + m.row_stride;
        uint32_t* pair = words + (r / 2) * cols;
        if (r + 1 < rows) {
          for (int64_t c = 0; c < cols; ++c) pair[c] = bfloat16_pair(even[c], odd[c]);
        } else {
          for (int64_t c = 0; c < cols; ++c) pair[c] = bfloat16_pair(even[c], T(0.0f));
        }
      }
      return;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = m.data + r * m.row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[b_offset<layout>(r, c, cols)] = static_cast<T>(src[c * m.col_stride]);
  }
  for (int64_t r = rows; r < product_depth<layout>(rows); ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[b_offset<layout>(r, c, cols)] = T(0.0f);
  }
}

// Rows [r0, r0 + n) of `m` transposed to a right operand of depth `cols` in `layout`, leading dimension ld: element
// (c, r) = m[r0 + r, c]. In tiles of 16 rows, so that each write fills a cache line and the tile's source rows stay
// in L1.
template <Layout layout, typename scalar_t, typename T>
static void transpose_rows(const Matrix<scalar_t>& m, int64_t r0, int64_t n, int64_t cols, T* dst, int64_t ld) {
  constexpr int64_t kTile = 16;
  if constexpr (layout == Layout::kVnni && std::is_same_v<scalar_t, T>) {
    if (m.col_stride == 1 && cols % 2 == 0) {
      // bfloat16 as it is: a VNNI pair is two adjacent columns of one row, so this is a transpose of 32-bit words.
      uint32_t* words = reinterpret_cast<uint32_t*>(dst);
      for (int64_t t0 = 0; t0 < n; t0 += kTile) {
        const int64_t t1 = std::min(n, t0 + kTile);
        for (int64_t c = 0; c < cols; c += 2) {
          const scalar_t* src = m.data + r0 * m.row_stride + c;
          for (int64_t r = t0; r < t1; ++r) {
            words[(c / 2) * ld + r] = bfloat16_pair(src[r * m.row_stride], src[r * m.row_stride + 1]);
          }
        }
      }
      return;
    }
  }
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t t1 = std::min(n, t0 + kTile);
    for (int64_t c = 0; c < cols; ++c) {
      const scalar_t* src = m.data + r0 * m.row_stride + c * m.col_stride;
      for (int64_t r = t0; r < t1; ++r) {
        if constexpr (std::is_same_v<scalar_t, T>) {
          dst[b_offset<layout>(c, r, ld)] = src[r * m.row_stride];  // a copy, not a rounding through float
        } else {
          dst[b_offset<layout>(c, r, ld)] = static_cast<T>(static_cast<float>(src[r * m.row_stride]));
        }
      }
    }
  }
  for (int64_t c = cols; c < product_depth<layout>(cols); ++c) {
    for (int64_t r = 0; r < n; ++r) dst[b_offset<layout>(c, r, ld)] = T(0.0f);
  }
}

// Rows [0, rows) of `m` transposed block by block: block i (rows [i * block, ...)), at dst + i * block *
// product_depth(cols), is a (cols x block) right operand in `layout` with leading dimension `block` (row-major, also
// a left operand).
template <Layout layout, typename scalar_t, typename T>
static void transpose_blocks(const Matrix<scalar_t>& m, int64_t rows, int64_t cols, int64_t block, T* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    transpose_rows<layout>(m, r0, std::min(block, rows - r0), cols, dst + r0 * product_depth<layout>(cols), block);
  }
}

// The mask as float biases for one query row over a key block: the mask's own memory for a float32 row with unit
// stride, else converted into a scratch row (a bool mask to 0 / -inf).
class MaskRows {
 public:
  explicit MaskRows(const at::Tensor& mask) : mask_(mask) {}

  const float* row(int64_t b, int64_t h, int64_t i, int64_t k0, int64_t n, float* scratch) const {
    if (!mask_.defined()) return nullptr;
    const int64_t offset = b * mask_.stride(0) + h * mask_.stride(1) + i * mask_.stride(2) + k0 * mask_.stride(3);
    const int64_t step = mask_.stride(3);
    if (mask_.scalar_type() == at::kFloat && step == 1) return mask_.const_data_ptr<float>() + offset;
    if (mask_.scalar_type() == at::kBool) {
      const bool* src = mask_.const_data_ptr<bool>() + offset;
      for (int64_t j = 0; j < n; ++j) scratch[j] = src[j * step] ? 0.0f : -kInf;
      return scratch;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_.scalar_type(), "lmrt_attention_mask", [&] {
      const scalar_t* src = mask_.const_data_ptr<scalar_t>() + offset;
      for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(src[j * step]);
    });
    return scratch;
  }

 private:
  const at::Tensor& mask_;
};

// Causal visibility: query row i sees keys [0, i + 1 + shift), shift = k_len - q_len for bottom-right alignment.
struct Causal {
  bool enabled;
  int64_t shift;

  // How many of the n keys from k0 row i sees.
  int64_t visible(int64_t i, int64_t k0, int64_t n) const {
    return enabled ? std::clamp<int64_t>(i + 1 + shift - k0, 0, n) : n;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward.

// `op_t`: the gemm operands' type, float, or at::BFloat16 for bfloat16 inputs where bfloat16_gemm_available():
// Q, K and V as they are, and the probabilities P rounded to bfloat16 for P V, as FlashAttention does; the right
// operands, K^T and V, then go in the VNNI layout, packed once per kv head.
template <typename scalar_t, typename op_t>
static void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                    const Causal& causal, float scale, const at::Tensor& out, const at::Tensor& lse) {
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2), dim_v = v.size(3);
  const int64_t group = heads / kv_heads;
  const int64_t q_blocks = ceil_div(q_len, kQueryBlock), k_blocks = ceil_div(k_len, kKeyBlock);
  const MaskRows mask_rows(mask);
  float* lse_data = lse.data_ptr<float>();

  constexpr bool kFloatOperands = std::is_same_v<op_t, float>;
  constexpr Layout kLayout = kFloatOperands ? Layout::kRowMajor : Layout::kVnni;
  // The products' depths: the head dim for S = Q K^T, the key block's length for P V (both padded to even in VNNI).
  const int64_t dim_depth = product_depth<kLayout>(dim);
  at::parallel_for(0, batch * heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch: K^T of the current kv head (key block by key block), its V as a right operand and one
    // query block as a left one when they are not already, the probabilities as op_t (bfloat16 operands only), the
    // score block, the output accumulator and the row statistics.
    const int64_t k_t_size = padded(k_blocks * dim_depth * kKeyBlock);
    const int64_t v_size = padded(product_depth<kLayout>(k_len) * dim_v), q_size = padded(kQueryBlock * dim_depth);
    const int64_t s_size = kQueryBlock * kKeyBlock, p_size = kFloatOperands ? 0 : s_size;
    const int64_t acc_size = padded(kQueryBlock * dim_v), stats_size = padded(kQueryBlock);
    at::Tensor operands = at::empty({k_t_size + v_size + q_size + p_size}, c10::CppTypeToScalarType<op_t>::value);
    op_t* k_t = operands.data_ptr<op_t>();
    op_t* v_scratch = k_t + k_t_size;
    op_t* q_scratch = v_scratch + v_size;
    at::Tensor scratch = at::empty({s_size + acc_size + 2 * stats_size + kKeyBlock}, at::kFloat);
    float* s = scratch.data_ptr<float>();
    float* acc = s + s_size;
    float* row_max = acc + acc_size;
    float* row_sum = row_max + stats_size;
    float* bias_scratch = row_sum + stats_size;
    op_t* p;  // P as op_t: the scores' block for float operands (P replaces them), else a block of its own
    if constexpr (kFloatOperands) {
      p = s;
    } else {
      p = q_scratch + q_size;
    }

    int64_t cached_kv = -1;
    Rows<op_t> v_rows{};  // V of the current kv head as a right operand
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, b = bh / heads, h = bh % heads;
      const int64_t i0 = zigzag(task % q_blocks, q_blocks) * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, q_len - i0);
      const int64_t kv = b * kv_heads + h / group;
      if (kv != cached_kv) {  // consecutive tasks share a kv head: lay it out once
        transpose_blocks<kLayout>(head_of<scalar_t>(k, b, h / group), k_len, dim, kKeyBlock, k_t);
        const Matrix<scalar_t> v_head = head_of<scalar_t>(v, b, h / group);
        if constexpr (kFloatOperands) {
          v_rows = operand_rows<op_t>(v_head, 0, k_len, dim_v, dim_v, v_scratch);
        } else {
          pack_rows<kLayout>(v_head, k_len, dim_v, v_scratch);
          v_rows = {v_scratch, dim_v};
        }
        cached_kv = kv;
      }
      const Rows<op_t> q_rows = operand_rows<op_t>(head_of<scalar_t>(q, b, h), i0, rows, dim, dim_depth, q_scratch);
      // Keys past the last row's causal limit are hidden from every row of the block: no scores for them.
      const int64_t key_end = causal.enabled ? std::clamp<int64_t>(i0 + rows + causal.shift, 0, k_len) : k_len;

      std::fill(acc, acc + rows * dim_v, 0.0f);
      std::fill(row_max, row_max + rows, -kInf);
      std::fill(row_sum, row_sum + rows, 0.0f);
      for (int64_t k0 = 0; k0 < key_end; k0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, key_end - k0), n_depth = product_depth<kLayout>(n);
        gemm<kLayout>(rows, n, dim_depth, q_rows.data, q_rows.ld, k_t + k0 * dim_depth, kKeyBlock, s, kKeyBlock,
                      false);
        for (int64_t r = 0; r < rows; ++r) {
          const ScoreRow row{s + r * kKeyBlock, n, causal.visible(i0 + r, k0, n),
                             mask_rows.row(b, h, i0 + r, k0, n, bias_scratch), scale};
          const float alpha = online_softmax_row(row, row_max + r, row_sum + r, s + r * kKeyBlock);
          if constexpr (!kFloatOperands) round_row_operand<kLayout>(s + r * kKeyBlock, n, p + r * kKeyBlock);
          if (alpha != 1.0f) {
            for (float* a = acc + r * dim_v; a < acc + (r + 1) * dim_v; ++a) *a *= alpha;
          }
        }
        // V's rows from k0 (an even offset, so whole VNNI pairs) are the right operand's first n_depth rows: past n
        // they are the next keys' or the zero pad, and P's padding columns are zero.
        gemm<kLayout>(rows, dim_v, n_depth, p, kKeyBlock, v_rows.data + k0 * v_rows.ld, v_rows.ld, acc, dim_v, true);
      }

      scalar_t* out_block = out.data_ptr<scalar_t>() + b * out.stride(0) + h * out.stride(1) + i0 * out.stride(2);
      for (int64_t r = 0; r < rows; ++r) {
        // A row that saw no key: output 0 and lse +inf, so that the backward's exp(s - lse) is 0.
        const bool empty = row_max[r] == -kInf;
        const float inv_sum = empty ? 0.0f : 1.0f / row_sum[r];
        scalar_t* dst = out_block + r * out.stride(2);
        for (int64_t d = 0; d < dim_v; ++d) dst[d] = static_cast<scalar_t>(acc[r * dim_v + d] * inv_sum);
        lse_data[bh * q_len + i0 + r] = empty ? kInf : row_max[r] + std::log(row_sum[r]);
      }
    }
    if constexpr (!kFloatOperands) {
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);  // the thread's AMX tile state, if it took any
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.

// dst[0, n) = src[0, n) rounded to scalar_t, vectorized (bfloat16 through round_to_bfloat16).
template <typename scalar_t>
static void store_row(const float* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    round_to_bfloat16(src, dst, n);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst (rows x cols, strided) = scale * the transpose of src, given as (cols x block) blocks (see transpose_blocks):
// each row gathered into `row` (cols floats), then stored.
template <typename scalar_t>
static void store_transposed_blocks(const float* src, int64_t rows, int64_t cols, int64_t block, float scale,
                                    scalar_t* dst, int64_t row_stride, float* row) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* block_src = src + (r / block) * cols * block + r % block;
    for (int64_t c = 0; c < cols; ++c) row[c] = scale * block_src[c * block];
    store_row(row, cols, dst + r * row_stride);
  }
}

// dst (rows x cols, strided) = scale * src (rows x cols, contiguous), each row scaled into `row` (cols floats).
template <typename scalar_t>
static void store_rows(const float* src, int64_t rows, int64_t cols, float scale, scalar_t* dst, int64_t row_stride,
                       float* row) {
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::map([scale](const Vec& x) { return x * Vec(scale); }, row, src + r * cols, cols);
    store_row(row, cols, dst + r * row_stride);
  }
}

// `op_t` as in forward: with bfloat16 operands, P and dS are rounded to bfloat16 for the products they feed.
template <typename scalar_t, typename op_t>
static void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& mask, const Causal& causal,
                     float scale, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), k_len = k.size(2), dim_v = v.size(3);
  const int64_t group = heads / kv_heads;
  const int64_t q_blocks = ceil_div(q_len, kQueryBlock), k_blocks = ceil_div(k_len, kKeyBlock);
  // Split each kv head's keys into chunks only as far as needed to give every thread kTasksPerThread tasks.
  const int64_t wanted_chunks =
      ceil_div(kTasksPerThread * at::get_num_threads(), std::max<int64_t>(batch * kv_heads, 1));
  const int64_t chunk_blocks = ceil_div(k_blocks, std::clamp<int64_t>(wanted_chunks, 1, k_blocks));
  const int64_t chunks = ceil_div(k_blocks, chunk_blocks), chunk_len = chunk_blocks * kKeyBlock;
  // Each chunk's dQ share (unscaled), summed in chunk order at the end; with one chunk dQ is written directly.
  const at::Tensor dq_chunks =
      chunks > 1 ? at::empty({chunks, batch, heads, q_len, dim}, q.options().dtype(at::kFloat)) : at::Tensor();
  const MaskRows mask_rows(mask);
  const float* lse_data = lse.const_data_ptr<float>();

  constexpr bool kFloatOperands = std::is_same_v<op_t, float>;
  // Right operands in the VNNI layout for bfloat16 (see Layout), as in the forward; left operands row-major.
  constexpr Layout kLayout = kFloatOperands ? Layout::kRowMajor : Layout::kVnni;
  // The depths of S = Q K^T and dP = dO V^T: the head dims, padded to even in VNNI.
  const int64_t dim_depth = product_depth<kLayout>(dim), dim_v_depth = product_depth<kLayout>(dim_v);
  at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch. Key side, for the chunk: K^T and V^T block by block (the right operands of S = Q K^T and
    // dP = dO V^T), K as the right operand of dQ += dS K, and dK^T and dV^T accumulated block by block. Query side,
    // for one query head: Q and dO as left operands if they are not already, Q^T and dO^T block by block (the left
    // operands of dK^T += Q^T dS and dV^T += dO^T P), delta, and dQ unless it goes to a chunk buffer. Then the
    // score and dP blocks, and with bfloat16 operands P and dS rounded to it: P and dS as right operands, dS also
    // as a left one.
    const int64_t kt_size = padded(chunk_len * dim_depth), vt_size = padded(chunk_len * dim_v_depth);
    const int64_t k_size = padded(chunk_len * dim);
    const int64_t q_size = padded(q_blocks * kQueryBlock * dim_depth);
    const int64_t do_size = padded(q_blocks * kQueryBlock * dim_v_depth);
    const int64_t s_size = kQueryBlock * kKeyBlock, ps_size = kFloatOperands ? 0 : s_size;
    at::Tensor operands = at::empty({kt_size + k_size + vt_size + 2 * q_size + 2 * do_size + 3 * ps_size},
                                    c10::CppTypeToScalarType<op_t>::value);
    op_t* k_t = operands.data_ptr<op_t>();
    op_t* k_scratch = k_t + kt_size;
    op_t* v_t = k_scratch + k_size;
    op_t* q_scratch = v_t + vt_size;
    op_t* q_t = q_scratch + q_size;
    op_t* do_scratch = q_t + q_size;
    op_t* do_t = do_scratch + do_size;
    op_t* p_op = do_t + do_size;
    op_t* ds_op = p_op + ps_size;
    op_t* ds_right_op = ds_op + ps_size;
    at::Tensor scratch = at::empty(
        {kt_size + vt_size + q_size + padded(q_len) + 2 * s_size + kKeyBlock + std::max(dim, dim_v)}, at::kFloat);
    float* dk_t = scratch.data_ptr<float>();
    float* dv_t = dk_t + kt_size;
    float* dq_scratch = dv_t + vt_size;
    float* delta = dq_scratch + q_size;
    float* s = delta + padded(q_len);
    float* dp = s + s_size;
    float* bias_scratch = dp + s_size;
    float* row_scratch = bias_scratch + kKeyBlock;  // a row of dQ, dK or dV on its way out

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bkv = task / chunks, b = bkv / kv_heads, kvh = bkv % kv_heads;
      const int64_t chunk = zigzag(task % chunks, chunks);
      const int64_t c0 = chunk * chunk_len, keys = std::min(chunk_len, k_len - c0);
      const Matrix<scalar_t> k_chunk = head_of<scalar_t>(k, b, kvh).from_row(c0);
      transpose_blocks<kLayout>(k_chunk, keys, dim, kKeyBlock, k_t);
      transpose_blocks<kLayout>(head_of<scalar_t>(v, b, kvh).from_row(c0), keys, dim_v, kKeyBlock, v_t);
      Rows<op_t> k_rows{};  // K as the right operand of dQ += dS K
      if constexpr (kFloatOperands) {
        k_rows = operand_rows<op_t>(k_chunk, 0, keys, dim, dim, k_scratch);
      } else {
        pack_rows<kLayout>(k_chunk, keys, dim, k_scratch);
        k_rows = {k_scratch, dim};
      }
      const int64_t padded_keys = ceil_div(keys, kKeyBlock) * kKeyBlock;  // the last block is whole in the layout
      std::fill(dk_t, dk_t + padded_keys * dim, 0.0f);
      std::fill(dv_t, dv_t + padded_keys * dim_v, 0.0f);

      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        const Matrix<scalar_t> q_head = head_of<scalar_t>(q, b, h), do_head = head_of<scalar_t>(dout, b, h);
        const Matrix<scalar_t> out_head = head_of<scalar_t>(out, b, h);
        const Rows<op_t> q_rows = operand_rows<op_t>(q_head, 0, q_len, dim, dim_depth, q_scratch);
        const Rows<op_t> do_rows = operand_rows<op_t>(do_head, 0, q_len, dim_v, dim_v_depth, do_scratch);
        // Q^T and dO^T: the last block's columns past q_len stay zero, the padding of a depth made even.
        std::fill(q_t, q_t + q_blocks * kQueryBlock * dim, op_t(0.0f));
        std::fill(do_t, do_t + q_blocks * kQueryBlock * dim_v, op_t(0.0f));
        transpose_blocks<Layout::kRowMajor>(q_head, q_len, dim, kQueryBlock, q_t);
        transpose_blocks<Layout::kRowMajor>(do_head, q_len, dim_v, kQueryBlock, do_t);
        for (int64_t i = 0; i < q_len; ++i) {
          const scalar_t* do_row = do_head.data + i * do_head.row_stride;
          const scalar_t* o_row = out_head.data + i * out_head.row_stride;
          if (do_head.col_stride == 1 && out_head.col_stride == 1) {
            const auto product = [](auto x, auto y) { return x * y; };
            delta[i] = sum_floats2(do_row, o_row, dim_v, product, product);
          } else {
            float sum = 0.0f;
            for (int64_t d = 0; d < dim_v; ++d) {
              sum += static_cast<float>(do_row[d * do_head.col_stride]) *
                     static_cast<float>(o_row[d * out_head.col_stride]);
            }
            delta[i] = sum;
          }
        }
        float* dq_acc = chunks > 1 ? dq_chunks.data_ptr<float>() + ((chunk * batch + b) * heads + h) * q_len * dim
                                   : dq_scratch;
        std::fill(dq_acc, dq_acc + q_len * dim, 0.0f);
        const float* lse_row = lse_data + (b * heads + h) * q_len;

        for (int64_t k0 = 0; k0 < keys; k0 += kKeyBlock) {
          const int64_t n = std::min(kKeyBlock, keys - k0), key0 = c0 + k0;
          const op_t* k_t_block = k_t + k0 * dim_depth;
          const op_t* v_t_block = v_t + k0 * dim_v_depth;
          float* dk_t_block = dk_t + k0 * dim;
          float* dv_t_block = dv_t + k0 * dim_v;
          // Query rows before key0 - shift see none of these keys under causality.
          const int64_t first_row = causal.enabled ? std::clamp<int64_t>(key0 - causal.shift, 0, q_len) : 0;
          for (int64_t i0 = first_row / kQueryBlock * kQueryBlock; i0 < q_len; i0 += kQueryBlock) {
            const int64_t rows = std::min(kQueryBlock, q_len - i0);
            // Keys past the last row's causal limit: hidden from every row of the query block, no scores for them.
            const int64_t cols = causal.visible(i0 + rows - 1, key0, n);
            gemm<kLayout>(rows, cols, dim_depth, q_rows.data + i0 * q_rows.ld, q_rows.ld, k_t_block, kKeyBlock, s,
                          kKeyBlock, false);
            gemm<kLayout>(rows, cols, dim_v_depth, do_rows.data + i0 * do_rows.ld, do_rows.ld, v_t_block, kKeyBlock,
                          dp, kKeyBlock, false);
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = i0 + r;
              const ScoreRow row{s + r * kKeyBlock, cols, causal.visible(i, key0, cols),
                                 mask_rows.row(b, h, i, key0, cols, bias_scratch), scale};
              softmax_grad_row(row, s + r * kKeyBlock, dp + r * kKeyBlock, lse_row[i], delta[i]);
            }
            // dV^T += dO^T P and dK^T += Q^T dS over the block's rows, dQ += dS K over its keys (k0 is even, so K's
            // rows from k0 are whole VNNI pairs); where a depth is padded to even, both operands are zero there.
            const int64_t rows_depth = product_depth<kLayout>(rows), cols_depth = product_depth<kLayout>(cols);
            const op_t* p = right_block_operand<kLayout>(s, rows, cols, p_op);
            const op_t* ds_right = right_block_operand<kLayout>(dp, rows, cols, ds_right_op);
            const op_t* ds_left = block_operand<kLayout>(dp, rows, cols, ds_op);
            gemm<kLayout>(dim_v, cols, rows_depth, do_t + i0 * dim_v, kQueryBlock, p, kKeyBlock, dv_t_block, kKeyBlock,
                          true);
            gemm<kLayout>(dim, cols, rows_depth, q_t + i0 * dim, kQueryBlock, ds_right, kKeyBlock, dk_t_block,
                          kKeyBlock, true);
            gemm<kLayout>(rows, dim, cols_depth, ds_left, kKeyBlock, k_rows.data + k0 * k_rows.ld, k_rows.ld,
                          dq_acc + i0 * dim, dim, true);
          }
        }
        if (chunks == 1) {
          store_rows(dq_acc, q_len, dim, scale, dq.data_ptr<scalar_t>() + b * dq.stride(0) + h * dq.stride(1),
                     dq.stride(2), row_scratch);
        }
      }
      store_transposed_blocks(dk_t, keys, dim, kKeyBlock, scale,
                              dk.data_ptr<scalar_t>() + b * dk.stride(0) + kvh * dk.stride(1) + c0 * dk.stride(2),
                              dk.stride(2), row_scratch);
      store_transposed_blocks(dv_t, keys, dim_v, kKeyBlock, 1.0f,
                              dv.data_ptr<scalar_t>() + b * dv.stride(0) + kvh * dv.stride(1) + c0 * dv.stride(2),
                              dv.stride(2), row_scratch);
    }
    if constexpr (!kFloatOperands) {
      at::native::cpublas::brgemm_release(/*is_vnni=*/true);
    }
  });

  if (chunks > 1) {
    // dQ = scale * the chunks' shares, summed in chunk order.
    const float* shares = dq_chunks.const_data_ptr<float>();
    const int64_t chunk_stride = batch * heads * q_len * dim;
    at::parallel_for(0, batch * heads * q_len, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> sums(dim);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / q_len, b = bh / heads, h = bh % heads, i = row % q_len;
        for (int64_t d = 0; d < dim; ++d) {
          float sum = 0.0f;
          for (int64_t c = 0; c < chunks; ++c) sum += shares[c * chunk_stride + row * dim + d];
          sums[d] = scale * sum;
        }
        store_row(sums.data(), dim, dq.data_ptr<scalar_t>() + b * dq.stride(0) + h * dq.stride(1) + i * dq.stride(2));
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& mask, bool causal, bool bottom_right, double scale,
                                                 bool heads_first_out) {
  TORCH_INTERNAL_ASSERT(q.dim() == 4 && k.dim() == 4 && v.dim() == 4);
  TORCH_INTERNAL_ASSERT(q.size(1) == 0 || (k.size(1) > 0 && q.size(1) % k.size(1) == 0));
  const int64_t batch = q.size(0), heads = q.size(1), q_len = q.size(2), dim_v = v.size(3);
  at::Tensor out = heads_first_out ? at::empty({batch, heads, q_len, dim_v}, q.options())
                                   : at::empty({batch, q_len, heads, dim_v}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({batch, heads, q_len}, q.options().dtype(at::kFloat));
  const Causal visibility{causal, bottom_right ? k.size(2) - q_len : 0};
  LMRT_DISPATCH_KERNEL_TYPES(q.scalar_type(), "lmrt_attention_fwd", [&] {
    with_operand_type<scalar_t>([&](auto operand) {
      forward<scalar_t, decltype(operand)>(q, k, v, mask, visibility, static_cast<float>(scale), out, lse);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const at::Tensor& mask, bool causal, bool bottom_right,
                                                             double scale) {
  TORCH_INTERNAL_ASSERT(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && dout.dim() == 4 && out.dim() == 4);
  TORCH_INTERNAL_ASSERT(q.size(1) == 0 || (k.size(1) > 0 && q.size(1) % k.size(1) == 0));
  TORCH_INTERNAL_ASSERT(lse.scalar_type() == at::kFloat && lse.is_contiguous());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (k.size(2) == 0) {  // no keys: dq = 0 (dk and dv are empty)
    dq.zero_();
    return {dq, dk, dv};
  }
  const Causal visibility{causal, bottom_right ? k.size(2) - q.size(2) : 0};
  LMRT_DISPATCH_KERNEL_TYPES(q.scalar_type(), "lmrt_attention_bwd", [&] {
    with_operand_type<scalar_t>([&](auto operand) {
      backward<scalar_t, decltype(operand)>(dout, q, k, v, out, lse, mask, visibility, static_cast<float>(scale), dq,
                                            dk, dv);
    });
  });
  return {dq, dk, dv};
}

}  // namespace lmrt::cpu
