// One row's fused optimizer step on the CPU, shared by the single-table update
// (fused_update.cpp) and the collection's (bag_collection_fused.cpp): the row's summed
// gradient g in hand, the rule (../optimizer_rules.h) applied to the weight row and its state.
#pragma once

#include <cstdint>
#include <vector>

#include "../optimizer_rules.h"
#include "common.h"

namespace embedding_ext::cpu {

// sum of g[d]^2 in kLanes fixed lanes, then the lanes in order: the loop vectorises (a plain
// running sum is a serial chain of dependent adds, ~4 cycles per element) and every
// instruction set gives the same bits.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t sum_of_squares(const acc_t* g, int64_t dim) {
  constexpr int64_t kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += g[d + l] * g[d + l];
  }
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; d < dim; ++d) total += g[d] * g[d];
  return total;
}

// One row's update by kRule (optimizer_rules.h); s1/s2 point at the row's state. The rule is
// a template parameter so that each loop is a plain vectorisable loop.
template <int64_t kRule, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void apply_rule(const RuleScalars<acc_t>& r, int64_t dim,
                                                      const acc_t* g, scalar_t* w, acc_t* s1,
                                                      acc_t* s2) {
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
    const acc_t scale = rowwise_adagrad_scale(sum_of_squares(g, dim), dim, s1[0], r);
    for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - g[d] * scale);
  }
}

// Reorders the segments: rows seen once first, in position order (their gradient rows are
// then read in order, not at random), then the rows seen more than once, by row. Each row is
// still one segment, updated once: the results are the same bits in either order.
inline void singles_first_in_position_order(SortedLookups& sorted, std::vector<int64_t>& heads,
                                            int64_t n) {
  const int64_t segments = static_cast<int64_t>(heads.size()) - 1;
  int64_t singles = 0;
  for (int64_t s = 0; s < segments; ++s) singles += heads[s + 1] - heads[s] == 1;
  if (singles == 0) return;
  std::vector<int64_t> single_row(n, -1);  // by position: its row if the row is seen once
  for (int64_t s = 0; s < segments; ++s) {
    if (heads[s + 1] - heads[s] == 1) {
      single_row[sorted.positions[heads[s]]] = sorted.rows[heads[s]];
    }
  }
  const int64_t m = static_cast<int64_t>(sorted.rows.size());
  std::vector<int64_t> rows(m), positions(m), new_heads;
  new_heads.reserve(segments + 1);
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (single_row[i] < 0) continue;
    new_heads.push_back(j);
    rows[j] = single_row[i];
    positions[j++] = i;
  }
  for (int64_t s = 0; s < segments; ++s) {
    if (heads[s + 1] - heads[s] == 1) continue;
    new_heads.push_back(j);
    for (int64_t t = heads[s]; t < heads[s + 1]; ++t) {
      rows[j] = sorted.rows[t];
      positions[j++] = sorted.positions[t];
    }
  }
  new_heads.push_back(j);
  sorted.rows.swap(rows);
  sorted.positions.swap(positions);
  heads.swap(new_heads);
}

}  // namespace embedding_ext::cpu
