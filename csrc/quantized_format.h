// The row layouts of quantized tables and the checks of their arguments, shared by the CPU
// and CUDA kernels (csrc/cpu/quantized*.cpp, csrc/cuda/quantized.cu). Every layout keeps a
// row's codes first and its parameters after them, so that one row is one contiguous read.
//   int8: D uint8 codes, fp32 scale, fp32 bias               (D + 8 bytes)
//   int4: D / 2 bytes, code 2j in the low nibble of byte j,  (D / 2 + 4 bytes)
//         code 2j + 1 in the high one, fp16 scale, fp16 bias
//   fp8:  D e4m3 codes, fp32 scale                           (D + 4 bytes)
// int8 and int4 are exactly PyTorch's prepacked rows (embedding_bag_byte_prepack,
// embedding_bag_4bit_prepack), so tables move between the two without conversion.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>

#include "checks.h"

namespace embedding_ext {

enum class QuantFormat : int { kInt8 = 0, kInt4 = 1, kFp8 = 2 };

inline QuantFormat parse_quant_format(c10::string_view name, const char* op) {
  if (name == "int8") return QuantFormat::kInt8;
  if (name == "int4") return QuantFormat::kInt4;
  if (name == "fp8") return QuantFormat::kFp8;
  TORCH_CHECK(false, op, ": 'format' must be 'int8', 'int4' or 'fp8', got '", std::string(name), "'");
}

// Bytes after the codes: the row's scale (and bias).
inline int64_t quant_param_bytes(QuantFormat f) {
  return f == QuantFormat::kInt8 ? 8 : 4;
}

inline int64_t quant_row_bytes(QuantFormat f, int64_t dim) {
  return (f == QuantFormat::kInt4 ? dim / 2 : dim) + quant_param_bytes(f);
}

// A packed table once checked: (V, row_bytes) uint8 with unit stride along a row.
struct QuantTable {
  at::Tensor packed;
  QuantFormat format;
  int64_t num_rows, dim, row_bytes;
};

inline QuantTable quant_table(const at::Tensor& packed, c10::string_view format, const char* op) {
  const QuantFormat f = parse_quant_format(format, op);
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": 'packed' must be a uint8 tensor, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2, op, ": 'packed' must be 2-D (rows, row bytes), got shape ",
              packed.sizes());
  const int64_t cols = packed.size(1), params = quant_param_bytes(f);
  TORCH_CHECK(cols >= params, op, ": 'packed' rows of format '", std::string(format),
              "' hold at least ", params, " bytes (the scale", f == QuantFormat::kFp8 ? "" : " and bias",
              "), got ", cols);
  const int64_t codes = cols - params;
  QuantTable t{packed.size(1) <= 1 || packed.stride(1) == 1 ? packed : packed.contiguous(), f,
               packed.size(0), f == QuantFormat::kInt4 ? 2 * codes : codes, cols};
  return t;
}

inline void check_quant_output_dtype(at::ScalarType dtype, const char* op) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": 'dtype' must be float32, float16 or bfloat16, got ", dtype);
}

// quantized_embedding_forward's checks: the table, the ids' dtype and device, the output dtype.
inline QuantTable quant_lookup_table(const at::Tensor& packed, c10::string_view format,
                                     const at::Tensor& indices, at::ScalarType dtype,
                                     const char* op) {
  QuantTable t = quant_table(packed, format, op);
  check_indices_dtype(indices, op);
  check_same_device(packed, "packed", indices, "indices", op);
  check_quant_output_dtype(dtype, op);
  return t;
}

// quantized_embedding_bag_forward's checks (offsets' values: each backend, as for bags).
inline BagInputs quant_bag_inputs(const QuantTable& t, const at::Tensor& indices,
                                  const at::Tensor& offsets, int64_t mode,
                                  const c10::optional<at::Tensor>& per_sample_weights,
                                  at::ScalarType dtype, const char* op) {
  check_bag_mode(mode, op);
  check_quant_output_dtype(dtype, op);
  BagInputs in = bag_inputs(t.packed, "packed", indices, offsets, per_sample_weights, op);
  if (per_sample_weights.has_value()) {
    TORCH_CHECK(mode == kBagSum, op,
                ": 'per_sample_weights' is only supported in sum mode (0), got mode ", mode);
    TORCH_CHECK(per_sample_weights->scalar_type() == at::kFloat, op,
                ": 'per_sample_weights' must be float32, got ", per_sample_weights->scalar_type());
  }
  in.num_rows = t.num_rows;
  in.dim = t.dim;
  return in;
}

}  // namespace embedding_ext
