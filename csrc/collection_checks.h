// The checks of the table-batched pooled lookup (embedding_bag_collection_*) that read no
// data, written once for the CPU kernels (csrc/cpu/bag_collection*.cpp, which also check the
// offsets' values before any work) and the CUDA kernels (csrc/cuda/bag_collection*.cu, whose
// kernels report bad offsets through the error record instead). The fake kernels repeat them
// in Python (embedding_ext/collection_ops.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"

namespace embedding_ext {

// A checked call: per feature its table and first output column, per table its shape, mode
// and padding row.
struct CollectionLayout {
  int64_t features = 0, tables = 0, batch = 0, total_dim = 0, max_dim = 0, n = 0;
  std::vector<int64_t> table_of, col_of;          // per feature
  std::vector<int64_t> rows, dims, mode, pad;     // per table
  std::vector<std::vector<int64_t>> features_of;  // per table, in feature order
  bool any_max = false;
  at::Tensor values, offsets;  // contiguous; offsets int64
};

inline CollectionLayout collection_layout(const std::vector<int64_t>& rows,
                                          const std::vector<int64_t>& dims,
                                          const at::Tensor& values, const at::Tensor& offsets,
                                          at::IntArrayRef feature_table, at::IntArrayRef modes,
                                          at::IntArrayRef padding_idx,
                                          const c10::optional<at::Tensor>& psw, int64_t batch,
                                          const char* op) {
  CollectionLayout L;
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
  return L;
}

// The forward's tables: at least one, 2-D, one dtype (per_sample_weights' too), on the
// device of 'values'; their shapes and contiguous forms.
struct CollectionTables {
  std::vector<int64_t> rows, dims;
  std::vector<at::Tensor> tables;
};

inline CollectionTables collection_tables(at::TensorList weights, const at::Tensor& values,
                                          const c10::optional<at::Tensor>& psw, const char* op) {
  TORCH_CHECK(!weights.empty(), op, ": 'weights' must hold at least one table");
  CollectionTables out;
  const auto dtype = weights[0].scalar_type();
  for (size_t t = 0; t < weights.size(); ++t) {
    const at::Tensor& w = weights[t];
    TORCH_CHECK(w.dim() == 2, op, ": 'weights[", t, "]' must be 2-D, got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype, op, ": every table must have one dtype; 'weights[", t,
                "]' is ", w.scalar_type(), ", 'weights[0]' ", dtype);
    check_same_device(w, "weights", values, "values", op);
    out.rows.push_back(w.size(0));
    out.dims.push_back(w.size(1));
    out.tables.push_back(w.contiguous());
  }
  TORCH_CHECK(!psw.has_value() || psw->scalar_type() == dtype, op, ": 'per_sample_weights' "
              "must have the tables' dtype (", dtype, "), got ", psw->scalar_type());
  return out;
}

// The gradient ops' arguments: one (rows, dim) per table, grad_output (B, sum of the dims),
// arg_max where a table pools with max, per_sample_weights in grad_output's dtype.
inline CollectionLayout collection_grad_layout(
    const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& offsets,
    const at::Tensor& arg_max, at::IntArrayRef feature_table, at::IntArrayRef modes,
    at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& psw,
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
  CollectionLayout L = collection_layout(rows, dim_list, values, offsets, feature_table, modes,
                                         padding_idx, psw, grad_output.size(0), op);
  check_same_device(grad_output, "grad_output", values, "values", op);
  TORCH_CHECK(grad_output.size(1) == L.total_dim, op,
              ": 'grad_output' must have shape (B, sum of the features' dims = ", L.total_dim,
              "), got ", grad_output.sizes());
  TORCH_CHECK(!L.any_max || (arg_max.scalar_type() == at::kLong &&
                             arg_max.sizes() == grad_output.sizes()), op,
              ": 'arg_max' must be int64 of grad_output's shape ", grad_output.sizes(),
              " when a table is in max mode, got ", arg_max.scalar_type(), " ", arg_max.sizes());
  if (L.any_max) check_same_device(arg_max, "arg_max", values, "values", op);
  TORCH_CHECK(!psw.has_value() || psw->scalar_type() == grad_output.scalar_type(), op,
              ": 'per_sample_weights' must have grad_output's dtype (",
              grad_output.scalar_type(), "), got ", psw->scalar_type());
  return L;
}

}  // namespace embedding_ext
