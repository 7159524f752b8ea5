// The max_norm rule, written once for every backend: a referenced row whose
// norm_type-norm is greater than max_norm is scaled by max_norm / (norm + kRenormEpsilon).
// The float64 reference (embedding_ext/reference.py) states the same rule.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

namespace embedding_ext {

// PyTorch's epsilon, so that a renormed row lands just inside max_norm.
constexpr double kRenormEpsilon = 1e-7;

enum class NormKind : int { kOne, kTwo, kInf, kGeneral };

inline NormKind norm_kind(double p) {
  if (std::isinf(p)) return NormKind::kInf;
  if (p == 1.0) return NormKind::kOne;
  if (p == 2.0) return NormKind::kTwo;
  return NormKind::kGeneral;
}

// Explicit float/double overloads: the same names resolve on the host and in device code.
C10_HOST_DEVICE inline float norm_abs(float x) { return fabsf(x); }
C10_HOST_DEVICE inline double norm_abs(double x) { return fabs(x); }
C10_HOST_DEVICE inline float norm_pow(float x, float p) { return powf(x, p); }
C10_HOST_DEVICE inline double norm_pow(double x, double p) { return pow(x, p); }
C10_HOST_DEVICE inline float norm_sqrt(float x) { return sqrtf(x); }
C10_HOST_DEVICE inline double norm_sqrt(double x) { return sqrt(x); }

// One element's contribution: |x|^p (|x| for p = 1 and p = inf). A true p-norm for every
// p: PyTorch's CUDA kernel drops the abs() for p outside {1, 2}.
template <NormKind kKind, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_term(acc_t x, acc_t p) {
  const acc_t a = norm_abs(x);
  if constexpr (kKind == NormKind::kTwo) return a * a;
  if constexpr (kKind == NormKind::kGeneral) return norm_pow(a, p);
  return a;
}

// Folds a term (or a partial result) into a partial result: max for p = inf, else a sum.
template <NormKind kKind, typename acc_t>
C10_HOST_DEVICE inline acc_t norm_combine(acc_t total, acc_t term) {
  if constexpr (kKind == NormKind::kInf) return total < term ? term : total;
  return total + term;
}

// The norm from the folded terms.
template <NormKind kKind, typename acc_t>
C10_HOST_DEVICE inline double norm_finish(acc_t total, acc_t p) {
  if constexpr (kKind == NormKind::kTwo) return static_cast<double>(norm_sqrt(total));
  if constexpr (kKind == NormKind::kGeneral) return static_cast<double>(norm_pow(total, acc_t(1) / p));
  return static_cast<double>(total);
}

// The factor that brings a row of this norm within max_norm (applied only when > max_norm).
C10_HOST_DEVICE inline double renorm_factor(double norm, double max_norm) {
  return max_norm / (norm + kRenormEpsilon);
}

// Runs f(std::integral_constant-like tag) with the NormKind as a compile-time constant.
template <typename F>
decltype(auto) dispatch_norm_kind(NormKind kind, F&& f) {
  switch (kind) {
    case NormKind::kOne: return f(std::integral_constant<NormKind, NormKind::kOne>{});
    case NormKind::kTwo: return f(std::integral_constant<NormKind, NormKind::kTwo>{});
    case NormKind::kInf: return f(std::integral_constant<NormKind, NormKind::kInf>{});
    default: return f(std::integral_constant<NormKind, NormKind::kGeneral>{});
  }
}

}  // namespace embedding_ext
