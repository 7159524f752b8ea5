// CPU optimizer step fused into the lookup's backward (embedding_fused_update_, issue 14):
// positions grouped by row (sort_by_row), each row's gradient summed in fp32 (fp64 for fp64)
// in position order, then the rule applied once to the row and its state. No gradient
// tensor exists; extra memory is O(ids). Rows are split across threads, each row written
// by one thread: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../optimizer_rules.h"
#include "common.h"
#include "row_convert.h"

namespace embedding_ext {
namespace cpu {
namespace {

// One row's update by kRule (optimizer_rules.h); s1/s2 point at the row's state. The rule is
// a template parameter so that each loop is a plain vectorisable loop.
template <int64_t kRule, typename scalar_t, typename acc_t>
inline void apply_rule(const RuleScalars<acc_t>& r, int64_t dim, const acc_t* g, scalar_t* w,
                       acc_t* s1, acc_t* s2) {
  if constexpr (kRule == kRuleSgd) {
    for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<scalar_t>(sgd_element(static_cast<acc_t>(w[d]), g[d], r));
  } else if constexpr (kRule == kRuleAdagrad) {
    for (int64_t d = 0; d < dim; ++d) {
      w[d] = static_cast<scalar_t>(adagrad_element(static_cast<acc_t>(w[d]), g[d], s1[d], r));
    }
  } else if constexpr (kRule == kRuleSparseAdam) {
    for (int64_t d = 0; d < dim; ++d) {
      w[d] = static_cast<scalar_t>(sparse_adam_element(static_cast<acc_t>(w[d]), g[d], s1[d], s2[d], r));
    }
  } else {
    acc_t square_sum = 0;
    for (int64_t d = 0; d < dim; ++d) square_sum += g[d] * g[d];
    const acc_t scale = rowwise_adagrad_scale(square_sum, dim, s1[0], r);
    for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - g[d] * scale);
  }
}

// Rows this many segments ahead are prefetched (weight row, state rows, first gradient row):
// every access here is random, so without it each row waits for DRAM in turn.
constexpr int64_t kUpdatePrefetch = 8;

template <int64_t kRule, typename scalar_t, typename state_t, typename index_t>
void fused_update(scalar_t* weight, int64_t row_stride, const scalar_t* grad, const index_t* idx,
                  int64_t n, int64_t num_rows, int64_t dim, int64_t padding_idx,
                  bool scale_grad_by_freq, const RuleScalars<state_t>& r, state_t* s1,
                  state_t* s2) {
  const SortedLookups sorted = sort_by_row(idx, n, num_rows, padding_idx);
  const std::vector<int64_t> heads = segment_heads(sorted);
  const int64_t segments = static_cast<int64_t>(heads.size()) - 1;
  const int64_t s1_row = kRule == kRuleRowWiseAdagrad ? 1 : dim;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t state_bytes = dim * static_cast<int64_t>(sizeof(state_t));
  at::parallel_for(0, segments, grain_for(row_bytes * 4), [&](int64_t g0, int64_t g1) {
    std::vector<state_t> acc(dim);
    for (int64_t s = g0; s < g1; ++s) {
      if (s + kUpdatePrefetch < g1) {
        const int64_t ahead = heads[s + kUpdatePrefetch], k_ahead = sorted.rows[ahead];
        prefetch_row(weight + k_ahead * row_stride, row_bytes);
        prefetch_row(grad + sorted.positions[ahead] * dim, row_bytes);
        if (s1 != nullptr && kRule != kRuleRowWiseAdagrad) prefetch_row(s1 + k_ahead * dim, state_bytes);
        if (s2 != nullptr) prefetch_row(s2 + k_ahead * dim, state_bytes);
      }
      const int64_t k = sorted.rows[heads[s]];
      std::fill(acc.begin(), acc.end(), state_t(0));
      for (int64_t j = heads[s]; j < heads[s + 1]; ++j) {
        load_row<true>(grad + sorted.positions[j] * dim, acc.data(), dim);
      }
      if (scale_grad_by_freq) {
        const state_t count = static_cast<state_t>(heads[s + 1] - heads[s]);
        for (int64_t d = 0; d < dim; ++d) acc[d] /= count;
      }
      apply_rule<kRule, scalar_t, state_t>(r, dim, acc.data(), weight + k * row_stride,
                                           s1 ? s1 + k * s1_row : nullptr,
                                           s2 ? s2 + k * dim : nullptr);
    }
  });
}

void embedding_fused_update_cpu(const at::Tensor& weight, const at::Tensor& grad_in,
                                const at::Tensor& indices_in, int64_t padding_idx,
                                bool scale_grad_by_freq, int64_t rule,
                                const c10::optional<at::Tensor>& state1,
                                const c10::optional<at::Tensor>& state2, double lr, double eps, double beta1,
                                double beta2, double lr_decay, int64_t step) {
  constexpr const char* op = "embedding_fused_update_";
  const int64_t num_rows = check_fused_update_args(weight, grad_in, indices_in, padding_idx, rule,
                                                   state1, state2, step, op);
  const int64_t dim = weight.size(1);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), op, [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, indices.numel(), num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      using state_t = at::opmath_type<scalar_t>;
      const bool has1 = rule != kRuleSgd, has2 = rule == kRuleSparseAdam;
      const auto r = rule_scalars<state_t>(lr, eps, beta1, beta2, lr_decay, step);
      state_t* s1 = has1 ? state1->mutable_data_ptr<state_t>() : nullptr;
      state_t* s2 = has2 ? state2->mutable_data_ptr<state_t>() : nullptr;
      const auto run = [&](auto rule_tag) {
        fused_update<decltype(rule_tag)::value, scalar_t, state_t, index_t>(
            weight.mutable_data_ptr<scalar_t>(), weight.stride(0),
            grad.const_data_ptr<scalar_t>(), idx, indices.numel(), num_rows, dim, padding_idx,
            scale_grad_by_freq, r, s1, s2);
      };
      switch (rule) {
        case kRuleSgd: return run(std::integral_constant<int64_t, kRuleSgd>{});
        case kRuleAdagrad: return run(std::integral_constant<int64_t, kRuleAdagrad>{});
        case kRuleSparseAdam: return run(std::integral_constant<int64_t, kRuleSparseAdam>{});
        default: return run(std::integral_constant<int64_t, kRuleRowWiseAdagrad>{});
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_fused_update_", &embedding_fused_update_cpu);
}

}  // namespace cpu
}  // namespace embedding_ext
