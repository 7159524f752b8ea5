// The checked description of a table-batched pooled lookup, shared by the forward
// (bag_collection.cpp) and the backward (bag_collection_backward.cpp) CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace embedding_ext {
namespace cpu {

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

// Checks every argument the ops share (one message per rule, naming the argument) and
// returns the layout; offsets are validated entry by entry.
Layout make_layout(const std::vector<int64_t>& rows, const std::vector<int64_t>& dims,
                   const at::Tensor& values, const at::Tensor& offsets,
                   at::IntArrayRef feature_table, at::IntArrayRef modes,
                   at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& psw,
                   int64_t batch, const char* op);

}  // namespace cpu
}  // namespace embedding_ext
