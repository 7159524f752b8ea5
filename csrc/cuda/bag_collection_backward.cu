// CUDA gradients of the table-batched pooled lookup (embedding_bag_collection_dense_backward,
// _sparse_backward), every table's in one launch (one per 256 features), a warp per bag.
// - Dense: each pooled id adds its bag's gradient slice times its coefficient into its row
//   with atomics (fp32 accumulators for fp16/bf16 tables). The order of the additions varies:
//   not deterministic, so the op alerts under torch.use_deterministic_algorithms, as
//   PyTorch's CUDA embedding_bag backward does.
// - Sparse: one slot per pooled id, in position order within each table (the CPU kernels'
//   order). Sizing each table's output needs its count of pooled ids, so the op copies one
//   count per feature to the host: one synchronisation, as PyTorch's sparse backward with
//   padding. Not capturable into a CUDA graph.
// The fused update has no CUDA kernel yet: it raises NotImplementedError saying so.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bag_collection.cuh"

namespace embedding_ext::cuda {
namespace {

// The term of position i in bag b (column d of its slice): coefficient times gradient, or
// for max mode the gradient where i won column d (and 0 elsewhere).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t term(const scalar_t* __restrict__ g, const int64_t* __restrict__ won,
                                      const CollectionTable& t, acc_t coef, int64_t i, int64_t d) {
  if (t.mode == kBagMax) return won[d] == i ? static_cast<acc_t>(g[d]) : acc_t(0);
  return coef * static_cast<acc_t>(g[d]);
}

// kPass 0: dense (atomics into the acc_t rows at table.data); 1: mark the positions that
// pool a row (live[i] = 1); 2: sparse (row ids at table.data, gradient rows at table.values).
template <int kPass, typename scalar_t, typename index_t>
__global__ void collection_grad_kernel(const CollectionChunk k, const scalar_t* __restrict__ grad,
                                       const index_t* __restrict__ idx,
                                       const int64_t* __restrict__ off,
                                       const scalar_t* __restrict__ psw,
                                       const int64_t* __restrict__ arg_pos,
                                       int* __restrict__ live, const int64_t* __restrict__ slot,
                                       ErrorSink sink) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_chunk_bag(k, off, sink, [&](int64_t f, int64_t b, int64_t, const BagRange& r) {
    const CollectionTable& t = k.table[f];
    const int64_t count = t.mode == kBagMean ? pooled_count(idx, r, t) : 0;
    const acc_t scale = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(1);
    const scalar_t* g = grad + b * k.total_dim + k.col[f];
    const int64_t* won = arg_pos != nullptr ? arg_pos + b * k.total_dim + k.col[f] : nullptr;
    // The feature's first position (clamped as the host's copy): slots count from there.
    const int64_t feature_start = min(max(off[(k.first + f) * k.batch], int64_t(0)), k.n);
    for (int64_t i = r.start; i < r.end; ++i) {
      const int64_t id = idx[i];
      if (id == t.pad || !row_in_range(id, t.rows)) continue;
      const acc_t coef = psw != nullptr ? static_cast<acc_t>(psw[i]) : scale;
      if constexpr (kPass == 0) {
        acc_t* dst = static_cast<acc_t*>(const_cast<void*>(t.data)) + id * t.dim;
        for (int64_t d = threadIdx.x; d < t.dim; d += blockDim.x) {
          const acc_t v = term(g, won, t, coef, i, d);
          if (v != acc_t(0)) atomicAdd(dst + d, v);
        }
      } else if constexpr (kPass == 1) {
        if (threadIdx.x == 0) live[i] = 1;
      } else {
        // slot: the exclusive prefix count of pooled positions; this table's j-th.
        const int64_t j = t.base + slot[i] - slot[feature_start];
        if (j < 0 || j >= t.nnz) continue;  // only with bad offsets (already reported)
        if (threadIdx.x == 0) static_cast<int64_t*>(const_cast<void*>(t.data))[j] = id;
        scalar_t* dst = static_cast<scalar_t*>(t.values) + j * t.dim;
        for (int64_t d = threadIdx.x; d < t.dim; d += blockDim.x) {
          dst[d] = static_cast<scalar_t>(term(g, won, t, coef, i, d));
        }
      }
    }
  });
}

struct GradCall {
  CollectionCall c;
  at::Tensor grad, psw, arg_pos;
};

GradCall grad_call(const at::Tensor& grad_output, const at::Tensor& values,
                   const at::Tensor& offsets, const at::Tensor& arg_max,
                   at::IntArrayRef feature_table, at::IntArrayRef modes,
                   at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& psw,
                   c10::SymIntArrayRef num_weights, at::IntArrayRef dims, const char* op) {
  check_cuda_grad_output(grad_output, op);
  GradCall g{collection_grad_layout(grad_output, values, offsets, arg_max, feature_table, modes,
                                    padding_idx, psw, num_weights, dims, op)};
  g.grad = grad_output.contiguous();
  g.arg_pos = g.c.any_max ? arg_max.contiguous() : at::Tensor();
  if (psw.has_value()) g.psw = psw->contiguous();
  return g;
}

// Launches pass kPass over every chunk; table(f_global, t, chunk_table) fills in the
// per-feature outputs.
template <int kPass, typename scalar_t, typename index_t, typename Fill>
void launch_pass(const GradCall& g, const LaunchScope& scope, int* live, const int64_t* slot,
                 Fill&& fill) {
  const CollectionCall& c = g.c;
  for (int64_t first = 0; first < c.features; first += kChunkFeatures) {
    CollectionChunk k = collection_chunk(c, first, [](int64_t) -> const void* { return nullptr; });
    for (int64_t f = 0; f < k.count; ++f) fill(first + f, c.table_of[first + f], k.table[f]);
    const RowLaunch launch = chunk_launch(k);
    collection_grad_kernel<kPass, scalar_t, index_t><<<launch.grid, launch.block, 0, scope.stream>>>(
        k, g.grad.const_data_ptr<scalar_t>(), c.values.const_data_ptr<index_t>(),
        c.offsets.const_data_ptr<int64_t>(), g.psw.defined() ? g.psw.const_data_ptr<scalar_t>() : nullptr,
        g.arg_pos.defined() ? g.arg_pos.const_data_ptr<int64_t>() : nullptr, live, slot,
        scope.sink);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::vector<at::Tensor> dense_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& offsets,
    const at::Tensor& arg_max, at::IntArrayRef feature_table, at::IntArrayRef modes,
    at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& per_sample_weights,
    c10::SymIntArrayRef num_weights, at::IntArrayRef dims) {
  constexpr const char* op = "embedding_bag_collection_dense_backward";
  const GradCall g = grad_call(grad_output, values, offsets, arg_max, feature_table, modes,
                               padding_idx, per_sample_weights, num_weights, dims, op);
  at::globalContext().alertNotDeterministic("embedding_ext::embedding_bag_collection_dense_backward (CUDA)");
  LaunchScope scope(values, op);
  std::vector<at::Tensor> out(g.c.tables);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.grad.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = g.grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    std::vector<at::Tensor> acc;
    for (int64_t t = 0; t < g.c.tables; ++t) {
      acc.push_back(at::zeros({g.c.rows[t], g.c.dims[t]}, acc_options));
    }
    if (g.c.features * g.c.batch == 0) {
      check_first_offset(g.c, scope);
    } else {
      AT_DISPATCH_INDEX_TYPES(g.c.values.scalar_type(), op, [&] {
        launch_pass<0, scalar_t, index_t>(g, scope, nullptr, nullptr,
                                          [&](int64_t, int64_t t, CollectionTable& d) {
          d.data = acc[t].mutable_data_ptr<acc_t>();
        });
      });
    }
    for (int64_t t = 0; t < g.c.tables; ++t) {
      out[t] = acc[t].scalar_type() == g.grad.scalar_type() ? acc[t] : acc[t].to(g.grad.scalar_type());
    }
  });
  scope.finish();
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& values, const at::Tensor& offsets,
    const at::Tensor& arg_max, at::IntArrayRef feature_table, at::IntArrayRef modes,
    at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& per_sample_weights,
    c10::SymIntArrayRef num_weights, at::IntArrayRef dims) {
  constexpr const char* op = "embedding_bag_collection_sparse_backward";
  const GradCall g = grad_call(grad_output, values, offsets, arg_max, feature_table, modes,
                               padding_idx, per_sample_weights, num_weights, dims, op);
  const CollectionCall& c = g.c;
  LaunchScope scope(values, op);
  std::vector<at::Tensor> row_ids(c.tables), vals(c.tables);
  const auto long_options = values.options().dtype(at::kLong);
  if (c.features * c.batch == 0) {
    for (int64_t t = 0; t < c.tables; ++t) {
      row_ids[t] = at::zeros({0}, long_options);
      vals[t] = at::zeros({0, c.dims[t]}, g.grad.options());
    }
    check_first_offset(c, scope);
    scope.finish();
    return {row_ids, vals};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.grad.scalar_type(), op, [&] {
    AT_DISPATCH_INDEX_TYPES(c.values.scalar_type(), op, [&] {
      // 1. Which positions pool a row; their exclusive prefix count is each one's slot.
      at::Tensor live = at::zeros({c.n}, values.options().dtype(at::kInt));
      launch_pass<1, scalar_t, index_t>(g, scope, live.mutable_data_ptr<int>(), nullptr,
                                        [](int64_t, int64_t, CollectionTable&) {});
      const at::Tensor slot = at::cat({at::zeros({1}, long_options), at::cumsum(live, 0, at::kLong)});
      // 2. Each feature's first position and slot (clamped: a bad offset reads nothing
      //    outside), copied to the host at once: the synchronisation.
      const at::Tensor starts = c.offsets.index_select(
          0, at::arange(0, c.features * c.batch + 1, c.batch, long_options)).clamp(0, c.n);
      const at::Tensor host = at::stack({starts, slot.index_select(0, starts)}).cpu();
      const int64_t* h = host.const_data_ptr<int64_t>();
      std::vector<int64_t> pooled(c.features), base(c.features), nnz(c.tables, 0);
      for (int64_t f = 0; f < c.features; ++f) {
        pooled[f] = std::max<int64_t>(0, h[c.features + 1 + f + 1] - h[c.features + 1 + f]);
        base[f] = nnz[c.table_of[f]];
        nnz[c.table_of[f]] += pooled[f];
      }
      for (int64_t t = 0; t < c.tables; ++t) {
        // Zeros: a slot left unwritten (only with bad offsets) is row 0 with a zero gradient.
        row_ids[t] = at::zeros({nnz[t]}, long_options);
        vals[t] = at::zeros({nnz[t], c.dims[t]}, g.grad.options());
      }
      // 3. Every pooled position's row id and gradient row into its table's slot.
      launch_pass<2, scalar_t, index_t>(g, scope, nullptr, slot.const_data_ptr<int64_t>(),
                                        [&](int64_t f, int64_t t, CollectionTable& d) {
        d.data = row_ids[t].mutable_data_ptr<int64_t>();
        d.values = vals[t].mutable_data_ptr<scalar_t>();
        d.base = base[f];
        d.nnz = nnz[t];
      });
    });
  });
  scope.finish();
  return {row_ids, vals};
}

void fused_update_cuda(at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                       const c10::optional<at::Tensor>&, int64_t, at::TensorList, at::TensorList,
                       double, double, double, double, double, at::IntArrayRef) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "embedding_bag_collection_fused_update_: the fused "
                              "optimizer of EmbeddingBagCollection has no CUDA kernel yet; on the "
                              "GPU train the collection with sparse=True and a torch optimizer "
                              "(or keep the fused collection on the CPU)");
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_bag_collection_dense_backward", &dense_backward_cuda);
  m.impl("embedding_bag_collection_sparse_backward", &sparse_backward_cuda);
  m.impl("embedding_bag_collection_fused_update_", &fused_update_cuda);
}

}  // namespace embedding_ext::cuda
