// CUDA sparse backward (embedding_sparse_backward): values in position order, padding
// positions removed, scaled by 1/count with scale_grad_by_freq.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void sparse_values_kernel(const scalar_t* __restrict__ grad,
                                     const index_t* __restrict__ idx,
                                     const int64_t* __restrict__ slot_end,  // inclusive scan of "kept"
                                     int64_t n, int64_t num_rows, int64_t dim, int64_t padding_idx,
                                     const int* __restrict__ counts, int64_t* __restrict__ rows_out,
                                     scalar_t* __restrict__ values, ErrorSink sink) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    // The range check comes first: without padding (padding_idx = -1) an id of -1 is a bad
    // id to report, not a padding position to skip.
    const bool bad = !row_in_range(k, num_rows);
    if (!bad && k == padding_idx) continue;
    const int64_t j = slot_end ? slot_end[i] - 1 : i;
    scalar_t* dst = values + j * dim;
    if (bad) {
      if (threadIdx.x == 0) {
        report_bad_index(sink, i, k, num_rows);
        rows_out[j] = 0;
      }
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = scalar_t(0);
      continue;
    }
    if (threadIdx.x == 0) rows_out[j] = k;
    const acc_t scale = counts ? acc_t(1) / static_cast<acc_t>(counts[k]) : acc_t(1);
    const scalar_t* g = grad + i * dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(g[d]) * scale);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> embedding_sparse_backward_cuda(const at::Tensor& grad_in,
                                                                  const at::Tensor& indices_in,
                                                                  c10::SymInt num_weights,
                                                                  int64_t padding_idx,
                                                                  bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_sparse_backward";
  const BackwardInputs in = cuda_backward_inputs(grad_in, indices_in, num_weights, padding_idx, op);
  const at::Tensor &grad = in.grad, &indices = in.indices;
  const int64_t num_rows = in.num_rows, dim = in.dim, n = in.n;
  LaunchScope scope(grad_in, op);
  at::Tensor slot_end;
  int64_t nnz = n;
  if (padding_idx >= 0 && n > 0) {
    // The only host synchronisation on this path: the output size depends on the data.
    slot_end = at::cumsum(indices.ne(padding_idx), 0, at::kLong);
    nnz = slot_end[-1].item<int64_t>();
  }
  at::Tensor rows = at::empty({1, nnz}, indices.options().dtype(at::kLong));
  at::Tensor values = at::empty({nnz, dim}, grad.options());
  if (n == 0) return {rows, values};
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      at::Tensor counts;
      if (scale_grad_by_freq) counts = row_counts(idx, n, num_rows, padding_idx, grad, scope);
      const RowLaunch l = row_launch(n, dim);
      sparse_values_kernel<scalar_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
          grad.const_data_ptr<scalar_t>(), idx,
          slot_end.defined() ? slot_end.const_data_ptr<int64_t>() : nullptr, n, num_rows, dim,
          padding_idx, scale_grad_by_freq ? counts.const_data_ptr<int>() : nullptr,
          rows.mutable_data_ptr<int64_t>(), values.mutable_data_ptr<scalar_t>(), scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  scope.finish();
  return {rows, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_sparse_backward", &embedding_sparse_backward_cuda);
}

}  // namespace embedding_ext::cuda
