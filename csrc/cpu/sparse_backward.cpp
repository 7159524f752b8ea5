// CPU sparse backward (embedding_sparse_backward): the (row ids, values) of an uncoalesced
// COO gradient, in position order with padding positions removed; values divided by the
// row's count with scale_grad_by_freq.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>

#include "common.h"
#include "output_allocator.h"

namespace embedding_ext::cpu {
namespace {

template <typename scalar_t, typename index_t>
void sparse_backward_rows(const scalar_t* grad, const index_t* idx, int64_t n, int64_t num_rows,
                          int64_t dim, int64_t padding_idx, bool scale_grad_by_freq,
                          int64_t* rows_out, scalar_t* values) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> occurrences;
  if (scale_grad_by_freq) occurrences = count_rows(idx, n, num_rows, padding_idx);
  // source[j] = the position whose gradient becomes the j-th value.
  std::vector<int64_t> source;
  source.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<int64_t>(idx[i]) != padding_idx) {
      rows_out[source.size()] = idx[i];
      source.push_back(i);
    }
  }
  const int64_t nnz = static_cast<int64_t>(source.size());
  at::parallel_for(0, nnz, grain_for(dim * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const scalar_t* src = grad + source[j] * dim;
      scalar_t* dst = values + j * dim;
      if (!scale_grad_by_freq) {
        std::memcpy(dst, src, dim * sizeof(scalar_t));
        continue;
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(occurrences[rows_out[j]]);
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * inv);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> embedding_sparse_backward_cpu(const at::Tensor& grad_in,
                                                                 const at::Tensor& indices_in,
                                                                 c10::SymInt num_weights,
                                                                 int64_t padding_idx,
                                                                 bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_sparse_backward";
  const BackwardInputs in = backward_inputs(grad_in, indices_in, num_weights, padding_idx, op);
  const at::Tensor &grad = in.grad, &indices = in.indices;
  const int64_t num_rows = in.num_rows, dim = in.dim, n = in.n;
  at::Tensor rows, values;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, num_rows, op);
    // Compared as int64 (as in the loop above): a padding_idx past index_t's range must
    // match no id, not its truncation.
    const int64_t nnz = padding_idx >= 0
        ? n - std::count_if(idx, idx + n, [&](index_t k) { return static_cast<int64_t>(k) == padding_idx; })
        : n;
    rows = at::empty({1, nnz}, indices.options().dtype(at::kLong));
    values = empty_output({nnz, dim}, grad.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      sparse_backward_rows<scalar_t, index_t>(grad.const_data_ptr<scalar_t>(), idx, n,
                                              num_rows, dim, padding_idx, scale_grad_by_freq,
                                              rows.mutable_data_ptr<int64_t>(),
                                              values.mutable_data_ptr<scalar_t>());
    });
  });
  return {rows, values};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_sparse_backward", &embedding_sparse_backward_cpu);
}

}  // namespace embedding_ext::cpu
