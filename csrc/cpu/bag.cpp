// CPU pooled lookup (embedding_bag_forward, embedding_bag_dense_backward,
// embedding_bag_per_sample_weights_backward). Bags are pooled in fp32 (fp64 for fp64), one
// task per run of bags; the weight gradient sums each row's terms in position order (rows
// split across threads, never atomics), so every result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "isa.h"
#include "output_allocator.h"
#include "row_convert.h"

// Vector values returned by always-inlined helpers in the portable copy: never an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_*(): a false "may be
// used uninitialized" inside its own header at every inlined use (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace embedding_ext {
namespace cpu {
namespace {

constexpr int64_t kSum = kBagSum, kMean = kBagMean, kMax = kBagMax;

// 1 / (non-padding entries of each bag), 0 for an empty bag: mean mode's coefficients.
template <typename acc_t, typename index_t>
std::vector<acc_t> mean_coefficients(const index_t* idx, const int64_t* off, int64_t bags,
                                     int64_t padding_idx) {
  std::vector<acc_t> inv_count(bags);
  for (int64_t b = 0; b < bags; ++b) {
    int64_t count = 0;
    for (int64_t i = off[b]; i < off[b + 1]; ++i) count += static_cast<int64_t>(idx[i]) != padding_idx;
    inv_count[b] = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
  }
  return inv_count;
}

// bag_of[i]: the bag that pools id i, or -1 for ids past the last offset.
std::vector<int64_t> bag_of_positions(const int64_t* off, int64_t bags, int64_t n) {
  std::vector<int64_t> bag_of(n, -1);
  for (int64_t b = 0; b < bags; ++b) {
    for (int64_t i = off[b]; i < off[b + 1]; ++i) bag_of[i] = b;
  }
  return bag_of;
}

// Rows fetched ahead while pooling (16 and 8 measured alike within this VM's noise; 16 kept).
constexpr int64_t kBagPrefetch = 16;

// One pooling task's inputs: bags [b0, b1) of `off` pool rows of `weight` into `out`.
template <typename scalar_t, typename index_t>
struct PoolArgs {
  const scalar_t* weight;
  int64_t row_stride;
  const index_t* idx;
  const int64_t* off;
  int64_t dim, mode;
  const scalar_t* psw;  // per_sample_weights (sum mode) or nullptr
  int64_t padding_idx;
  scalar_t* out;
  int64_t* arg_max;  // max mode: (bags, dim) row ids, -1 for an empty bag
  uint64_t num_rows;  // sum/mean check each id against it while pooling
};

// The pooling loops have portable, AVX2 and AVX-512 copies (isa.h).
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
__attribute__((target("avx2"))) inline __m256i broadcast_8_avx2(int32_t value) {
  return _mm256_set1_epi32(value);
}
__attribute__((target("avx2"))) inline __m256i broadcast_4_avx2(int64_t value) {
  return _mm256_set1_epi64x(value);
}
__attribute__((target("avx512f"))) inline __m512i broadcast_16_avx512(int32_t value) {
  return _mm512_set1_epi32(value);
}
__attribute__((target("avx512f"))) inline __m512i broadcast_8_avx512(int64_t value) {
  return _mm512_set1_epi64(value);
}
#endif

// Every lane = value: one vpbroadcast. (GCC 12 built it lane by lane, whether spelled per
// lane or as `vector + scalar`: 16 masked broadcasts per row in the AVX-512 copy, 3 inserts
// and a 128-bit insert in the AVX2 copy; max pooled 1.6x slower. Hence the intrinsics.)
template <typename acc_t, int kIsa>
__attribute__((always_inline)) inline PosVec<acc_t, kIsa> broadcast_position(int64_t value) {
  using lane_t = std::remove_reference_t<decltype(std::declval<PosVec<acc_t, kIsa>>()[0])>;
#if defined(__x86_64__)
  if constexpr (kIsa == kAvx512 || kIsa == kAvx2) {
    PosVec<acc_t, kIsa> out;
    if constexpr (kIsa == kAvx512 && sizeof(lane_t) == 4) {
      const __m512i v = broadcast_16_avx512(static_cast<int32_t>(value));
      std::memcpy(&out, &v, sizeof(out));
    } else if constexpr (kIsa == kAvx512) {
      const __m512i v = broadcast_8_avx512(value);
      std::memcpy(&out, &v, sizeof(out));
    } else if constexpr (sizeof(lane_t) == 4) {
      const __m256i v = broadcast_8_avx2(static_cast<int32_t>(value));
      std::memcpy(&out, &v, sizeof(out));
    } else {
      const __m256i v = broadcast_4_avx2(value);
      std::memcpy(&out, &v, sizeof(out));
    }
    return out;
  }
#endif
  return PosVec<acc_t, kIsa>{} + static_cast<lane_t>(value);
}

#if defined(__x86_64__)
// fp16/bf16 <-> fp32 a vector at a time, inlined into the copy of their instruction set.
// bf16 -> fp32 is a shift into the top half: one vpmovzxwd from memory (GCC's generic
// __builtin_convertvector gave two 128-bit ones and an insert: bf16 pooled at half fp16's
// speed).
__attribute__((target("avx,f16c"))) inline __m256 widen_8_f16c(const c10::Half* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
__attribute__((target("avx2"))) inline __m256 widen_8_bf16_avx2(const c10::BFloat16* src) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
__attribute__((target("avx,f16c"))) inline void narrow_8_f16c(__m256 v, c10::Half* dst) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
__attribute__((target("avx512f"))) inline __m512 widen_16_f16_avx512(const c10::Half* src) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
__attribute__((target("avx512f"))) inline __m512 widen_16_bf16_avx512(const c10::BFloat16* src) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
__attribute__((target("avx512f"))) inline void narrow_16_f16_avx512(__m512 v, c10::Half* dst) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

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
  } else if constexpr (kIsa == kAvx2 && std::is_same_v<scalar_t, c10::BFloat16>) {
    v = widen_8_bf16_avx2(src);
  } else if constexpr (kIsa == kAvx512 && std::is_same_v<scalar_t, c10::BFloat16>) {
    v = widen_16_bf16_avx512(src);
  } else if constexpr (kIsa == kAvx2 && std::is_same_v<scalar_t, c10::Half>) {
    v = widen_8_f16c(src);
  } else if constexpr (kIsa == kAvx512 && std::is_same_v<scalar_t, c10::Half>) {
    v = widen_16_f16_avx512(src);
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
  } else if constexpr (kIsa == kAvx2 && std::is_same_v<scalar_t, c10::Half>) {
    narrow_8_f16c(v, dst);
  } else if constexpr (kIsa == kAvx512 && std::is_same_v<scalar_t, c10::Half>) {
    narrow_16_f16_avx512(v, dst);
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

// Columns [d0, d0 + kCols) of bag b are pooled in registers across the whole bag. Rows in
// position order, no a*b+c contraction (setup.py: -ffp-contract=off): every instruction set
// gives the same bits. prefetch_end > 0 (the first block of a bag): while row i is pooled,
// row i + kBagPrefetch (up to prefetch_end, across bag boundaries) is fetched, one row per
// row, so the memory system sees a steady stream rather than a burst per bag.

// Every cache line of row k (the first column block prefetches for the later ones too).
// kRowLines > 0: the row is that many lines (the block is the whole row), unrolled: a loop
// here cost a compare and a branch per line, a fifth of the time of a cache-resident row.
template <int kRowLines, typename scalar_t, typename index_t>
__attribute__((always_inline)) inline void fetch_row(const PoolArgs<scalar_t, index_t>& a,
                                                     int64_t k) {
  // Integer arithmetic: k may be an id not yet checked (sum/mean check while pooling), and a
  // prefetch of any address is harmless.
  const char* row = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(a.weight) +
                                                  static_cast<uint64_t>(k) * a.row_stride * sizeof(scalar_t));
  if constexpr (kRowLines > 0) {
    for (int line = 0; line < kRowLines; ++line) __builtin_prefetch(row + 64 * line);
  } else {
    const int64_t row_bytes = a.dim * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(row + byte);
  }
}

// Max: the first non-padding row as is (a NaN included), then strictly greater values, so
// ties go to the first occurrence and a later NaN is never taken (PyTorch's rule).
template <int kCols, int kIsa, typename scalar_t, typename index_t>
__attribute__((always_inline)) inline void pool_max_columns(const PoolArgs<scalar_t, index_t>& a,
                                                            int64_t b, int64_t d0,
                                                            int64_t prefetch_end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = kLanesOf<acc_t, kIsa>, kVecs = kCols / kLanes;
  static_assert(kCols % kLanes == 0);
  const int64_t i0 = a.off[b], i1 = a.off[b + 1];
  const auto prefetch = [&](int64_t i) __attribute__((always_inline)) {
    if (i + kBagPrefetch < prefetch_end) fetch_row<0>(a, static_cast<int64_t>(a.idx[i + kBagPrefetch]));
  };
  Vec<acc_t, kIsa> acc[kVecs] = {};
  // Positions relative to the bag's start (pool_bags keeps bags below 2^31 ids here).
  PosVec<acc_t, kIsa> pos[kVecs] = {};
  int64_t i = i0;
  while (i < i1 && static_cast<int64_t>(a.idx[i]) == a.padding_idx) ++i;
  const bool any = i < i1;
  #pragma GCC unroll 16
  for (int j = 0; j < kVecs; ++j) {
    pos[j] = broadcast_position<acc_t, kIsa>(i - i0);
    if (any) acc[j] = load_vec<kIsa>(a.weight + static_cast<int64_t>(a.idx[i]) * a.row_stride + d0 + j * kLanes);
  }
  for (int64_t p = i0; p <= std::min(i, i1 - 1); ++p) prefetch(p);
  for (++i; i < i1; ++i) {
    prefetch(i);
    const int64_t k = a.idx[i];
    if (k == a.padding_idx) continue;
    const PosVec<acc_t, kIsa> here = broadcast_position<acc_t, kIsa>(i - i0);
    #pragma GCC unroll 16
    for (int j = 0; j < kVecs; ++j) {
      const Vec<acc_t, kIsa> v = load_vec<kIsa>(a.weight + k * a.row_stride + d0 + j * kLanes);
      const auto take = v > acc[j];
      acc[j] = take ? v : acc[j];
      pos[j] = take ? here : pos[j];
    }
  }
  int64_t* arg = a.arg_max + b * a.dim + d0;
  #pragma GCC unroll 16
  for (int j = 0; j < kVecs; ++j) {
    for (int e = 0; e < kLanes; ++e) {
      arg[j * kLanes + e] = any ? static_cast<int64_t>(a.idx[i0 + pos[j][e]]) : int64_t(-1);
    }
  }
  #pragma GCC unroll 16
  for (int j = 0; j < kVecs; ++j) store_vec<kIsa, acc_t>(acc[j], a.out + b * a.dim + d0 + j * kLanes);
}

// Sum, mean (a division by the count, as PyTorch, not a multiply by 1/count) and
// per_sample_weights. Loop invariants in locals and one loop per case: the per-row work is a
// few instructions, so every reload and branch shows (cache-resident rows: 4.4 ns a row
// before this, PyTorch's FBGEMM loop 2.3 ns). Ids are checked here, not in a pass of their
// own (as FBGEMM's kernels do): an id outside the table is skipped and reported (returns
// true), and the caller raises.
template <int kCols, int kRowLines, int kIsa, typename scalar_t, typename index_t>
__attribute__((always_inline)) inline bool pool_sum_columns(const PoolArgs<scalar_t, index_t>& a,
                                                            int64_t b, int64_t d0,
                                                            int64_t prefetch_end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = kLanesOf<acc_t, kIsa>, kVecs = kCols / kLanes;
  static_assert(kCols % kLanes == 0);
  const int64_t i0 = a.off[b], i1 = a.off[b + 1];
  Vec<acc_t, kIsa> acc[kVecs] = {};
  const scalar_t* const weight = a.weight + d0;
  const index_t* const idx = a.idx;
  const scalar_t* const psw = a.psw;
  const int64_t stride = a.row_stride, pad = a.padding_idx;
  const uint64_t num_rows = a.num_rows;
  bool bad = false;
  // Rows below prefetch_until fetch row i + kBagPrefetch without a bounds check.
  const int64_t prefetch_until = std::max(i0, std::min(i1, prefetch_end - kBagPrefetch));
  int64_t count = 0;
  const auto pool_rows = [&](int64_t from, int64_t to, auto weighted, auto prefetching)
                             __attribute__((always_inline)) {
    for (int64_t i = from; i < to; ++i) {
      if constexpr (decltype(prefetching)::value) fetch_row<kRowLines>(a, static_cast<int64_t>(idx[i + kBagPrefetch]));
      const int64_t k = idx[i];
      if (static_cast<uint64_t>(k) >= num_rows) {  // before the padding test: pad = -1 is "none"
        bad = true;
        continue;
      }
      if (k == pad) continue;
      ++count;
      const scalar_t* src = weight + k * stride;
      if constexpr (decltype(weighted)::value) {
        const acc_t w = static_cast<acc_t>(psw[i]);
        #pragma GCC unroll 16
        for (int j = 0; j < kVecs; ++j) acc[j] += load_vec<kIsa>(src + j * kLanes) * w;
      } else {
        #pragma GCC unroll 16
        for (int j = 0; j < kVecs; ++j) acc[j] += load_vec<kIsa>(src + j * kLanes);
      }
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (psw != nullptr) {
    pool_rows(i0, prefetch_until, yes{}, yes{});
    pool_rows(prefetch_until, i1, yes{}, no{});
  } else {
    pool_rows(i0, prefetch_until, no{}, yes{});
    pool_rows(prefetch_until, i1, no{}, no{});
  }
  if (a.mode == kMean && count > 1) {
    const acc_t c = static_cast<acc_t>(count);
    #pragma GCC unroll 16
    for (int j = 0; j < kVecs; ++j) acc[j] /= c;
  }
  #pragma GCC unroll 16
  for (int j = 0; j < kVecs; ++j) store_vec<kIsa, acc_t>(acc[j], a.out + b * a.dim + d0 + j * kLanes);
  return bad;
}

// Bags [b0, b1), dim a multiple of 16: blocks of 8 vector registers of accumulator
// (AVX2 fp32: 64 columns; AVX-512 fp32: 128) for sum/mean, 4 vectors then 16 columns for max (values and
// their arg-max positions: int32 lanes for fp32, int64 for fp64), then 16-column blocks for the rest. Rows are prefetched
// kBagPrefetch ids ahead, across bag boundaries within the task (a bag's first rows would
// otherwise each wait for DRAM). kMaxMode is a template parameter, and each (kMaxMode,
// instruction set) a function of its own: with both loop nests in one function GCC's
// register allocator spilled one of sum's eight accumulators to the stack (a store and a
// reload per row: bench/NOTES-cpu.md 8). Returns true when sum/mean met an id outside the
// table (max mode's ids are checked first).
template <bool kMaxMode, int kIsa, typename scalar_t, typename index_t>
__attribute__((always_inline)) inline bool pool_register_blocks(
    const PoolArgs<scalar_t, index_t>& a, int64_t b0, int64_t b1) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kWide = 8 * kLanesOf<acc_t, kIsa>;
  const int64_t task_end = a.off[b1];
  for (int64_t i = a.off[b0]; i < std::min(a.off[b0] + kBagPrefetch, task_end); ++i) {
    fetch_row<0>(a, static_cast<int64_t>(a.idx[i]));
  }
  bool bad = false;
  for (int64_t b = b0; b < b1; ++b) {
    int64_t d0 = 0;
    if constexpr (kMaxMode) {
      // Blocks of 4 vectors (values and positions: 8 registers), then 16 columns: 16-column
      // blocks alone were 4 passes over each bag at D = 64 with AVX-512 (one vector each),
      // 1.5x slower than AVX2's 2-vector blocks.
      constexpr int kMaxWide = 4 * kLanesOf<acc_t, kIsa>;
      for (; d0 + kMaxWide <= a.dim; d0 += kMaxWide) pool_max_columns<kMaxWide, kIsa>(a, b, d0, d0 == 0 ? task_end : 0);
      for (; d0 < a.dim; d0 += 16) pool_max_columns<16, kIsa>(a, b, d0, d0 == 0 ? task_end : 0);
    } else {
      // Rows of half, 1, 2 or 4 wide blocks (AVX2 fp32: D = 32, 64, 128, 256): the first
      // block prefetches the whole row with unrolled lines (a prefetch loop per row cost
      // D = 128 half its speed on cache-resident rows).
      constexpr int kWideLines = kWide * sizeof(scalar_t) / 64;
      static_assert(kWideLines >= 2, "a half-wide block must be at least one cache line");
      const auto whole_rows = [&](auto blocks) __attribute__((always_inline)) {
        constexpr int kBlocks = decltype(blocks)::value;
        bad |= pool_sum_columns<kWide, kBlocks * kWideLines, kIsa>(a, b, 0, task_end);
        for (int blk = 1; blk < kBlocks; ++blk) bad |= pool_sum_columns<kWide, 0, kIsa>(a, b, blk * kWide, 0);
      };
      if (a.dim == kWide / 2) {
        bad |= pool_sum_columns<kWide / 2, kWideLines / 2, kIsa>(a, b, 0, task_end);
        continue;
      }
      if (a.dim == kWide) {
        whole_rows(std::integral_constant<int, 1>{});
        continue;
      }
      if (a.dim == 2 * kWide) {
        whole_rows(std::integral_constant<int, 2>{});
        continue;
      }
      if (a.dim == 4 * kWide) {
        whole_rows(std::integral_constant<int, 4>{});
        continue;
      }
      for (; d0 + kWide <= a.dim; d0 += kWide) bad |= pool_sum_columns<kWide, 0, kIsa>(a, b, d0, d0 == 0 ? task_end : 0);
      for (; d0 < a.dim; d0 += 16) bad |= pool_sum_columns<16, 0, kIsa>(a, b, d0, d0 == 0 ? task_end : 0);
    }
  }
  return bad;
}

template <bool kMaxMode, typename scalar_t, typename index_t>
__attribute__((noinline)) bool pool_register_blocks_portable(const PoolArgs<scalar_t, index_t>& a,
                                                             int64_t b0, int64_t b1) {
  return pool_register_blocks<kMaxMode, kPortable>(a, b0, b1);
}

#if defined(__x86_64__)
template <bool kMaxMode, typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX2 bool pool_register_blocks_avx2(
    const PoolArgs<scalar_t, index_t>& a, int64_t b0, int64_t b1) {
  return pool_register_blocks<kMaxMode, kAvx2>(a, b0, b1);
}

template <bool kMaxMode, typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX512 bool
pool_register_blocks_avx512(const PoolArgs<scalar_t, index_t>& a, int64_t b0, int64_t b1) {
  return pool_register_blocks<kMaxMode, kAvx512>(a, b0, b1);
}
#endif

template <bool kMaxMode, typename scalar_t, typename index_t>
bool pool_register_blocks_any(const PoolArgs<scalar_t, index_t>& a, int64_t b0, int64_t b1) {
#if defined(__x86_64__)
  switch (cpu_isa()) {
    case kAvx512: return pool_register_blocks_avx512<kMaxMode>(a, b0, b1);
    case kAvx2: return pool_register_blocks_avx2<kMaxMode>(a, b0, b1);
    default: break;
  }
#endif
  return pool_register_blocks_portable<kMaxMode>(a, b0, b1);
}

// Pools bags [0, bags) of the n ids into out; raises IndexError (check_index_range's
// message: the first bad position) for an id outside the num_rows-row table.
template <typename scalar_t, typename index_t>
void pool_bags(const scalar_t* weight, int64_t row_stride, int64_t num_rows, const index_t* idx,
               int64_t n, const int64_t* off, int64_t bags, int64_t dim, int64_t mode,
               const scalar_t* psw, int64_t padding_idx, scalar_t* out, int64_t* arg_max,
               const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t avg_ids = bags ? std::max<int64_t>(1, off[bags] / bags) : 1;
  const int64_t grain = grain_for(avg_ids * dim * sizeof(scalar_t));
  // Max mode keeps arg-max positions as int32 lanes: bags of fewer than 2^31 ids.
  // (dim 0 takes the generic loop: the register blocks would pool no column, so check no id.)
  // Max mode's int32 positions are relative to a bag; the test on the total is conservative.
  if (dim > 0 && dim % 16 == 0 && (mode != kMax || off[bags] <= std::numeric_limits<int32_t>::max())) {
    const PoolArgs<scalar_t, index_t> args{weight, row_stride, idx, off, dim, mode, psw,
                                            padding_idx, out, arg_max, static_cast<uint64_t>(num_rows)};
    std::atomic<bool> bad{false};
    if (mode == kMax) {
      check_index_range(idx, n, num_rows, op);
    } else {
      // Sum/mean check the ids they pool; the ids after the last bag (CSR) are checked here.
      for (int64_t i = off[bags]; i < n; ++i) {
        if (static_cast<uint64_t>(static_cast<int64_t>(idx[i])) >= static_cast<uint64_t>(num_rows)) bad = true;
      }
    }
    at::parallel_for(0, bags, grain, [&](int64_t begin, int64_t end) {
      const bool task_bad = mode == kMax ? pool_register_blocks_any<true>(args, begin, end)
                                         : pool_register_blocks_any<false>(args, begin, end);
      if (task_bad) bad = true;
    });
    if (bad) check_index_range(idx, n, num_rows, op);  // raises for the first bad position
    TORCH_INTERNAL_ASSERT(!bad, op, ": an id outside the table was met while pooling, but "
                          "not found again");
    return;
  }
  check_index_range(idx, n, num_rows, op);
  at::parallel_for(0, bags, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim), row(dim);
    // Prefetch across bag boundaries (within this task's ids): a bag's first rows would
    // otherwise each wait for DRAM.
    const int64_t task_end = off[end];
    const auto prefetch_ahead = [&](int64_t i) {
      if (i + kBagPrefetch < task_end) {
        prefetch_row(weight + static_cast<int64_t>(idx[i + kBagPrefetch]) * row_stride,
                     dim * sizeof(scalar_t));
      }
    };
    for (int64_t i = off[begin]; i < std::min(off[begin] + kBagPrefetch, task_end); ++i) {
      prefetch_row(weight + static_cast<int64_t>(idx[i]) * row_stride, dim * sizeof(scalar_t));
    }
    for (int64_t b = begin; b < end; ++b) {
      int64_t count = 0;
      if (mode == kMax) {
        int64_t* arg = arg_max + b * dim;
        for (int64_t i = off[b]; i < off[b + 1]; ++i) {
          prefetch_ahead(i);
          const int64_t k = idx[i];
          if (k == padding_idx) continue;
          if (count++ == 0) {
            load_row<false>(weight + k * row_stride, acc.data(), dim);
            std::fill(arg, arg + dim, k);
            continue;
          }
          load_row<false>(weight + k * row_stride, row.data(), dim);
          for (int64_t d = 0; d < dim; ++d) {
            // Strictly greater: the first occurrence wins ties, and a NaN is never taken
            // after the first row (PyTorch's rule). Selects, no branches: the loop vectorises.
            const bool take = row[d] > acc[d];
            acc[d] = take ? row[d] : acc[d];
            arg[d] = take ? k : arg[d];
          }
        }
        if (count == 0) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          std::fill(arg, arg + dim, int64_t(-1));
        }
        store_row(acc.data(), acc_t(1), out + b * dim, dim);
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        prefetch_ahead(i);
        const int64_t k = idx[i];
        if (k == padding_idx) continue;
        ++count;
        if (psw == nullptr) {
          load_row<true>(weight + k * row_stride, acc.data(), dim);
          continue;
        }
        load_row<false>(weight + k * row_stride, row.data(), dim);
        const acc_t w = static_cast<acc_t>(psw[i]);
        for (int64_t d = 0; d < dim; ++d) acc[d] += row[d] * w;
      }
      if (mode == kMean && count > 1) {  // a division, as PyTorch (not a multiply by 1/count)
        const acc_t c = static_cast<acc_t>(count);
        for (int64_t d = 0; d < dim; ++d) acc[d] /= c;
      }
      store_row(acc.data(), acc_t(1), out + b * dim, dim);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_forward_cpu(
    const at::Tensor& weight_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    int64_t mode, const c10::optional<at::Tensor>& per_sample_weights, int64_t padding_idx) {
  constexpr const char* op = "embedding_bag_forward";
  const BagInputs in = bag_forward_inputs(weight_in, indices_in, offsets_in, mode, per_sample_weights, op);
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  at::Tensor out = empty_output({in.bags, in.dim}, weight.options());
  at::Tensor arg_max = at::empty({mode == kMax ? in.bags : 0, in.dim},
                                 weight.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      pool_bags<scalar_t, index_t>(
          weight.const_data_ptr<scalar_t>(), weight.stride(0), in.num_rows, idx, in.n,
          in.offsets.const_data_ptr<int64_t>(), in.bags, in.dim, mode,
          psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr, padding_idx,
          out.mutable_data_ptr<scalar_t>(), mode == kMax ? arg_max.mutable_data_ptr<int64_t>() : nullptr,
          op);
    });
  });
  return {out, arg_max};
}

template <typename scalar_t, typename index_t>
void bag_weight_gradient(const scalar_t* grad, const index_t* idx, const int64_t* off,
                         int64_t bags, int64_t n, int64_t num_rows, int64_t dim, int64_t mode,
                         const int64_t* arg_max, const scalar_t* psw, int64_t padding_idx,
                         bool scale_grad_by_freq, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> occurrences;  // over the ids in bags (CSR: trailing ids are in none)
  if (scale_grad_by_freq) occurrences = count_rows(idx, off[bags], num_rows, padding_idx);
  const auto freq = [&](int64_t k) {
    return scale_grad_by_freq ? acc_t(1) / static_cast<acc_t>(occurrences[k]) : acc_t(1);
  };
  if (mode == kMax) {
    // Each (bag, feature) sends its gradient to one row: columns split across threads, so
    // no two threads touch one element; bags in order within a column. fp32/fp64 add into
    // the (zeroed) output itself; fp16/bf16 need an fp32 table-sized scratch (V x D x 4
    // bytes, freed on return).
    std::vector<acc_t> scratch;
    acc_t* acc = nullptr;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      acc = out;
    } else {
      scratch.assign(num_rows * dim, acc_t(0));
      acc = scratch.data();
    }
    at::parallel_for(0, dim, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t b = 0; b < bags; ++b) {
        for (int64_t d = d0; d < d1; ++d) {
          const int64_t k = arg_max[b * dim + d];
          if (k >= 0) acc[k * dim + d] += static_cast<acc_t>(grad[b * dim + d]);
        }
      }
    });
    if constexpr (!std::is_same_v<acc_t, scalar_t>) {
      at::parallel_for(0, num_rows, grain_for(dim * sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
        for (int64_t k = r0; k < r1; ++k) store_row(acc + k * dim, acc_t(1), out + k * dim, dim);
      });
    }
    return;
  }
  std::vector<int64_t> bag_of = bag_of_positions(off, bags, n);
  const std::vector<acc_t> inv_count =
      mode == kMean ? mean_coefficients<acc_t>(idx, off, bags, padding_idx) : std::vector<acc_t>();
  // Rows with their positions in order; each row summed by one thread.
  const SortedLookups sorted = sort_by_row(idx, n, num_rows, padding_idx);
  const std::vector<int64_t> heads = segment_heads(sorted);
  const int64_t segments = static_cast<int64_t>(heads.size()) - 1;
  at::parallel_for(0, segments, grain_for(dim * sizeof(scalar_t) * 4), [&](int64_t s0, int64_t s1) {
    std::vector<acc_t> acc(dim), row(dim);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t k = sorted.rows[heads[s]];
      std::fill(acc.begin(), acc.end(), acc_t(0));
      bool any = false;
      for (int64_t j = heads[s]; j < heads[s + 1]; ++j) {
        const int64_t i = sorted.positions[j];
        const int64_t b = bag_of[i];
        if (b < 0) continue;  // an id in no bag
        any = true;
        acc_t coef = mode == kMean ? inv_count[b] : acc_t(1);
        if (psw != nullptr) coef *= static_cast<acc_t>(psw[i]);
        load_row<false>(grad + b * dim, row.data(), dim);
        for (int64_t d = 0; d < dim; ++d) acc[d] += row[d] * coef;
      }
      if (any) store_row(acc.data(), freq(k), out + k * dim, dim);
    }
  });
}

at::Tensor embedding_bag_dense_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const at::Tensor& arg_max_in, c10::SymInt num_weights, int64_t mode,
    const c10::optional<at::Tensor>& per_sample_weights, int64_t padding_idx,
    bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_bag_dense_backward";
  const BagInputs in = bag_dense_gradient_inputs(grad_in, indices_in, offsets_in, arg_max_in,
                                                 num_weights, mode, per_sample_weights,
                                                 padding_idx, scale_grad_by_freq, op);
  const int64_t num_rows = in.num_rows, dim = in.dim;
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor arg_max = mode == kMax ? arg_max_in.contiguous() : arg_max_in;
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->to(grad.scalar_type()).contiguous();
  // A V x D output: from the output cache (no page faults on a reused buffer, unlike
  // at::zeros' fresh pages: bench/NOTES-cpu.md section 8), zeroed by row ranges in parallel.
  at::Tensor out = empty_output({num_rows, dim}, grad.options());
  const int64_t row_bytes = dim * grad.element_size();
  char* zero_from = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, num_rows, grain_for(row_bytes), [&](int64_t r0, int64_t r1) {
    std::memset(zero_from + r0 * row_bytes, 0, (r1 - r0) * row_bytes);
  });
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    check_index_range(idx, in.n, num_rows, op);
    if (mode == kMax) {
      const int64_t* am = arg_max.const_data_ptr<int64_t>();
      for (int64_t e = 0; e < in.bags * dim; ++e) {
        TORCH_CHECK(am[e] >= -1 && am[e] < num_rows, op, ": 'arg_max' holds ", am[e],
                    ", not a row of the ", num_rows, "-row table");
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      bag_weight_gradient<scalar_t, index_t>(
          grad.const_data_ptr<scalar_t>(), idx, in.offsets.const_data_ptr<int64_t>(), in.bags,
          in.n, num_rows, dim, mode, mode == kMax ? arg_max.const_data_ptr<int64_t>() : nullptr,
          psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr, padding_idx,
          scale_grad_by_freq, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

// Copies of rows into a large output that nothing reads soon (the sparse gradient's N x D
// values): non-temporal stores where both ends allow them, so the write does not first read
// each line into the cache (half the memory traffic of a plain copy). StreamingStores'
// destructor orders them (sfence) before the task ends.
#if defined(__x86_64__)
__attribute__((target("avx2"))) inline void stream_copy_avx2(void* dst, const void* src,
                                                             int64_t bytes) {
  auto* d = static_cast<__m256i*>(dst);
  const auto* s = static_cast<const __m256i_u*>(src);
  for (int64_t i = 0; i < bytes / 32; ++i) _mm256_stream_si256(d + i, _mm256_loadu_si256(s + i));
}
#endif

// Outputs below this stay in cache for the optimizer that reads them next: plain stores.
constexpr int64_t kStreamingMinBytes = int64_t(8) << 20;

inline void copy_row_streaming(void* dst, const void* src, int64_t bytes, int64_t total_bytes) {
#if defined(__x86_64__)
  if (total_bytes >= kStreamingMinBytes && bytes % 32 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 32 == 0 && cpu_isa() >= kAvx2) {
    return stream_copy_avx2(dst, src, bytes);
  }
#endif
  std::memcpy(dst, src, bytes);
}

struct StreamingStores {
  ~StreamingStores() {
#if defined(__x86_64__)
    _mm_sfence();
#endif
  }
};

std::tuple<at::Tensor, at::Tensor> embedding_bag_sparse_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    c10::SymInt num_weights, int64_t mode, const c10::optional<at::Tensor>& per_sample_weights,
    int64_t padding_idx, bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_bag_sparse_backward";
  const BagInputs in = bag_gradient_inputs(grad_in, indices_in, offsets_in, num_weights, mode,
                                           per_sample_weights, padding_idx, /*sparse=*/true, op);
  const int64_t num_rows = in.num_rows, dim = in.dim;
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->to(grad.scalar_type()).contiguous();
  const int64_t* off = in.offsets.const_data_ptr<int64_t>();
  at::Tensor rows, values;
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    check_index_range(idx, in.n, num_rows, op);
    const int64_t in_bags = off[in.bags];
    // first[b]: bag b's first value (values are the non-padding ids in bags, in position
    // order); first[b + 1] - first[b] is mean mode's count. Without padding, the offsets.
    std::vector<int64_t> first(in.bags + 1);
    if (padding_idx < 0) {
      std::copy(off, off + in.bags + 1, first.begin());
    } else {
      int64_t nnz = 0;
      for (int64_t b = 0; b < in.bags; ++b) {
        first[b] = nnz;
        for (int64_t i = off[b]; i < off[b + 1]; ++i) nnz += static_cast<int64_t>(idx[i]) != padding_idx;
      }
      first[in.bags] = nnz;
    }
    // Without padding, one entry per position, as PyTorch's: ids after the last offset (the
    // CSR tail, in no bag) get zero rows, as on CUDA (where this size needs no
    // synchronisation). With padding, the non-padding ids in bags.
    const int64_t nnz = padding_idx < 0 ? in.n : first[in.bags];
    rows = at::empty({1, nnz}, in.indices.options().dtype(at::kLong));
    // N x D, written once: from the output cache, as the dense gradient (a fresh 32 MiB
    // buffer from malloc is new pages, a fault per 4 KiB: D = 128 took 16 ms instead of 2).
    values = empty_output({nnz, dim}, grad.options());
    int64_t* r = rows.mutable_data_ptr<int64_t>();
    std::vector<int64_t> occurrences;
    if (scale_grad_by_freq) occurrences = count_rows(idx, in_bags, num_rows, padding_idx);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* w = psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* v = values.mutable_data_ptr<scalar_t>();
      const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t avg_ids = in.bags ? std::max<int64_t>(1, in_bags / in.bags) : 1;
      // Bag by bag: the bag's gradient row is read once and written to each of its values.
      at::parallel_for(0, in.bags, grain_for(avg_ids * row_bytes), [&](int64_t b0, int64_t b1) {
        StreamingStores fence_at_end;
        std::vector<acc_t> row(dim);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t count = first[b + 1] - first[b];
          if (count == 0) continue;
          const acc_t bag_coef = mode == kMean ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1);
          const bool scaled = mode == kMean || w != nullptr || scale_grad_by_freq;
          if (scaled) load_row<false>(g + b * dim, row.data(), dim);
          int64_t j = first[b];
          for (int64_t i = off[b]; i < off[b + 1]; ++i) {
            const int64_t k = idx[i];
            if (k == padding_idx) continue;
            r[j] = k;
            if (!scaled) {  // the row itself, bit for bit (as PyTorch's index_select)
              copy_row_streaming(v + j * dim, g + b * dim, row_bytes, nnz * row_bytes);
            } else {
              acc_t coef = bag_coef;
              if (w != nullptr) coef *= static_cast<acc_t>(w[i]);
              if (scale_grad_by_freq) coef /= static_cast<acc_t>(occurrences[k]);
              store_row(row.data(), coef, v + j * dim, dim);
            }
            ++j;
          }
        }
      });
      for (int64_t i = in_bags; i < nnz; ++i) {  // the CSR tail (padding_idx < 0 only)
        r[i] = idx[i];
        std::fill(v + i * dim, v + (i + 1) * dim, scalar_t(0));
      }
    });
  });
  return {rows, values};
}

at::Tensor embedding_bag_per_sample_weights_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& weight_in, const at::Tensor& indices_in,
    const at::Tensor& offsets_in, int64_t padding_idx) {
  constexpr const char* op = "embedding_bag_per_sample_weights_backward";
  const BagInputs in = bag_sample_weight_gradient_inputs(grad_in, weight_in, indices_in, offsets_in, op);
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const at::Tensor grad = grad_in.to(weight.scalar_type()).contiguous();
  const int64_t dim = in.dim;
  at::Tensor out = at::empty({in.n}, weight.options());
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    check_index_range(idx, in.n, in.num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const std::vector<int64_t> bag_of = bag_of_positions(in.offsets.const_data_ptr<int64_t>(), in.bags, in.n);
      const scalar_t* w = weight.const_data_ptr<scalar_t>();
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, in.n, grain_for(2 * dim * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> a(dim), b(dim);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t k = idx[i];
          if (bag_of[i] < 0 || k == padding_idx) {
            o[i] = scalar_t(0);
            continue;
          }
          load_row<false>(w + k * weight.stride(0), a.data(), dim);
          load_row<false>(g + bag_of[i] * dim, b.data(), dim);
          acc_t dot = 0;
          for (int64_t d = 0; d < dim; ++d) dot += a[d] * b[d];
          o[i] = static_cast<scalar_t>(dot);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_bag_forward", &embedding_bag_forward_cpu);
  m.impl("embedding_bag_dense_backward", &embedding_bag_dense_backward_cpu);
  m.impl("embedding_bag_sparse_backward", &embedding_bag_sparse_backward_cpu);
  m.impl("embedding_bag_per_sample_weights_backward", &embedding_bag_per_sample_weights_backward_cpu);
}

}  // namespace cpu
}  // namespace embedding_ext
