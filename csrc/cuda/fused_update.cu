// CUDA optimizer step fused into the lookup's backward (embedding_fused_update_, the step of
// ee.fuse_optimizer), the rules in ../optimizer_rules.h. The ids are sorted by row
// (sort_by_row, launch.cuh, which also reports a bad id: then no row changes, without a host
// synchronisation, as renorm does; stable: positions ascending within a row); one warp per
// distinct row sums the row's gradient over its positions in order (fp32, fp64 for fp64)
// and applies the rule to the row and its state. Every row is written by one warp and no
// atomics touch the weight: deterministic. A row's positions are summed by its warp alone,
// so a very hot row (a long run of one id) is serial; the dense backward's chunked carry is
// the model if that shows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../optimizer_rules.h"
#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Column d of row k's gradient: the sum over its positions [j, e) in order, divided by the
// count with scale_grad_by_freq (a division, as the CPU kernel).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_gradient(const scalar_t* __restrict__ grad,
                                              const int64_t* __restrict__ positions, int64_t j,
                                              int64_t e, int64_t dim, int64_t d, bool scale) {
  acc_t g = 0;
  for (int64_t t = j; t < e; ++t) g += static_cast<acc_t>(grad[positions[t] * dim + d]);
  return scale ? g / static_cast<acc_t>(e - j) : g;
}

// blockDim = (32, warps per block): a warp per position, acting where a run of equal rows
// starts.
template <typename scalar_t, typename index_t>
__global__ void fused_update_kernel(scalar_t* __restrict__ weight, int64_t row_stride,
                                    const scalar_t* __restrict__ grad, int64_t dim,
                                    const index_t* __restrict__ sorted_rows,
                                    const int64_t* __restrict__ positions, int64_t n,
                                    int64_t padding_idx, bool scale, int64_t rule,
                                    RuleScalars<at::opmath_type<scalar_t>> r,
                                    at::opmath_type<scalar_t>* __restrict__ s1,
                                    at::opmath_type<scalar_t>* __restrict__ s2,
                                    const int* __restrict__ any_bad) {
  using acc_t = at::opmath_type<scalar_t>;
  if (*any_bad) return;  // sort_by_row reported it; leave every row as it is
  const int lane = threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; j < n; j += step) {
    const int64_t k = sorted_rows[j];
    if (j > 0 && static_cast<int64_t>(sorted_rows[j - 1]) == k) continue;  // not a run's start
    if (k == padding_idx) continue;
    int64_t e = j + 1;
    while (e < n && static_cast<int64_t>(sorted_rows[e]) == k) ++e;
    scalar_t* w = weight + k * row_stride;
    if (rule == kRuleRowWiseAdagrad) {
      acc_t square_sum = 0;
      for (int64_t d = lane; d < dim; d += 32) {
        const acc_t g = row_gradient<scalar_t, acc_t>(grad, positions, j, e, dim, d, scale);
        square_sum += g * g;
      }
      square_sum = warp_sum(square_sum);
      acc_t sum = s1[k];  // every lane reads the old value ...
      const acc_t multiplier = rowwise_adagrad_scale(square_sum, dim, sum, r);
      __syncwarp();
      if (lane == 0) s1[k] = sum;  // ... before one lane writes the new one
      for (int64_t d = lane; d < dim; d += 32) {
        const acc_t g = row_gradient<scalar_t, acc_t>(grad, positions, j, e, dim, d, scale);
        w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - g * multiplier);
      }
      continue;
    }
    for (int64_t d = lane; d < dim; d += 32) {
      const acc_t g = row_gradient<scalar_t, acc_t>(grad, positions, j, e, dim, d, scale);
      const acc_t old = static_cast<acc_t>(w[d]);
      acc_t updated;
      if (rule == kRuleSgd) {
        updated = sgd_element(old, g, r);
      } else if (rule == kRuleAdagrad) {
        updated = adagrad_element(old, g, s1[k * dim + d], r);
      } else {
        updated = sparse_adam_element(old, g, s1[k * dim + d], s2[k * dim + d], r);
      }
      w[d] = static_cast<scalar_t>(updated);
    }
  }
}

void embedding_fused_update_cuda(const at::Tensor& weight, const at::Tensor& grad_in,
                                 const at::Tensor& indices_in, int64_t padding_idx,
                                 bool scale_grad_by_freq, int64_t rule,
                                 const c10::optional<at::Tensor>& state1,
                                 const c10::optional<at::Tensor>& state2, double lr, double eps,
                                 double beta1, double beta2, double lr_decay, int64_t step) {
  constexpr const char* op = "embedding_fused_update_";
  const int64_t num_rows = check_fused_update_args(weight, grad_in, indices_in, padding_idx, rule,
                                                   state1, state2, step, op);
  TORCH_CHECK(weight.is_cuda(), op, ": 'weight' must be a CUDA tensor here, got ", weight.device());
  LaunchScope scope(weight, op);
  const at::Tensor indices = indices_in.reshape(-1).contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = indices.numel(), dim = weight.size(1);
  if (n == 0) return;
  at::Tensor any_bad = at::zeros({1}, indices.options().dtype(at::kInt));
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      // Bad ids are reported and set any_bad (the update kernel then changes nothing).
      const SortedRows sorted = sort_by_row<index_t>(indices, num_rows, scope,
                                                     any_bad.mutable_data_ptr<int>());
      const at::Tensor& sorted_rows = sorted.rows;
      const at::Tensor& positions = sorted.positions;
      const auto r = rule_scalars<acc_t>(lr, eps, beta1, beta2, lr_decay, step);
      constexpr int warps_per_block = kThreadsPerBlock / 32;
      const int64_t blocks = std::min<int64_t>(std::max<int64_t>(ceil_div(n, warps_per_block), 1), kMaxBlocks);
      const bool has1 = rule != kRuleSgd, has2 = rule == kRuleSparseAdam;
      fused_update_kernel<scalar_t, index_t><<<blocks, dim3(32, warps_per_block), 0, scope.stream>>>(
          weight.mutable_data_ptr<scalar_t>(), weight.stride(0), grad.const_data_ptr<scalar_t>(),
          dim, sorted_rows.const_data_ptr<index_t>(), positions.const_data_ptr<int64_t>(), n,
          padding_idx, scale_grad_by_freq, rule, r,
          has1 ? state1->mutable_data_ptr<acc_t>() : nullptr,
          has2 ? state2->mutable_data_ptr<acc_t>() : nullptr, any_bad.const_data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  scope.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_fused_update_", &embedding_fused_update_cuda);
}

}  // namespace embedding_ext::cuda
