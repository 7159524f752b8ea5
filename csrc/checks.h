// Boundary checks shared by every backend. Each message names the op, the argument, the
// rule and the offending value; the fake kernels in embedding_ext/ops.py repeat the same
// rules with torch._check (keep the two in step).
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace embedding_ext {

inline void check_indices_dtype(const at::Tensor& indices, const char* op) {
  TORCH_CHECK(
      indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
      ": 'indices' must be an int64 or int32 tensor, got ", indices.scalar_type(),
      "; Expected tensor for argument #1 'indices' to have one of the following scalar types: "
      "Long, Int");
}

inline void check_weight_2d(const at::Tensor& weight, const char* op, const char* name = "weight") {
  TORCH_CHECK(weight.dim() == 2, op, ": '", name, "' must be 2-D, got a ", weight.dim(),
              "-D tensor of shape ", weight.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": '", a_name, "' and '", b_name,
              "' must be on the same device, got ", a.device(), " and ", b.device());
}

// The arguments of every gather-like op: a 2-D table, int32/int64 ids, one device.
inline void check_lookup_args(const at::Tensor& weight, const at::Tensor& indices, const char* op) {
  check_weight_2d(weight, op);
  check_indices_dtype(indices, op);
  check_same_device(weight, "weight", indices, "indices", op);
}

// grad_output of a lookup must have shape indices.shape + (D,).
inline void check_grad_shape(const at::Tensor& grad, const at::Tensor& indices, const char* op) {
  bool ok = grad.dim() == indices.dim() + 1;
  for (int64_t d = 0; ok && d < indices.dim(); ++d) ok = grad.size(d) == indices.size(d);
  TORCH_CHECK(ok, op, ": 'grad_output' must have shape indices.shape + (D,) = ", indices.sizes(),
              " + (D,), got ", grad.sizes());
}

// The arguments of every backward op (dense and sparse, every backend): int32/int64 ids,
// grad_output of shape indices.shape + (D,) on the same device, num_weights >= 0, and
// padding_idx < num_weights (negative: no padding; a padding_idx no id can equal would
// make the sparse output size and its fill disagree). Returns num_weights as an integer.
inline int64_t check_backward_args(const at::Tensor& grad, const at::Tensor& indices,
                                   const c10::SymInt& num_weights, int64_t padding_idx,
                                   const char* op) {
  check_indices_dtype(indices, op);
  check_same_device(grad, "grad_output", indices, "indices", op);
  check_grad_shape(grad, indices, op);
  const int64_t num_rows = num_weights.expect_int();
  TORCH_CHECK(num_rows >= 0, op, ": 'num_weights' must be >= 0, got ", num_rows);
  TORCH_CHECK(padding_idx < num_rows, op, ": 'padding_idx' must be < num_weights (", num_rows,
              ") or negative for none, got ", padding_idx);
  return num_rows;
}

// The arguments of embedding_renorm_ on every backend.
inline void check_renorm_args(const at::Tensor& weight, const at::Tensor& indices,
                              double max_norm, double norm_type, const char* op) {
  check_lookup_args(weight, indices, op);
  TORCH_CHECK(std::isfinite(max_norm) && max_norm >= 0, op,
              ": 'max_norm' must be a finite number >= 0, got ", max_norm);
  TORCH_CHECK(!std::isnan(norm_type) && norm_type > 0, op,
              ": 'norm_type' must be > 0 (inf allowed), got ", norm_type);
}

// The table with unit stride along D (so a row is one contiguous block), copying only if
// it is not already so.
inline at::Tensor rows_unit_stride(const at::Tensor& weight) {
  return (weight.size(1) <= 1 || weight.stride(1) == 1) ? weight : weight.contiguous();
}

// indices.shape + (dim,)
inline std::vector<int64_t> lookup_shape(const at::Tensor& indices, int64_t dim) {
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(dim);
  return shape;
}

// A gather-like op's inputs once checked: rows of unit stride, contiguous ids, sizes.
struct LookupInputs {
  at::Tensor weight, indices;
  int64_t num_rows, dim, n;
  std::vector<int64_t> out_shape;  // indices.shape + (dim,)
};

inline LookupInputs lookup_inputs(const at::Tensor& weight, const at::Tensor& indices,
                                  const char* op) {
  check_lookup_args(weight, indices, op);
  LookupInputs in{rows_unit_stride(weight), indices.contiguous(), weight.size(0), weight.size(1),
                  indices.numel(), {}};
  in.out_shape = lookup_shape(in.indices, in.dim);
  return in;
}

// A backward op's inputs once checked: contiguous grad_output rows, flat contiguous ids.
struct BackwardInputs {
  at::Tensor grad, indices;
  int64_t num_rows, dim, n;
};

inline BackwardInputs backward_inputs(const at::Tensor& grad, const at::Tensor& indices,
                                      const c10::SymInt& num_weights, int64_t padding_idx,
                                      const char* op) {
  const int64_t num_rows = check_backward_args(grad, indices, num_weights, padding_idx, op);
  BackwardInputs in{grad.contiguous(), indices.reshape({-1}).contiguous(), num_rows, 0, 0};
  in.dim = in.grad.size(-1);
  in.n = in.indices.numel();
  return in;
}

// The arguments of the pooled lookup (embedding_bag_*): 1-D int32/int64 ids, 1-D int32/int64
// CSR offsets with at least one entry, per_sample_weights (if any) one per id, in the
// table's dtype, all on one device. The offsets' values are checked by each backend
// (check_bag_offsets on the CPU).
inline void check_bag_args(const at::Tensor& table, const char* table_name,
                           const at::Tensor& indices, const at::Tensor& offsets,
                           const c10::optional<at::Tensor>& per_sample_weights, const char* op) {
  check_indices_dtype(indices, op);
  TORCH_CHECK(indices.dim() == 1, op, ": 'indices' must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
              ": 'offsets' must be an int64 or int32 tensor, got ", offsets.scalar_type(),
              "; Expected tensor for argument #1 'offsets' to have one of the following scalar "
              "types: Long, Int");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": 'offsets' must be 1-D with at least one entry (CSR: bags + 1), got shape ",
              offsets.sizes());
  check_same_device(table, table_name, indices, "indices", op);
  check_same_device(offsets, "offsets", indices, "indices", op);
  if (per_sample_weights.has_value()) {
    const at::Tensor& w = *per_sample_weights;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == indices.size(0), op,
                ": 'per_sample_weights' must have the shape of 'indices' ", indices.sizes(),
                ", got ", w.sizes());
    check_same_device(w, "per_sample_weights", indices, "indices", op);
  }
}

// Bag modes as the ops take them (PyTorch's numbering).
constexpr int64_t kBagSum = 0, kBagMean = 1, kBagMax = 2;

inline void check_bag_mode(int64_t mode, const char* op) {
  TORCH_CHECK(mode == kBagSum || mode == kBagMean || mode == kBagMax, op,
              ": 'mode' must be 0 (sum), 1 (mean) or 2 (max), got ", mode);
}

// CSR offsets: off[0] == 0, each <= n, non-decreasing.
inline void check_bag_offsets(const int64_t* off, int64_t count, int64_t n, const char* op) {
  TORCH_CHECK(off[0] == 0, op, ": 'offsets[0]' must be 0 (the first bag starts at the first id), got ",
              off[0], "; offsets[0] has to be 0, i.e., the first sequence in the mini-batch has "
              "to start from position 0. However, got ", off[0]);
  for (int64_t b = 1; b < count; ++b) {
    TORCH_CHECK(off[b] <= n, op, ": 'offsets[", b, "]' = ", off[b],
                " is past the end of 'indices' (", n, " ids); offsets[-1] can not be greater "
                "than input's length ", n, " but got offsets[-1] of ", off[b]);
    TORCH_CHECK(off[b] >= off[b - 1], op, ": 'offsets' must be non-decreasing, got offsets[",
                b - 1, "] = ", off[b - 1], " > offsets[", b, "] = ", off[b]);
  }
}

// A bag op's inputs once checked: contiguous ids, int64 CSR offsets, n ids in `bags` bags,
// and the table's num_rows and D.
struct BagInputs {
  at::Tensor indices, offsets;  // offsets: int64, contiguous
  int64_t n, bags, num_rows, dim;
};

// check_bag_args, then the ids and offsets as the kernels read them (num_rows and dim are
// left to the caller). CPU offsets have their values checked here, before any kernel reads
// them; the CUDA kernels check them as they read them (no host synchronisation).
inline BagInputs bag_inputs(const at::Tensor& table, const char* table_name,
                            const at::Tensor& indices, const at::Tensor& offsets,
                            const c10::optional<at::Tensor>& per_sample_weights, const char* op) {
  check_bag_args(table, table_name, indices, offsets, per_sample_weights, op);
  BagInputs in{indices.contiguous(), offsets.to(at::kLong).contiguous(), indices.size(0),
               offsets.size(0) - 1, 0, 0};
  if (in.offsets.is_cpu()) check_bag_offsets(in.offsets.const_data_ptr<int64_t>(), in.bags + 1, in.n, op);
  return in;
}

// embedding_bag_forward's checks; per_sample_weights in sum mode only, in the weight's dtype.
inline BagInputs bag_forward_inputs(const at::Tensor& weight, const at::Tensor& indices,
                                    const at::Tensor& offsets, int64_t mode,
                                    const c10::optional<at::Tensor>& per_sample_weights,
                                    const char* op) {
  check_weight_2d(weight, op);
  check_bag_mode(mode, op);
  BagInputs in = bag_inputs(weight, "weight", indices, offsets, per_sample_weights, op);
  if (per_sample_weights.has_value()) {
    TORCH_CHECK(mode == kBagSum, op,
                ": 'per_sample_weights' is only supported in sum mode (0), got mode ", mode);
    TORCH_CHECK(per_sample_weights->scalar_type() == weight.scalar_type(), op,
                ": 'per_sample_weights' must have the dtype of 'weight' (", weight.scalar_type(),
                "), got ", per_sample_weights->scalar_type(), "; Expected tensor for argument "
                "#1 'weight' to have the same type as tensor for argument #1 "
                "'per_sample_weights'");
  }
  in.num_rows = weight.size(0);
  in.dim = weight.size(1);
  return in;
}

// The checks of both weight gradients (sparse: no max mode, as PyTorch): a (bags, D)
// grad_output, num_weights >= 0 (the table's num_rows) and a padding_idx below it.
inline BagInputs bag_gradient_inputs(const at::Tensor& grad, const at::Tensor& indices,
                                     const at::Tensor& offsets, const c10::SymInt& num_weights,
                                     int64_t mode,
                                     const c10::optional<at::Tensor>& per_sample_weights,
                                     int64_t padding_idx, bool sparse, const char* op) {
  check_bag_mode(mode, op);
  TORCH_CHECK(!sparse || mode != kBagMax, op, ": max mode (2) has no sparse gradient (as in PyTorch)");
  check_weight_2d(grad, op, "grad_output");
  BagInputs in = bag_inputs(grad, "grad_output", indices, offsets, per_sample_weights, op);
  in.num_rows = num_weights.expect_int();
  TORCH_CHECK(in.num_rows >= 0, op, ": 'num_weights' must be >= 0, got ", in.num_rows);
  TORCH_CHECK(padding_idx < in.num_rows, op, ": 'padding_idx' must be < num_weights (",
              in.num_rows, "), got ", padding_idx);
  TORCH_CHECK(grad.size(0) == in.bags, op, ": 'grad_output' must have one row per bag (",
              in.bags, "), got shape ", grad.sizes());
  in.dim = grad.size(1);
  return in;
}

// The dense gradient's further rules: no scale_grad_by_freq in max mode (as PyTorch), and
// max mode's arg_max of shape (bags, D), int64.
inline BagInputs bag_dense_gradient_inputs(const at::Tensor& grad, const at::Tensor& indices,
                                           const at::Tensor& offsets, const at::Tensor& arg_max,
                                           const c10::SymInt& num_weights, int64_t mode,
                                           const c10::optional<at::Tensor>& per_sample_weights,
                                           int64_t padding_idx, bool scale_grad_by_freq,
                                           const char* op) {
  const BagInputs in = bag_gradient_inputs(grad, indices, offsets, num_weights, mode,
                                           per_sample_weights, padding_idx, false, op);
  TORCH_CHECK(!(mode == kBagMax && scale_grad_by_freq), op,
              ": max mode (2) does not support scale_grad_by_freq");
  if (mode == kBagMax) check_same_device(arg_max, "arg_max", grad, "grad_output", op);
  TORCH_CHECK(mode != kBagMax || (arg_max.dim() == 2 && arg_max.size(0) == in.bags &&
                                  arg_max.size(1) == in.dim && arg_max.scalar_type() == at::kLong),
              op, ": 'arg_max' must be an int64 tensor of shape (bags, D) = (", in.bags, ", ",
              in.dim, ") in max mode, got ", arg_max.scalar_type(), " of shape ", arg_max.sizes());
  return in;
}

// The per_sample_weights gradient's checks: a 2-D weight, and grad_output of shape (bags, D)
// on its device.
inline BagInputs bag_sample_weight_gradient_inputs(const at::Tensor& grad, const at::Tensor& weight,
                                                   const at::Tensor& indices,
                                                   const at::Tensor& offsets, const char* op) {
  check_weight_2d(weight, op);
  check_weight_2d(grad, op, "grad_output");
  BagInputs in = bag_inputs(weight, "weight", indices, offsets, c10::nullopt, op);
  check_same_device(grad, "grad_output", weight, "weight", op);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == in.bags && grad.size(1) == weight.size(1), op,
              ": 'grad_output' must have shape (bags, D) = (", in.bags, ", ", weight.size(1),
              "), got ", grad.sizes());
  in.num_rows = weight.size(0);
  in.dim = weight.size(1);
  return in;
}

// The message of the error every backend raises for an index outside [0, num_rows).
inline std::string index_error_message(int64_t value, int64_t position, int64_t num_rows,
                                       const char* op, const char* when = "") {
  const bool bag = std::string(op).find("_bag") != std::string::npos;
  return c10::str(op, ": index ", value, " at position ", position,
                  " (row-major) is out of range for 'weight' with ", num_rows,
                  " rows; valid indices are 0 <= index < ", num_rows, when, "; ",
                  bag ? "Expected idx >= 0 && idx < num_embeddings but found idx to be "
                      : "index out of range in self",
                  bag ? c10::str(value) : std::string());
}

// The CUDA message for a bad CSR offset entry (found by a kernel, raised later as IndexError
// through the same record as a bad id; the CPU checks offsets before any work).
inline std::string bad_offset_message(int64_t value, int64_t position, int64_t num_ids,
                                      const char* op, const char* when = "") {
  return c10::str(op, ": 'offsets[", position, "]' = ", value, " breaks the CSR rules (offsets[0] ",
                  "== 0, non-decreasing, each <= the ", num_ids, " ids)", when);
}

// Throws the error of an out-of-range id (or CUDA bad offset): Python sees it as
// embedding_ext.EmbeddingIndexError, both IndexError and RuntimeError. Each binary defines
// it (csrc/index_error_class.h).
[[noreturn]] void raise_index_error(const std::string& message);

[[noreturn]] inline void throw_index_error(int64_t value, int64_t position, int64_t num_rows,
                                           const char* op, const char* when = "") {
  raise_index_error(index_error_message(value, position, num_rows, op, when));
}

}  // namespace embedding_ext
