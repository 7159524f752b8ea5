// CUDA table-batched pooled lookup (embedding_bag_collection_forward): every (feature, bag)
// of every table in one launch (one per 256 features), a warp per bag, a lane per column,
// rows in position order with an fp32 (fp64) accumulator: deterministic. Bad ids pool
// nothing and are reported through the error record (a later call raises IndexError); bad
// offsets likewise, as the single-table bag does (bag.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "bag_collection.cuh"

namespace embedding_ext::cuda {
namespace {

template <typename scalar_t, typename index_t>
__global__ void collection_pool_kernel(const CollectionChunk k, const index_t* __restrict__ idx,
                                       const int64_t* __restrict__ off,
                                       const scalar_t* __restrict__ psw,
                                       scalar_t* __restrict__ out, int64_t* __restrict__ arg_pos,
                                       ErrorSink sink) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_chunk_bag(k, off, sink, [&](int64_t f, int64_t b, int64_t, const BagRange& r) {
    const CollectionTable& t = k.table[f];
    const scalar_t* __restrict__ weight = static_cast<const scalar_t*>(t.data);
    if (threadIdx.x == 0) {  // every bad id of the bag, once
      for (int64_t i = r.start; i < r.end; ++i) {
        const int64_t id = idx[i];
        if (!row_in_range(id, t.rows)) report_bad_index(sink, i, id, t.rows);
      }
    }
    const int64_t count = t.mode == kBagMean ? pooled_count(idx, r, t) : 0;
    scalar_t* o = out + b * k.total_dim + k.col[f];
    for (int64_t d = threadIdx.x; d < t.dim; d += blockDim.x) {
      acc_t acc = 0;
      int64_t won = -1;
      bool any = false;
      for (int64_t i = r.start; i < r.end; ++i) {
        const int64_t id = idx[i];
        if (id == t.pad || !row_in_range(id, t.rows)) continue;
        const acc_t v = static_cast<acc_t>(weight[id * t.dim + d]);
        if (t.mode == kBagMax) {
          // The first row as is (a NaN too), then strictly greater, as the CPU kernels.
          if (!any || v > acc) {
            acc = v;
            won = i;
          }
        } else {
          acc += psw != nullptr ? static_cast<acc_t>(psw[i]) * v : v;
        }
        any = true;
      }
      if (t.mode == kBagMean && count > 0) acc /= static_cast<acc_t>(count);
      o[d] = static_cast<scalar_t>(acc);
      if (t.mode == kBagMax) arg_pos[b * k.total_dim + k.col[f] + d] = won;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(
    at::TensorList weights, const at::Tensor& values, const at::Tensor& offsets,
    at::IntArrayRef feature_table, at::IntArrayRef modes, at::IntArrayRef padding_idx,
    const c10::optional<at::Tensor>& per_sample_weights, c10::SymInt batch_size) {
  constexpr const char* op = "embedding_bag_collection_forward";
  const CollectionTables T = collection_tables(weights, values, per_sample_weights, op);
  const std::vector<at::Tensor>& tables = T.tables;
  const auto dtype = weights[0].scalar_type();
  const CollectionCall c = collection_layout(T.rows, T.dims, values, offsets, feature_table, modes,
                                             padding_idx, per_sample_weights,
                                             batch_size.expect_int(), op);
  LaunchScope scope(values, op);
  at::Tensor out = at::empty({c.batch, c.total_dim}, weights[0].options());
  const auto long_options = values.options().dtype(at::kLong);
  at::Tensor arg_pos = c.any_max ? at::full({c.batch, c.total_dim}, -1, long_options)
                                 : at::empty({0}, long_options);
  const at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous()
                                                        : at::Tensor();
  if (c.features * c.batch == 0) {
    check_first_offset(c, scope);
    scope.finish();
    return {out, arg_pos};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, op, [&] {
    AT_DISPATCH_INDEX_TYPES(c.values.scalar_type(), op, [&] {
      for (int64_t first = 0; first < c.features; first += kChunkFeatures) {
        const CollectionChunk k = collection_chunk(c, first, [&](int64_t t) -> const void* {
          return tables[t].const_data_ptr<scalar_t>();
        });
        const RowLaunch launch = chunk_launch(k);
        collection_pool_kernel<scalar_t, index_t><<<launch.grid, launch.block, 0, scope.stream>>>(
            k, c.values.const_data_ptr<index_t>(), c.offsets.const_data_ptr<int64_t>(),
            psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(),
            c.any_max ? arg_pos.mutable_data_ptr<int64_t>() : nullptr, scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  scope.finish();
  return {out, arg_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_bag_collection_forward", &forward_cuda);
}

}  // namespace embedding_ext::cuda
