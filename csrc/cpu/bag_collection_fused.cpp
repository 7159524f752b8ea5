// CPU optimizer step fused into the table-batched lookup's backward
// (embedding_bag_collection_fused_update_, the step of ee.fuse_optimizer on a collection):
// each table's terms (id, its bag's grad_output slice, the sum/mean/per_sample_weights
// factor) grouped by row, each row's gradient summed in fp32 (fp64 for fp64) in position
// order and the rule applied once (fused_row.h), read straight from grad_output: no gradient
// rows are materialised. Every argument and id is checked before the first write; one task
// per table, each row written by one thread: deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "bag_collection.h"
#include "common.h"
#include "fused_row.h"
#include "isa.h"
#include "output_allocator.h"

namespace embedding_ext::cpu {
namespace {

constexpr int64_t kTablePrefetch = 8;  // segments ahead, as the single-table update

// One table's step: terms sorted by row, segment s = one distinct row.
template <typename scalar_t, typename state_t>
struct TableStep {
  scalar_t* weight;
  int64_t dim;
  const int64_t* rows;          // sorted row of each term
  const int64_t* terms;         // the term (index into src/coef) of each sorted entry
  const int64_t* heads;         // segment s is [heads[s], heads[s + 1])
  const scalar_t* const* src;   // each term's gradient slice
  const state_t* coef;          // each term's factor
  RuleScalars<state_t> r;
  state_t* s1;
  state_t* s2;
};

// Each term's gradient row is rounded to the weight's dtype before the sum, as the sparse
// gradient's values are (so fp16/bf16 tables step as with ee.fuse_optimizer per table).
// (Always inlined: each copy below compiles it for its instruction set.)
template <int64_t kRule, typename scalar_t, typename state_t>
__attribute__((always_inline)) inline void step_segments(const TableStep<scalar_t, state_t>& a,
                                                         int64_t segments, state_t* acc) {
  const int64_t dim = a.dim;
  const int64_t s1_row = kRule == kRuleRowWiseAdagrad ? 1 : dim;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t s = 0; s < segments; ++s) {
    if (s + kTablePrefetch < segments) {
      const int64_t ahead = a.heads[s + kTablePrefetch], k_ahead = a.rows[ahead];
      prefetch_row(a.weight + k_ahead * dim, row_bytes);
      prefetch_row(a.src[a.terms[ahead]], row_bytes);
      if (a.s1 != nullptr) prefetch_row(a.s1 + k_ahead * s1_row, s1_row * sizeof(state_t));
      if (a.s2 != nullptr) prefetch_row(a.s2 + k_ahead * dim, dim * sizeof(state_t));
    }
    std::fill(acc, acc + dim, state_t(0));
    for (int64_t j = a.heads[s]; j < a.heads[s + 1]; ++j) {
      const int64_t term = a.terms[j];
      const scalar_t* g = a.src[term];
      const state_t c = a.coef[term];
      for (int64_t d = 0; d < dim; ++d) {
        acc[d] += static_cast<state_t>(static_cast<scalar_t>(c * static_cast<state_t>(g[d])));
      }
    }
    const int64_t k = a.rows[a.heads[s]];
    apply_rule<kRule, scalar_t, state_t>(a.r, dim, acc, a.weight + k * dim,
                                         a.s1 ? a.s1 + k * s1_row : nullptr,
                                         a.s2 ? a.s2 + k * dim : nullptr);
  }
}

template <int64_t kRule, typename scalar_t, typename state_t>
EMBEDDING_EXT_TARGET_PORTABLE void step_segments_portable(const TableStep<scalar_t, state_t>& a,
                                                          int64_t segments, state_t* acc) {
  step_segments<kRule>(a, segments, acc);
}

#if defined(__x86_64__)
template <int64_t kRule, typename scalar_t, typename state_t>
EMBEDDING_EXT_TARGET_AVX2 void step_segments_avx2(const TableStep<scalar_t, state_t>& a,
                                                  int64_t segments, state_t* acc) {
  step_segments<kRule>(a, segments, acc);
}

template <int64_t kRule, typename scalar_t, typename state_t>
EMBEDDING_EXT_TARGET_AVX512 void step_segments_avx512(const TableStep<scalar_t, state_t>& a,
                                                      int64_t segments, state_t* acc) {
  step_segments<kRule>(a, segments, acc);
}
#endif

template <int64_t kRule, typename scalar_t, typename index_t>
void step_table(const Layout& L, int64_t t, scalar_t* weight, const scalar_t* grad,
                const scalar_t* psw, const RuleScalars<at::opmath_type<scalar_t>>& r,
                at::opmath_type<scalar_t>* s1, at::opmath_type<scalar_t>* s2) {
  using state_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> rows;
  std::vector<const scalar_t*> src;
  std::vector<state_t> coef;
  for_each_term<scalar_t, index_t>(L, t, grad, psw, [&](int64_t, int64_t k, state_t c, int64_t,
                                                        int64_t, const scalar_t* g) {
    rows.push_back(k);
    src.push_back(g);
    coef.push_back(c);
  });
  const int64_t m = static_cast<int64_t>(rows.size());
  SortedLookups sorted = sort_by_row(rows.data(), m, L.rows[t], /*padding_idx=*/-1);
  std::vector<int64_t> heads = segment_heads(sorted);
  // As the single-table update (fused_update.cpp): where the touched rows are sparse in the
  // table, rows seen once go first in term (position) order, so that their gradient slices
  // are read in order, not at random (for the rules with at most one state element a row).
  constexpr bool kRowStateOnly = kRule == kRuleSgd || kRule == kRuleRowWiseAdagrad;
  if (kRowStateOnly && (static_cast<int64_t>(heads.size()) - 1) * 4 < L.rows[t]) {
    singles_first_in_position_order(sorted, heads, m);
  }
  const TableStep<scalar_t, state_t> step{weight, L.dims[t], sorted.rows.data(),
                                          sorted.positions.data(), heads.data(), src.data(),
                                          coef.data(), r, s1, s2};
  const int64_t segments = static_cast<int64_t>(heads.size()) - 1;
  std::vector<state_t> acc(L.dims[t]);
#if defined(__x86_64__)
  if (cpu_isa() == kAvx512) return step_segments_avx512<kRule>(step, segments, acc.data());
  if (cpu_isa() == kAvx2) return step_segments_avx2<kRule>(step, segments, acc.data());
#endif
  step_segments_portable<kRule>(step, segments, acc.data());
}

void embedding_bag_collection_fused_update_cpu(
    at::TensorList weights, const at::Tensor& grad_output, const at::Tensor& values,
    const at::Tensor& offsets, at::IntArrayRef feature_table, at::IntArrayRef modes,
    at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& per_sample_weights,
    int64_t rule, at::TensorList state1, at::TensorList state2, double lr, double eps,
    double beta1, double beta2, double lr_decay, at::IntArrayRef steps) {
  constexpr const char* op = "embedding_bag_collection_fused_update_";
  const int64_t tables = static_cast<int64_t>(weights.size());
  TORCH_CHECK(tables > 0, op, ": 'weights' must hold at least one table");
  TORCH_CHECK(rule >= kRuleSgd && rule <= kRuleRowWiseAdagrad, op, ": 'rule' must be 0 (SGD), "
              "1 (Adagrad), 2 (SparseAdam) or 3 (RowWiseAdagrad), got ", rule);
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == tables, op, ": 'steps' must have one entry "
              "per table (", tables, "), got ", steps.size());
  const auto dtype = weights[0].scalar_type();
  const at::ScalarType state_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> rows, dims;
  for (int64_t t = 0; t < tables; ++t) {
    const at::Tensor& w = weights[t];
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == dtype, op, ": 'weights[",
                t, "]' must be a contiguous 2-D ", dtype, " tensor, got ", w.scalar_type(),
                " of shape ", w.sizes());
    check_same_device(w, "weights", values, "values", op);
    TORCH_CHECK(steps[t] >= 1, op, ": 'steps[", t, "]' must be >= 1, got ", steps[t]);
    rows.push_back(w.size(0));
    dims.push_back(w.size(1));
  }
  const auto check_states = [&](at::TensorList states, const char* name, bool needed) {
    TORCH_CHECK(static_cast<int64_t>(states.size()) == (needed ? tables : 0), op, ": rule ", rule,
                needed ? " needs one '" : " takes no '", name, "' tensor per table, got ",
                states.size());
    for (int64_t t = 0; t < static_cast<int64_t>(states.size()); ++t) {
      const at::Tensor& s = states[t];
      const auto shape = rule == kRuleRowWiseAdagrad ? std::vector<int64_t>{rows[t]}
                                                     : std::vector<int64_t>{rows[t], dims[t]};
      TORCH_CHECK(s.scalar_type() == state_type && s.is_contiguous() && s.sizes() == shape &&
                      s.device() == weights[t].device(),
                  op, ": '", name, "[", t, "]' must be a contiguous ", state_type,
                  " tensor of shape ", at::IntArrayRef(shape), ", got ", s.scalar_type(),
                  " of shape ", s.sizes());
    }
  };
  check_states(state1, "state1", rule != kRuleSgd);
  check_states(state2, "state2", rule == kRuleSparseAdam);
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.scalar_type() == dtype, op,
              ": 'grad_output' must be a 2-D ", dtype, " tensor, got ", grad_output.scalar_type(),
              " of shape ", grad_output.sizes());
  Layout L = make_layout(rows, dims, values, offsets, feature_table, modes, padding_idx,
                         per_sample_weights, grad_output.size(0), op);
  TORCH_CHECK(grad_output.size(1) == L.total_dim, op, ": 'grad_output' must have the features' ",
              L.total_dim, " columns, got shape ", grad_output.sizes());
  for (int64_t t = 0; t < tables; ++t) {
    TORCH_CHECK(L.mode[t] != kBagMax, op, ": table ", t, " pools with max, which has no per-row "
                "update");
  }
  const at::Tensor grad = grad_output.contiguous();
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous()
                                                        : at::Tensor();
  TORCH_CHECK(!psw.defined() || psw.scalar_type() == dtype, op, ": 'per_sample_weights' must "
              "have the tables' dtype");
  AT_DISPATCH_INDEX_TYPES(L.values.scalar_type(), op, [&] {
    // Every id against its own table before any row changes.
    const index_t* idx = L.values.const_data_ptr<index_t>();
    const int64_t* off = L.offsets.const_data_ptr<int64_t>();
    for (int64_t f = 0; f < L.features; ++f) {
      const int64_t t = L.table_of[f];
      for (int64_t i = off[f * L.batch]; i < off[(f + 1) * L.batch]; ++i) {
        const int64_t k = static_cast<int64_t>(idx[i]);
        if (k < 0 || k >= rows[t]) throw_index_error(k, i, rows[t], op);
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
      using state_t = at::opmath_type<scalar_t>;
      const scalar_t* g_in = grad.const_data_ptr<scalar_t>();
      const at::Tensor by_feature = empty_output({L.batch * L.total_dim}, grad.options());
      grad_by_feature(L, g_in, by_feature.mutable_data_ptr<scalar_t>());
      const scalar_t* g = by_feature.const_data_ptr<scalar_t>();
      const scalar_t* p = psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, tables, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const auto r = rule_scalars<state_t>(lr, eps, beta1, beta2, lr_decay, steps[t]);
          scalar_t* w = weights[t].mutable_data_ptr<scalar_t>();
          state_t* s1 = state1.empty() ? nullptr : state1[t].mutable_data_ptr<state_t>();
          state_t* s2 = state2.empty() ? nullptr : state2[t].mutable_data_ptr<state_t>();
          switch (rule) {
            case kRuleSgd: step_table<kRuleSgd, scalar_t, index_t>(L, t, w, g, p, r, s1, s2); break;
            case kRuleAdagrad: step_table<kRuleAdagrad, scalar_t, index_t>(L, t, w, g, p, r, s1, s2); break;
            case kRuleSparseAdam: step_table<kRuleSparseAdam, scalar_t, index_t>(L, t, w, g, p, r, s1, s2); break;
            default: step_table<kRuleRowWiseAdagrad, scalar_t, index_t>(L, t, w, g, p, r, s1, s2); break;
          }
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_bag_collection_fused_update_", &embedding_bag_collection_fused_update_cpu);
}

}  // namespace embedding_ext::cpu
