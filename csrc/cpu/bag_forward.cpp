// CPU pooled lookup, forward (embedding_bag_forward): bags pooled in fp32 (fp64 for fp64), one
// task per run of bags, rows in position order: deterministic. D >= 16 takes the
// register-block loops (bag_pool.h) of this CPU's instruction set; smaller D a loop over
// whole rows.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <vector>

#include "bag_pool.h"
#include "common.h"
#include "isa.h"
#include "output_allocator.h"
#include "row_convert.h"

namespace embedding_ext::cpu {
namespace {

// Pools bags [0, bags) of the n ids into out; raises IndexError (check_index_range's
// message: the first bad position) for an id outside the num_rows-row table.
template <typename scalar_t, typename index_t>
void pool_bags(const scalar_t* weight, int64_t row_stride, int64_t num_rows, const index_t* idx,
               int64_t n, const int64_t* off, int64_t bags, int64_t dim, int64_t mode,
               const scalar_t* psw, int64_t padding_idx, scalar_t* out, int64_t* arg_max,
               const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t avg_ids = bags ? std::max<int64_t>(1, off[bags] / bags) : 1;
  const int64_t grain = grain_for(avg_ids * dim * sizeof(scalar_t));
  // Max mode keeps arg-max positions as int32 lanes: bags of fewer than 2^31 ids.
  // (dims under 16 take the generic loop: the register blocks are 16 columns wide.)
  // Max mode's int32 positions are relative to a bag; the test on the total is conservative.
  if (dim >= 16 && (mode != kBagMax || off[bags] <= std::numeric_limits<int32_t>::max())) {
    const PoolArgs<scalar_t, index_t> args{weight, row_stride, idx, off, dim, mode, psw,
                                            padding_idx, out, arg_max, static_cast<uint64_t>(num_rows),
                                            /*out_stride=*/dim};
    std::atomic<bool> bad{false};
    if (mode == kBagMax) {
      check_index_range(idx, n, num_rows, op);
    } else {
      // Sum/mean check the ids they pool; the ids after the last bag (CSR) are checked here.
      for (int64_t i = off[bags]; i < n; ++i) {
        if (static_cast<uint64_t>(static_cast<int64_t>(idx[i])) >= static_cast<uint64_t>(num_rows)) bad = true;
      }
    }
    at::parallel_for(0, bags, grain, [&](int64_t begin, int64_t end) {
      const bool task_bad = mode == kBagMax ? pool_register_blocks_any<true>(args, begin, end)
                                         : pool_register_blocks_any<false>(args, begin, end);
      if (task_bad) bad = true;
    });
    if (bad) check_index_range(idx, n, num_rows, op);  // raises for the first bad position
    TORCH_INTERNAL_ASSERT(!bad, op, ": an id outside the table was met while pooling, but "
                          "not found again");
    return;
  }
  check_index_range(idx, n, num_rows, op);
  at::parallel_for(0, bags, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim), row(dim);
    // Prefetch across bag boundaries (within this task's ids): a bag's first rows would
    // otherwise each wait for DRAM.
    const int64_t task_end = off[end];
    const auto prefetch_ahead = [&](int64_t i) {
      if (i + kBagPrefetch < task_end) {
        prefetch_row(weight + static_cast<int64_t>(idx[i + kBagPrefetch]) * row_stride,
                     dim * sizeof(scalar_t));
      }
    };
    for (int64_t i = off[begin]; i < std::min(off[begin] + kBagPrefetch, task_end); ++i) {
      prefetch_row(weight + static_cast<int64_t>(idx[i]) * row_stride, dim * sizeof(scalar_t));
    }
    for (int64_t b = begin; b < end; ++b) {
      int64_t count = 0;
      if (mode == kBagMax) {
        int64_t* arg = arg_max + b * dim;
        for (int64_t i = off[b]; i < off[b + 1]; ++i) {
          prefetch_ahead(i);
          const int64_t k = idx[i];
          if (k == padding_idx) continue;
          if (count++ == 0) {
            load_row<false>(weight + k * row_stride, acc.data(), dim);
            std::fill(arg, arg + dim, k);
            continue;
          }
          load_row<false>(weight + k * row_stride, row.data(), dim);
          for (int64_t d = 0; d < dim; ++d) {
            // Strictly greater: the first occurrence wins ties, and a NaN is never taken
            // after the first row (PyTorch's rule). Selects, no branches: the loop vectorises.
            const bool take = row[d] > acc[d];
            acc[d] = take ? row[d] : acc[d];
            arg[d] = take ? k : arg[d];
          }
        }
        if (count == 0) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          std::fill(arg, arg + dim, int64_t(-1));
        }
        store_row(acc.data(), acc_t(1), out + b * dim, dim);
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t i = off[b]; i < off[b + 1]; ++i) {
        prefetch_ahead(i);
        const int64_t k = idx[i];
        if (k == padding_idx) continue;
        ++count;
        if (psw == nullptr) {
          load_row<true>(weight + k * row_stride, acc.data(), dim);
          continue;
        }
        load_row<false>(weight + k * row_stride, row.data(), dim);
        const acc_t w = static_cast<acc_t>(psw[i]);
        for (int64_t d = 0; d < dim; ++d) acc[d] += row[d] * w;
      }
      if (mode == kBagMean && count > 1) {  // a division, as PyTorch (not a multiply by 1/count)
        const acc_t c = static_cast<acc_t>(count);
        for (int64_t d = 0; d < dim; ++d) acc[d] /= c;
      }
      store_row(acc.data(), acc_t(1), out + b * dim, dim);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_forward_cpu(
    const at::Tensor& weight_in, const at::Tensor& indices_in, const at::Tensor& offsets_in,
    int64_t mode, const c10::optional<at::Tensor>& per_sample_weights, int64_t padding_idx) {
  constexpr const char* op = "embedding_bag_forward";
  const BagInputs in = bag_forward_inputs(weight_in, indices_in, offsets_in, mode, per_sample_weights, op);
  at::Tensor psw;
  if (per_sample_weights.has_value()) psw = per_sample_weights->contiguous();
  const at::Tensor weight = weight_in.stride(1) == 1 ? weight_in : weight_in.contiguous();
  at::Tensor out = empty_output({in.bags, in.dim}, weight.options());
  at::Tensor arg_max = at::empty({mode == kBagMax ? in.bags : 0, in.dim},
                                 weight.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      pool_bags<scalar_t, index_t>(
          weight.const_data_ptr<scalar_t>(), weight.stride(0), in.num_rows, idx, in.n,
          in.offsets.const_data_ptr<int64_t>(), in.bags, in.dim, mode,
          psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr, padding_idx,
          out.mutable_data_ptr<scalar_t>(), mode == kBagMax ? arg_max.mutable_data_ptr<int64_t>() : nullptr,
          op);
    });
  });
  return {out, arg_max};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_bag_forward", &embedding_bag_forward_cpu);
}

}  // namespace embedding_ext::cpu
