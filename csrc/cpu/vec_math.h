// Vector math for the CPU kernels' hot loops, where at::vec's general versions do more than these inputs need:
// exp over x <= 0 (a softmax's exp(x - max)), and float32 -> bfloat16 rounding in hardware where the CPU has it.
#pragma once

#include <cstdint>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

namespace lmrt::cpu {

// exp(x) for the x <= 0 of a softmax's exp(x - max), with exp(-inf) = 0 and exp(NaN) = NaN; right up to x = 88 too.
// In a build for AVX-512 or AVX2 (12 or 16 instructions to exp_u20's 19 or 25): n = round(x log2 e), r = x - n ln 2
// in two parts (so r is near exact), e^r by a degree-5 polynomial fitted on |r| <= ln(2) / 2, then times 2^n.
// Relative error at most 1.8e-7 (about 3 units of 2^-24) over [-87, 0], simulated in float32 against float64 exp;
// exp_u20 allows 20 units. Results under exp(-87) = 1.6e-38 are 0, as in exp_u20: computing subnormals costs a
// microcode assist per instruction on Intel cores (measured: the causal forward at length 256, whose hidden keys are
// -inf, went 15% slower), and no softmax sum notices them. Other builds use exp_u20.
inline at::vec::Vectorized<float> exp_nonpositive(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using Vec = at::vec::Vectorized<float>;
  constexpr float kSmallest = -87.0f;
  // clamp_min keeps x when it is NaN (vmaxps returns its second operand then).
  const Vec clamped = at::vec::clamp_min(x, Vec(kSmallest));
  const Vec n = (clamped * Vec(1.44269504088896341f)).round();  // to nearest, ties to even
  // ln 2 = kLn2High + kLn2Low, kLn2High with 16 significant bits, so that n kLn2High is exact for |n| < 2^8.
  constexpr float kLn2High = 0.693145751953125f, kLn2Low = 1.42860682030941723212e-6f;
  Vec r = at::vec::fmadd(n, Vec(-kLn2High), clamped);
  r = at::vec::fmadd(n, Vec(-kLn2Low), r);
  Vec p(0.008312524296343327f);
  p = at::vec::fmadd(p, r, Vec(0.041890114545822144f));
  p = at::vec::fmadd(p, r, Vec(0.16667114198207855f));
  p = at::vec::fmadd(p, r, Vec(0.499992311000824f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  p = at::vec::fmadd(p, r, Vec(1.0f));
  // p 2^n in the lanes kept (x >= kSmallest, or NaN: unordered compares are true), 0 in the others.
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 kept = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kSmallest), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(kept, p, n);
#else
  // 2^n built in the exponent field (n >= -126 after the clamp, so it is normal), where AVX-512 has vscalefps.
  const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(kSmallest), _CMP_NLT_UQ);
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(exponent)), kept);
#endif
#else
  return x.exp_u20();
#endif
}

// float32 -> bfloat16 rounding (to nearest even) of whole rows. AVX512-BF16's vcvtne2ps2bf16 rounds 32 floats in one
// instruction where at::vec's conversion takes about twenty integer ones; it also flushes subnormal inputs to zero
// (magnitudes under 1.2e-38, which no kernel here keeps apart from zero). Used where the CPU has it and the build is
// for AVX-512 by a compiler that knows the instruction (GCC 10, Clang 9 and later); at::vec's conversion elsewhere.
#if defined(CPU_CAPABILITY_AVX512) && (defined(__clang__) ? __clang_major__ >= 9 : defined(__GNUC__) && __GNUC__ >= 10)
#define LMRT_HAS_BFLOAT16_ROUNDING_PATH 1

__attribute__((target("avx512bf16"))) inline __m512i round_pairs_avx512bf16(const __m512& low, const __m512& high) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
}

__attribute__((target("avx512bf16"))) inline void round_to_bfloat16_avx512bf16(const float* src, c10::BFloat16* dst,
                                                                              int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm512_storeu_si512(dst + i, round_pairs_avx512bf16(_mm512_loadu_ps(src + i), _mm512_loadu_ps(src + i + 16)));
  }
  if (i < n) {
    const int64_t rest = n - i;
    const __mmask16 low = rest >= 16 ? 0xffff : (1u << rest) - 1, high = rest > 16 ? (1u << (rest - 16)) - 1 : 0;
    const __m512i rounded =
        round_pairs_avx512bf16(_mm512_maskz_loadu_ps(low, src + i), _mm512_maskz_loadu_ps(high, src + i + 16));
    _mm512_mask_storeu_epi16(dst + i, (__mmask32{1} << rest) - 1, rounded);
  }
}

// The whole vectors' part of interleave_round_to_bfloat16 below; returns how many columns it did.
__attribute__((target("avx512bf16"))) inline int64_t interleave_round_to_bfloat16_avx512bf16(const float* even,
                                                                                            const float* odd,
                                                                                            c10::BFloat16* dst,
                                                                                            int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const auto [low, high] = at::vec::interleave2(Vec::loadu(even + c), odd ? Vec::loadu(odd + c) : Vec(0.0f));
    _mm512_storeu_si512(dst + 2 * c, round_pairs_avx512bf16(low, high));
  }
  return c;
}
#endif

// Whether this CPU has AVX512-BF16 (vcvtne2ps2bf16, vdpbf16ps; so does every CPU with AMX), as far as the compiler
// can ask (GCC 10, Clang 9 and later, on x86).
inline bool cpu_has_avx512_bf16() {
#if (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__clang__) ? __clang_major__ >= 9 : defined(__GNUC__) && __GNUC__ >= 10)
  static const bool available = __builtin_cpu_supports("avx512bf16");
  return available;
#else
  return false;
#endif
}

// Whether round_to_bfloat16 and interleave_round_to_bfloat16 take the AVX512-BF16 path on this CPU.
inline bool has_bfloat16_rounding() {
#if defined(LMRT_HAS_BFLOAT16_ROUNDING_PATH)
  return cpu_has_avx512_bf16();
#else
  return false;
#endif
}

// dst[i] = src[i] rounded to bfloat16, i < n.
inline void round_to_bfloat16(const float* src, c10::BFloat16* dst, int64_t n) {
#if defined(LMRT_HAS_BFLOAT16_ROUNDING_PATH)
  if (has_bfloat16_rounding()) {
    round_to_bfloat16_avx512bf16(src, dst, n);
    return;
  }
#endif
  at::vec::convert(src, dst, n);
}

// dst[2 c] = even[c] and dst[2 c + 1] = odd[c] (0 for a null odd), rounded to bfloat16, c < n.
inline void interleave_round_to_bfloat16(const float* even, const float* odd, c10::BFloat16* dst, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  int64_t c = 0;
#if defined(LMRT_HAS_BFLOAT16_ROUNDING_PATH)
  if (has_bfloat16_rounding()) c = interleave_round_to_bfloat16_avx512bf16(even, odd, dst, n);
#endif
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const auto [low, high] = at::vec::interleave2(Vec::loadu(even + c), odd ? Vec::loadu(odd + c) : Vec(0.0f));
    at::vec::convert_from_float<c10::BFloat16>(low, high).store(dst + 2 * c);
  }
  for (; c < n; ++c) {
    dst[2 * c] = static_cast<c10::BFloat16>(even[c]);
    dst[2 * c + 1] = static_cast<c10::BFloat16>(odd ? odd[c] : 0.0f);
  }
}

}  // namespace lmrt::cpu
