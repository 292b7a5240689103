// Non-temporal (streaming) stores for the CPU kernels' outputs, and when to use them.
//
// A plain store to a line that is not in the cache reads the line from memory first (read for ownership) and keeps
// it in the caches, evicting other lines. A non-temporal store writes the line to memory without either. That is a
// gain when the output would leave the caches before anyone read it, and then the inputs keep the cache too: a call
// that streams its inputs from memory moves fewer bytes: a softmax backward's dy, y and dx 3 transfers, not 4; a
// forward's x and y 2, not 3. The kernels stream when a call moves more bytes (read and written)
// than half the last-level cache, which also holds whatever else the program touches: the softmax, LayerNorm and
// RMSNorm forwards (y) and backwards (dx). Measured on the Zen 4 EPYC (32 MiB L3), ATen's time, block-interleaved:
// softmax backward 1024 x 8192 float32 0.88x -> 0.73x, 1024 x 4096 0.94x -> 0.62x, 1024 x 2048 (25 MiB moved)
// 1.07x -> 0.75-0.96x; LayerNorm forward 1024 x 4096 float32 0.79-1.00x -> 0.52-0.61x, 8192 0.90-0.97x ->
// 0.80-0.88x, bfloat16 8192 0.79x -> 0.69x; LayerNorm backward 1024 x 2048 float32 0.91x -> 0.75x, 4096 0.80-0.85x
// -> 0.64-0.70x, 8192 0.78-0.86x -> 0.71-0.72x; softmax forward float32 4096 0.63-0.72x -> 0.53-0.64x, 8192
// 0.77-0.83x -> 0.72-0.73x. A 1024 x 1024 softmax backward (12.6 MiB, under the threshold) streamed lost 4%, its
// output being still in L3 when read back.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>
#include <type_traits>

#include "float_rows.h"

namespace lmrt::cpu {

// The bytes of the largest cache of CPU 0 (its last level: the L3 of the cores that share it), from Linux's sysfs;
// 0 where that is not readable. (sysconf's _SC_LEVEL3_CACHE_SIZE said 320 MiB on the 32 MiB Zen 4 EPYC.)
inline int64_t read_last_level_cache_bytes() {
  int64_t largest = 0;
  for (int index = 0;; ++index) {
    std::ifstream size_file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    int64_t size = 0;
    std::string unit;
    if (!(size_file >> size)) {
      return largest;
    }
    size_file >> unit;  // "K" (what Linux writes), "M" or "G"; none for bytes
    const int64_t scale = unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : unit == "G" ? 1024 * 1024 * 1024 : 1;
    largest = std::max(largest, size * scale);
  }
}

inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = read_last_level_cache_bytes();
  return bytes;
}

// Whether a kernel writes its output with streaming stores: the build has them (x86 with AVX2 or AVX-512) and the
// call moves more bytes (read and written) than half the last-level cache, as far as its size is known.
inline bool use_streaming_stores(int64_t bytes_moved) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 && bytes_moved > cache / 2;
#else
  (void)bytes_moved;
  return false;
#endif
}

// The alignment streaming stores need of their destination: one vector's bytes.
constexpr int64_t kStreamAlignment = sizeof(FloatVec);

inline bool stream_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kStreamAlignment == 0; }

// One float32 vector by a streaming store; `dst` is kStreamAlignment-aligned and use_streaming_stores was true (so
// the build has them). The writing thread calls end_streaming_stores() before another reads what it wrote.
inline void stream_vector(float* dst, const FloatVec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(dst, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(dst, v);
#else
  v.store(dst);
#endif
}

// One vector of float16/bfloat16 elements by a streaming store; `dst` as stream_vector's.
template <typename T>
inline void stream_vector(T* dst, const at::vec::Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
#else
  v.store(dst);
#endif
}

// store_floats with streaming stores; `dst` as stream_vector's.
template <bool kHardwareRounding = false, typename T>
inline void stream_floats(T* dst, const FloatVec& a, const FloatVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    stream_vector(dst, a);
    stream_vector(dst + FloatVec::size(), b);
  } else {
    stream_vector(dst, narrow_floats<kHardwareRounding, T>(a, b));
  }
}

// store_floats, or stream_floats for kStream (kHardwareRounding: as in narrow_floats).
template <bool kStream, bool kHardwareRounding = false, typename T>
inline void write_floats(T* dst, const FloatVec& a, const FloatVec& b) {
  if constexpr (kStream) {
    stream_floats<kHardwareRounding>(dst, a, b);
  } else {
    store_floats<kHardwareRounding>(dst, a, b);
  }
}

// One float32 vector, as write_floats writes two.
template <bool kStream>
inline void write_vector(float* dst, const FloatVec& v) {
  if constexpr (kStream) {
    stream_vector(dst, v);
  } else {
    v.store(dst);
  }
}

// write_row(std::true_type{}) where `stream` (a row's choice: use_streaming_stores, and stream_aligned at its start),
// else write_row(std::false_type{}): a row's loop is compiled once for each, and its stores (write_floats<
// decltype(tag)::value>) take no branch each. One per store made the 1024 x 768 float32 LayerNorm forward, which
// does not stream, 1.3-1.5x slower on the Zen 4 EPYC.
template <typename WriteRow>
inline void write_row_streamed_if(bool stream, const WriteRow& write_row) {
  if (stream) {
    write_row(std::true_type{});
  } else {
    write_row(std::false_type{});
  }
}

// Orders the calling thread's streaming stores before its later stores (streaming stores are weakly ordered), so
// that a thread that synchronizes with it afterwards (the end of at::parallel_for) sees them.
inline void end_streaming_stores() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace lmrt::cpu
