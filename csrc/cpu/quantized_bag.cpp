// CPU pooled lookup of quantized tables (quantized_embedding_bag_forward): each bag's rows
// dequantized and pooled in fp32 registers/rows, in position order (deterministic). The
// pooling loop has portable, AVX2 and AVX-512 copies (isa.h) chosen at run time; the row
// arithmetic is quantized_rows.h's, vectorised by the compiler for each copy.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif


#include "common.h"
#include "isa.h"
#include "output_allocator.h"
#include "quantized_rows.h"
#include "row_convert.h"

namespace embedding_ext::cpu {
namespace {

// Rows fetched ahead while pooling, across bag boundaries within a task: a random row of a
// large table is a DRAM miss, and a bag's first rows would otherwise each wait for one.
// (Measured on this 2-core VM at D=128, rows of 136 bytes: 32 rows ahead, every line of
// each, beat 8, 16 and 24 ahead and first-line-only prefetches.)
constexpr int64_t kQuantPrefetch = 32;

template <typename index_t>
struct QuantBagArgs {
  const uint8_t* table;
  int64_t row_bytes, dim;
  uint64_t num_rows;
  const index_t* idx;
  const int64_t* off;
  int64_t mode;
  const float* psw;  // per_sample_weights (sum mode) or nullptr
  int64_t padding_idx;
};

// Pools bags [b0, b1) into out (row b - b0 of `dim` floats each). Ids are checked as they
// are read: an id outside the table is skipped and reported (true), and the caller raises.
// Max mode: the first pooled row as is, then strictly greater values (the float bag's rule);
// an empty or all-padding bag gives zeros, as mean's and sum's do.
template <QuantFormat F, typename index_t>
EMBEDDING_EXT_ALWAYS_INLINE bool pool_quant_bags(const QuantBagArgs<index_t>& a, int64_t b0,
                                                 int64_t b1, float* out) {
  const int64_t dim = a.dim, rb = a.row_bytes, task_end = a.off[b1];
  const auto row_of = [&](int64_t k) { return a.table + static_cast<uint64_t>(k) * rb; };
  for (int64_t i = a.off[b0]; i < std::min(a.off[b0] + kQuantPrefetch, task_end); ++i) {
    prefetch_quant_row(row_of(a.idx[i]), rb);
  }
  bool bad = false;
  for (int64_t b = b0; b < b1; ++b) {
    float* acc = out + (b - b0) * dim;
    int64_t count = 0;
    for (int64_t i = a.off[b]; i < a.off[b + 1]; ++i) {
      // A prefetch of any address is harmless: ids ahead are not checked yet.
      if (i + kQuantPrefetch < task_end) prefetch_quant_row(row_of(a.idx[i + kQuantPrefetch]), rb);
      const int64_t k = a.idx[i];
      if (k == a.padding_idx) continue;
      if (static_cast<uint64_t>(k) >= a.num_rows) {
        bad = true;
        continue;
      }
      const uint8_t* row = row_of(k);
      const RowParams p = row_params<F>(row, dim);
      if (a.mode == kBagMax) {
        if (count++ == 0) add_codes<F, true>(row, dim, p.scale, p.bias, acc);
        else max_codes<F>(row, dim, p.scale, p.bias, acc);
        continue;
      }
      const float w = a.psw ? a.psw[i] : 1.0f;
      // w * (scale * q + bias) as (w * scale) * q + w * bias: one multiply and add a code.
      const float scale = a.psw ? p.scale * w : p.scale, bias = a.psw ? p.bias * w : p.bias;
      if (count++ == 0) add_codes<F, true>(row, dim, scale, bias, acc);
      else add_codes<F, false>(row, dim, scale, bias, acc);
    }
    if (count == 0) {
      std::fill(acc, acc + dim, 0.0f);
    } else if (a.mode == kBagMean && count > 1) {  // a division, as the float bag
      const float c = static_cast<float>(count);
      for (int64_t d = 0; d < dim; ++d) acc[d] /= c;
    }
  }
  return bad;
}

// --- The register-block loop of int8 tables in sum and mean mode with D a multiple of
// 16: columns [d0, d0 + 16 kVecs) of a bag pooled in a fixed-size accumulator that the
// compiler keeps in vector registers across the bag (fully unrolled, no per-element loop
// control), so more rows fit in the out-of-order window and their misses overlap.
template <QuantFormat F, int kVecs, typename index_t>
EMBEDDING_EXT_ALWAYS_INLINE bool pool_block(const QuantBagArgs<index_t>& a, int64_t b, int64_t d0,
                                            int64_t prefetch_end, float* out_row) {
  const int64_t dim = a.dim, rb = a.row_bytes;
  constexpr int kCols = 16 * kVecs;
  // Each row dequantized, then added: summing scale * q and the biases apart saves an add a
  // code, but the two partial sums cancel (bias = the row's minimum) and were measured 10x
  // less accurate than "dequantize, then add" on bags of 250 rows.
  float acc[kCols] = {};
  bool bad = false;
  int64_t count = 0;
  for (int64_t i = a.off[b]; i < a.off[b + 1]; ++i) {
    if (i + kQuantPrefetch < prefetch_end) {  // the first block fetches for the others
      prefetch_quant_row(a.table + static_cast<uint64_t>(a.idx[i + kQuantPrefetch]) * rb, rb);
    }
    const int64_t k = a.idx[i];
    if (k == a.padding_idx) continue;
    if (static_cast<uint64_t>(k) >= a.num_rows) {
      bad = true;
      continue;
    }
    ++count;
    const uint8_t* row = a.table + k * rb;
    const RowParams p = row_params<F>(row, dim);
    const float w = a.psw ? a.psw[i] : 1.0f;
    const float scale = a.psw ? p.scale * w : p.scale, bias = a.psw ? p.bias * w : p.bias;
    const uint8_t* codes = row + d0;
    #pragma GCC unroll 64
    for (int e = 0; e < kCols; ++e) acc[e] += scale * static_cast<float>(codes[e]) + bias;
  }
  const float divisor = a.mode == kBagMean && count > 1 ? static_cast<float>(count) : 1.0f;
  for (int e = 0; e < kCols; ++e) out_row[d0 + e] = divisor == 1.0f ? acc[e] : acc[e] / divisor;
  return bad;
}

// kWide: the widest block, 128 columns with AVX-512's 32 vector registers (8 accumulators),
// 64 otherwise (AVX2 has 16 registers: 16 accumulators would spill).
template <QuantFormat F, int kWide, typename index_t>
EMBEDDING_EXT_ALWAYS_INLINE bool pool_register_blocks(const QuantBagArgs<index_t>& a, int64_t b0,
                                                      int64_t b1, float* out) {
  const int64_t task_end = a.off[b1], rb = a.row_bytes;
  for (int64_t i = a.off[b0]; i < std::min(a.off[b0] + kQuantPrefetch, task_end); ++i) {
    prefetch_quant_row(a.table + static_cast<uint64_t>(a.idx[i]) * rb, rb);
  }
  bool bad = false;
  for (int64_t b = b0; b < b1; ++b) {
    float* out_row = out + (b - b0) * a.dim;
    int64_t d0 = 0;
    if constexpr (kWide == 128) {
      for (; d0 + 128 <= a.dim; d0 += 128) bad |= pool_block<F, 8>(a, b, d0, d0 == 0 ? task_end : 0, out_row);
    }
    for (; d0 + 64 <= a.dim; d0 += 64) bad |= pool_block<F, 4>(a, b, d0, d0 == 0 ? task_end : 0, out_row);
    const int64_t prefetch_end = d0 == 0 ? task_end : 0;
    switch ((a.dim - d0) / 16) {
      case 3: bad |= pool_block<F, 3>(a, b, d0, prefetch_end, out_row); break;
      case 2: bad |= pool_block<F, 2>(a, b, d0, prefetch_end, out_row); break;
      case 1: bad |= pool_block<F, 1>(a, b, d0, prefetch_end, out_row); break;
      default: break;
    }
  }
  return bad;
}

template <int kWide, typename index_t>
EMBEDDING_EXT_ALWAYS_INLINE bool pool_quant_bags_any_format(QuantFormat f, const QuantBagArgs<index_t>& a,
                                                            int64_t b0, int64_t b1, float* out) {
  const bool blocks = a.mode != kBagMax && a.dim % 16 == 0;
  switch (f) {
    case QuantFormat::kInt8:
      return blocks ? pool_register_blocks<QuantFormat::kInt8, kWide>(a, b0, b1, out)
                    : pool_quant_bags<QuantFormat::kInt8>(a, b0, b1, out);
    case QuantFormat::kInt4:  // (the block loop measured 3-10x slower for int4 here: GCC
                              // assembles its vectors element by element)
      return pool_quant_bags<QuantFormat::kInt4>(a, b0, b1, out);
    case QuantFormat::kFp8: return pool_quant_bags<QuantFormat::kFp8>(a, b0, b1, out);
  }
  return false;
}

#if defined(__x86_64__)
// int8 and int4 sum/mean with D a multiple of 16 (int4: 32) up to 128, AVX-512 copy only:
// codes widened by vpmovzxbd (the compiler's vectorisation widened in two steps, and for int4
// assembled vectors byte by byte) and accumulated in registers across the bag; int4's 16
// bytes -> 32 codes in column order by unpacking the low and high nibbles. The same
// operations per element in the same order as the loops the other copies run (int8:
// pool_block, from zero; int4: pool_quant_bags, the first row as is), so the same bits.
template <QuantFormat F, int kVecs, typename index_t>
EMBEDDING_EXT_TARGET_AVX512 bool pool_small_avx512(const QuantBagArgs<index_t>& a, int64_t b0,
                                                   int64_t b1, float* out) {
  constexpr int64_t dim = 16 * kVecs;
  const int64_t rb = a.row_bytes, task_end = a.off[b1];
  const auto row_of = [&](int64_t k) { return a.table + static_cast<uint64_t>(k) * rb; };
  for (int64_t i = a.off[b0]; i < std::min(a.off[b0] + kQuantPrefetch, task_end); ++i) {
    prefetch_quant_row(row_of(a.idx[i]), rb);
  }
  const __m128i low_nibbles = _mm_set1_epi8(15);
  bool bad = false;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc[kVecs];
    #pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) acc[v] = _mm512_setzero_ps();
    int64_t count = 0;
    for (int64_t i = a.off[b]; i < a.off[b + 1]; ++i) {
      if (i + kQuantPrefetch < task_end) prefetch_quant_row(row_of(a.idx[i + kQuantPrefetch]), rb);
      const int64_t k = a.idx[i];
      if (k == a.padding_idx) continue;
      if (static_cast<uint64_t>(k) >= a.num_rows) {
        bad = true;
        continue;
      }
      const uint8_t* row = row_of(k);
      const RowParams p = row_params<F>(row, dim);
      const float w = a.psw ? a.psw[i] : 1.0f;
      const __m512 scale = _mm512_set1_ps(a.psw ? p.scale * w : p.scale);
      const __m512 bias = _mm512_set1_ps(a.psw ? p.bias * w : p.bias);
      __m128i bytes[kVecs];  // 16 codes each, in column order
      if constexpr (F == QuantFormat::kInt8) {
        #pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) bytes[v] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * v));
      } else {
        #pragma GCC unroll 4
        for (int c = 0; c < kVecs / 2; ++c) {
          const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c));
          const __m128i lo = _mm_and_si128(packed, low_nibbles);
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
          bytes[2 * c] = _mm_unpacklo_epi8(lo, hi);
          bytes[2 * c + 1] = _mm_unpackhi_epi8(lo, hi);
        }
      }
      #pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) {
        const __m512 value = _mm512_add_ps(
            _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes[v]))), bias);
        const bool first_as_is = F == QuantFormat::kInt4 && count == 0;
        acc[v] = first_as_is ? value : _mm512_add_ps(acc[v], value);
      }
      ++count;
    }
    float* dst = out + (b - b0) * dim;
    const __m512 divisor = _mm512_set1_ps(static_cast<float>(count));
    #pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      const __m512 total = count == 0 ? _mm512_setzero_ps()
                           : a.mode == kBagMean && count > 1 ? _mm512_div_ps(acc[v], divisor) : acc[v];
      _mm512_storeu_ps(dst + 16 * v, total);
    }
  }
  return bad;
}
#endif

// One copy per instruction set: the same source, vectorised for each.
template <typename index_t>
EMBEDDING_EXT_TARGET_PORTABLE bool pool_quant_portable(QuantFormat f, const QuantBagArgs<index_t>& a,
                                                       int64_t b0, int64_t b1, float* out) {
  return pool_quant_bags_any_format<64>(f, a, b0, b1, out);
}
#if defined(__x86_64__)
template <typename index_t>
EMBEDDING_EXT_TARGET_AVX2 bool pool_quant_avx2(QuantFormat f, const QuantBagArgs<index_t>& a,
                                               int64_t b0, int64_t b1, float* out) {
  return pool_quant_bags_any_format<64>(f, a, b0, b1, out);
}
template <typename index_t>
EMBEDDING_EXT_TARGET_AVX512 bool pool_quant_avx512(QuantFormat f, const QuantBagArgs<index_t>& a,
                                                   int64_t b0, int64_t b1, float* out) {
  if (f != QuantFormat::kFp8 && a.mode != kBagMax) {
    const bool int8 = f == QuantFormat::kInt8;
    switch (a.dim) {
      case 16: if (int8) return pool_small_avx512<QuantFormat::kInt8, 1>(a, b0, b1, out); break;
      case 32: return int8 ? pool_small_avx512<QuantFormat::kInt8, 2>(a, b0, b1, out)
                           : pool_small_avx512<QuantFormat::kInt4, 2>(a, b0, b1, out);
      case 64: return int8 ? pool_small_avx512<QuantFormat::kInt8, 4>(a, b0, b1, out)
                           : pool_small_avx512<QuantFormat::kInt4, 4>(a, b0, b1, out);
      case 128: return int8 ? pool_small_avx512<QuantFormat::kInt8, 8>(a, b0, b1, out)
                            : pool_small_avx512<QuantFormat::kInt4, 8>(a, b0, b1, out);
      default: break;
    }
  }
  return pool_quant_bags_any_format<128>(f, a, b0, b1, out);
}
#endif

template <typename index_t>
bool pool_quant_any_isa(QuantFormat f, const QuantBagArgs<index_t>& a, int64_t b0, int64_t b1,
                        float* out) {
#if defined(__x86_64__)
  switch (cpu_isa()) {
    case kAvx512: return pool_quant_avx512(f, a, b0, b1, out);
    case kAvx2: return pool_quant_avx2(f, a, b0, b1, out);
    default: break;
  }
#endif
  return pool_quant_portable(f, a, b0, b1, out);
}

// Bags converted to fp16/bf16 are pooled this many at a time into an fp32 buffer.
constexpr int64_t kConvertChunk = 64;

at::Tensor quantized_embedding_bag_forward_cpu(const at::Tensor& packed, c10::string_view format,
                                               const at::Tensor& indices, const at::Tensor& offsets,
                                               int64_t mode,
                                               const c10::optional<at::Tensor>& per_sample_weights,
                                               int64_t padding_idx, at::ScalarType dtype) {
  constexpr const char* op = "quantized_embedding_bag_forward";
  const QuantTable t = quant_table(packed, format, op);
  const BagInputs in = quant_bag_inputs(t, indices, offsets, mode, per_sample_weights, dtype, op);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor out = empty_output({in.bags, in.dim}, packed.options().dtype(dtype));
  const int64_t* off = in.offsets.const_data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    const QuantBagArgs<index_t> args{t.packed.const_data_ptr<uint8_t>(), t.row_bytes, t.dim,
                                     static_cast<uint64_t>(t.num_rows), idx, off, mode,
                                     psw.defined() ? psw.const_data_ptr<float>() : nullptr,
                                     padding_idx};
    // dim 0 pools nothing: the ids are still checked, all of them, below.
    std::atomic<bool> bad{t.dim == 0};
    for (int64_t i = off[in.bags]; i < in.n; ++i) {  // ids after the last bag (CSR)
      if (static_cast<uint64_t>(static_cast<int64_t>(idx[i])) >= args.num_rows) bad = true;
    }
    const int64_t avg_ids = in.bags ? std::max<int64_t>(1, off[in.bags] / in.bags) : 1;
    if (t.dim > 0) {
      at::parallel_for(0, in.bags, grain_for(avg_ids * t.row_bytes), [&](int64_t begin, int64_t end) {
        bool task_bad = false;
        if (dtype == at::kFloat) {
          task_bad = pool_quant_any_isa(t.format, args, begin, end,
                                        out.mutable_data_ptr<float>() + begin * t.dim);
        } else {
          std::vector<float> buffer(std::min(kConvertChunk, end - begin) * t.dim);
          for (int64_t b0 = begin; b0 < end; b0 += kConvertChunk) {
            const int64_t b1 = std::min(end, b0 + kConvertChunk);
            task_bad |= pool_quant_any_isa(t.format, args, b0, b1, buffer.data());
            const int64_t count = (b1 - b0) * t.dim;
            if (dtype == at::kHalf) {
              store_row(buffer.data(), 1.0f, out.mutable_data_ptr<c10::Half>() + b0 * t.dim, count);
            } else {
              store_row(buffer.data(), 1.0f, out.mutable_data_ptr<c10::BFloat16>() + b0 * t.dim, count);
            }
          }
        }
        if (task_bad) bad = true;
      });
    }
    if (bad) check_index_range(idx, in.n, t.num_rows, op);  // raises for the first bad position
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("quantized_embedding_bag_forward", &quantized_embedding_bag_forward_cpu);
}

}  // namespace embedding_ext::cpu
