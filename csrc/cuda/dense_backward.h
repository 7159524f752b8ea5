// The lookup's sorted dense backward, for op families whose gradient terms are fp32 rows.
#pragma once

#include <ATen/core/Tensor.h>

#include "launch.cuh"

namespace embedding_ext::cuda {

// Sums the float32 rows fp32_rows.grad[i] into row fp32_rows.indices[i] of a zero
// (num_rows, dim) gradient of out_dtype (float16 or bfloat16): the sorted path, so the same
// bits every run, each row rounded once. The bag backward uses it so that its per-position
// terms (grad_output times a coefficient) are not rounded to fp16/bf16 before the sum.
// padding_idx rows stay zero; bad ids are reported through scope's sink.
at::Tensor sorted_row_sums(const BackwardInputs& fp32_rows, int64_t padding_idx,
                           at::ScalarType out_dtype, const LaunchScope& scope);

}  // namespace embedding_ext::cuda
