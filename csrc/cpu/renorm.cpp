// CPU max_norm renorm (embedding_renorm_), in place on the distinct referenced rows; the
// rule itself is in ../renorm_math.h. The ids are all checked before any row changes.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../renorm_math.h"
#include "common.h"

namespace embedding_ext::cpu {
namespace {

// The norm of a (strided) row, folded into 8 independent partial results: a single
// running sum is one dependent add per element, a latency chain that made max_norm much
// slower than the lookup itself (bench/NOTES-cpu.md).
template <NormKind kKind, typename acc_t, typename scalar_t>
double row_norm(const scalar_t* row, int64_t stride, int64_t dim, acc_t p) {
  acc_t part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    for (int u = 0; u < 8; ++u) {
      part[u] = norm_combine<kKind>(part[u], norm_term<kKind>(static_cast<acc_t>(row[(d + u) * stride]), p));
    }
  }
  for (; d < dim; ++d) part[0] = norm_combine<kKind>(part[0], norm_term<kKind>(static_cast<acc_t>(row[d * stride]), p));
  const acc_t total = norm_combine<kKind>(
      norm_combine<kKind>(norm_combine<kKind>(part[0], part[1]), norm_combine<kKind>(part[2], part[3])),
      norm_combine<kKind>(norm_combine<kKind>(part[4], part[5]), norm_combine<kKind>(part[6], part[7])));
  return norm_finish<kKind>(total, p);
}

template <NormKind kKind, typename scalar_t>
void renorm_rows(scalar_t* weight, int64_t row_stride, int64_t col_stride, int64_t dim,
                 const std::vector<int64_t>& rows, double max_norm, double norm_type) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t p = static_cast<acc_t>(norm_type);
  at::parallel_for(0, static_cast<int64_t>(rows.size()), grain_for(dim * sizeof(scalar_t)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      scalar_t* row = weight + rows[j] * row_stride;
      const double norm = row_norm<kKind, acc_t>(row, col_stride, dim, p);
      if (norm > max_norm) {
        const acc_t scale = static_cast<acc_t>(renorm_factor(norm, max_norm));
        for (int64_t d = 0; d < dim; ++d) {
          row[d * col_stride] = static_cast<scalar_t>(static_cast<acc_t>(row[d * col_stride]) * scale);
        }
      }
    }
  });
}

void embedding_renorm_cpu(const at::Tensor& weight, const at::Tensor& indices_in, double max_norm,
                          double norm_type) {
  constexpr const char* op = "embedding_renorm_";
  check_renorm_args(weight, indices_in, max_norm, norm_type, op);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t num_rows = weight.size(0), n = indices.numel();
  std::vector<int64_t> rows;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, num_rows, op);
    rows = sort_by_row(idx, n, num_rows, /*padding_idx=*/-1).rows;  // O(N) radix sort
  });
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
    dispatch_norm_kind(norm_kind(norm_type), [&](auto kind) {
      renorm_rows<decltype(kind)::value, scalar_t>(weight.mutable_data_ptr<scalar_t>(),
                                                   weight.stride(0), weight.stride(1),
                                                   weight.size(1), rows, max_norm, norm_type);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_renorm_", &embedding_renorm_cpu);
}

}  // namespace embedding_ext::cpu
