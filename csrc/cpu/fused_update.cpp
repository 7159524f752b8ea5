// CPU optimizer step fused into the lookup's backward (embedding_fused_update_, the step of
// ee.fuse_optimizer): positions grouped by row (sort_by_row), each row's gradient summed in
// fp32 (fp64 for fp64) in position order, then the rule applied once to the row and its
// state. No gradient tensor exists; extra memory is O(ids). Rows are split across threads,
// each row written by one thread: deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../optimizer_rules.h"
#include "common.h"
#include "fused_row.h"
#include "isa.h"
#include "row_convert.h"

namespace embedding_ext::cpu {
namespace {

// Rows this many segments ahead are prefetched (weight row, state rows, first gradient row):
// every access here is random, so without it each row waits for DRAM in turn. (Whole rows,
// other distances and L2-only hints measured no better: bench/NOTES-cpu.md 10.2, 10.3.)
constexpr int64_t kUpdatePrefetch = 8;

// One update: the positions sorted by row (sort_by_row), segment s = one distinct row.
template <typename scalar_t, typename state_t>
struct UpdateArgs {
  scalar_t* weight;
  int64_t row_stride;
  const scalar_t* grad;
  int64_t dim;
  const int64_t* rows;       // sorted row of each kept position
  const int64_t* positions;  // its position in grad
  const int64_t* heads;      // segment s is [heads[s], heads[s + 1])
  bool scale_grad_by_freq;
  RuleScalars<state_t> r;
  state_t* s1;
  state_t* s2;
};

// Segments [s0, s_end): each row's gradient summed in position order into acc (dim
// elements), then the rule applied once. A row seen once at full precision is updated from
// its gradient row directly: the same values (a sum of one term, a count of one) but for the
// sign of a zero (a -0 gradient element stays -0 where 0 + -0 gave +0; torch.optim's
// update reads it as given too).
// (Always inlined: each copy below compiles it for its instruction set.)
template <int64_t kRule, typename scalar_t, typename state_t>
__attribute__((always_inline)) inline void update_segments(
    const UpdateArgs<scalar_t, state_t>& a, int64_t s0, int64_t s_end, state_t* acc) {
  const int64_t dim = a.dim;
  const int64_t s1_row = kRule == kRuleRowWiseAdagrad ? 1 : dim;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t state_bytes = dim * static_cast<int64_t>(sizeof(state_t));
  for (int64_t s = s0; s < s_end; ++s) {
    if (s + kUpdatePrefetch < s_end) {
      const int64_t ahead = a.heads[s + kUpdatePrefetch], k_ahead = a.rows[ahead];
      prefetch_row(a.weight + k_ahead * a.row_stride, row_bytes);
      prefetch_row(a.grad + a.positions[ahead] * dim, row_bytes);
      // (Row-wise Adagrad's state is one element per row, but its update waits on it: the
      // row's multiplier needs it before any element of the row is written.)
      if (a.s1 != nullptr) {
        prefetch_row(a.s1 + k_ahead * s1_row,
                     kRule == kRuleRowWiseAdagrad ? sizeof(state_t) : state_bytes);
      }
      if (a.s2 != nullptr) prefetch_row(a.s2 + k_ahead * dim, state_bytes);
    }
    const int64_t head = a.heads[s], count = a.heads[s + 1] - head;
    const int64_t k = a.rows[head];
    const bool direct = std::is_same_v<scalar_t, state_t> && count == 1;
    const state_t* g = acc;
    if constexpr (std::is_same_v<scalar_t, state_t>) {
      if (direct) g = a.grad + a.positions[head] * dim;
    }
    if (!direct) {
      std::fill(acc, acc + dim, state_t(0));
      for (int64_t j = head; j < head + count; ++j) {
        load_row<true>(a.grad + a.positions[j] * dim, acc, dim);
      }
      if (a.scale_grad_by_freq) {
        const state_t c = static_cast<state_t>(count);
        for (int64_t d = 0; d < dim; ++d) acc[d] /= c;
      }
    }
    apply_rule<kRule, scalar_t, state_t>(a.r, dim, g, a.weight + k * a.row_stride,
                                         a.s1 ? a.s1 + k * s1_row : nullptr,
                                         a.s2 ? a.s2 + k * dim : nullptr);
  }
}

// The copies of update_segments per instruction set (isa.h): wider vectors keep more of a
// row's cache lines in flight (the loop waits on random rows from DRAM), ~25% on rows of 3 KB.
template <int64_t kRule, typename scalar_t, typename state_t>
EMBEDDING_EXT_TARGET_PORTABLE void update_segments_portable(const UpdateArgs<scalar_t, state_t>& a,
                                                            int64_t s0, int64_t s_end, state_t* acc) {
  update_segments<kRule>(a, s0, s_end, acc);
}

#if defined(__x86_64__)
template <int64_t kRule, typename scalar_t, typename state_t>
EMBEDDING_EXT_TARGET_AVX2 void update_segments_avx2(const UpdateArgs<scalar_t, state_t>& a,
                                                    int64_t s0, int64_t s_end, state_t* acc) {
  update_segments<kRule>(a, s0, s_end, acc);
}

template <int64_t kRule, typename scalar_t, typename state_t>
EMBEDDING_EXT_TARGET_AVX512 void update_segments_avx512(const UpdateArgs<scalar_t, state_t>& a,
                                                        int64_t s0, int64_t s_end, state_t* acc) {
  update_segments<kRule>(a, s0, s_end, acc);
}
#endif

template <int64_t kRule, typename scalar_t, typename state_t, typename index_t>
void fused_update(scalar_t* weight, int64_t row_stride, const scalar_t* grad, const index_t* idx,
                  int64_t n, int64_t num_rows, int64_t dim, int64_t padding_idx,
                  bool scale_grad_by_freq, const RuleScalars<state_t>& r, state_t* s1,
                  state_t* s2) {
  SortedLookups sorted = sort_by_row(idx, n, num_rows, padding_idx);
  std::vector<int64_t> heads = segment_heads(sorted);
  const int64_t segments = static_cast<int64_t>(heads.size()) - 1;  // reordering keeps it
  // Where the touched rows are sparse in the table (under a quarter of its rows), walking
  // them by row has no locality to keep, and rows seen once go first in position order, so
  // that their gradient rows are read in order. For the rules whose state is at most one
  // element per row; Adagrad and SparseAdam (a state row each) measured no clear gain, and
  // a dense walk (50k x 768, 73% of rows touched) lost 15% (bench/NOTES-cpu.md 10.4).
  constexpr bool kRowStateOnly = kRule == kRuleSgd || kRule == kRuleRowWiseAdagrad;
  if (kRowStateOnly && segments * 4 < num_rows) singles_first_in_position_order(sorted, heads, n);
  const UpdateArgs<scalar_t, state_t> args{weight, row_stride, grad, dim, sorted.rows.data(),
                                           sorted.positions.data(), heads.data(),
                                           scale_grad_by_freq, r, s1, s2};
  const int isa = cpu_isa();
  at::parallel_for(0, segments, grain_for(dim * static_cast<int64_t>(sizeof(scalar_t)) * 4),
                   [&](int64_t g0, int64_t g1) {
    std::vector<state_t> acc(dim);
#if defined(__x86_64__)
    if (isa == kAvx512) return update_segments_avx512<kRule>(args, g0, g1, acc.data());
    if (isa == kAvx2) return update_segments_avx2<kRule>(args, g0, g1, acc.data());
#else
    (void)isa;
#endif
    update_segments_portable<kRule>(args, g0, g1, acc.data());
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

}  // namespace embedding_ext::cpu
