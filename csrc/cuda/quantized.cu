// CUDA lookups of quantized tables (layouts: csrc/quantized_format.h): the unpooled lookup
// (quantized_embedding_forward) and the pooled one (quantized_embedding_bag_forward). One
// group of lanes per output row, each lane dequantizing columns d, d + lanes, ... in fp32.
// Bad ids and offsets are reported through the error sink, without a synchronisation, as
// in every CUDA op of the library (index_errors.h); their rows pool nothing.
// Quantizing (quantize_rows) runs on the CPU for CUDA tensors too: a table is packed once.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../quantized_format.h"
#include "bag.cuh"
#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

// A row's scale and bias (fp8: bias 0). The parameters sit right after the codes, at any
// byte offset (D is arbitrary): read byte-wise.
struct RowParams {
  float scale, bias;
};

template <QuantFormat F>
__device__ __forceinline__ RowParams row_params(const uint8_t* __restrict__ row, int64_t dim) {
  RowParams p{0.f, 0.f};
  if constexpr (F == QuantFormat::kInt4) {
    const uint8_t* params = row + dim / 2;
    const uint16_t scale_bits = static_cast<uint16_t>(params[0] | (params[1] << 8));
    const uint16_t bias_bits = static_cast<uint16_t>(params[2] | (params[3] << 8));
    p.scale = static_cast<float>(c10::Half(scale_bits, c10::Half::from_bits()));
    p.bias = static_cast<float>(c10::Half(bias_bits, c10::Half::from_bits()));
  } else {
    const uint8_t* params = row + dim;
    uint32_t bits = params[0] | (params[1] << 8) | (params[2] << 16) | (uint32_t(params[3]) << 24);
    p.scale = __uint_as_float(bits);
    if constexpr (F == QuantFormat::kInt8) {
      bits = params[4] | (params[5] << 8) | (params[6] << 16) | (uint32_t(params[7]) << 24);
      p.bias = __uint_as_float(bits);
    }
  }
  return p;
}

// Column d of a row, dequantized: scale * code + bias (fp8: scale * e4m3 value).
template <QuantFormat F>
__device__ __forceinline__ float dequantize(const uint8_t* __restrict__ row, int64_t d,
                                            const RowParams& p) {
  if constexpr (F == QuantFormat::kInt8) {
    return p.scale * static_cast<float>(row[d]) + p.bias;
  } else if constexpr (F == QuantFormat::kInt4) {
    const int code = (row[d >> 1] >> ((d & 1) * 4)) & 15;
    return p.scale * static_cast<float>(code) + p.bias;
  } else {
    return p.scale * static_cast<float>(c10::Float8_e4m3fn(row[d], c10::Float8_e4m3fn::from_bits()));
  }
}

template <QuantFormat F, typename index_t, typename out_t>
__global__ void gather_kernel(const uint8_t* __restrict__ table, int64_t row_bytes,
                              int64_t num_rows, const index_t* __restrict__ idx, int64_t n,
                              int64_t dim, out_t* __restrict__ out, ErrorSink sink) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    out_t* dst = out + i * dim;
    if (!row_in_range(k, num_rows)) {  // zeros, never a read outside the table
      if (threadIdx.x == 0) report_bad_index(sink, i, k, num_rows);
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = static_cast<out_t>(0.f);
      continue;
    }
    const uint8_t* row = table + k * row_bytes;
    const RowParams p = row_params<F>(row, dim);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      dst[d] = static_cast<out_t>(dequantize<F>(row, d, p));
    }
  }
}

// Bag b's columns d, d + lanes, ...: rows in position order, fp32, as the CPU pools them
// (an empty or all-padding bag gives zeros; max takes the first row, then strictly greater).
template <QuantFormat F, typename index_t, typename out_t>
__global__ void pool_kernel(const uint8_t* __restrict__ table, int64_t row_bytes, int64_t num_rows,
                            const index_t* __restrict__ idx, const int64_t* __restrict__ off,
                            int64_t bags, int64_t n, int64_t dim, int64_t mode,
                            const float* __restrict__ psw, int64_t padding_idx,
                            out_t* __restrict__ out, ErrorSink sink) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; b < bags; b += step) {
    const BagRange r = bag_range(off, b, n, sink, threadIdx.x == 0);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      float acc = 0.f;
      int64_t count = 0;
      for (int64_t i = r.start; i < r.end; ++i) {
        const int64_t k = idx[i];
        // Bad ids pool nothing (probe_indices reports every id, in bags or not).
        if (k == padding_idx || !row_in_range(k, num_rows)) continue;
        const uint8_t* row = table + k * row_bytes;
        const float v = dequantize<F>(row, d, row_params<F>(row, dim));
        if (mode == kBagMax) {
          if (count == 0 || v > acc) acc = v;
        } else {
          acc += psw != nullptr ? v * psw[i] : v;
        }
        ++count;
      }
      if (mode == kBagMean && count > 1) acc /= static_cast<float>(count);
      out[b * dim + d] = static_cast<out_t>(acc);
    }
  }
}

// fn(out_t{}) for the output dtype (fp32, fp16, bf16), fn(QuantFormat constant) for the format.
template <typename Fn>
void dispatch_output(at::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: fn(float{}); break;
  }
}

template <typename Fn>
void dispatch_format(QuantFormat f, const Fn& fn) {
  switch (f) {
    case QuantFormat::kInt8: fn(std::integral_constant<QuantFormat, QuantFormat::kInt8>{}); break;
    case QuantFormat::kInt4: fn(std::integral_constant<QuantFormat, QuantFormat::kInt4>{}); break;
    case QuantFormat::kFp8: fn(std::integral_constant<QuantFormat, QuantFormat::kFp8>{}); break;
  }
}

at::Tensor quantized_embedding_forward_cuda(const at::Tensor& packed, c10::string_view format,
                                            const at::Tensor& indices_in, at::ScalarType dtype) {
  constexpr const char* op = "quantized_embedding_forward";
  const QuantTable t = quant_lookup_table(packed, format, indices_in, dtype, op);
  LaunchScope scope(packed, op);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel();
  at::Tensor out = at::empty(lookup_shape(indices, t.dim), packed.options().dtype(dtype));
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    if (t.dim == 0) {
      probe_indices(idx, n, t.num_rows, scope);
      return;
    }
    if (n == 0) return;
    const RowLaunch launch = row_launch(n, t.dim);
    dispatch_output(dtype, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      dispatch_format(t.format, [&](auto format_tag) {
        gather_kernel<decltype(format_tag)::value, index_t, out_t>
            <<<launch.grid, launch.block, 0, scope.stream>>>(
                t.packed.const_data_ptr<uint8_t>(), t.row_bytes, t.num_rows, idx, n, t.dim,
                out.mutable_data_ptr<out_t>(), scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  scope.finish();
  return out;
}

at::Tensor quantized_embedding_bag_forward_cuda(const at::Tensor& packed, c10::string_view format,
                                                const at::Tensor& indices,
                                                const at::Tensor& offsets, int64_t mode,
                                                const c10::optional<at::Tensor>& per_sample_weights,
                                                int64_t padding_idx, at::ScalarType dtype) {
  constexpr const char* op = "quantized_embedding_bag_forward";
  const QuantTable t = quant_table(packed, format, op);
  const BagInputs in = quant_bag_inputs(t, indices, offsets, mode, per_sample_weights, dtype, op);
  LaunchScope scope(packed, op);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  at::Tensor out = at::empty({in.bags, in.dim}, packed.options().dtype(dtype));
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    probe_indices(idx, in.n, t.num_rows, scope);  // every id, also those in no bag
    if (in.dim == 0) {  // nothing to pool; the offsets are still checked
      bag_layout<index_t>(in, padding_idx, false, scope);
      return;
    }
    if (in.bags == 0) {
      check_first_offset_kernel<<<1, 1, 0, scope.stream>>>(in.offsets.const_data_ptr<int64_t>(),
                                                           in.n, scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const RowLaunch launch = row_launch(in.bags, in.dim);
    dispatch_output(dtype, [&](auto out_tag) {
      using out_t = decltype(out_tag);
      dispatch_format(t.format, [&](auto format_tag) {
        pool_kernel<decltype(format_tag)::value, index_t, out_t>
            <<<launch.grid, launch.block, 0, scope.stream>>>(
                t.packed.const_data_ptr<uint8_t>(), t.row_bytes, t.num_rows, idx,
                in.offsets.const_data_ptr<int64_t>(), in.bags, in.n, in.dim, mode,
                psw.defined() ? psw.const_data_ptr<float>() : nullptr, padding_idx,
                out.mutable_data_ptr<out_t>(), scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  scope.finish();
  return out;
}

// A CUDA table is packed by the CPU kernel: one copy each way, once per table (the rows'
// min/max and the codes' rounding then come from one implementation, PyTorch's bit for bit).
at::Tensor quantize_rows_cuda(const at::Tensor& weight, c10::string_view format) {
  static const auto cpu_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("embedding_ext::quantize_rows", "")
                                 .typed<at::Tensor(const at::Tensor&, c10::string_view)>();
  return cpu_op.call(weight.cpu(), format).to(weight.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("quantize_rows", &quantize_rows_cuda);
  m.impl("quantized_embedding_forward", &quantized_embedding_forward_cuda);
  m.impl("quantized_embedding_bag_forward", &quantized_embedding_bag_forward_cuda);
}

}  // namespace embedding_ext::cuda
