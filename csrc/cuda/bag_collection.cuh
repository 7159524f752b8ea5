// What the CUDA kernels of the table-batched pooled lookup (bag_collection.cu,
// bag_collection_backward.cu) share: the call's description passed by value as a kernel
// argument (no host-to-device copy, so a launch can be captured into a CUDA graph), the
// checks that need no data, and the walk over a feature's bags.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "bag.cuh"
#include "launch.cuh"

namespace embedding_ext::cuda {

// Features per launch. A launch's description is ~10 KB of kernel parameters (CUDA 12.1+
// takes up to 32 KB on every architecture we build for); a collection with more features
// is pooled in several launches, one per chunk of features.
constexpr int kChunkFeatures = 256;

struct CollectionTable {
  // The forward's table; the dense gradient's accumulator; the sparse gradient's row ids.
  const void* data;
  void* values;        // the sparse gradient's values
  int64_t rows, pad, dim, mode;
  int64_t base;        // sparse gradient: this feature's first slot in its table's output
  int64_t nnz;         // sparse gradient: the table's slots
};

// One launch's features [first, first + count): feature first + f pools table[f] (its own
// copy of the table's description, so the kernels never look a second array up).
struct CollectionChunk {
  int64_t first, count, batch, total_dim, n;
  int64_t col[kChunkFeatures];
  CollectionTable table[kChunkFeatures];
};

// The host's view of a checked call.
struct CollectionCall {
  int64_t features = 0, tables = 0, batch = 0, total_dim = 0, n = 0;
  std::vector<int64_t> table_of, col_of, rows, dims, modes, pads;
  bool any_max = false;
  at::Tensor values, offsets;  // offsets int64, both contiguous
};

// The checks of the CPU kernels that read no data (the offsets' values are checked in the
// kernels, reported through the error record as bad offsets).
inline CollectionCall collection_call(const std::vector<int64_t>& rows,
                                      const std::vector<int64_t>& dims, const at::Tensor& values,
                                      const at::Tensor& offsets, at::IntArrayRef feature_table,
                                      at::IntArrayRef modes, at::IntArrayRef padding_idx,
                                      const c10::optional<at::Tensor>& psw, int64_t batch,
                                      const char* op) {
  CollectionCall c;
  c.tables = static_cast<int64_t>(rows.size());
  c.features = static_cast<int64_t>(feature_table.size());
  c.batch = batch;
  c.rows = rows;
  c.dims = dims;
  TORCH_CHECK(batch >= 0, op, ": 'batch_size' must be >= 0, got ", batch);
  TORCH_CHECK(static_cast<int64_t>(modes.size()) == c.tables, op,
              ": 'modes' must have one entry per table (", c.tables, "), got ", modes.size());
  TORCH_CHECK(static_cast<int64_t>(padding_idx.size()) == c.tables, op,
              ": 'padding_idx' must have one entry per table (", c.tables, "), got ",
              padding_idx.size());
  for (int64_t t = 0; t < c.tables; ++t) {
    check_bag_mode(modes[t], op);
    TORCH_CHECK(padding_idx[t] < rows[t], op, ": 'padding_idx[", t, "]' must be < the table's ",
                rows[t], " rows or negative for none, got ", padding_idx[t]);
    c.modes.push_back(modes[t]);
    c.pads.push_back(padding_idx[t]);
    c.any_max = c.any_max || modes[t] == kBagMax;
  }
  for (int64_t f = 0; f < c.features; ++f) {
    const int64_t t = feature_table[f];
    TORCH_CHECK(t >= 0 && t < c.tables, op, ": 'feature_table[", f, "]' must name one of the ",
                c.tables, " tables, got ", t);
    TORCH_CHECK(!psw.has_value() || modes[t] == kBagSum, op, ": 'per_sample_weights' needs sum "
                "mode (0), but feature ", f, " pools table ", t, " in mode ", modes[t]);
    c.table_of.push_back(t);
    c.col_of.push_back(c.total_dim);
    c.total_dim += dims[t];
  }
  check_indices_dtype(values, op);
  TORCH_CHECK(values.dim() == 1, op, ": 'values' must be 1-D, got shape ", values.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
              ": 'offsets' must be an int64 or int32 tensor, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == c.features * batch + 1, op,
              ": 'offsets' must be 1-D with features * batch_size + 1 = ", c.features, " * ",
              batch, " + 1 = ", c.features * batch + 1, " entries, got shape ", offsets.sizes());
  check_same_device(offsets, "offsets", values, "values", op);
  c.n = values.size(0);
  if (psw.has_value()) {
    TORCH_CHECK(psw->dim() == 1 && psw->size(0) == c.n, op,
                ": 'per_sample_weights' must have the shape of 'values' ", values.sizes(),
                ", got ", psw->sizes());
    check_same_device(*psw, "per_sample_weights", values, "values", op);
  }
  c.values = values.contiguous();
  c.offsets = offsets.to(at::kLong).contiguous();
  return c;
}

// The chunk of features [first, first + count) with table descriptions; `pointer(t)` gives
// table t's `data` entry.
template <typename Pointer>
CollectionChunk collection_chunk(const CollectionCall& c, int64_t first, Pointer&& pointer) {
  CollectionChunk k{};
  k.first = first;
  k.count = std::min<int64_t>(kChunkFeatures, c.features - first);
  k.batch = c.batch;
  k.total_dim = c.total_dim;
  k.n = c.n;
  for (int64_t f = 0; f < k.count; ++f) {
    const int64_t t = c.table_of[first + f];
    k.col[f] = c.col_of[first + f];
    k.table[f] = CollectionTable{pointer(t), nullptr, c.rows[t], c.pads[t], c.dims[t],
                                 c.modes[t], 0, 0};
  }
  return k;
}

// Launch shape over a chunk's bags: a warp's lanes per bag (columns), 8 bags per block.
inline RowLaunch chunk_launch(const CollectionChunk& k) { return row_launch(k.count * k.batch, 32); }

#ifdef __CUDACC__
// Calls visit(f, b, fb, range) for this thread group's bags of the chunk: local feature f,
// bag b in the batch, global bag fb = (first + f) * batch + b and its checked range (a bad
// entry is reported once, by lane 0, and pools nothing).
template <typename Visit>
__device__ __forceinline__ void for_each_chunk_bag(const CollectionChunk& k,
                                                   const int64_t* __restrict__ off,
                                                   const ErrorSink& sink, Visit&& visit) {
  const int64_t bags = k.count * k.batch;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t lb = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; lb < bags;
       lb += step) {
    const int64_t f = lb / k.batch, b = lb - f * k.batch;
    const int64_t fb = (k.first + f) * k.batch + b;
    visit(f, b, fb, bag_range(off, fb, k.n, sink, threadIdx.x == 0));
  }
}

// The ids of one bag that pool a row: in range and not padding.
template <typename index_t>
__device__ __forceinline__ int64_t pooled_count(const index_t* __restrict__ idx,
                                                const BagRange& r, const CollectionTable& t) {
  int64_t count = 0;
  for (int64_t i = r.start; i < r.end; ++i) {
    const int64_t k = idx[i];
    count += k != t.pad && row_in_range(k, t.rows);
  }
  return count;
}
#endif

}  // namespace embedding_ext::cuda
