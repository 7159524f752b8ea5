// CUDA max_norm renorm (embedding_renorm_), in place; the rule is in ../renorm_math.h.
// The first warp to claim a row renorms it, so duplicate ids never race. A probe of the ids
// runs first on the same stream: with a bad id no row changes (as on the CPU), without a
// host synchronisation.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../renorm_math.h"
#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

template <NormKind kKind, typename acc_t>
__device__ acc_t warp_fold(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v = norm_combine<kKind>(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// blockDim = (32, rows per block): one full warp per position.
template <NormKind kKind, typename scalar_t, typename index_t>
__global__ void renorm_kernel(scalar_t* weight, int64_t row_stride, int64_t col_stride,
                              const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                              int64_t dim, int* __restrict__ claimed,
                              const int* __restrict__ any_bad, double max_norm,
                              double norm_type) {
  using acc_t = at::opmath_type<scalar_t>;
  if (*any_bad) return;  // the probe reported it; leave every row as it is
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const acc_t p = static_cast<acc_t>(norm_type);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    int won = 0;
    if (threadIdx.x == 0) won = atomicCAS(claimed + k, 0, 1) == 0;
    won = __shfl_sync(0xffffffffu, won, 0);
    if (!won) continue;
    scalar_t* row = weight + k * row_stride;
    acc_t part = 0;
    for (int64_t d = threadIdx.x; d < dim; d += 32) {
      part = norm_combine<kKind>(part, norm_term<kKind>(static_cast<acc_t>(row[d * col_stride]), p));
    }
    const double norm = norm_finish<kKind>(warp_fold<kKind>(part), p);
    if (norm > max_norm) {
      const acc_t scale = static_cast<acc_t>(renorm_factor(norm, max_norm));
      for (int64_t d = threadIdx.x; d < dim; d += 32) {
        row[d * col_stride] = static_cast<scalar_t>(static_cast<acc_t>(row[d * col_stride]) * scale);
      }
    }
  }
}

void embedding_renorm_cuda(const at::Tensor& weight, const at::Tensor& indices_in, double max_norm,
                           double norm_type) {
  constexpr const char* op = "embedding_renorm_";
  check_renorm_args(weight, indices_in, max_norm, norm_type, op);
  LaunchScope scope(weight, op);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel(), num_rows = weight.size(0), dim = weight.size(1);
  if (n == 0) return;
  // One claim flag per row, then the call's "a bad id was seen" flag.
  at::Tensor flags = at::zeros({num_rows + 1}, indices.options().dtype(at::kInt));
  int* claimed = flags.mutable_data_ptr<int>();
  int* any_bad = claimed + num_rows;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      // Inside the dtype dispatch: an unsupported weight dtype raises before anything runs.
      probe_indices<index_t>(indices.const_data_ptr<index_t>(), n, num_rows, scope, any_bad);
      dispatch_norm_kind(norm_kind(norm_type), [&](auto kind) {
        constexpr int rows_per_block = kThreadsPerBlock / 32;
        const int64_t blocks = std::min<int64_t>(ceil_div(n, rows_per_block), kMaxBlocks);
        renorm_kernel<decltype(kind)::value, scalar_t, index_t>
            <<<blocks, dim3(32, rows_per_block), 0, scope.stream>>>(
                weight.mutable_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                indices.const_data_ptr<index_t>(), n, num_rows, dim, claimed, any_bad,
                max_norm, norm_type);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  scope.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_renorm_", &embedding_renorm_cuda);
}

}  // namespace embedding_ext::cuda
