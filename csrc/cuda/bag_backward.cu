// CUDA pooled lookup, gradients (embedding_bag_dense_backward, embedding_bag_sparse_backward,
// embedding_bag_per_sample_weights_backward).
// - Weight gradients (sum, mean): each position's gradient row, grad_output[bag] times its
//   coefficient (1, 1/count, per_sample_weights[i], and 1/frequency), is written once and
//   summed by the lookup's dense backward: fp32/fp64 rows through the op itself (its atomic
//   scatter by default, its sorted path under torch.use_deterministic_algorithms), fp16/bf16
//   as fp32 rows through its sorted path (sorted_row_sums: deterministic, each gradient row
//   rounded once, never each term). The sparse gradient's values are the positions in bags,
//   in the gradient's dtype (one term each). Max mode adds
//   grad_output[b, d] into row arg_max[b, d] with atomics (as PyTorch; not deterministic,
//   so it alerts under torch.use_deterministic_algorithms).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "bag.cuh"
#include "dense_backward.h"
#include "launch.cuh"

namespace embedding_ext::cuda {
namespace {

// The sparse gradient's COO row numbers without padding: the ids, a bad one (its value row
// is zero) as row 0.
template <typename index_t>
__global__ void coo_row_ids_kernel(const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                   int64_t* __restrict__ row_ids) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx[i];
    row_ids[i] = row_in_range(k, num_rows) ? k : 0;
  }
}

// Calls visit(i, b, k, live) for each position i < n of this thread group (row_launch: a thread
// group per position), in bag b = bag_of[i] with id k = idx[i]; live: whether i pools a row
// (in a bag, not padding, a valid id).
template <typename index_t, typename F>
__device__ __forceinline__ void for_each_position(const index_t* __restrict__ idx,
                                                  const int64_t* __restrict__ bag_of, int64_t n,
                                                  int64_t padding_idx, int64_t num_rows, F&& visit) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t b = bag_of[i], k = idx[i];
    visit(i, b, k, b >= 0 && k != padding_idx && row_in_range(k, num_rows));
  }
}

// rows[i] = grad_output[bag_of[i]] * coefficient, or 0 for positions in no bag, padding and
// bad ids (which then add nothing wherever the rows go). rows_t: scalar_t, or fp32 for the
// fp16/bf16 dense gradient (terms summed before any rounding, as PyTorch does).
template <typename scalar_t, typename rows_t, typename index_t>
__global__ void position_gradients_kernel(const scalar_t* __restrict__ grad,
                                          const index_t* __restrict__ idx,
                                          const int64_t* __restrict__ bag_of,
                                          const unsigned long long* __restrict__ bag_count,
                                          const scalar_t* __restrict__ psw,
                                          const int* __restrict__ counts, int64_t n,
                                          int64_t num_rows, int64_t dim, int64_t mode,
                                          int64_t padding_idx, rows_t* __restrict__ rows) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_position(idx, bag_of, n, padding_idx, num_rows, [&](int64_t i, int64_t b, int64_t k, bool live) {
    acc_t coef = 0;
    if (live) {
      coef = mode == kBagMean ? acc_t(1) / static_cast<acc_t>(bag_count[b]) : acc_t(1);
      if (psw != nullptr) coef *= static_cast<acc_t>(psw[i]);
      if (counts != nullptr) coef /= static_cast<acc_t>(counts[k]);
    }
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      rows[i * dim + d] = live ? static_cast<rows_t>(static_cast<acc_t>(grad[b * dim + d]) * coef)
                               : rows_t(0);
    }
  });
}

// Max mode: out[arg_max[b, d], d] += grad_output[b, d]. arg_max comes from our forward, but
// the op is public: an entry outside [-1, num_rows) is reported as a bad id, not followed.
template <typename scalar_t, typename acc_t>
__global__ void max_gradient_kernel(const scalar_t* __restrict__ grad,
                                    const int64_t* __restrict__ arg_max, int64_t elements,
                                    int64_t dim, int64_t num_rows, acc_t* __restrict__ out,
                                    ErrorSink sink) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < elements;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = arg_max[e];
    if (k == -1) continue;  // an empty bag
    if (!row_in_range(k, num_rows)) {
      report_bad_index(sink, e, k, num_rows);
      continue;
    }
    atomicAdd(out + k * dim + e % dim, static_cast<acc_t>(grad[e]));
  }
}

// out[i] = <grad_output[bag_of[i]], weight[idx[i]]>, 0 where position i pools nothing. One
// warp per position (blockDim.x == 32), so the shuffle reduction has the whole warp.
template <typename scalar_t, typename index_t>
__global__ void sample_weight_gradients_kernel(const scalar_t* __restrict__ grad,
                                               const scalar_t* __restrict__ weight,
                                               int64_t row_stride, const index_t* __restrict__ idx,
                                               const int64_t* __restrict__ bag_of, int64_t n,
                                               int64_t num_rows, int64_t dim,
                                               int64_t padding_idx, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_position(idx, bag_of, n, padding_idx, num_rows, [&](int64_t i, int64_t b, int64_t k, bool live) {
    acc_t dot = 0;
    if (live) {
      for (int64_t d = threadIdx.x; d < dim; d += 32) {
        dot += static_cast<acc_t>(grad[b * dim + d]) * static_cast<acc_t>(weight[k * row_stride + d]);
      }
    }
    for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2) {
      dot += __shfl_xor_sync(0xffffffffu, dot, lane_mask);
    }
    if (threadIdx.x == 0) out[i] = static_cast<scalar_t>(dot);
  });
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Each position's gradient row (n, D) in grad's dtype (fp32 with fp32_rows, for fp16/bf16
// grads): what the lookup's backward ops take.
at::Tensor position_gradients(const at::Tensor& grad, const BagInputs& in, const BagLayout& l,
                              int64_t mode, const at::Tensor& psw, int64_t padding_idx,
                              bool fp32_rows, const LaunchScope& scope) {
  constexpr const char* op = "embedding_bag position gradients";
  const int64_t dim = grad.size(1);
  at::Tensor rows = at::empty({in.n, dim}, fp32_rows ? grad.options().dtype(at::kFloat) : grad.options());
  if (in.n == 0 || dim == 0) return rows;
  const RowLaunch launch = row_launch(in.n, dim);
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      auto launch_as = [&](auto rows_tag) {
        using rows_t = typename decltype(rows_tag)::type;
        position_gradients_kernel<scalar_t, rows_t, index_t><<<launch.grid, launch.block, 0, scope.stream>>>(
            grad.const_data_ptr<scalar_t>(), in.indices.const_data_ptr<index_t>(),
            l.bag_of.const_data_ptr<int64_t>(),
            reinterpret_cast<const unsigned long long*>(l.bag_count.const_data_ptr<int64_t>()),
            psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr,
            l.counts.defined() ? l.counts.const_data_ptr<int>() : nullptr, in.n, in.num_rows, dim,
            mode, padding_idx, rows.mutable_data_ptr<rows_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (fp32_rows) launch_as(TypeTag<float>{});
      else launch_as(TypeTag<scalar_t>{});
    });
  });
  return rows;
}

at::Tensor embedding_bag_dense_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    const at::Tensor& arg_max_in, c10::SymInt num_weights, int64_t mode,
    const c10::optional<at::Tensor>& per_sample_weights, int64_t padding_idx,
    bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_bag_dense_backward";
  check_cuda_grad_output(grad_in, op);
  const BagInputs in = bag_dense_gradient_inputs(grad_in, indices_in, offsets_in, arg_max_in,
                                                 num_weights, mode, per_sample_weights,
                                                 padding_idx, scale_grad_by_freq, op);
  const int64_t num_rows = in.num_rows, dim = in.dim;
  LaunchScope scope(grad_in, op);
  const at::Tensor grad = grad_in.contiguous();
  if (mode == kBagMax) {
    at::globalContext().alertNotDeterministic("embedding_ext::embedding_bag_dense_backward (max mode, CUDA)");
    // The ids are not read here (arg_max names the rows), but a direct call still gets them
    // checked, as on the CPU.
    AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
      probe_indices(in.indices.const_data_ptr<index_t>(), in.n, num_rows, scope);
    });
    const at::Tensor arg_max = arg_max_in.contiguous();
    const bool wide = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
    at::Tensor acc = at::zeros({num_rows, dim}, grad.options().dtype(wide ? at::kFloat : grad.scalar_type()));
    const int64_t elements = in.bags * dim;
    if (elements > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
        using acc_t = at::opmath_type<scalar_t>;
        max_gradient_kernel<scalar_t, acc_t><<<flat_blocks(elements), kThreadsPerBlock, 0, scope.stream>>>(
            grad.const_data_ptr<scalar_t>(), arg_max.const_data_ptr<int64_t>(), elements, dim,
            num_rows, acc.mutable_data_ptr<acc_t>(), scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    scope.finish();
    return wide ? acc.to(grad.scalar_type()) : acc;
  }
  const at::Tensor psw = per_sample_weights.has_value()
                             ? per_sample_weights->to(grad.scalar_type()).contiguous() : at::Tensor();
  // fp16/bf16: fp32 rows, summed by the sorted path into the fp16/bf16 gradient, so that
  // each term is not rounded before the sum (a row whose terms cancel would lose digits).
  const bool reduced = grad.scalar_type() == at::kHalf || grad.scalar_type() == at::kBFloat16;
  at::Tensor rows;
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const BagLayout l = bag_layout<index_t>(in, padding_idx, scale_grad_by_freq, scope);
    rows = position_gradients(grad, in, l, mode, psw, padding_idx, reduced, scope);
  });
  if (reduced) {
    at::Tensor result = sorted_row_sums({rows, in.indices, num_rows, dim, in.n}, padding_idx,
                                        grad.scalar_type(), scope);
    scope.finish();
    return result;
  }
  scope.finish();
  // The lookup's own dense backward sums the rows (its frequency scaling is already in them).
  static auto dense_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("embedding_ext::embedding_dense_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, bool)>();
  return dense_backward.call(rows, in.indices, c10::SymInt(num_rows), padding_idx, false);
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_sparse_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    c10::SymInt num_weights, int64_t mode, const c10::optional<at::Tensor>& per_sample_weights,
    int64_t padding_idx, bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_bag_sparse_backward";
  check_cuda_grad_output(grad_in, op);
  const BagInputs in = bag_gradient_inputs(grad_in, indices_in, offsets_in, num_weights, mode,
                                           per_sample_weights, padding_idx, /*sparse=*/true, op);
  const int64_t num_rows = in.num_rows;
  LaunchScope scope(grad_in, op);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor psw = per_sample_weights.has_value()
                             ? per_sample_weights->to(grad.scalar_type()).contiguous() : at::Tensor();
  // Without padding: one entry per position, as PyTorch's sparse gradient, so the size is
  // known and nothing synchronises (the compaction's nonzero made this row 0.56x PyTorch on
  // an H200 though its kernels were faster: bench/NOTES-cuda.md, run 4b). position_gradients
  // writes zero rows for ids in no bag (the CSR tail) and for bad ids, whose row number
  // becomes 0 so that the COO tensor stays inside the table (the forward and the probe
  // report them).
  const bool every_position = padding_idx < 0 && num_rows > 0;
  at::Tensor rows, bag_of, row_ids;
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    probe_indices(in.indices.const_data_ptr<index_t>(), in.n, num_rows, scope);  // bad ids: no value
    const BagLayout l = bag_layout<index_t>(in, padding_idx, scale_grad_by_freq, scope);
    rows = position_gradients(grad, in, l, mode, psw, padding_idx, false, scope);
    bag_of = l.bag_of;
    if (every_position) {
      row_ids = at::empty({1, in.n}, in.indices.options().dtype(at::kLong));
      if (in.n > 0) {
        coo_row_ids_kernel<index_t><<<flat_blocks(in.n), kThreadsPerBlock, 0, scope.stream>>>(
            in.indices.const_data_ptr<index_t>(), in.n, num_rows, row_ids.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  scope.finish();
  if (every_position) return {row_ids, rows};
  // With padding: the positions in bags, padding left out, in order (nonzero: the one
  // synchronisation, as the number of values is data-dependent; PyTorch's masks the padding
  // out too). Bad ids are left out too: no COO row outside the table.
  const at::Tensor keep = bag_of.ge(0)
                              .logical_and_(in.indices.ge(0))
                              .logical_and_(in.indices.lt(num_rows))
                              .logical_and_(in.indices.ne(padding_idx));
  const at::Tensor source = keep.nonzero().squeeze(1);
  return {in.indices.index_select(0, source).to(at::kLong).unsqueeze(0), rows.index_select(0, source)};
}

at::Tensor embedding_bag_per_sample_weights_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& weight_in, const at::Tensor& indices_in,
    const at::Tensor& offsets_in, int64_t padding_idx) {
  constexpr const char* op = "embedding_bag_per_sample_weights_backward";
  const BagInputs in = bag_sample_weight_gradient_inputs(grad_in, weight_in, indices_in, offsets_in, op);
  LaunchScope scope(weight_in, op);
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  const at::Tensor grad = grad_in.to(weight.scalar_type()).contiguous();
  const int64_t num_rows = in.num_rows, dim = in.dim;
  at::Tensor out = at::empty({in.n}, weight.options());
  if (in.n == 0) return out;
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    probe_indices(in.indices.const_data_ptr<index_t>(), in.n, num_rows, scope);  // bad ids give 0
    const BagLayout l = bag_layout<index_t>(in, padding_idx, false, scope);
    const int64_t blocks = std::min<int64_t>(ceil_div(in.n, kThreadsPerBlock / 32), kMaxBlocks);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      sample_weight_gradients_kernel<scalar_t, index_t>
          <<<dim3(static_cast<unsigned>(blocks)), dim3(32, kThreadsPerBlock / 32), 0, scope.stream>>>(
              grad.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), weight.stride(0),
              in.indices.const_data_ptr<index_t>(), l.bag_of.const_data_ptr<int64_t>(), in.n,
              num_rows, dim, padding_idx, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  scope.finish();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_bag_dense_backward", &embedding_bag_dense_backward_cuda);
  m.impl("embedding_bag_sparse_backward", &embedding_bag_sparse_backward_cuda);
  m.impl("embedding_bag_per_sample_weights_backward", &embedding_bag_per_sample_weights_backward_cuda);
}

}  // namespace embedding_ext::cuda
