// CUDA dense backward (embedding_dense_backward), two algorithms:
// - fp32/fp64, default: an atomic scatter-add straight into the zero-filled gradient (the
//   fewest bytes: no sort, no scratch).
// - fp16/bf16 always, and every dtype under torch.use_deterministic_algorithms(True): the
//   sorted path. Positions stably sorted by row; each distinct row is summed in fp32 in a
//   fixed order and written once, rounded once (no fp32 scratch of the whole table). A long
//   segment (a hot row) is not summed by one row group alone: the sorted positions are cut
//   into chunks of kChunk, a first pass sums each chunk's share of a segment that began in
//   an earlier chunk, and the segment's head adds those partial sums in chunk order. The
//   result depends only on the ids, never on scheduling.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>

#include "dense_backward.h"
#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void scatter_add_kernel(const scalar_t* __restrict__ grad, const index_t* __restrict__ idx,
                                   int64_t n, int64_t num_rows, int64_t dim, int64_t padding_idx,
                                   const int* __restrict__ counts, scalar_t* __restrict__ out,
                                   ErrorSink sink) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(sink, i, k, num_rows);
      continue;
    }
    if (k == padding_idx) continue;
    const scalar_t scale = counts ? scalar_t(1) / static_cast<scalar_t>(counts[k]) : scalar_t(1);
    const scalar_t* g = grad + i * dim;
    scalar_t* dst = out + k * dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) atomicAdd(dst + d, g[d] * scale);
  }
}

// Sorted positions per chunk. A segment of L positions costs its head at most kChunk row
// reads plus L / kChunk partial sums.
constexpr int64_t kChunk = 64;

// VEC consecutive elements of a row, loaded and stored as one access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Adds the VEC elements of `src` (any float type) to fp32/fp64 accumulators.
template <typename acc_t, typename T, int VEC>
__device__ __forceinline__ void add_pack(acc_t (&acc)[VEC], const T* src) {
  const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(src);
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(p.v[e]);
}

// First position in [begin, n) whose row is above k (rows ascending).
template <typename index_t>
__device__ __forceinline__ int64_t segment_end(const index_t* rows, int64_t begin, int64_t n,
                                               int64_t k) {
  int64_t lo = begin, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(rows[mid]) <= k) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Pass 1: for each chunk whose first position continues a segment begun in an earlier chunk
// (and is a valid, non-padding row), the sum of that segment's terms inside the chunk.
// Other chunks' partial rows are never read. dim_vecs = dim / VEC.
template <typename scalar_t, typename index_t, int VEC>
__global__ void chunk_carry_kernel(const scalar_t* __restrict__ grad,
                                   const index_t* __restrict__ sorted_rows,
                                   const int64_t* __restrict__ positions, int64_t n,
                                   int64_t num_rows, int64_t dim_vecs, int64_t padding_idx,
                                   at::opmath_type<scalar_t>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; c < num_chunks;
       c += step) {
    const int64_t s = c * kChunk;
    const int64_t k = sorted_rows[s];
    if (s == 0 || static_cast<int64_t>(sorted_rows[s - 1]) != k) continue;  // a segment head
    if (!row_in_range(k, num_rows) || k == padding_idx) continue;
    const int64_t end = min(s + kChunk, n);
    int64_t e = s + 1;
    while (e < end && static_cast<int64_t>(sorted_rows[e]) == k) ++e;
    for (int64_t v = threadIdx.x; v < dim_vecs; v += blockDim.x) {
      acc_t acc[VEC] = {};
      for (int64_t t = s; t < e; ++t) add_pack<acc_t, scalar_t, VEC>(acc, grad + (positions[t] * dim_vecs + v) * VEC);
      Pack<acc_t, VEC> out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) out.v[i] = acc[i];
      *reinterpret_cast<Pack<acc_t, VEC>*>(partial + (c * dim_vecs + v) * VEC) = out;
    }
  }
}

// Pass 2: one row group per segment head sums the segment's terms in its first chunk, then
// the partial sums of the chunks it continues into, in order, and writes the row once.
// The rows are read as scalar_t and written as out_t (the same type, or fp32 terms summed
// into an fp16/bf16 gradient: see sorted_row_sums).
template <typename scalar_t, typename out_t, typename index_t, int VEC>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ grad,
                                   const index_t* __restrict__ sorted_rows,
                                   const int64_t* __restrict__ positions, int64_t n,
                                   int64_t num_rows, int64_t dim_vecs, int64_t padding_idx,
                                   bool scale_grad_by_freq,
                                   const at::opmath_type<scalar_t>* __restrict__ partial,
                                   out_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; j < n; j += step) {
    const int64_t k = sorted_rows[j];
    if (j > 0 && static_cast<int64_t>(sorted_rows[j - 1]) == k) continue;  // not a segment head
    // Bad ids (sorted as row num_rows) were reported by sort_by_row, with their own value.
    if (!row_in_range(k, num_rows) || k == padding_idx) continue;
    // The segment's end: a scan inside its first chunk (most segments end there), a binary
    // search beyond.
    const int64_t first_chunk = j / kChunk;
    const int64_t chunk_end = min(n, (first_chunk + 1) * kChunk);
    int64_t e = j + 1;
    while (e < chunk_end && static_cast<int64_t>(sorted_rows[e]) == k) ++e;
    if (e == chunk_end && e < n && static_cast<int64_t>(sorted_rows[e]) == k) {
      e = segment_end(sorted_rows, e + 1, n, k);
    }
    const int64_t first_end = min(e, chunk_end);
    const acc_t scale = scale_grad_by_freq ? acc_t(1) / static_cast<acc_t>(e - j) : acc_t(1);
    for (int64_t v = threadIdx.x; v < dim_vecs; v += blockDim.x) {
      acc_t acc[VEC] = {};
      for (int64_t t = j; t < first_end; ++t) add_pack<acc_t, scalar_t, VEC>(acc, grad + (positions[t] * dim_vecs + v) * VEC);
#pragma unroll 4
      for (int64_t c = first_chunk + 1; c * kChunk < e; ++c) add_pack<acc_t, acc_t, VEC>(acc, partial + (c * dim_vecs + v) * VEC);
      Pack<out_t, VEC> row;
#pragma unroll
      for (int i = 0; i < VEC; ++i) row.v[i] = static_cast<out_t>(acc[i] * scale);
      *reinterpret_cast<Pack<out_t, VEC>*>(out + (k * dim_vecs + v) * VEC) = row;
    }
  }
}

// out_t: the gradient's type, scalar_t's or narrower (fp32 rows into an fp16/bf16 table).
template <typename scalar_t, typename out_t, typename index_t>
at::Tensor sorted_dense_backward(const BackwardInputs& in, int64_t padding_idx,
                                 bool scale_grad_by_freq, const LaunchScope& scope) {
  static_assert(sizeof(out_t) <= sizeof(scalar_t), "the result is never wider than the rows");
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = in.n, dim = in.dim;
  const SortedRows sorted = sort_by_row<index_t>(in.indices, in.num_rows, scope);
  const at::Tensor& sorted_rows = sorted.rows;
  const at::Tensor& positions = sorted.positions;
  at::Tensor result = at::zeros({in.num_rows, dim},
                                in.grad.options().dtype(c10::CppTypeToScalarType<out_t>::value));
  const int64_t num_chunks = ceil_div(n, kChunk);
  at::Tensor partial = at::empty({num_chunks, dim},
                                 in.grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const int64_t elem = sizeof(scalar_t);
  const int vb = vector_bytes({dim * elem, reinterpret_cast<int64_t>(in.grad.const_data_ptr()),
                               reinterpret_cast<int64_t>(result.const_data_ptr())});
  auto go = [&](auto vec_tag) {
    constexpr int VEC = decltype(vec_tag)::value;
    const int64_t dim_vecs = dim / VEC;
    const RowLaunch carry = row_launch(num_chunks, dim_vecs);
    chunk_carry_kernel<scalar_t, index_t, VEC><<<carry.grid, carry.block, 0, scope.stream>>>(
        in.grad.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<index_t>(),
        positions.const_data_ptr<int64_t>(), n, in.num_rows, dim_vecs, padding_idx,
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const RowLaunch heads = row_launch(n, dim_vecs);
    segment_sum_kernel<scalar_t, out_t, index_t, VEC><<<heads.grid, heads.block, 0, scope.stream>>>(
        in.grad.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<index_t>(),
        positions.const_data_ptr<int64_t>(), n, in.num_rows, dim_vecs, padding_idx,
        scale_grad_by_freq, partial.const_data_ptr<acc_t>(), result.mutable_data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // The widest access (<= 16 bytes) that divides the row and both base addresses.
  const int vec = vb / static_cast<int>(elem);
  if (vec >= 8 && 8 * elem <= 16) go(std::integral_constant<int, (8 * sizeof(scalar_t) <= 16 ? 8 : 1)>{});
  else if (vec >= 4 && 4 * elem <= 16) go(std::integral_constant<int, (4 * sizeof(scalar_t) <= 16 ? 4 : 1)>{});
  else if (vec >= 2) go(std::integral_constant<int, 2>{});
  else go(std::integral_constant<int, 1>{});
  return result;
}

// Picks the algorithm (see the top of this file).
template <typename scalar_t, typename index_t>
at::Tensor dense_backward(const BackwardInputs& in, int64_t padding_idx, bool scale_grad_by_freq,
                          const LaunchScope& scope) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    if (!at::globalContext().deterministicAlgorithms()) {
      const index_t* idx = in.indices.const_data_ptr<index_t>();
      at::Tensor counts;
      if (scale_grad_by_freq) counts = row_counts(idx, in.n, in.num_rows, padding_idx, in.grad, scope);
      at::Tensor result = at::zeros({in.num_rows, in.dim}, in.grad.options());
      const RowLaunch l = row_launch(in.n, in.dim);
      scatter_add_kernel<scalar_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
          in.grad.const_data_ptr<scalar_t>(), idx, in.n, in.num_rows, in.dim, padding_idx,
          scale_grad_by_freq ? counts.const_data_ptr<int>() : nullptr,
          result.mutable_data_ptr<scalar_t>(), scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return result;
    }
  }
  return sorted_dense_backward<scalar_t, scalar_t, index_t>(in, padding_idx, scale_grad_by_freq, scope);
}

at::Tensor embedding_dense_backward_cuda(const at::Tensor& grad_in, const at::Tensor& indices_in,
                                         c10::SymInt num_weights, int64_t padding_idx,
                                         bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_dense_backward";
  const BackwardInputs in = cuda_backward_inputs(grad_in, indices_in, num_weights, padding_idx, op);
  const int64_t num_rows = in.num_rows, dim = in.dim, n = in.n;
  LaunchScope scope(grad_in, op);
  if (n == 0 || dim == 0 || num_rows == 0) {
    // Nothing to add, but bad ids are still reported.
    AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
      probe_indices<index_t>(in.indices.const_data_ptr<index_t>(), n, num_rows, scope);
    });
    scope.finish();
    return at::zeros({num_rows, dim}, in.grad.options());
  }
  at::Tensor result;
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.grad.scalar_type(), op, [&] {
      result = dense_backward<scalar_t, index_t>(in, padding_idx, scale_grad_by_freq, scope);
    });
  });
  scope.finish();
  return result;
}

}  // namespace

at::Tensor sorted_row_sums(const BackwardInputs& fp32_rows, int64_t padding_idx,
                           at::ScalarType out_dtype, const LaunchScope& scope) {
  constexpr const char* op = "sorted_row_sums";
  TORCH_CHECK(fp32_rows.grad.scalar_type() == at::kFloat, op, ": the rows must be float32, got ",
              fp32_rows.grad.scalar_type());
  if (fp32_rows.n == 0 || fp32_rows.dim == 0 || fp32_rows.num_rows == 0) {
    return at::zeros({fp32_rows.num_rows, fp32_rows.dim}, fp32_rows.grad.options().dtype(out_dtype));
  }
  at::Tensor result;
  AT_DISPATCH_INDEX_TYPES(fp32_rows.indices.scalar_type(), op, [&] {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(out_dtype, op, [&] {
      result = sorted_dense_backward<float, scalar_t, index_t>(fp32_rows, padding_idx, false, scope);
    });
  });
  return result;
}

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_dense_backward", &embedding_dense_backward_cuda);
}

}  // namespace embedding_ext::cuda
