// The vectors of the bag pooling loops (bag_pool.h): GCC vector types of the accumulator, and
// the loads, stores and broadcasts that each instruction-set copy (isa.h) compiles them to.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "isa.h"
#include "row_convert.h"

// Vector values returned by always-inlined helpers in the portable copy: never an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_*(): a false "may be
// used uninitialized" inside its own header at every inlined use (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace embedding_ext::cpu {

// Vector width: 64 bytes with AVX-512 (32 registers: D = 128 fp32 pools in one pass over a
// bag, not two), 32 otherwise (one AVX2 register, two SSE registers in the portable copy).
constexpr int vector_bytes(int isa) { return isa == kAvx512 ? 64 : 32; }

// GCC vector types of the accumulator type, so a column block's accumulators stay in
// registers across a bag (arrays of scalars indexed in unrolled loops were left on the
// stack). (vector_size cannot take a dependent size: one specialisation per case.)
// positions: max mode's arg-max as a position in the bag, an integer of the values' width,
// so that a comparison's mask selects it directly (int64 lanes beside fp32 values made GCC
// split a 64-byte vector into scalar code: max pooled 48x slower than sum).
template <typename acc_t, int kBytes>
struct VectorTypes;
template <>
struct VectorTypes<float, 32> {
  using values = float __attribute__((vector_size(32)));
  using positions = int32_t __attribute__((vector_size(32)));
};
template <>
struct VectorTypes<double, 32> {
  using values = double __attribute__((vector_size(32)));
  using positions = int64_t __attribute__((vector_size(32)));
};
template <>
struct VectorTypes<float, 64> {
  using values = float __attribute__((vector_size(64)));
  using positions = int32_t __attribute__((vector_size(64)));
};
template <>
struct VectorTypes<double, 64> {
  using values = double __attribute__((vector_size(64)));
  using positions = int64_t __attribute__((vector_size(64)));
};
template <typename acc_t, int kIsa>
using Vec = typename VectorTypes<acc_t, vector_bytes(kIsa)>::values;
template <typename acc_t, int kIsa>
using PosVec = typename VectorTypes<acc_t, vector_bytes(kIsa)>::positions;
template <typename acc_t, int kIsa>
constexpr int kLanesOf = vector_bytes(kIsa) / sizeof(acc_t);

#if defined(__x86_64__)
// What GCC's generic vector code compiled badly, in the instructions of one copy (inlined
// into that copy only: each function carries its target):
// - broadcast: every lane = value, one vpbroadcast (GCC 12 built it lane by lane, whether
//   spelled per lane or as `vector + scalar`: 16 masked broadcasts per row in the AVX-512
//   copy, 3 inserts and a 128-bit insert in the AVX2 copy; max pooled 1.6x slower);
// - widen: fp16/bf16 -> fp32, bf16 as a shift into the top half, one vpmovzxwd from memory
//   (__builtin_convertvector gave two 128-bit ones and an insert: bf16 pooled at half fp16's
//   speed);
// - narrow: fp32 -> fp16, rounded to nearest even.
template <int kIsa>
struct IsaLanes;

#define EMBEDDING_EXT_AVX2_INLINE __attribute__((target("avx2,f16c")))
template <>
struct IsaLanes<kAvx2> {
  EMBEDDING_EXT_AVX2_INLINE static __m256i broadcast(int32_t value) { return _mm256_set1_epi32(value); }
  EMBEDDING_EXT_AVX2_INLINE static __m256i broadcast(int64_t value) { return _mm256_set1_epi64x(value); }
  EMBEDDING_EXT_AVX2_INLINE static __m256 widen(const c10::Half* src) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
  EMBEDDING_EXT_AVX2_INLINE static __m256 widen(const c10::BFloat16* src) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  EMBEDDING_EXT_AVX2_INLINE static void narrow(__m256 v, c10::Half* dst) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#undef EMBEDDING_EXT_AVX2_INLINE

#define EMBEDDING_EXT_AVX512_INLINE __attribute__((target("avx512f")))
template <>
struct IsaLanes<kAvx512> {
  EMBEDDING_EXT_AVX512_INLINE static __m512i broadcast(int32_t value) { return _mm512_set1_epi32(value); }
  EMBEDDING_EXT_AVX512_INLINE static __m512i broadcast(int64_t value) { return _mm512_set1_epi64(value); }
  EMBEDDING_EXT_AVX512_INLINE static __m512 widen(const c10::Half* src) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  }
  EMBEDDING_EXT_AVX512_INLINE static __m512 widen(const c10::BFloat16* src) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  EMBEDDING_EXT_AVX512_INLINE static void narrow(__m512 v, c10::Half* dst) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#undef EMBEDDING_EXT_AVX512_INLINE
#endif

// Every lane = value.
template <typename acc_t, int kIsa>
__attribute__((always_inline)) inline PosVec<acc_t, kIsa> broadcast_position(int64_t value) {
  using lane_t = std::remove_reference_t<decltype(std::declval<PosVec<acc_t, kIsa>>()[0])>;
#if defined(__x86_64__)
  if constexpr (kIsa != kPortable) {
    const auto v = IsaLanes<kIsa>::broadcast(static_cast<lane_t>(value));
    PosVec<acc_t, kIsa> out;
    std::memcpy(&out, &v, sizeof(out));
    return out;
  }
#endif
  return PosVec<acc_t, kIsa>{} + static_cast<lane_t>(value);
}

// bf16 bits of kLanes fp32 lanes, and those lanes as integers.
template <int kLanes>
struct HalfWords;
template <>
struct HalfWords<8> {
  using u16s = uint16_t __attribute__((vector_size(16)));
  using u32s = uint32_t __attribute__((vector_size(32)));
  using i32s = int32_t __attribute__((vector_size(32)));
};
template <>
struct HalfWords<16> {
  using u16s = uint16_t __attribute__((vector_size(32)));
  using u32s = uint32_t __attribute__((vector_size(64)));
  using i32s = int32_t __attribute__((vector_size(64)));
};

// The next kLanesOf<acc_t, kIsa> stored values, widened to the accumulator type.
template <int kIsa, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__attribute__((always_inline)) inline Vec<acc_t, kIsa> load_vec(const scalar_t* src) {
  constexpr int kLanes = kLanesOf<acc_t, kIsa>;
  Vec<acc_t, kIsa> v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(&v, src, sizeof(v));
#if defined(__x86_64__)
  } else if constexpr (kIsa != kPortable) {  // fp16 or bf16
    v = IsaLanes<kIsa>::widen(src);
#endif
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // the top half of an fp32
    using u16s = typename HalfWords<kLanes>::u16s;
    using u32s = typename HalfWords<kLanes>::u32s;
    u16s bits;
    std::memcpy(&bits, src, sizeof(bits));
    const u32s widened = __builtin_convertvector(bits, u32s) << 16;
    std::memcpy(&v, &widened, sizeof(v));
  } else {
    for (int e = 0; e < kLanes; ++e) v[e] = static_cast<acc_t>(src[e]);
  }
  return v;
}

// One accumulator vector to dst, rounded to the stored type as store_row rounds (nearest
// even; a NaN stays a NaN), in vector registers: through an array of lanes GCC kept the
// whole accumulator block in memory (zeroed with rep stos per bag, stored, reloaded in
// halves), a fifth of a cache-resident bag's time.
template <int kIsa, typename acc_t, typename scalar_t>
__attribute__((always_inline)) inline void store_vec(Vec<acc_t, kIsa> v, scalar_t* dst) {
  constexpr int kLanes = kLanesOf<acc_t, kIsa>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, &v, sizeof(v));
#if defined(__x86_64__)
  } else if constexpr (kIsa != kPortable && std::is_same_v<scalar_t, c10::Half>) {
    IsaLanes<kIsa>::narrow(v, dst);
#endif
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    using u32s = typename HalfWords<kLanes>::u32s;
    using i32s = typename HalfWords<kLanes>::i32s;
    using u16s = typename HalfWords<kLanes>::u16s;
    u32s bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const u32s rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const i32s nan = v != v;
    const u32s kept = nan ? u32s{} + 0x7FC0u : rounded;
    const u16s narrow = __builtin_convertvector(kept, u16s);
    std::memcpy(dst, &narrow, sizeof(narrow));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    // The portable copy: store_row picks F16C at run time, as the other copies' vcvtps2ph
    // (c10::Half's software conversion, compiled here for baseline x86-64, turns every NaN
    // into 0x7E00: a NaN payload would differ between copies).
    acc_t lanes[kLanes];
    std::memcpy(lanes, &v, sizeof(lanes));
    store_row(lanes, acc_t(1), dst, kLanes);
  } else {
    for (int e = 0; e < kLanes; ++e) dst[e] = static_cast<scalar_t>(v[e]);
  }
}

}  // namespace embedding_ext::cpu
