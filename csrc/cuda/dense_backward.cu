// CUDA dense backward (embedding_dense_backward). Default: an atomic scatter-add into an
// accumulation-type buffer (fp32 for fp16/bf16, rounded once). Under
// torch.use_deterministic_algorithms(True): positions stably sorted by row, and one row
// group per distinct row sums its positions in ascending order (no atomics on values).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "launch.cuh"

namespace embedding_ext {
namespace cuda {
namespace {

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void scatter_add_kernel(const scalar_t* __restrict__ grad, const index_t* __restrict__ idx,
                                   int64_t n, int64_t num_rows, int64_t dim, int64_t padding_idx,
                                   const int* __restrict__ counts, acc_t* __restrict__ out,
                                   ErrorSink sink) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(sink, i, k, num_rows);
      continue;
    }
    if (k == padding_idx) continue;
    const acc_t scale = counts ? acc_t(1) / static_cast<acc_t>(counts[k]) : acc_t(1);
    const scalar_t* g = grad + i * dim;
    acc_t* dst = out + k * dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      atomicAdd(dst + d, static_cast<acc_t>(g[d]) * scale);
    }
  }
}

template <typename scalar_t, typename index_t>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ grad,
                                   const index_t* __restrict__ sorted_rows,
                                   const int64_t* __restrict__ positions, int64_t n,
                                   int64_t num_rows, int64_t dim, int64_t padding_idx,
                                   bool scale_grad_by_freq, scalar_t* __restrict__ out,
                                   ErrorSink sink) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; j < n; j += step) {
    const int64_t k = sorted_rows[j];
    if (j > 0 && static_cast<int64_t>(sorted_rows[j - 1]) == k) continue;  // not a segment head
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(sink, positions[j], k, num_rows);
      continue;
    }
    if (k == padding_idx) continue;
    int64_t e = j + 1;
    while (e < n && static_cast<int64_t>(sorted_rows[e]) == k) ++e;
    const acc_t scale = scale_grad_by_freq ? acc_t(1) / static_cast<acc_t>(e - j) : acc_t(1);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t s = j; s < e; ++s) acc += static_cast<acc_t>(grad[positions[s] * dim + d]);
      out[k * dim + d] = static_cast<scalar_t>(acc * scale);
    }
  }
}

at::Tensor embedding_dense_backward_cuda(const at::Tensor& grad_in, const at::Tensor& indices_in,
                                         c10::SymInt num_weights, int64_t padding_idx,
                                         bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_dense_backward";
  const BackwardInputs in = cuda_backward_inputs(grad_in, indices_in, num_weights, padding_idx, op);
  const at::Tensor &grad = in.grad, &indices = in.indices;
  const int64_t num_rows = in.num_rows, dim = in.dim, n = in.n;
  LaunchScope scope(grad_in, op);
  if (n == 0 || dim == 0 || num_rows == 0) {
    // Nothing to add, but bad ids are still reported.
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
      probe_indices<index_t>(indices.const_data_ptr<index_t>(), n, num_rows, scope);
    });
    scope.finish();
    return at::zeros({num_rows, dim}, grad.options());
  }
  at::Tensor result;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const RowLaunch l = row_launch(n, dim);
      if (at::globalContext().deterministicAlgorithms()) {
        auto sorted = at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        const at::Tensor& sorted_rows = std::get<0>(sorted);
        const at::Tensor& positions = std::get<1>(sorted);
        result = at::zeros({num_rows, dim}, grad.options());
        segment_sum_kernel<scalar_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
            grad.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<index_t>(),
            positions.const_data_ptr<int64_t>(), n, num_rows, dim, padding_idx, scale_grad_by_freq,
            result.mutable_data_ptr<scalar_t>(), scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      at::Tensor counts;
      if (scale_grad_by_freq) counts = row_counts(idx, n, num_rows, padding_idx, grad, scope);
      at::Tensor acc = at::zeros({num_rows, dim}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      scatter_add_kernel<scalar_t, acc_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
          grad.const_data_ptr<scalar_t>(), idx, n, num_rows, dim, padding_idx,
          scale_grad_by_freq ? counts.const_data_ptr<int>() : nullptr,
          acc.mutable_data_ptr<acc_t>(), scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // fp16/bf16 were summed in fp32 and are rounded once here.
      result = acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
    });
  });
  scope.finish();
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_dense_backward", &embedding_dense_backward_cuda);
}

}  // namespace cuda
}  // namespace embedding_ext
