// What the CPU kernels of the table-batched pooled lookup share: the checked description of
// a call (Layout), the output gradient regrouped by feature, and the walk over one table's
// terms, used by the forward (bag_collection.cpp), the gradients (bag_collection_backward.cpp)
// and the fused step (bag_collection_fused.cpp).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "../collection_checks.h"

namespace embedding_ext {
namespace cpu {

// Everything the kernels need once the arguments are checked (csrc/collection_checks.h).
using Layout = CollectionLayout;

// The offsets' values, entry by entry (the checks that read data; the CPU does them before
// any work).
inline void check_layout_offsets(const Layout& L, const char* op) {
  check_bag_offsets(L.offsets.const_data_ptr<int64_t>(), L.features * L.batch + 1, L.n, op);
}

// Every argument the ops share checked (one message per rule, naming the argument), offsets
// entry by entry, and the layout.
Layout make_layout(const std::vector<int64_t>& rows, const std::vector<int64_t>& dims,
                   const at::Tensor& values, const at::Tensor& offsets,
                   at::IntArrayRef feature_table, at::IntArrayRef modes,
                   at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& psw,
                   int64_t batch, const char* op);

// grad_output (B, total D) regrouped feature by feature: feature f's (B, D_f) block starts
// at B * col_of[f]. The gradient ops read one table's slices bag after bag; in grad_output
// consecutive slices of a feature are a whole output row apart (6.6 KB at Criteo's 26 x 64:
// a new page and a cache miss per slice, beyond the prefetcher's reach; the collection's
// fused step waited on them for 64% of its time). Here they follow each other. One pass
// over grad_output in row order.
// `out` holds batch * total D elements (from empty_output: a fresh buffer of this size
// page-faulted on every call).
template <typename scalar_t>
void grad_by_feature(const Layout& L, const scalar_t* grad, scalar_t* out) {
  at::parallel_for(0, L.batch, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, L.total_dim)),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t f = 0; f < L.features; ++f) {
        const int64_t dim = L.dims[L.table_of[f]];
        std::copy_n(grad + b * L.total_dim + L.col_of[f], dim,
                    out + L.batch * L.col_of[f] + b * dim);
      }
    }
  });
}

// Calls visit(i, k, coef, b, f, g) for every non-padding id i (row k) of table t's
// features, in position order, where g is its bag's gradient slice in `by_feature`
// (grad_by_feature) and coef its sum/mean factor; max mode passes coef 0 and leaves the
// choice of columns to the caller (arg_pos).
template <typename scalar_t, typename index_t, typename Visit>
void for_each_term(const Layout& L, int64_t t, const scalar_t* by_feature, const scalar_t* psw,
                   Visit&& visit) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* idx = L.values.const_data_ptr<index_t>();
  const int64_t* off = L.offsets.const_data_ptr<int64_t>();
  const int64_t pad = L.pad[t], mode = L.mode[t];
  for (int64_t f : L.features_of[t]) {
    for (int64_t b = 0; b < L.batch; ++b) {
      const int64_t s = off[f * L.batch + b], e = off[f * L.batch + b + 1];
      const scalar_t* g = by_feature + L.batch * L.col_of[f] + b * L.dims[t];
      int64_t count = 0;
      if (mode == kBagMean) {
        for (int64_t i = s; i < e; ++i) count += static_cast<int64_t>(idx[i]) != pad;
      }
      const acc_t scale = count > 0 ? acc_t(1) / acc_t(count) : acc_t(1);
      for (int64_t i = s; i < e; ++i) {
        const int64_t k = static_cast<int64_t>(idx[i]);
        if (k == pad) continue;
        const acc_t coef = mode == kBagMax ? acc_t(0)
                           : psw != nullptr ? static_cast<acc_t>(psw[i])
                                            : scale;
        visit(i, k, coef, b, f, g);
      }
    }
  }
}

}  // namespace cpu
}  // namespace embedding_ext
