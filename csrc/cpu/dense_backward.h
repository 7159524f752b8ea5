// The CPU dense backward has two implementations (see dense_backward.cpp). The op picks one
// by dtype; python_module.cpp exposes both by name so that tests can compare them knowing
// which one ran.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

namespace embedding_ext::cpu {

enum class DenseBackwardPath {
  kByDtype,  // what embedding_dense_backward runs: scatter for fp32/fp64, sorted otherwise
  kScatter,  // fp32/fp64 only
  kSorted,
};

at::Tensor dense_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                          const c10::SymInt& num_weights, int64_t padding_idx,
                          bool scale_grad_by_freq, DenseBackwardPath path);

}  // namespace embedding_ext::cpu
