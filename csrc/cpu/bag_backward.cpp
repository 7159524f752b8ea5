// CPU pooled lookup, gradients: the weight's dense gradient (embedding_bag_dense_backward)
// and sparse gradient (embedding_bag_sparse_backward), and the per_sample_weights gradient
// (embedding_bag_per_sample_weights_backward). The dense gradient sums each row's terms in
// position order (rows split across threads, never atomics): deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "isa.h"
#include "output_allocator.h"
#include "row_convert.h"

namespace embedding_ext::cpu {
namespace {

// 1 / (non-padding entries of each bag), 0 for an empty bag: mean mode's coefficients.
template <typename acc_t, typename index_t>
std::vector<acc_t> mean_coefficients(const index_t* idx, const int64_t* off, int64_t bags,
                                     int64_t padding_idx) {
  std::vector<acc_t> inv_count(bags);
  for (int64_t b = 0; b < bags; ++b) {
    int64_t count = 0;
    for (int64_t i = off[b]; i < off[b + 1]; ++i) count += static_cast<int64_t>(idx[i]) != padding_idx;
    inv_count[b] = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
  }
  return inv_count;
}

// bag_of[i]: the bag that pools id i, or -1 for ids past the last offset.
std::vector<int64_t> bag_of_positions(const int64_t* off, int64_t bags, int64_t n) {
  std::vector<int64_t> bag_of(n, -1);
  for (int64_t b = 0; b < bags; ++b) {
    for (int64_t i = off[b]; i < off[b + 1]; ++i) bag_of[i] = b;
  }
  return bag_of;
}

template <typename scalar_t, typename index_t>
void bag_weight_gradient(const scalar_t* grad, const index_t* idx, const int64_t* off,
                         int64_t bags, int64_t n, int64_t num_rows, int64_t dim, int64_t mode,
                         const int64_t* arg_max, const scalar_t* psw, int64_t padding_idx,
                         bool scale_grad_by_freq, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> occurrences;  // over the ids in bags (CSR: trailing ids are in none)
  if (scale_grad_by_freq) occurrences = count_rows(idx, off[bags], num_rows, padding_idx);
  const auto freq = [&](int64_t k) {
    return scale_grad_by_freq ? acc_t(1) / static_cast<acc_t>(occurrences[k]) : acc_t(1);
  };
  if (mode == kBagMax) {
    // Each (bag, feature) sends its gradient to one row: columns split across threads, so
    // no two threads touch one element; bags in order within a column. fp32/fp64 add into
    // the (zeroed) output itself; fp16/bf16 need an fp32 table-sized scratch (V x D x 4
    // bytes, freed on return).
    std::vector<acc_t> scratch;
    acc_t* acc = nullptr;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      acc = out;
    } else {
      scratch.assign(num_rows * dim, acc_t(0));
      acc = scratch.data();
    }
    at::parallel_for(0, dim, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t b = 0; b < bags; ++b) {
        for (int64_t d = d0; d < d1; ++d) {
          const int64_t k = arg_max[b * dim + d];
          if (k >= 0) acc[k * dim + d] += static_cast<acc_t>(grad[b * dim + d]);
        }
      }
    });
    if constexpr (!std::is_same_v<acc_t, scalar_t>) {
      at::parallel_for(0, num_rows, grain_for(dim * sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
        for (int64_t k = r0; k < r1; ++k) store_row(acc + k * dim, acc_t(1), out + k * dim, dim);
      });
    }
    return;
  }
  std::vector<int64_t> bag_of = bag_of_positions(off, bags, n);
  const std::vector<acc_t> inv_count =
      mode == kBagMean ? mean_coefficients<acc_t>(idx, off, bags, padding_idx) : std::vector<acc_t>();
  // Rows with their positions in order; each row summed by one thread.
  const SortedLookups sorted = sort_by_row(idx, n, num_rows, padding_idx);
  const std::vector<int64_t> heads = segment_heads(sorted);
  const int64_t segments = static_cast<int64_t>(heads.size()) - 1;
  at::parallel_for(0, segments, grain_for(dim * sizeof(scalar_t) * 4), [&](int64_t s0, int64_t s1) {
    std::vector<acc_t> acc(dim), row(dim);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t k = sorted.rows[heads[s]];
      std::fill(acc.begin(), acc.end(), acc_t(0));
      bool any = false;
      for (int64_t j = heads[s]; j < heads[s + 1]; ++j) {
        const int64_t i = sorted.positions[j];
        const int64_t b = bag_of[i];
        if (b < 0) continue;  // an id in no bag
        any = true;
        acc_t coef = mode == kBagMean ? inv_count[b] : acc_t(1);
        if (psw != nullptr) coef *= static_cast<acc_t>(psw[i]);
        load_row<false>(grad + b * dim, row.data(), dim);
        for (int64_t d = 0; d < dim; ++d) acc[d] += row[d] * coef;
      }
      if (any) store_row(acc.data(), freq(k), out + k * dim, dim);
    }
  });
}

at::Tensor embedding_bag_dense_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const at::Tensor& arg_max_in, c10::SymInt num_weights, int64_t mode,
    const c10::optional<at::Tensor>& per_sample_weights, int64_t padding_idx,
    bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_bag_dense_backward";
  const BagInputs in = bag_dense_gradient_inputs(grad_in, indices_in, offsets_in, arg_max_in,
                                                 num_weights, mode, per_sample_weights,
                                                 padding_idx, scale_grad_by_freq, op);
  const int64_t num_rows = in.num_rows, dim = in.dim;
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor arg_max = mode == kBagMax ? arg_max_in.contiguous() : arg_max_in;
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->to(grad.scalar_type()).contiguous();
  // A V x D output: from the output cache (no page faults on a reused buffer, unlike
  // at::zeros' fresh pages: bench/NOTES-cpu.md section 8), zeroed by row ranges in parallel.
  at::Tensor out = empty_output({num_rows, dim}, grad.options());
  const int64_t row_bytes = dim * grad.element_size();
  char* zero_from = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, num_rows, grain_for(row_bytes), [&](int64_t r0, int64_t r1) {
    std::memset(zero_from + r0 * row_bytes, 0, (r1 - r0) * row_bytes);
  });
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    check_index_range(idx, in.n, num_rows, op);
    if (mode == kBagMax) {
      const int64_t* am = arg_max.const_data_ptr<int64_t>();
      for (int64_t e = 0; e < in.bags * dim; ++e) {
        TORCH_CHECK(am[e] >= -1 && am[e] < num_rows, op, ": 'arg_max' holds ", am[e],
                    ", not a row of the ", num_rows, "-row table");
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      bag_weight_gradient<scalar_t, index_t>(
          grad.const_data_ptr<scalar_t>(), idx, in.offsets.const_data_ptr<int64_t>(), in.bags,
          in.n, num_rows, dim, mode, mode == kBagMax ? arg_max.const_data_ptr<int64_t>() : nullptr,
          psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr, padding_idx,
          scale_grad_by_freq, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

// Copies of rows into a large output that nothing reads soon (the sparse gradient's N x D
// values): non-temporal stores where both ends allow them, so the write does not first read
// each line into the cache (half the memory traffic of a plain copy). StreamingStores'
// destructor orders them (sfence) before the task ends.
#if defined(__x86_64__)
__attribute__((target("avx2"))) inline void stream_copy_avx2(void* dst, const void* src,
                                                             int64_t bytes) {
  auto* d = static_cast<__m256i*>(dst);
  const auto* s = static_cast<const __m256i_u*>(src);
  for (int64_t i = 0; i < bytes / 32; ++i) _mm256_stream_si256(d + i, _mm256_loadu_si256(s + i));
}
#endif

// Outputs below this stay in cache for the optimizer that reads them next: plain stores.
constexpr int64_t kStreamingMinBytes = int64_t(8) << 20;

inline void copy_row_streaming(void* dst, const void* src, int64_t bytes, int64_t total_bytes) {
#if defined(__x86_64__)
  if (total_bytes >= kStreamingMinBytes && bytes % 32 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 32 == 0 && cpu_isa() >= kAvx2) {
    return stream_copy_avx2(dst, src, bytes);
  }
#endif
  std::memcpy(dst, src, bytes);
}

struct StreamingStores {
  ~StreamingStores() {
#if defined(__x86_64__)
    _mm_sfence();
#endif
  }
};

std::tuple<at::Tensor, at::Tensor> embedding_bag_sparse_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    c10::SymInt num_weights, int64_t mode, const c10::optional<at::Tensor>& per_sample_weights,
    int64_t padding_idx, bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_bag_sparse_backward";
  const BagInputs in = bag_gradient_inputs(grad_in, indices_in, offsets_in, num_weights, mode,
                                           per_sample_weights, padding_idx, /*sparse=*/true, op);
  const int64_t num_rows = in.num_rows, dim = in.dim;
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->to(grad.scalar_type()).contiguous();
  const int64_t* off = in.offsets.const_data_ptr<int64_t>();
  at::Tensor rows, values;
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    check_index_range(idx, in.n, num_rows, op);
    const int64_t in_bags = off[in.bags];
    // first[b]: bag b's first value (values are the non-padding ids in bags, in position
    // order); first[b + 1] - first[b] is mean mode's count. Without padding, the offsets.
    std::vector<int64_t> first(in.bags + 1);
    if (padding_idx < 0) {
      std::copy(off, off + in.bags + 1, first.begin());
    } else {
      int64_t nnz = 0;
      for (int64_t b = 0; b < in.bags; ++b) {
        first[b] = nnz;
        for (int64_t i = off[b]; i < off[b + 1]; ++i) nnz += static_cast<int64_t>(idx[i]) != padding_idx;
      }
      first[in.bags] = nnz;
    }
    // Without padding, one entry per position, as PyTorch's: ids after the last offset (the
    // CSR tail, in no bag) get zero rows, as on CUDA (where this size needs no
    // synchronisation). With padding, the non-padding ids in bags.
    const int64_t nnz = padding_idx < 0 ? in.n : first[in.bags];
    rows = at::empty({1, nnz}, in.indices.options().dtype(at::kLong));
    // N x D, written once: from the output cache, as the dense gradient (a fresh 32 MiB
    // buffer from malloc is new pages, a fault per 4 KiB: D = 128 took 16 ms instead of 2).
    values = empty_output({nnz, dim}, grad.options());
    int64_t* r = rows.mutable_data_ptr<int64_t>();
    std::vector<int64_t> occurrences;
    if (scale_grad_by_freq) occurrences = count_rows(idx, in_bags, num_rows, padding_idx);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const scalar_t* w = psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr;
      scalar_t* v = values.mutable_data_ptr<scalar_t>();
      const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t avg_ids = in.bags ? std::max<int64_t>(1, in_bags / in.bags) : 1;
      // Bag by bag: the bag's gradient row is read once and written to each of its values.
      at::parallel_for(0, in.bags, grain_for(avg_ids * row_bytes), [&](int64_t b0, int64_t b1) {
        StreamingStores fence_at_end;
        std::vector<acc_t> row(dim);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t count = first[b + 1] - first[b];
          if (count == 0) continue;
          const acc_t bag_coef = mode == kBagMean ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1);
          const bool scaled = mode == kBagMean || w != nullptr || scale_grad_by_freq;
          if (scaled) load_row<false>(g + b * dim, row.data(), dim);
          int64_t j = first[b];
          for (int64_t i = off[b]; i < off[b + 1]; ++i) {
            const int64_t k = idx[i];
            if (k == padding_idx) continue;
            r[j] = k;
            if (!scaled) {  // the row itself, bit for bit (as PyTorch's index_select)
              copy_row_streaming(v + j * dim, g + b * dim, row_bytes, nnz * row_bytes);
            } else {
              acc_t coef = bag_coef;
              if (w != nullptr) coef *= static_cast<acc_t>(w[i]);
              if (scale_grad_by_freq) coef /= static_cast<acc_t>(occurrences[k]);
              store_row(row.data(), coef, v + j * dim, dim);
            }
            ++j;
          }
        }
      });
      for (int64_t i = in_bags; i < nnz; ++i) {  // the CSR tail (padding_idx < 0 only)
        r[i] = idx[i];
        std::fill(v + i * dim, v + (i + 1) * dim, scalar_t(0));
      }
    });
  });
  return {rows, values};
}

at::Tensor embedding_bag_per_sample_weights_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& weight_in, const at::Tensor& indices_in,
    const at::Tensor& offsets_in, int64_t padding_idx) {
  constexpr const char* op = "embedding_bag_per_sample_weights_backward";
  const BagInputs in = bag_sample_weight_gradient_inputs(grad_in, weight_in, indices_in, offsets_in, op);
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const at::Tensor grad = grad_in.to(weight.scalar_type()).contiguous();
  const int64_t dim = in.dim;
  at::Tensor out = at::empty({in.n}, weight.options());
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    check_index_range(idx, in.n, in.num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const std::vector<int64_t> bag_of = bag_of_positions(in.offsets.const_data_ptr<int64_t>(), in.bags, in.n);
      const scalar_t* w = weight.const_data_ptr<scalar_t>();
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, in.n, grain_for(2 * dim * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> a(dim), b(dim);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t k = idx[i];
          if (bag_of[i] < 0 || k == padding_idx) {
            o[i] = scalar_t(0);
            continue;
          }
          load_row<false>(w + k * weight.stride(0), a.data(), dim);
          load_row<false>(g + bag_of[i] * dim, b.data(), dim);
          acc_t dot = 0;
          for (int64_t d = 0; d < dim; ++d) dot += a[d] * b[d];
          o[i] = static_cast<scalar_t>(dot);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_bag_dense_backward", &embedding_bag_dense_backward_cpu);
  m.impl("embedding_bag_sparse_backward", &embedding_bag_sparse_backward_cpu);
  m.impl("embedding_bag_per_sample_weights_backward", &embedding_bag_per_sample_weights_backward_cpu);
}

}  // namespace embedding_ext::cpu
