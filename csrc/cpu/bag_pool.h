// The register-block loops of the bag pooling forward (bag_forward.cpp), for bags whose D is
// at least 16. They have portable, AVX2 and AVX-512 copies (isa.h), each compiled in a file
// of its own (bag_pool_portable.cpp, bag_pool_avx2.cpp, bag_pool_avx512.cpp): the copies'
// template instantiations are most of what bag pooling costs to compile, and in three files
// they compile in parallel.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../checks.h"
#include "bag_vectors.h"
#include "isa.h"

namespace embedding_ext::cpu {

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
  int64_t out_stride;  // elements from one bag's output row to the next (out and arg_max)
};

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

// Columns [d0, d0 + kCols) of bag b, pooled in kVecs vector registers of acc_t. kRowLines
// (sum/mean) as in fetch_row.
template <int kCols, int kRowLines, int kIsa, typename scalar_t, typename index_t>
struct ColumnBlock {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kLanes = kLanesOf<acc_t, kIsa>, kVecs = kCols / kLanes;
  static_assert(kCols % kLanes == 0);
  const PoolArgs<scalar_t, index_t>& a;
  const int64_t b, d0, i0, i1;  // i0, i1: the bag's ids

  __attribute__((always_inline)) ColumnBlock(const PoolArgs<scalar_t, index_t>& args, int64_t bag,
                                             int64_t first_column)
      : a(args), b(bag), d0(first_column), i0(args.off[bag]), i1(args.off[bag + 1]) {}
  void pool_max(int64_t prefetch_end) const;
  bool pool_sum(int64_t prefetch_end) const;  // true: an id outside the table was skipped

  __attribute__((always_inline)) void store(const Vec<acc_t, kIsa>* acc) const {
    #pragma GCC unroll 16
    for (int j = 0; j < kVecs; ++j) store_vec<kIsa, acc_t>(acc[j], a.out + b * a.out_stride + d0 + j * kLanes);
  }
};

// Max: the first non-padding row as is (a NaN included), then strictly greater values, so
// ties go to the first occurrence and a later NaN is never taken (PyTorch's rule).
template <int kCols, int kRowLines, int kIsa, typename scalar_t, typename index_t>
__attribute__((always_inline)) inline void
ColumnBlock<kCols, kRowLines, kIsa, scalar_t, index_t>::pool_max(int64_t prefetch_end) const {
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
  int64_t* arg = a.arg_max + b * a.out_stride + d0;
  #pragma GCC unroll 16
  for (int j = 0; j < kVecs; ++j) {
    for (int e = 0; e < kLanes; ++e) {
      arg[j * kLanes + e] = any ? static_cast<int64_t>(a.idx[i0 + pos[j][e]]) : int64_t(-1);
    }
  }
  store(acc);
}

// Sum, mean (a division by the count, as PyTorch, not a multiply by 1/count) and
// per_sample_weights. Loop invariants in locals and one loop per case: the per-row work is a
// few instructions, so every reload and branch shows (cache-resident rows: 4.4 ns a row
// before this, PyTorch's FBGEMM loop 2.3 ns). Ids are checked here, not in a pass of their
// own (as FBGEMM's kernels do): an id outside the table is skipped and reported (returns
// true), and the caller raises.
template <int kCols, int kRowLines, int kIsa, typename scalar_t, typename index_t>
__attribute__((always_inline)) inline bool
ColumnBlock<kCols, kRowLines, kIsa, scalar_t, index_t>::pool_sum(int64_t prefetch_end) const {
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
  if (a.mode == kBagMean && count > 1) {
    const acc_t c = static_cast<acc_t>(count);
    #pragma GCC unroll 16
    for (int j = 0; j < kVecs; ++j) acc[j] /= c;
  }
  store(acc);
  return bad;
}

// Bags [b0, b1), dim at least 16: blocks of 8 vector registers of accumulator
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
      for (; d0 + kMaxWide <= a.dim; d0 += kMaxWide) ColumnBlock<kMaxWide, 0, kIsa, scalar_t, index_t>(a, b, d0).pool_max(d0 == 0 ? task_end : 0);
      for (; d0 + 16 <= a.dim; d0 += 16) ColumnBlock<16, 0, kIsa, scalar_t, index_t>(a, b, d0).pool_max(d0 == 0 ? task_end : 0);
      if (d0 < a.dim) ColumnBlock<16, 0, kIsa, scalar_t, index_t>(a, b, a.dim - 16).pool_max(0);  // see below
    } else {
      // Rows of half, 1, 2 or 4 wide blocks (AVX2 fp32: D = 32, 64, 128, 256): the first
      // block prefetches the whole row with unrolled lines (a prefetch loop per row cost
      // D = 128 half its speed on cache-resident rows).
      constexpr int kWideLines = kWide * sizeof(scalar_t) / 64;
      static_assert(kWideLines >= 2, "a half-wide block must be at least one cache line");
      const auto whole_rows = [&](auto blocks) __attribute__((always_inline)) {
        constexpr int kBlocks = decltype(blocks)::value;
        bad |= ColumnBlock<kWide, kBlocks * kWideLines, kIsa, scalar_t, index_t>(a, b, 0).pool_sum(task_end);
        for (int blk = 1; blk < kBlocks; ++blk) bad |= ColumnBlock<kWide, 0, kIsa, scalar_t, index_t>(a, b, blk * kWide).pool_sum(0);
      };
      if (a.dim == kWide / 2) {
        bad |= ColumnBlock<kWide / 2, kWideLines / 2, kIsa, scalar_t, index_t>(a, b, 0).pool_sum(task_end);
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
      for (; d0 + kWide <= a.dim; d0 += kWide) bad |= ColumnBlock<kWide, 0, kIsa, scalar_t, index_t>(a, b, d0).pool_sum(d0 == 0 ? task_end : 0);
      // Then half and quarter blocks, so a row of any D takes few passes over the bag (each
      // pass pays the per-row loop again: D = 200 was 128 + 4 x 16 + 16 columns, 6 passes).
      if (d0 + kWide / 2 <= a.dim) {
        bad |= ColumnBlock<kWide / 2, 0, kIsa, scalar_t, index_t>(a, b, d0).pool_sum(d0 == 0 ? task_end : 0);
        d0 += kWide / 2;
      }
      if constexpr (kWide / 4 >= 16) {
        if (d0 + kWide / 4 <= a.dim) {
          bad |= ColumnBlock<kWide / 4, 0, kIsa, scalar_t, index_t>(a, b, d0).pool_sum(d0 == 0 ? task_end : 0);
          d0 += kWide / 4;
        }
      }
      for (; d0 + 16 <= a.dim; d0 += 16) bad |= ColumnBlock<16, 0, kIsa, scalar_t, index_t>(a, b, d0).pool_sum(d0 == 0 ? task_end : 0);
      // D = 16k + r: the last 16 columns once more, from D - 16. The overlapping columns are
      // pooled by the same operations in the same order, so they are stored again with the
      // same bits; a general loop for the last r columns ran at half the bytes per second.
      if (d0 < a.dim) bad |= ColumnBlock<16, 0, kIsa, scalar_t, index_t>(a, b, a.dim - 16).pool_sum(0);
    }
  }
  return bad;
}

// The copies, one per instruction set; each calls pool_register_blocks for its own.
template <bool kMaxMode, typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_PORTABLE bool pool_register_blocks_portable(const PoolArgs<scalar_t, index_t>& a,
                                                                 int64_t b0, int64_t b1);
#if defined(__x86_64__)
template <bool kMaxMode, typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX2 bool pool_register_blocks_avx2(const PoolArgs<scalar_t, index_t>& a,
                                                         int64_t b0, int64_t b1);
template <bool kMaxMode, typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX512 bool pool_register_blocks_avx512(const PoolArgs<scalar_t, index_t>& a,
                                                             int64_t b0, int64_t b1);
#endif

// The copy of the instruction set cpu_isa() names (the best this CPU has, unless a test
// pinned another).
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

// Defines `copy` (one of the three above) as pool_register_blocks compiled for instruction
// set `isa` with `attributes`, for each mode, dtype and id type that the forward dispatches.
#define EMBEDDING_EXT_DEFINE_POOL_COPY(copy, isa, attributes)                                  \
  template <bool kMaxMode, typename scalar_t, typename index_t>                                \
  attributes bool copy(const PoolArgs<scalar_t, index_t>& a, int64_t b0, int64_t b1) {        \
    return pool_register_blocks<kMaxMode, isa>(a, b0, b1);                                    \
  }                                                                                            \
  EMBEDDING_EXT_INSTANTIATE_POOL_COPY(copy, float)                                             \
  EMBEDDING_EXT_INSTANTIATE_POOL_COPY(copy, double)                                            \
  EMBEDDING_EXT_INSTANTIATE_POOL_COPY(copy, c10::Half)                                         \
  EMBEDDING_EXT_INSTANTIATE_POOL_COPY(copy, c10::BFloat16)
#define EMBEDDING_EXT_INSTANTIATE_POOL_COPY(copy, scalar_t)                                    \
  template bool copy<false, scalar_t, int32_t>(const PoolArgs<scalar_t, int32_t>&, int64_t, int64_t); \
  template bool copy<true, scalar_t, int32_t>(const PoolArgs<scalar_t, int32_t>&, int64_t, int64_t);  \
  template bool copy<false, scalar_t, int64_t>(const PoolArgs<scalar_t, int64_t>&, int64_t, int64_t); \
  template bool copy<true, scalar_t, int64_t>(const PoolArgs<scalar_t, int64_t>&, int64_t, int64_t);

}  // namespace embedding_ext::cpu
