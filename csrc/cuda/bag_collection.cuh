// What the CUDA kernels of the table-batched pooled lookup (bag_collection.cu,
// bag_collection_backward.cu) share: the call's description passed by value as a kernel
// argument (no host-to-device copy, so a launch can be captured into a CUDA graph) and the
// walk over a feature's bags.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../collection_checks.h"
#include "bag.cuh"
#include "launch.cuh"

namespace embedding_ext::cuda {

// Features per launch. A launch's description is 18.5 KB of kernel parameters (CUDA 12.1+
// takes up to 32,764 bytes on every architecture we build for; static_assert below); a
// collection with more features is pooled in several launches, one per chunk of features.
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

// Room left for the kernels' other arguments (pointers, the error sink).
static_assert(sizeof(CollectionChunk) <= 32764 - 512, "a launch's description must fit the "
              "kernel parameter space");

// The host's view of a checked call (csrc/collection_checks.h; the offsets' values are
// checked in the kernels, reported through the error record as bad offsets).
using CollectionCall = CollectionLayout;

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
    k.table[f] = CollectionTable{pointer(t), nullptr, c.rows[t], c.pad[t], c.dims[t],
                                 c.mode[t], 0, 0};
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

static __global__ void collection_first_offset_kernel(const int64_t* __restrict__ off, int64_t n,
                                                      ErrorSink sink) {
  if (off[0] != 0) report_bad_index(sink, 0, off[0], n, kBadOffset);
}

// No bags: only offsets[0] (which must be 0) to check.
inline void check_first_offset(const CollectionCall& c, const LaunchScope& scope) {
  collection_first_offset_kernel<<<1, 1, 0, scope.stream>>>(c.offsets.const_data_ptr<int64_t>(),
                                                            c.n, scope.sink);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
