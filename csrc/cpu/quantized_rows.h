// Reading one quantized row on the CPU (layouts: csrc/quantized_format.h). The loops are plain
// so the compiler vectorises them for the instruction set of the function they are inlined
// into (the AVX2 / AVX-512 copies of quantized_bag.cpp, isa.h); no a*b+c contraction
// (setup.py: -ffp-contract=off), so every copy gives the same bits.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "../quantized_format.h"

namespace embedding_ext::cpu {

#define EMBEDDING_EXT_ALWAYS_INLINE __attribute__((always_inline)) inline

// The fp32 value of an e4m3 code, branch-free so that loops over codes vectorise: the sign,
// exponent and mantissa bits moved to their fp32 places, then scaled by 2^(127 - 7) (the
// difference of the exponent biases), which is exact for normal and subnormal codes alike;
// 0x7F / 0xFF are NaN (e4m3fn has no infinities).
EMBEDDING_EXT_ALWAYS_INLINE float fp8_e4m3_value(uint8_t code) {
  const uint32_t bits = (static_cast<uint32_t>(code & 0x80) << 24) |
                        (static_cast<uint32_t>(code & 0x7F) << 20);
  float magnitude;
  std::memcpy(&magnitude, &bits, 4);
  const float value = magnitude * 0x1p120f;
  return (code & 0x7F) == 0x7F ? std::numeric_limits<float>::quiet_NaN() : value;
}

// A row's scale and bias (fp8: bias 0), widened to fp32.
struct RowParams {
  float scale, bias;
};

template <QuantFormat F>
EMBEDDING_EXT_ALWAYS_INLINE RowParams row_params(const uint8_t* row, int64_t dim) {
  RowParams p{0.f, 0.f};
  if constexpr (F == QuantFormat::kInt8) {
    std::memcpy(&p.scale, row + dim, 4);
    std::memcpy(&p.bias, row + dim + 4, 4);
  } else if constexpr (F == QuantFormat::kInt4) {
    uint16_t bits[2];
    std::memcpy(bits, row + dim / 2, 4);
    p.scale = static_cast<float>(c10::Half(bits[0], c10::Half::from_bits()));
    p.bias = static_cast<float>(c10::Half(bits[1], c10::Half::from_bits()));
  } else {
    std::memcpy(&p.scale, row + dim, 4);
  }
  return p;
}

// acc[d] += a * code_d + c for the codes of `row` (a and c: the row's scale and bias, each
// times the id's weight). fp8 has no bias: c is 0 and not added. kStore: acc[d] = ..., the
// plain dequantized row when a, c are the row's own parameters.
template <QuantFormat F, bool kStore>
EMBEDDING_EXT_ALWAYS_INLINE void add_codes(const uint8_t* __restrict row, int64_t dim, float a,
                                           float c, float* __restrict acc) {
  if constexpr (F == QuantFormat::kInt8) {
    for (int64_t d = 0; d < dim; ++d) {
      const float v = a * static_cast<float>(row[d]) + c;
      acc[d] = kStore ? v : acc[d] + v;
    }
  } else if constexpr (F == QuantFormat::kInt4) {
    for (int64_t j = 0; j < dim / 2; ++j) {
      const float lo = a * static_cast<float>(row[j] & 15) + c;
      const float hi = a * static_cast<float>(row[j] >> 4) + c;
      acc[2 * j] = kStore ? lo : acc[2 * j] + lo;
      acc[2 * j + 1] = kStore ? hi : acc[2 * j + 1] + hi;
    }
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      const float v = a * fp8_e4m3_value(row[d]);
      acc[d] = kStore ? v : acc[d] + v;
    }
  }
}

// acc[d] = max(acc[d], dequantized code_d): strictly greater, so a NaN already there stays
// (the float bag's rule: the first row as is, then strictly greater values).
template <QuantFormat F>
EMBEDDING_EXT_ALWAYS_INLINE void max_codes(const uint8_t* __restrict row, int64_t dim, float a,
                                           float c, float* __restrict acc) {
  if constexpr (F == QuantFormat::kInt8) {
    for (int64_t d = 0; d < dim; ++d) {
      const float v = a * static_cast<float>(row[d]) + c;
      acc[d] = v > acc[d] ? v : acc[d];
    }
  } else if constexpr (F == QuantFormat::kInt4) {
    for (int64_t j = 0; j < dim / 2; ++j) {
      const float lo = a * static_cast<float>(row[j] & 15) + c;
      const float hi = a * static_cast<float>(row[j] >> 4) + c;
      acc[2 * j] = lo > acc[2 * j] ? lo : acc[2 * j];
      acc[2 * j + 1] = hi > acc[2 * j + 1] ? hi : acc[2 * j + 1];
    }
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      const float v = a * fp8_e4m3_value(row[d]);
      acc[d] = v > acc[d] ? v : acc[d];
    }
  }
}

// Every cache line of a row (rows are rarely line-aligned: the first and last bytes may sit
// in lines of their own).
EMBEDDING_EXT_ALWAYS_INLINE void prefetch_quant_row(const uint8_t* row, int64_t row_bytes) {
  for (int64_t byte = 0; byte < row_bytes; byte += 64) __builtin_prefetch(row + byte);
  __builtin_prefetch(row + row_bytes - 1);
}

}  // namespace embedding_ext::cpu
