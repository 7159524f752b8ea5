// The optimizer rules of embedding_fused_update_, written once for every backend: the
// per-element updates of one row given its summed gradient g, in the accumulator type
// (fp32, fp64 for fp64 weights). They follow torch.optim's sparse-gradient rules (SGD
// without momentum, Adagrad, SparseAdam) and FBGEMM's EXACT_ROWWISE_ADAGRAD
// (ee.optim.RowWiseAdagrad), in the same order of operations.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include <ATen/MemoryOverlap.h>

#include "checks.h"

namespace embedding_ext {

constexpr int64_t kRuleSgd = 0, kRuleAdagrad = 1, kRuleSparseAdam = 2, kRuleRowWiseAdagrad = 3;

// The step's scalars, computed once on the host in double, then rounded to acc_t.
template <typename acc_t>
struct RuleScalars {
  acc_t lr, eps;
  acc_t clr;                  // Adagrad: lr / (1 + (step - 1) * lr_decay)
  acc_t one_minus_b1, one_minus_b2, step_size;  // SparseAdam (step_size: bias corrected)
};

template <typename acc_t>
RuleScalars<acc_t> rule_scalars(double lr, double eps, double beta1, double beta2,
                                double lr_decay, int64_t step) {
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  RuleScalars<acc_t> r;
  r.lr = static_cast<acc_t>(lr);
  r.eps = static_cast<acc_t>(eps);
  r.clr = static_cast<acc_t>(lr / (1.0 + static_cast<double>(step - 1) * lr_decay));
  r.one_minus_b1 = static_cast<acc_t>(1.0 - beta1);
  r.one_minus_b2 = static_cast<acc_t>(1.0 - beta2);
  r.step_size = static_cast<acc_t>(bias1 != 0.0 ? lr * std::sqrt(bias2) / bias1 : 0.0);
  return r;
}

C10_HOST_DEVICE inline float rule_sqrt(float x) { return sqrtf(x); }
C10_HOST_DEVICE inline double rule_sqrt(double x) { return sqrt(x); }

// w <- w - lr * g
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sgd_element(acc_t w, acc_t g, const RuleScalars<acc_t>& r) {
  return w - r.lr * g;
}

// sum += g^2; w <- w - clr * (g / (sqrt(sum) + eps))
template <typename acc_t>
C10_HOST_DEVICE inline acc_t adagrad_element(acc_t w, acc_t g, acc_t& sum,
                                             const RuleScalars<acc_t>& r) {
  sum += g * g;
  return w - r.clr * (g / (rule_sqrt(sum) + r.eps));
}

// Lazy Adam on a touched row: m, v moved towards g, g^2; w <- w - step_size * m / (sqrt(v) + eps)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sparse_adam_element(acc_t w, acc_t g, acc_t& m, acc_t& v,
                                                 const RuleScalars<acc_t>& r) {
  const acc_t m_update = (g - m) * r.one_minus_b1;
  const acc_t v_update = (g * g - v) * r.one_minus_b2;
  const acc_t numer = m_update + m;
  const acc_t denom = rule_sqrt(v_update + v) + r.eps;
  m += m_update;
  v += v_update;
  return w - r.step_size * (numer / denom);
}

// Row-wise Adagrad, once per row: sum += mean(g^2) (square_sum = sum of g^2 over the row);
// returns the row's multiplier lr / (sqrt(sum) + eps), then w <- w - g * multiplier.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rowwise_adagrad_scale(acc_t square_sum, int64_t dim, acc_t& sum,
                                                   const RuleScalars<acc_t>& r) {
  sum += dim > 0 ? square_sum / static_cast<acc_t>(dim) : acc_t(0);
  return r.lr / (rule_sqrt(sum) + r.eps);
}

// The arguments of embedding_fused_update_ on every backend; returns the number of rows.
inline int64_t check_fused_update_args(const at::Tensor& weight, const at::Tensor& grad,
                                       const at::Tensor& indices, int64_t padding_idx,
                                       int64_t rule, const c10::optional<at::Tensor>& state1,
                                       const c10::optional<at::Tensor>& state2, int64_t step,
                                       const char* op) {
  check_weight_2d(weight, op);
  const int64_t num_rows = check_backward_args(grad, indices, weight.size(0), padding_idx, op);
  const int64_t dim = weight.size(1);
  TORCH_CHECK(grad.size(-1) == dim, op, ": 'grad_output' rows must have weight's width ", dim,
              ", got ", grad.size(-1));
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), op, ": 'grad_output' must have "
              "weight's dtype ", weight.scalar_type(), ", got ", grad.scalar_type());
  check_same_device(grad, "grad_output", weight, "weight", op);
  // The kernels read gradient rows while they write weight and state rows.
  at::assert_no_overlap(weight, grad);
  TORCH_CHECK(weight.stride(1) == 1, op, ": 'weight' rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(rule >= kRuleSgd && rule <= kRuleRowWiseAdagrad, op, ": 'rule' must be 0 (SGD), "
              "1 (Adagrad), 2 (SparseAdam) or 3 (RowWiseAdagrad), got ", rule);
  TORCH_CHECK(step >= 1, op, ": 'step' must be >= 1, got ", step);
  const at::ScalarType state_type =
      weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto check_state = [&](const c10::optional<at::Tensor>& state, const char* name,
                               at::IntArrayRef shape) {
    TORCH_CHECK(state.has_value(), op, ": rule ", rule, " needs '", name, "'");
    const at::Tensor& s = *state;
    at::assert_no_overlap(s, grad);
    TORCH_CHECK(s.scalar_type() == state_type && s.is_contiguous() && s.sizes() == shape &&
                    s.device() == weight.device(),
                op, ": '", name, "' must be a contiguous ", state_type, " tensor of shape ",
                shape, " on ", weight.device(), ", got ", s.scalar_type(), " of shape ",
                s.sizes(), " on ", s.device());
  };
  if (rule == kRuleAdagrad || rule == kRuleSparseAdam) check_state(state1, "state1", weight.sizes());
  if (rule == kRuleSparseAdam) check_state(state2, "state2", weight.sizes());
  if (rule == kRuleRowWiseAdagrad) check_state(state1, "state1", {num_rows});
  return num_rows;
}

}  // namespace embedding_ext
