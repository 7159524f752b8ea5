// CPU table-batched pooled lookup (embedding_bag_collection_*): every (feature, bag) of every
// table in one parallel region, so a model with tens of small tables pays one thread start-up
// and one dispatch per pass instead of one per table. The backward gives each table to one
// task and sums its terms in position order: deterministic, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "common.h"
#include "row_convert.h"

namespace embedding_ext {
namespace cpu {
namespace {

// Everything the kernels need once the arguments are checked. Tables are described by
// their shapes only, so the forward and both backwards share it.
struct Layout {
  int64_t features = 0, tables = 0, batch = 0, total_dim = 0, max_dim = 0, n = 0;
  std::vector<int64_t> table_of, col_of;   // per feature
  std::vector<int64_t> rows, dims, mode, pad;  // per table
  std::vector<std::vector<int64_t>> features_of;  // per table, in feature order
  bool any_max = false;
  at::Tensor values, offsets;  // contiguous; offsets int64
};

Layout make_layout(const std::vector<int64_t>& rows, const std::vector<int64_t>& dims,
                   const at::Tensor& values, const at::Tensor& offsets,
                   at::IntArrayRef feature_table, at::IntArrayRef modes,
                   at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& psw,
                   int64_t batch, const char* op) {
  Layout L;
  L.tables = static_cast<int64_t>(rows.size());
  L.features = static_cast<int64_t>(feature_table.size());
  L.batch = batch;
  TORCH_CHECK(batch >= 0, op, ": 'batch_size' must be >= 0, got ", batch);
  TORCH_CHECK(static_cast<int64_t>(modes.size()) == L.tables, op,
              ": 'modes' must have one entry per table (", L.tables, "), got ", modes.size());
  TORCH_CHECK(static_cast<int64_t>(padding_idx.size()) == L.tables, op,
              ": 'padding_idx' must have one entry per table (", L.tables, "), got ",
              padding_idx.size());
  L.rows = rows;
  L.dims = dims;
  L.features_of.resize(L.tables);
  for (int64_t t = 0; t < L.tables; ++t) {
    check_bag_mode(modes[t], op);
    TORCH_CHECK(padding_idx[t] < rows[t], op, ": 'padding_idx[", t, "]' must be < the table's ",
                rows[t], " rows or negative for none, got ", padding_idx[t]);
    L.mode.push_back(modes[t]);
    L.pad.push_back(padding_idx[t]);
    L.any_max = L.any_max || modes[t] == kBagMax;
    L.max_dim = std::max(L.max_dim, dims[t]);
  }
  for (int64_t f = 0; f < L.features; ++f) {
    const int64_t t = feature_table[f];
    TORCH_CHECK(t >= 0 && t < L.tables, op, ": 'feature_table[", f, "]' must name one of the ",
                L.tables, " tables, got ", t);
    TORCH_CHECK(!psw.has_value() || modes[t] == kBagSum, op, ": 'per_sample_weights' needs sum "
                "mode (0), but feature ", f, " pools table ", t, " in mode ", modes[t]);
    L.table_of.push_back(t);
    L.col_of.push_back(L.total_dim);
    L.total_dim += dims[t];
    L.features_of[t].push_back(f);
  }
  check_indices_dtype(values, op);
  TORCH_CHECK(values.dim() == 1, op, ": 'values' must be 1-D, got shape ", values.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
              ": 'offsets' must be an int64 or int32 tensor, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == L.features * batch + 1, op,
              ": 'offsets' must be 1-D with features * batch_size + 1 = ", L.features, " * ", batch,
              " + 1 = ", L.features * batch + 1, " entries, got shape ", offsets.sizes());
  check_same_device(offsets, "offsets", values, "values", op);
  L.n = values.size(0);
  if (psw.has_value()) {
    TORCH_CHECK(psw->dim() == 1 && psw->size(0) == L.n, op,
                ": 'per_sample_weights' must have the shape of 'values' ", values.sizes(),
                ", got ", psw->sizes());
    check_same_device(*psw, "per_sample_weights", values, "values", op);
  }
  L.values = values.contiguous();
  L.offsets = offsets.to(at::kLong).contiguous();
  check_bag_offsets(L.offsets.const_data_ptr<int64_t>(), L.features * batch + 1, L.n, op);
  return L;
}

// The IndexError for the first bad id: which bag holds the position tells the feature.
[[noreturn]] void throw_collection_index_error(const Layout& L, int64_t value, int64_t pos,
                                               const char* op) {
  const int64_t* off = L.offsets.const_data_ptr<int64_t>();
  const int64_t bag = std::upper_bound(off, off + L.features * L.batch + 1, pos) - off - 1;
  const int64_t f = bag / L.batch, t = L.table_of[f];
  TORCH_CHECK_INDEX(false, op, ": id ", value, " at position ", pos, " of 'values' (feature ", f,
                    ", bag ", bag - f * L.batch, ") is out of range for table ", t, " with ",
                    L.rows[t], " rows; valid ids are 0 <= id < ", L.rows[t]);
  __builtin_unreachable();
}

// Rows fetched ahead while pooling a bag, as in the single-table kernel.
constexpr int64_t kAhead = 8;

template <typename scalar_t, typename index_t>
void pool_all(const Layout& L, const std::vector<const scalar_t*>& weights, const scalar_t* psw,
              scalar_t* out, int64_t* arg_pos, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* idx = L.values.const_data_ptr<index_t>();
  const int64_t* off = L.offsets.const_data_ptr<int64_t>();
  const int64_t bags = L.features * L.batch;
  std::atomic<int64_t> first_bad{L.n};
  // A bag's work is about its ids times its row bytes; size tasks from the average.
  const int64_t ids_per_bag = bags > 0 ? std::max<int64_t>(1, L.n / bags) : 1;
  const int64_t avg_dim = L.features > 0 ? std::max<int64_t>(1, L.total_dim / L.features) : 1;
  const int64_t grain = grain_for(ids_per_bag * avg_dim * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, bags, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(L.max_dim);
    std::vector<int64_t> won(L.max_dim);
    for (int64_t fb = begin; fb < end; ++fb) {
      const int64_t f = fb / L.batch, b = fb - f * L.batch, t = L.table_of[f];
      const int64_t dim = L.dims[t], pad = L.pad[t], mode = L.mode[t];
      const uint64_t num_rows = static_cast<uint64_t>(L.rows[t]);
      const scalar_t* w = weights[t];
      scalar_t* o = out + b * L.total_dim + L.col_of[f];
      const int64_t s = off[fb], e = off[fb + 1];
      int64_t count = 0;
      if (mode == kBagMax) {
        std::fill(won.begin(), won.begin() + dim, int64_t(-1));
      } else {
        std::fill(acc.begin(), acc.begin() + dim, acc_t(0));
      }
      for (int64_t i = s; i < e; ++i) {
        const int64_t k = static_cast<int64_t>(idx[i]);
        if (static_cast<uint64_t>(k) >= num_rows) {
          record_bad(first_bad, i);
          break;
        }
        if (i + kAhead < e) {
          const uint64_t next = static_cast<uint64_t>(static_cast<int64_t>(idx[i + kAhead]));
          if (next < num_rows) prefetch_row(w + next * dim, dim * sizeof(scalar_t));
        }
        if (k == pad) continue;
        ++count;
        const scalar_t* row = w + k * dim;
        if (mode == kBagMax) {
          for (int64_t d = 0; d < dim; ++d) {
            const acc_t v = static_cast<acc_t>(row[d]);
            if (won[d] < 0 || v > acc[d]) {
              acc[d] = v;
              won[d] = i;
            }
          }
        } else if (psw != nullptr) {
          const acc_t c = static_cast<acc_t>(psw[i]);
          for (int64_t d = 0; d < dim; ++d) acc[d] += c * static_cast<acc_t>(row[d]);
        } else {
          load_row<true>(row, acc.data(), dim);
        }
      }
      if (mode == kBagMax) {
        int64_t* a = arg_pos + b * L.total_dim + L.col_of[f];
        for (int64_t d = 0; d < dim; ++d) {
          o[d] = won[d] < 0 ? scalar_t(0) : static_cast<scalar_t>(acc[d]);
          a[d] = won[d];
        }
      } else {
        const acc_t scale = (mode == kBagMean && count > 0) ? acc_t(1) / acc_t(count) : acc_t(1);
        store_row(acc.data(), scale, o, dim);
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < L.n) throw_collection_index_error(L, static_cast<int64_t>(idx[bad]), bad, op);
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_collection_forward_cpu(
    at::TensorList weights, const at::Tensor& values, const at::Tensor& offsets,
    at::IntArrayRef feature_table, at::IntArrayRef modes, at::IntArrayRef padding_idx,
    const c10::optional<at::Tensor>& per_sample_weights, c10::SymInt batch_size) {
  const char* op = "embedding_bag_collection_forward";
  TORCH_CHECK(!weights.empty(), op, ": 'weights' must hold at least one table");
  std::vector<int64_t> rows, dims;
  std::vector<at::Tensor> tables;
  const auto dtype = weights[0].scalar_type();
  for (size_t t = 0; t < weights.size(); ++t) {
    const at::Tensor& w = weights[t];
    TORCH_CHECK(w.dim() == 2, op, ": 'weights[", t, "]' must be 2-D, got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype, op, ": every table must have one dtype; 'weights[", t,
                "]' is ", w.scalar_type(), ", 'weights[0]' ", dtype);
    check_same_device(w, "weights", values, "values", op);
    rows.push_back(w.size(0));
    dims.push_back(w.size(1));
    tables.push_back(w.contiguous());
  }
  if (per_sample_weights.has_value()) {
    TORCH_CHECK(per_sample_weights->scalar_type() == dtype, op, ": 'per_sample_weights' must "
                "have the tables' dtype (", dtype, "), got ", per_sample_weights->scalar_type());
  }
  Layout L = make_layout(rows, dims, values, offsets, feature_table, modes, padding_idx,
                         per_sample_weights, batch_size.expect_int(), op);
  at::Tensor out = at::empty({L.batch, L.total_dim}, weights[0].options());
  const auto long_options = values.options().dtype(at::kLong);
  // -1 in the columns of sum/mean features too: every element of every output is written.
  at::Tensor arg_pos = L.any_max ? at::full({L.batch, L.total_dim}, -1, long_options)
                                 : at::empty({0}, long_options);
  at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "embedding_bag_collection",
                                  [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& w : tables) ptrs.push_back(w.const_data_ptr<scalar_t>());
    const scalar_t* p = psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr;
    int64_t* a = L.any_max ? arg_pos.data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(L.values.scalar_type(), "embedding_bag_collection", [&] {
      pool_all<scalar_t, index_t>(L, ptrs, p, out.data_ptr<scalar_t>(), a, op);
    });
  });
  return {out, arg_pos};
}

// Calls visit(i, k, coef, g) for every non-padding id i (row k) of table t's features, in
// position order, where g is its bag's grad_output slice and coef its sum/mean factor; max
// mode passes coef 0 and leaves the choice of columns to the caller (arg_pos).
template <typename scalar_t, typename index_t, typename Visit>
void for_each_term(const Layout& L, int64_t t, const scalar_t* grad, const scalar_t* psw,
                   Visit&& visit) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* idx = L.values.const_data_ptr<index_t>();
  const int64_t* off = L.offsets.const_data_ptr<int64_t>();
  const int64_t pad = L.pad[t], mode = L.mode[t];
  for (int64_t f : L.features_of[t]) {
    for (int64_t b = 0; b < L.batch; ++b) {
      const int64_t s = off[f * L.batch + b], e = off[f * L.batch + b + 1];
      const scalar_t* g = grad + b * L.total_dim + L.col_of[f];
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

template <bool kSparse>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> collection_backward(
    const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& offsets,
    const at::Tensor& arg_max, at::IntArrayRef feature_table, at::IntArrayRef modes,
    at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& per_sample_weights,
    c10::SymIntArrayRef num_weights, at::IntArrayRef dims, const char* op) {
  TORCH_CHECK(num_weights.size() == dims.size(), op, ": 'num_weights' and 'dims' must both have "
              "one entry per table, got ", num_weights.size(), " and ", dims.size());
  std::vector<int64_t> rows, dim_list(dims.begin(), dims.end());
  for (size_t t = 0; t < num_weights.size(); ++t) {
    rows.push_back(num_weights[t].expect_int());
    TORCH_CHECK(rows.back() >= 0 && dims[t] >= 0, op, ": table ", t, " must have rows >= 0 and "
                "dim >= 0, got (", rows.back(), ", ", dims[t], ")");
  }
  TORCH_CHECK(grad_output.dim() == 2, op, ": 'grad_output' must be 2-D (B, sum D), got shape ",
              grad_output.sizes());
  Layout L = make_layout(rows, dim_list, values, offsets, feature_table, modes, padding_idx,
                         per_sample_weights, grad_output.size(0), op);
  check_same_device(grad_output, "grad_output", values, "values", op);
  TORCH_CHECK(grad_output.size(1) == L.total_dim, op,
              ": 'grad_output' must have shape (B, sum of the features' dims = ", L.total_dim,
              "), got ", grad_output.sizes());
  TORCH_CHECK(!L.any_max || (arg_max.scalar_type() == at::kLong &&
                             arg_max.sizes() == grad_output.sizes()), op,
              ": 'arg_max' must be int64 of grad_output's shape ", grad_output.sizes(),
              " when a table is in max mode, got ", arg_max.scalar_type(), " ", arg_max.sizes());
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor arg_pos = L.any_max ? arg_max.contiguous() : arg_max;
  at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  if (psw.defined()) {
    TORCH_CHECK(psw.scalar_type() == grad.scalar_type(), op, ": 'per_sample_weights' must have "
                "grad_output's dtype (", grad.scalar_type(), "), got ", psw.scalar_type());
  }
  std::vector<at::Tensor> first(L.tables), second(kSparse ? L.tables : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "embedding_bag_collection", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const scalar_t* g_all = grad.const_data_ptr<scalar_t>();
    const scalar_t* p = psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* ap = L.any_max ? arg_pos.const_data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(L.values.scalar_type(), "embedding_bag_collection", [&] {
      // One task per table: each table's gradient has one writer, so no atomics and a fixed
      // summation order. (Tables differ in size; at::parallel_for hands out ranges, so the
      // balance is only as good as the table sizes allow.)
      at::parallel_for(0, L.tables, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t dim = L.dims[t];
          const bool is_max = L.mode[t] == kBagMax;
          if (!kSparse) {
            at::Tensor acc = at::zeros({L.rows[t], dim}, acc_options);
            acc_t* G = acc.data_ptr<acc_t>();
            for_each_term<scalar_t, index_t>(L, t, g_all, p, [&](int64_t i, int64_t k, acc_t c,
                                                               int64_t b, int64_t f,
                                                               const scalar_t* g) {
              acc_t* dst = G + k * dim;
              if (is_max) {
                const int64_t* a = ap + b * L.total_dim + L.col_of[f];
                for (int64_t d = 0; d < dim; ++d) {
                  if (a[d] == i) dst[d] += static_cast<acc_t>(g[d]);
                }
              } else {
                for (int64_t d = 0; d < dim; ++d) dst[d] += c * static_cast<acc_t>(g[d]);
              }
            });
            first[t] = acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
          } else {
            int64_t nnz = 0;
            for_each_term<scalar_t, index_t>(
                L, t, g_all, p,
                [&](int64_t, int64_t, acc_t, int64_t, int64_t, const scalar_t*) { ++nnz; });
            at::Tensor row_ids = at::empty({nnz}, grad.options().dtype(at::kLong));
            at::Tensor vals = at::empty({nnz, dim}, grad.options());
            int64_t* r = row_ids.data_ptr<int64_t>();
            scalar_t* v = vals.data_ptr<scalar_t>();
            int64_t j = 0;
            for_each_term<scalar_t, index_t>(L, t, g_all, p, [&](int64_t i, int64_t k, acc_t c,
                                                               int64_t b, int64_t f,
                                                               const scalar_t* g) {
              r[j] = k;
              scalar_t* dst = v + j * dim;
              if (is_max) {
                const int64_t* a = ap + b * L.total_dim + L.col_of[f];
                for (int64_t d = 0; d < dim; ++d) dst[d] = a[d] == i ? g[d] : scalar_t(0);
              } else {
                for (int64_t d = 0; d < dim; ++d) {
                  dst[d] = static_cast<scalar_t>(c * static_cast<acc_t>(g[d]));
                }
              }
              ++j;
            });
            first[t] = row_ids;
            second[t] = vals;
          }
        }
      });
    });
  });
  return {first, second};
}

std::vector<at::Tensor> embedding_bag_collection_dense_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& offsets,
    const at::Tensor& arg_max, at::IntArrayRef feature_table, at::IntArrayRef modes,
    at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& per_sample_weights,
    c10::SymIntArrayRef num_weights, at::IntArrayRef dims) {
  return std::get<0>(collection_backward<false>(
      grad_output, values, offsets, arg_max, feature_table, modes, padding_idx,
      per_sample_weights, num_weights, dims, "embedding_bag_collection_dense_backward"));
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>
embedding_bag_collection_sparse_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& offsets,
    const at::Tensor& arg_max, at::IntArrayRef feature_table, at::IntArrayRef modes,
    at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& per_sample_weights,
    c10::SymIntArrayRef num_weights, at::IntArrayRef dims) {
  return collection_backward<true>(grad_output, values, offsets, arg_max, feature_table, modes,
                                   padding_idx, per_sample_weights, num_weights, dims,
                                   "embedding_bag_collection_sparse_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_bag_collection_forward", &embedding_bag_collection_forward_cpu);
  m.impl("embedding_bag_collection_dense_backward", &embedding_bag_collection_dense_backward_cpu);
  m.impl("embedding_bag_collection_sparse_backward", &embedding_bag_collection_sparse_backward_cpu);
}

}  // namespace cpu
}  // namespace embedding_ext
