// CUDA row gathers: the lookup (embedding_forward, any dtype: a row copy with the widest
// vector the layout allows) and the double backward (embedding_scaled_gather).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

template <typename vec_t, typename index_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ weight, int64_t row_stride_vecs,
                                   const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                   vec_t* __restrict__ out, int64_t row_vecs, ErrorSink sink) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    vec_t* dst = out + i * row_vecs;
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(sink, i, k, num_rows);
      for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst[v] = vec_t{};
      continue;
    }
    const vec_t* src = weight + k * row_stride_vecs;
    for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst[v] = src[v];
  }
}

template <typename index_t>
void launch_gather(const at::Tensor& weight, const index_t* idx, int64_t n, at::Tensor& out,
                   const LaunchScope& scope) {
  const int64_t elem = weight.element_size();
  const int64_t row_bytes = weight.size(1) * elem, stride_bytes = weight.stride(0) * elem;
  const char* w = static_cast<const char*>(weight.const_data_ptr());
  char* o = static_cast<char*>(out.mutable_data_ptr());
  const int vb = vector_bytes({row_bytes, stride_bytes, reinterpret_cast<int64_t>(w),
                               reinterpret_cast<int64_t>(o)});
  const int64_t row_vecs = row_bytes / vb;
  const RowLaunch l = row_launch(n, row_vecs);
  auto go = [&](auto vec_tag) {
    using vec_t = decltype(vec_tag);
    gather_rows_kernel<vec_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
        reinterpret_cast<const vec_t*>(w), stride_bytes / vb, idx, n, weight.size(0),
        reinterpret_cast<vec_t*>(o), row_vecs, scope.sink);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (vb) {
    case 16: go(uint4{}); break;
    case 8: go(uint2{}); break;
    case 4: go(uint32_t{}); break;
    case 2: go(uint16_t{}); break;
    default: go(uint8_t{}); break;
  }
}

// The host side both gathers share: checks, launch scope, the output, nothing to launch for
// no ids; launch(in, out, scope) does the rest.
template <typename Launch>
at::Tensor cuda_gather(const at::Tensor& weight, const at::Tensor& indices, const char* op,
                       Launch&& launch) {
  const LookupInputs in = lookup_inputs(weight, indices, op);
  LaunchScope scope(weight, op);
  at::Tensor out = at::empty(in.out_shape, in.weight.options());
  if (in.n == 0) return out;
  launch(in, out, scope);
  scope.finish();
  return out;
}

at::Tensor embedding_forward_cuda(const at::Tensor& weight, const at::Tensor& indices) {
  constexpr const char* op = "embedding_forward";
  return cuda_gather(weight, indices, op, [&](const LookupInputs& in, at::Tensor& out,
                                              const LaunchScope& scope) {
    // With D == 0 there is nothing to copy, but the indices are still checked.
    AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
      launch_gather<index_t>(in.weight, in.indices.const_data_ptr<index_t>(), in.n, out, scope);
    });
  });
}

// out[i] = weight[idx[i]] / count, 0 at padding and at bad ids.
template <typename scalar_t, typename index_t>
__global__ void scaled_gather_kernel(const scalar_t* __restrict__ weight, int64_t row_stride,
                                     const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                     int64_t dim, int64_t padding_idx,
                                     const int* __restrict__ counts, scalar_t* __restrict__ out,
                                     ErrorSink sink) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    scalar_t* dst = out + i * dim;
    const bool bad = !row_in_range(k, num_rows);
    if (bad && threadIdx.x == 0) report_bad_index(sink, i, k, num_rows);
    if (bad || k == padding_idx) {
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = scalar_t(0);
      continue;
    }
    const acc_t scale = counts ? acc_t(1) / static_cast<acc_t>(counts[k]) : acc_t(1);
    const scalar_t* src = weight + k * row_stride;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * scale);
    }
  }
}

at::Tensor embedding_scaled_gather_cuda(const at::Tensor& weight, const at::Tensor& indices,
                                        int64_t padding_idx, bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_scaled_gather";
  return cuda_gather(weight, indices, op, [&](const LookupInputs& in, at::Tensor& out,
                                              const LaunchScope& scope) {
    AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
      const index_t* idx = in.indices.const_data_ptr<index_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.weight.scalar_type(), op, [&] {
        at::Tensor counts;
        if (scale_grad_by_freq) {
          counts = row_counts(idx, in.n, in.num_rows, padding_idx, in.weight, scope);
        }
        const RowLaunch l = row_launch(in.n, in.dim);
        scaled_gather_kernel<scalar_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
            in.weight.const_data_ptr<scalar_t>(), in.weight.stride(0), idx, in.n, in.num_rows,
            in.dim, padding_idx, scale_grad_by_freq ? counts.const_data_ptr<int>() : nullptr,
            out.mutable_data_ptr<scalar_t>(), scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_forward", &embedding_forward_cuda);
  m.impl("embedding_scaled_gather", &embedding_scaled_gather_cuda);
}

}  // namespace embedding_ext::cuda
