// CPU dense backward (embedding_dense_backward): grad[k] = sum of grad_output rows at the
// positions of k, padding excluded, divided by k's count with scale_grad_by_freq. Every
// output row is owned by one thread and summed in ascending position order, so the result
// is deterministic and independent of the thread count; the zero fill of untouched rows
// is part of the same pass.
#include "dense_backward.h"

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "common.h"
#include "output_allocator.h"
#include "row_convert.h"

namespace embedding_ext::cpu {
namespace {

// Sorted path (any float dtype): lookups radix-sorted by row; each row's positions are
// summed in the accumulation type (fp32 for fp16/bf16), kept in L1, and rounded once.
template <typename scalar_t, typename index_t>
void dense_backward_sorted(const scalar_t* grad, const index_t* idx, int64_t n, int64_t num_rows,
                           int64_t dim, int64_t padding_idx, bool scale_grad_by_freq,
                           scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const SortedLookups sorted = sort_by_row(idx, n, num_rows, padding_idx);
  const int64_t* rows = sorted.rows.data();
  const int64_t m = static_cast<int64_t>(sorted.rows.size());
  const size_t row_bytes = dim * sizeof(scalar_t);
  at::parallel_for(0, num_rows, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    int64_t j = std::lower_bound(rows, rows + m, begin) - rows;
    int64_t k = begin;
    while (k < end) {
      const int64_t next = j < m ? std::min(rows[j], end) : end;
      // Untouched rows up to the next looked-up one: one memset for the whole run.
      std::memset(out + k * dim, 0, (next - k) * row_bytes);
      if (next == end) break;
      int64_t e = j + 1;
      while (e < m && rows[e] == next) ++e;
      // Sorted by row, the grad_output rows are read in random order: prefetch the ones a
      // few lookups ahead so that DRAM latency overlaps the additions.
      for (int64_t s = j; s < e; ++s) {
        if (s + kPrefetchDistance < m) prefetch_row(grad + sorted.positions[s + kPrefetchDistance] * dim, row_bytes);
        if (s == j) load_row<false>(grad + sorted.positions[s] * dim, acc.data(), dim);
        else load_row<true>(grad + sorted.positions[s] * dim, acc.data(), dim);
      }
      const acc_t scale = scale_grad_by_freq ? acc_t(1) / static_cast<acc_t>(e - j) : acc_t(1);
      store_row(acc.data(), scale, out + next * dim, dim);
      k = next + 1;
      j = e;
    }
  });
}

// Scatter path (fp32/fp64, no sort): each thread owns a range of output rows, zeroes it,
// then scans every id in position order and adds the grad_output rows that land in its
// range. grad_output is read in order (prefetcher-friendly), each thread re-reads only the
// ids (N * 4 or 8 bytes), and every row is still summed in ascending position order, so
// the result is bitwise that of the sorted path and independent of the thread count.
template <typename scalar_t, typename index_t>
void dense_backward_scatter(const scalar_t* grad, const index_t* idx, int64_t n, int64_t num_rows,
                            int64_t dim, int64_t padding_idx, bool scale_grad_by_freq,
                            scalar_t* out) {
  const size_t row_bytes = dim * sizeof(scalar_t);
  at::parallel_for(0, num_rows, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    std::memset(out + begin * dim, 0, (end - begin) * row_bytes);
    // This range's counts for scale_grad_by_freq, gathered during the same scan.
    std::vector<int32_t> counts(scale_grad_by_freq ? end - begin : 0, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetchDistance < n) {  // the output rows are updated in random order
        const int64_t ahead = idx[i + kPrefetchDistance];
        if (ahead >= begin && ahead < end) prefetch_row(out + ahead * dim, row_bytes);
      }
      const int64_t k = idx[i];
      if (k < begin || k >= end || k == padding_idx) continue;
      scalar_t* dst = out + k * dim;
      const scalar_t* g = grad + i * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += g[d];
      if (scale_grad_by_freq) ++counts[k - begin];
    }
    for (int64_t r = 0; r < static_cast<int64_t>(counts.size()); ++r) {
      if (counts[r] > 1) {
        const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(counts[r]);
        scalar_t* dst = out + (begin + r) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] *= inv;
      }
    }
  });
}

at::Tensor embedding_dense_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                        c10::SymInt num_weights, int64_t padding_idx,
                                        bool scale_grad_by_freq) {
  return dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq,
                        DenseBackwardPath::kByDtype);
}

}  // namespace

at::Tensor dense_backward(const at::Tensor& grad_in, const at::Tensor& indices_in,
                          const c10::SymInt& num_weights, int64_t padding_idx,
                          bool scale_grad_by_freq, DenseBackwardPath path) {
  constexpr const char* op = "embedding_dense_backward";
  const BackwardInputs in = backward_inputs(grad_in, indices_in, num_weights, padding_idx, op);
  const at::Tensor &grad = in.grad, &indices = in.indices;
  const int64_t num_rows = in.num_rows, dim = in.dim, n = in.n;
  at::Tensor out = empty_output({num_rows, dim}, grad.options());
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      // Full-precision types add straight into the output; fp16/bf16 need an fp32
      // accumulator per row, which the sorted path keeps in L1.
      constexpr bool full_precision = std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;
      const bool scatter = path == DenseBackwardPath::kScatter ||
                           (path == DenseBackwardPath::kByDtype && full_precision);
      TORCH_CHECK(!scatter || full_precision, op,
                  ": the scatter path takes float32/float64 gradients, got ", grad.scalar_type());
      if constexpr (full_precision) {
        if (scatter) {
          dense_backward_scatter<scalar_t, index_t>(grad.const_data_ptr<scalar_t>(), idx, n,
                                                    num_rows, dim, padding_idx, scale_grad_by_freq,
                                                    out.mutable_data_ptr<scalar_t>());
          return;
        }
      }
      dense_backward_sorted<scalar_t, index_t>(grad.const_data_ptr<scalar_t>(), idx, n, num_rows,
                                               dim, padding_idx, scale_grad_by_freq,
                                               out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_dense_backward", &embedding_dense_backward_cpu);
}

}  // namespace embedding_ext::cpu
