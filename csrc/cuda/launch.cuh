// Launch helpers every CUDA op family shares: the per-call scope (device guard, current
// stream, bad-index sink), the row-per-thread-group launch shape, vector widths, per-row
// counts, an index-only probe and the sort of positions by row.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <limits>

#ifdef __CUDACC__
#include <ATen/cuda/cub.h>  // radix_sort_pairs (instantiated in libtorch_cuda)
#endif

#include "../checks.h"
#include "index_errors.h"

namespace embedding_ext::cuda {

// Work shared by every op's host wrapper: surface earlier errors, guard the device, take
// the current stream and the error sink once per call (shared by the call's launches).
struct LaunchScope {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  ErrorSink sink;
  LaunchScope(const at::Tensor& t, const char* op)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {
    raise_pending_index_error(/*synchronize=*/false);
    sink = error_sink(op, stream);
  }
  // After the launches: with synchronous checks on, wait and raise from this call.
  void finish() const {
    if (!synchronous_index_checks()) return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    raise_pending_index_error(/*synchronize=*/false);
  }
};

// The CUDA gradient kernels need grad_output on a CUDA device (the dispatcher picks this
// backend from any CUDA argument): checked first, before the shared checks.
inline void check_cuda_grad_output(const at::Tensor& grad, const char* op) {
  TORCH_CHECK(grad.is_cuda(), op, ": 'grad_output' must be a CUDA tensor here, got ",
              grad.device());
}

inline BackwardInputs cuda_backward_inputs(const at::Tensor& grad, const at::Tensor& indices,
                                           const c10::SymInt& num_weights, int64_t padding_idx,
                                           const char* op) {
  check_cuda_grad_output(grad, op);
  return backward_inputs(grad, indices, num_weights, padding_idx, op);
}

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lanes that share one row: as many as the row has vectors, up to a warp, so that short
// rows put several rows in one warp.
inline int lanes_for(int64_t row_vecs) {
  int lanes = 1;
  while (lanes < 32 && lanes < row_vecs) lanes *= 2;
  return lanes;
}

// blockDim = (lanes per row, rows per block); kernels loop over rows with a grid stride.
struct RowLaunch {
  dim3 grid, block;
};

inline RowLaunch row_launch(int64_t rows, int64_t row_vecs) {
  const int lanes = lanes_for(row_vecs);
  const int rows_per_block = kThreadsPerBlock / lanes;
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>(ceil_div(rows, rows_per_block), 1), kMaxBlocks);
  return {dim3(static_cast<unsigned>(blocks)), dim3(lanes, rows_per_block)};
}

// A flat launch over n items.
inline int64_t flat_blocks(int64_t n) {
  return std::min<int64_t>(std::max<int64_t>(ceil_div(n, kThreadsPerBlock), 1), kMaxBlocks);
}

// Largest power-of-two byte width (<= 16) dividing every address and length involved.
inline int vector_bytes(std::initializer_list<int64_t> quantities) {
  int bytes = 16;
  for (int64_t q : quantities) {
    while (bytes > 1 && q % bytes != 0) bytes /= 2;
  }
  return bytes;
}

#ifdef __CUDACC__
// One pass over the ids, doing what the caller asks:
// - counts: counts[k] += 1 for in-range, non-padding k (the divisor of scale_grad_by_freq;
//   int32 is enough: a count above 2^31 needs more than 8 GiB of ids);
// - report: bad ids go to the sink (where no other kernel of the call would report them);
// - any_bad: set to 1 on a bad id, so that a later kernel on the stream can refuse to act
//   without a host synchronisation (every writer stores the same value).
template <typename index_t>
__global__ void scan_ids_kernel(const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                int64_t padding_idx, int* __restrict__ counts, bool report,
                                ErrorSink sink, int* __restrict__ any_bad) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx[i];
    if (!row_in_range(k, num_rows)) {
      if (report) report_bad_index(sink, i, k, num_rows);
      if (any_bad) *any_bad = 1;
    } else if (counts && k != padding_idx) {
      atomicAdd(counts + k, 1);
    }
  }
}

template <typename index_t>
at::Tensor row_counts(const index_t* idx, int64_t n, int64_t num_rows, int64_t padding_idx,
                      const at::Tensor& like, const LaunchScope& scope) {
  at::Tensor counts = at::zeros({num_rows}, like.options().dtype(at::kInt));
  scan_ids_kernel<index_t><<<flat_blocks(n), kThreadsPerBlock, 0, scope.stream>>>(
      idx, n, num_rows, padding_idx, counts.mutable_data_ptr<int>(), /*report=*/false,
      scope.sink, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

// Only checks the ids (and sets *any_bad on a bad one): for calls with nothing else to
// launch (e.g. D == 0) and before in-place work (renorm).
template <typename index_t>
void probe_indices(const index_t* idx, int64_t n, int64_t num_rows, const LaunchScope& scope,
                   int* any_bad = nullptr) {
  if (n == 0) return;
  scan_ids_kernel<index_t><<<flat_blocks(n), kThreadsPerBlock, 0, scope.stream>>>(
      idx, n, num_rows, /*padding_idx=*/-1, nullptr, /*report=*/true, scope.sink, any_bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Keys for sort_by_row: the id, or num_rows for a bad one (reported, *any_bad set), and
// the positions 0..n-1 that the sort carries along.
template <typename index_t>
__global__ void row_keys_kernel(const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                index_t* __restrict__ keys, int64_t* __restrict__ positions,
                                ErrorSink sink, int* __restrict__ any_bad) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx[i];
    positions[i] = i;
    if (row_in_range(k, num_rows)) {
      keys[i] = static_cast<index_t>(k);
    } else {
      keys[i] = static_cast<index_t>(num_rows);
      report_bad_index(sink, i, k, num_rows);
      if (any_bad) *any_bad = 1;
    }
  }
}

// The ids' positions stably sorted by row, for the kernels that sum each row's positions in
// a fixed order. Bad ids are reported (and set *any_bad) and sort as row num_rows, so the
// radix sort needs only the bits of num_rows, as PyTorch's own embedding backward sorts:
// 20 bits for a 1e6-row table instead of 64, 3 radix passes instead of 8 (at::sort was 68
// of a fused SGD step's 113 us on an H200: bench/NOTES-cuda.md, run 4b). Sorted rows equal
// to num_rows are bad ids; every consumer skips rows out of range. Past cub's int32 element count, or a table
// whose row count index_t cannot hold: the probe, then at::sort of the ids themselves (bad
// ids then sort to either end, also out of range).
struct SortedRows {
  at::Tensor rows;       // index_t, ascending
  at::Tensor positions;  // int64: the position of each sorted row in the ids
};

template <typename index_t>
SortedRows sort_by_row(const at::Tensor& indices, int64_t num_rows, const LaunchScope& scope,
                       int* any_bad = nullptr) {
  const int64_t n = indices.numel();
  if (n > std::numeric_limits<int>::max() ||
      num_rows > static_cast<int64_t>(std::numeric_limits<index_t>::max())) {
    probe_indices<index_t>(indices.const_data_ptr<index_t>(), n, num_rows, scope, any_bad);
    auto sorted = at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    return {std::get<0>(sorted), std::get<1>(sorted)};
  }
  at::Tensor keys = at::empty({n}, indices.options());
  at::Tensor positions = at::empty({n}, indices.options().dtype(at::kLong));
  if (n == 0) return {keys, positions};
  row_keys_kernel<index_t><<<flat_blocks(n), kThreadsPerBlock, 0, scope.stream>>>(
      indices.const_data_ptr<index_t>(), n, num_rows, keys.mutable_data_ptr<index_t>(),
      positions.mutable_data_ptr<int64_t>(), scope.sink, any_bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor rows = at::empty_like(keys);
  at::Tensor sorted_positions = at::empty_like(positions);
  at::cuda::cub::radix_sort_pairs<index_t, int64_t>(
      keys.const_data_ptr<index_t>(), rows.mutable_data_ptr<index_t>(),
      positions.const_data_ptr<int64_t>(), sorted_positions.mutable_data_ptr<int64_t>(), n,
      /*descending=*/false, /*begin_bit=*/0,
      /*end_bit=*/at::cuda::cub::get_num_bits(static_cast<uint64_t>(num_rows)));
  return {rows, sorted_positions};
}
#endif

}  // namespace embedding_ext::cuda
