// CPU quantization of float tables (quantize_rows) and the unpooled lookup of quantized
// tables (quantized_embedding_forward). The pooled lookup is quantized_bag.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "common.h"
#include "output_allocator.h"
#include "quantized_rows.h"
#include "row_convert.h"

namespace embedding_ext::cpu {
namespace {

// Rounds through fp16 and back (round to nearest even), as the 4-bit row parameters are kept.
float round_to_half(float x) { return static_cast<float>(c10::Half(x)); }

uint16_t half_bits(float x) { return c10::Half(x).x; }

// The 8-bit row of PyTorch's embedding_bag_byte_prepack (FBGEMM's fused 8-bit rowwise
// quantization): scale = range / 255, bias = min, and codes rounded to nearest even from
// (x - min) * (255 / (range + 1e-8)); the epsilon keeps a constant row at code 0. The same
// expressions in the same order give the same codes bit for bit.
void quantize_row_int8(const float* x, int64_t dim, uint8_t* out) {
  float lo = dim ? x[0] : 0.f, hi = lo;
  for (int64_t d = 1; d < dim; ++d) {
    lo = std::min(lo, x[d]);
    hi = std::max(hi, x[d]);
  }
  const float range = hi - lo;
  const float scale = range / 255.0f, bias = lo;
  const float inverse_scale = 255.0f / (range + 1e-8f);
  for (int64_t d = 0; d < dim; ++d) {
    const long code = std::lrintf((x[d] - lo) * inverse_scale);
    out[d] = static_cast<uint8_t>(std::clamp<long>(code, 0, 255));
  }
  std::memcpy(out + dim, &scale, 4);
  std::memcpy(out + dim + 4, &bias, 4);
}

// The 4-bit row of PyTorch's embedding_bag_4bit_prepack (FBGEMM's fused n-bit rowwise
// quantization, 4 bits): the minimum is rounded to fp16 first (so the stored bias is the one
// the codes were computed from), scale = range / 15 rounded to fp16 (1 if that is 0 or its
// inverse overflows), codes rounded to nearest even from (x - bias) / scale and clamped to
// [0, 15]; two codes a byte, the even column in the low nibble.
void quantize_row_int4(const float* x, int64_t dim, uint8_t* out) {
  float lo = dim ? x[0] : 0.f, hi = lo;
  for (int64_t d = 1; d < dim; ++d) {
    lo = std::min(lo, x[d]);
    hi = std::max(hi, x[d]);
  }
  lo = round_to_half(lo);
  const float range = hi - lo;
  float scale = round_to_half(range == 0 ? 1.0f : range / 15.0f);
  if (scale == 0) scale = 1.0f;
  float inverse_scale = 1.0f / scale;
  if (std::isinf(inverse_scale)) {
    scale = 1.0f;
    inverse_scale = 1.0f;
  }
  std::fill(out, out + dim / 2, uint8_t(0));
  for (int64_t d = 0; d < dim; ++d) {
    const long code = std::clamp<long>(std::lrintf((x[d] - lo) * inverse_scale), 0, 15);
    out[d / 2] |= static_cast<uint8_t>(code << ((d % 2) * 4));
  }
  const uint16_t params[2] = {half_bits(scale), half_bits(lo)};
  std::memcpy(out + dim / 2, params, 4);
}

// fp8 e4m3 codes of x / scale with scale = amax / 448 (e4m3's largest finite value), so the
// row's largest magnitude maps to the top of the format; a zero row keeps scale 1. A scale
// whose inverse would overflow (amax below ~1e-35) uses amax itself.
void quantize_row_fp8(const float* x, int64_t dim, uint8_t* out) {
  float amax = 0.f;
  for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(x[d]));
  float scale = amax / 448.0f;
  if (amax == 0.f) scale = 1.0f;
  else if (!std::isfinite(1.0f / scale)) scale = amax;
  for (int64_t d = 0; d < dim; ++d) out[d] = c10::Float8_e4m3fn(x[d] / scale).x;
  std::memcpy(out + dim, &scale, 4);
}

at::Tensor quantize_rows_cpu(const at::Tensor& weight_in, c10::string_view format) {
  constexpr const char* op = "quantize_rows";
  const QuantFormat f = parse_quant_format(format, op);
  check_weight_2d(weight_in, op);
  TORCH_CHECK(at::isFloatingType(weight_in.scalar_type()), op,
              ": 'weight' must be a floating-point tensor, got ", weight_in.scalar_type());
  const int64_t num_rows = weight_in.size(0), dim = weight_in.size(1);
  TORCH_CHECK(f != QuantFormat::kInt4 || dim % 2 == 0, op,
              ": 'weight' must have an even embedding_dim for int4 (two codes a byte, as "
              "PyTorch's 4-bit prepack), got ", dim);
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  const float* w = weight.const_data_ptr<float>();
  // Non-finite values have no affine code; refuse before writing anything.
  std::atomic<int64_t> first_bad{num_rows};
  at::parallel_for(0, num_rows, grain_for(dim * 4), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t d = 0; d < dim; ++d) {
        if (!std::isfinite(w[r * dim + d])) {
          record_bad(first_bad, r);
          return;
        }
      }
    }
  });
  TORCH_CHECK(first_bad.load() == num_rows, op, ": 'weight' row ", first_bad.load(),
              " has a non-finite value; only finite tables can be quantized");
  const int64_t row_bytes = quant_row_bytes(f, dim);
  // A table is read at random rows: from output_allocator, large tables get transparent huge
  // pages, which spares most lookups a TLB miss (a page walk per row otherwise).
  at::Tensor packed = empty_output({num_rows, row_bytes}, weight.options().dtype(at::kByte));
  uint8_t* p = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, num_rows, grain_for(dim * 4), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = w + r * dim;
      uint8_t* out = p + r * row_bytes;
      switch (f) {
        case QuantFormat::kInt8: quantize_row_int8(x, dim, out); break;
        case QuantFormat::kInt4: quantize_row_int4(x, dim, out); break;
        case QuantFormat::kFp8: quantize_row_fp8(x, dim, out); break;
      }
    }
  });
  return packed;
}

// Rows [begin, end) of the gather: each dequantized straight into its fp32 output row, or
// through a row buffer for fp16/bf16.
template <QuantFormat F, typename index_t, typename out_t>
void gather_rows(const QuantTable& t, const index_t* idx, int64_t begin, int64_t end, out_t* out) {
  const uint8_t* table = t.packed.const_data_ptr<uint8_t>();
  const int64_t dim = t.dim, rb = t.row_bytes;
  std::vector<float> buffer(std::is_same_v<out_t, float> ? 0 : dim);
  for (int64_t i = begin; i < std::min(end, begin + kPrefetchDistance); ++i) {
    prefetch_quant_row(table + static_cast<int64_t>(idx[i]) * rb, rb);
  }
  for (int64_t i = begin; i < end; ++i) {
    if (i + kPrefetchDistance < end) {
      prefetch_quant_row(table + static_cast<int64_t>(idx[i + kPrefetchDistance]) * rb, rb);
    }
    const uint8_t* row = table + static_cast<int64_t>(idx[i]) * rb;
    const RowParams p = row_params<F>(row, dim);
    if constexpr (std::is_same_v<out_t, float>) {
      add_codes<F, true>(row, dim, p.scale, p.bias, out + i * dim);
    } else {
      add_codes<F, true>(row, dim, p.scale, p.bias, buffer.data());
      store_row(buffer.data(), 1.0f, out + i * dim, dim);
    }
  }
}

at::Tensor quantized_embedding_forward_cpu(const at::Tensor& packed, c10::string_view format,
                                           const at::Tensor& indices_in, at::ScalarType dtype) {
  constexpr const char* op = "quantized_embedding_forward";
  const QuantTable t = quant_lookup_table(packed, format, indices_in, dtype, op);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel();
  at::Tensor out = empty_output(lookup_shape(indices, t.dim), packed.options().dtype(dtype));
  if (n == 0 || t.dim == 0) {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
      check_index_range(indices.const_data_ptr<index_t>(), n, t.num_rows, op);
    });
    return out;
  }
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, t.num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        scalar_t* o = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, n, grain_for(t.row_bytes), [&](int64_t begin, int64_t end) {
          switch (t.format) {
            case QuantFormat::kInt8: gather_rows<QuantFormat::kInt8>(t, idx, begin, end, o); break;
            case QuantFormat::kInt4: gather_rows<QuantFormat::kInt4>(t, idx, begin, end, o); break;
            case QuantFormat::kFp8: gather_rows<QuantFormat::kFp8>(t, idx, begin, end, o); break;
          }
        });
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("quantize_rows", &quantize_rows_cpu);
  m.impl("quantized_embedding_forward", &quantized_embedding_forward_cpu);
}

}  // namespace embedding_ext::cpu
