// Row conversions between the stored dtype and the fp32/fp64 accumulator, fast for
// fp16/bf16: c10::Half's scalar conversion is a branchy function call per element, which
// kept the fp16 dense backward far from its memory traffic (bench/NOTES-cpu.md). bf16 <-> fp32 is bit arithmetic the
// compiler vectorises; fp16 uses F16C when the CPU has it (checked once at run time, so
// the binary still runs on any x86-64).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace embedding_ext::cpu {

// acc[d] (+)= float(src[d]) for d < dim.
template <bool kAdd, typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* acc, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t v = static_cast<acc_t>(src[d]);
    acc[d] = kAdd ? acc[d] + v : v;
  }
}

// dst[d] = scalar_t(acc[d] * scale), rounded to nearest even.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* acc, acc_t scale, scalar_t* dst, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d] * scale);
}

// --- bf16: the top half of an fp32.
template <bool kAdd>
inline void load_row(const c10::BFloat16* src, float* acc, int64_t dim) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t d = 0; d < dim; ++d) {
    const uint32_t widened = static_cast<uint32_t>(bits[d]) << 16;
    float v;
    std::memcpy(&v, &widened, sizeof(v));
    acc[d] = kAdd ? acc[d] + v : v;
  }
}

template <>
inline void store_row(const float* acc, float scale, c10::BFloat16* dst, int64_t dim) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t d = 0; d < dim; ++d) {
    const float v = acc[d] * scale;
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    out[d] = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);  // keep NaN a NaN
  }
}

// --- fp16: F16C where available.
#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) inline void load_row_f16c(const c10::Half* src, float* acc,
                                                              int64_t dim, bool add) {
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
    if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(acc + d));
    _mm256_storeu_ps(acc + d, v);
  }
  for (; d < dim; ++d) acc[d] = (add ? acc[d] : 0.f) + static_cast<float>(src[d]);
}

__attribute__((target("avx,f16c"))) inline void store_row_f16c(const float* acc, float scale,
                                                               c10::Half* dst, int64_t dim) {
  int64_t d = 0;
  const __m256 s = _mm256_set1_ps(scale);
  for (; d + 8 <= dim; d += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(acc + d), s);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; d < dim; ++d) dst[d] = static_cast<c10::Half>(acc[d] * scale);
}

inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return yes;
}

template <bool kAdd>
inline void load_row(const c10::Half* src, float* acc, int64_t dim) {
  if (has_f16c()) return load_row_f16c(src, acc, dim, kAdd);
  for (int64_t d = 0; d < dim; ++d) {
    const float v = static_cast<float>(src[d]);
    acc[d] = kAdd ? acc[d] + v : v;
  }
}

template <>
inline void store_row(const float* acc, float scale, c10::Half* dst, int64_t dim) {
  if (has_f16c()) return store_row_f16c(acc, scale, dst, dim);
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<c10::Half>(acc[d] * scale);
}
#endif

}  // namespace embedding_ext::cpu
