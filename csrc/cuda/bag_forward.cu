// CUDA pooled lookup, forward (embedding_bag_forward): one thread group per bag, a lane per
// column, rows in position order with an fp32 (fp64) accumulator: deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "bag.cuh"
#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void pool_bags_kernel(const scalar_t* __restrict__ weight, int64_t row_stride,
                                 const index_t* __restrict__ idx, const int64_t* __restrict__ off,
                                 int64_t bags, int64_t n, int64_t num_rows, int64_t dim,
                                 int64_t mode, const scalar_t* __restrict__ psw,
                                 int64_t padding_idx, scalar_t* __restrict__ out,
                                 int64_t* __restrict__ arg_max, ErrorSink sink) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; b < bags; b += step) {
    const BagRange r = bag_range(off, b, n, sink, threadIdx.x == 0);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      acc_t acc = 0;
      int64_t arg = -1, count = 0;
      for (int64_t i = r.start; i < r.end; ++i) {
        const int64_t k = idx[i];
        // Bad ids pool nothing (probe_indices reports every id, in bags or not).
        if (k == padding_idx || !row_in_range(k, num_rows)) continue;
        const acc_t v = static_cast<acc_t>(weight[k * row_stride + d]);
        if (mode == kBagMax) {
          // The first row as is (a NaN too), then strictly greater: ties go to the first
          // occurrence and a later NaN is never taken (PyTorch's CPU rule, ours everywhere).
          if (count == 0 || v > acc) {
            acc = v;
            arg = k;
          }
        } else {
          acc += psw != nullptr ? v * static_cast<acc_t>(psw[i]) : v;
        }
        ++count;
      }
      if (mode == kBagMean && count > 1) acc /= static_cast<acc_t>(count);
      out[b * dim + d] = static_cast<scalar_t>(acc);
      if (mode == kBagMax) arg_max[b * dim + d] = arg;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_forward_cuda(
    const at::Tensor& weight_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    int64_t mode, const c10::optional<at::Tensor>& per_sample_weights, int64_t padding_idx) {
  constexpr const char* op = "embedding_bag_forward";
  const BagInputs in = bag_forward_inputs(weight_in, indices_in, offsets_in, mode, per_sample_weights, op);
  LaunchScope scope(weight_in, op);
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  const int64_t num_rows = in.num_rows, dim = in.dim;
  at::Tensor out = at::empty({in.bags, dim}, weight.options());
  at::Tensor arg_max = at::empty({mode == kBagMax ? in.bags : 0, dim}, weight.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    // Every id is range-checked, also those past the last offset (in no bag).
    probe_indices(idx, in.n, num_rows, scope);
    if (dim == 0) {  // nothing to pool; the offsets are still checked
      bag_layout<index_t>(in, padding_idx, false, scope);
      return;
    }
    if (in.bags == 0) {
      check_first_offset_kernel<<<1, 1, 0, scope.stream>>>(in.offsets.const_data_ptr<int64_t>(), in.n,
                                                           scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const RowLaunch launch = row_launch(in.bags, dim);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      pool_bags_kernel<scalar_t, index_t><<<launch.grid, launch.block, 0, scope.stream>>>(
          weight.const_data_ptr<scalar_t>(), weight.stride(0), idx,
          in.offsets.const_data_ptr<int64_t>(), in.bags, in.n, num_rows, dim, mode,
          psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr, padding_idx,
          out.mutable_data_ptr<scalar_t>(),
          mode == kBagMax ? arg_max.mutable_data_ptr<int64_t>() : nullptr, scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  scope.finish();
  return {out, arg_max};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_bag_forward", &embedding_bag_forward_cuda);
}

}  // namespace embedding_ext::cuda
