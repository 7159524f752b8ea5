// What the CUDA bag ops (bag_forward.cu, bag_backward.cu) share: each bag's range of
// positions, checked, and where every position pools to. Offsets are checked inside the
// kernels, without a host synchronisation: a kernel never reads outside the ids for a bad
// entry (that bag pools nothing) and records it like a bad id (kind kBadOffset); a later
// call raises IndexError naming the entry.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include "launch.cuh"

namespace embedding_ext::cuda {

// Bag b's positions [start, end); ok = false for a bad CSR entry (then the range is empty).
struct BagRange {
  int64_t start, end;
  bool ok;
};

// Each entry is blamed by one bag only, so one bad entry is always named the same way: entry
// 0 by bag 0, entry b + 1 by bag b when it is past the ids or below a valid start (a start
// outside [0, n] was already blamed as the previous bag's end).
__device__ __forceinline__ BagRange bag_range(const int64_t* __restrict__ off, int64_t b,
                                              int64_t n, const ErrorSink& sink, bool report) {
  const int64_t start = off[b], end = off[b + 1];
  const bool start_ok = start >= 0 && start <= n;
  if (b == 0 && start != 0 && report) report_bad_index(sink, 0, start, n, kBadOffset);
  if (start_ok && (end > n || end < start) && report) report_bad_index(sink, b + 1, end, n, kBadOffset);
  const bool ok = start_ok && (b != 0 || start == 0) && end >= start && end <= n;
  return ok ? BagRange{start, end, true} : BagRange{0, 0, false};
}

// A call with no bags: only offsets[0] (which must be 0) to check. (A kernel each .cu that
// includes this defines for itself: internal linkage.)
namespace {
__global__ void check_first_offset_kernel(const int64_t* __restrict__ off, int64_t n, ErrorSink sink) {
  if (off[0] != 0) report_bad_index(sink, 0, off[0], n, kBadOffset);
}
}  // namespace

// bag_of[i] = the bag pooling position i (left at -1 for ids in no bag: the CSR tail), and
// per bag the count of pooled (non-padding, in-range) ids; with counts, the in-bag
// occurrences of each row (scale_grad_by_freq's divisor). bag_of and bag_count start at -1
// and 0.
template <typename index_t>
__global__ void bag_layout_kernel(const index_t* __restrict__ idx, const int64_t* __restrict__ off,
                                  int64_t bags, int64_t n, int64_t num_rows, int64_t padding_idx,
                                  int64_t* __restrict__ bag_of,
                                  unsigned long long* __restrict__ bag_count,
                                  int* __restrict__ counts, ErrorSink sink) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; b < bags; b += step) {
    const BagRange r = bag_range(off, b, n, sink, threadIdx.x == 0);
    unsigned long long pooled = 0;
    for (int64_t i = r.start + threadIdx.x; i < r.end; i += blockDim.x) {
      bag_of[i] = b;
      const int64_t k = idx[i];
      if (k == padding_idx || !row_in_range(k, num_rows)) continue;
      ++pooled;
      if (counts != nullptr) atomicAdd(counts + k, 1);
    }
    if (pooled > 0) atomicAdd(bag_count + b, pooled);
  }
}

// Where every position pools to, and (with scale_grad_by_freq) the in-bag row counts.
struct BagLayout {
  at::Tensor bag_of, bag_count, counts;
};

template <typename index_t>
BagLayout bag_layout(const BagInputs& in, int64_t padding_idx, bool with_counts,
                     const LaunchScope& scope) {
  const auto opts = in.indices.options();
  BagLayout l{at::full({in.n}, -1, opts.dtype(at::kLong)), at::zeros({in.bags}, opts.dtype(at::kLong)),
              with_counts ? at::zeros({in.num_rows}, opts.dtype(at::kInt)) : at::Tensor()};
  const RowLaunch launch = row_launch(in.bags, 32);
  bag_layout_kernel<index_t><<<launch.grid, launch.block, 0, scope.stream>>>(
      in.indices.const_data_ptr<index_t>(), in.offsets.const_data_ptr<int64_t>(), in.bags, in.n,
      in.num_rows, padding_idx, l.bag_of.mutable_data_ptr<int64_t>(),
      reinterpret_cast<unsigned long long*>(l.bag_count.mutable_data_ptr<int64_t>()),
      with_counts ? l.counts.mutable_data_ptr<int>() : nullptr, scope.sink);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return l;
}

}  // namespace embedding_ext::cuda
