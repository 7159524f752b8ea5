// CPU table-batched pooled lookup (embedding_bag_collection_forward): every (feature, bag) of
// every table in one parallel region, so a model with tens of small tables pays one thread
// start-up and one dispatch per pass instead of one per table.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "bag_collection.h"
#include "bag_pool.h"
#include "common.h"
#include "isa.h"
#include "output_allocator.h"
#include "row_convert.h"

namespace embedding_ext {
namespace cpu {

Layout make_layout(const std::vector<int64_t>& rows, const std::vector<int64_t>& dims,
                   const at::Tensor& values, const at::Tensor& offsets,
                   at::IntArrayRef feature_table, at::IntArrayRef modes,
                   at::IntArrayRef padding_idx, const c10::optional<at::Tensor>& psw,
                   int64_t batch, const char* op) {
  Layout L = collection_layout(rows, dims, values, offsets, feature_table, modes, padding_idx,
                               psw, batch, op);
  check_layout_offsets(L, op);
  return L;
}

namespace {

// The IndexError for the first bad id: which bag holds the position tells the feature.
[[noreturn]] void throw_collection_index_error(const Layout& L, int64_t value, int64_t pos,
                                               const char* op) {
  const int64_t* off = L.offsets.const_data_ptr<int64_t>();
  const int64_t bag = std::upper_bound(off, off + L.features * L.batch + 1, pos) - off - 1;
  const int64_t f = bag / L.batch, t = L.table_of[f];
  raise_index_error(c10::str(op, ": id ", value, " at position ", pos, " of 'values' (feature ", f,
                              ", bag ", bag - f * L.batch, ") is out of range for table ", t,
                              " with ", L.rows[t], " rows; valid ids are 0 <= id < ", L.rows[t],
                              "; Expected idx >= 0 && idx < num_embeddings but found idx to be ",
                              value));
}

// One feature's bags for the generic loop: max mode, or a dim under 16. (Sum and mean with
// larger dims take the single-table kernel's register blocks, bag_pool.h.)
template <typename scalar_t, typename index_t>
struct FeatureBags {
  const scalar_t* weight;  // the first pooled column of row 0
  const index_t* idx;
  const int64_t* off;  // the feature's first bag: off[b] for its bag b
  const scalar_t* psw;
  scalar_t* out;       // the feature's first pooled column of output row 0
  int64_t* arg_pos;    // likewise in the positions (max mode)
  int64_t out_stride, dim, mode, pad;
  uint64_t num_rows;
  int64_t row_stride;  // the table's dim
};

// Rows fetched ahead of the pooling, across bag boundaries within the run of bags (a
// Criteo-like batch has one id per bag: prefetching within a bag would never fire).
constexpr int64_t kAhead = 16;

// Bags [b0, b1) of one feature, rows in position order. Always inlined into one copy per
// instruction set (isa.h), so the row loops compile to AVX2 / AVX-512 there.
template <typename scalar_t, typename index_t>
__attribute__((always_inline)) inline void pool_feature_bags(const FeatureBags<scalar_t, index_t>& r,
                                                             int64_t b0, int64_t b1,
                                                             std::atomic<int64_t>& first_bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t dim = r.dim, pad = r.pad, mode = r.mode, run_end = r.off[b1];
  std::vector<acc_t> acc_buffer(dim);
  std::vector<int64_t> won(dim);
  acc_t* __restrict acc = acc_buffer.data();
  const auto prefetch = [&](int64_t i) {
    const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(r.idx[i]));
    if (k < r.num_rows) prefetch_row(r.weight + k * r.row_stride, dim * sizeof(scalar_t));
  };
  for (int64_t i = r.off[b0]; i < std::min(r.off[b0] + kAhead, run_end); ++i) prefetch(i);
  for (int64_t b = b0; b < b1; ++b) {
    scalar_t* o = r.out + b * r.out_stride;
    int64_t count = 0;
    if (mode == kBagMax) std::fill(won.begin(), won.end(), int64_t(-1));
    for (int64_t i = r.off[b]; i < r.off[b + 1]; ++i) {
      if (i + kAhead < run_end) prefetch(i + kAhead);
      const int64_t k = static_cast<int64_t>(r.idx[i]);
      if (static_cast<uint64_t>(k) >= r.num_rows) {
        record_bad(first_bad, i);
        break;
      }
      if (k == pad) continue;
      ++count;
      const scalar_t* __restrict row = r.weight + k * r.row_stride;
      if (mode == kBagMax) {
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t v = static_cast<acc_t>(row[d]);
          if (won[d] < 0 || v > acc[d]) {
            acc[d] = v;
            won[d] = i;
          }
        }
      } else if (r.psw != nullptr) {
        // The first row initialises the accumulators (0 + x == x; only a -0.0 row keeps its
        // sign), which saves clearing them for every bag.
        const acc_t weight = static_cast<acc_t>(r.psw[i]);
        if (count == 1) {
          for (int64_t d = 0; d < dim; ++d) acc[d] = weight * static_cast<acc_t>(row[d]);
        } else {
          for (int64_t d = 0; d < dim; ++d) acc[d] += weight * static_cast<acc_t>(row[d]);
        }
      } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (count == 1) {
          for (int64_t d = 0; d < dim; ++d) acc[d] = row[d];
        } else {
          for (int64_t d = 0; d < dim; ++d) acc[d] += row[d];
        }
      } else if (count == 1) {
        load_row<false>(row, acc, dim);  // fp16/bf16: the fast conversions of row_convert.h
      } else {
        load_row<true>(row, acc, dim);
      }
    }
    if (mode == kBagMax) {
      int64_t* a = r.arg_pos + b * r.out_stride;
      for (int64_t d = 0; d < dim; ++d) {
        o[d] = won[d] < 0 ? scalar_t(0) : static_cast<scalar_t>(acc[d]);
        a[d] = won[d];
      }
    } else if (count == 0) {
      std::fill(o, o + dim, scalar_t(0));
    } else if (mode == kBagMean) {
      // A division, as PyTorch and the register blocks (the same bits as ee.embedding_bag).
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(acc[d] / static_cast<acc_t>(count));
    } else {
      store_row(acc, acc_t(1), o, dim);
    }
  }
}

template <typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_PORTABLE void pool_feature_bags_portable(
    const FeatureBags<scalar_t, index_t>& r, int64_t b0, int64_t b1, std::atomic<int64_t>& bad) {
  pool_feature_bags(r, b0, b1, bad);
}

#if defined(__x86_64__)
template <typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX2 void pool_feature_bags_avx2(
    const FeatureBags<scalar_t, index_t>& r, int64_t b0, int64_t b1, std::atomic<int64_t>& bad) {
  pool_feature_bags(r, b0, b1, bad);
}

template <typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX512 void pool_feature_bags_avx512(
    const FeatureBags<scalar_t, index_t>& r, int64_t b0, int64_t b1, std::atomic<int64_t>& bad) {
  pool_feature_bags(r, b0, b1, bad);
}
#endif

// The first position of 'values' whose id is outside its feature's table (n if none).
template <typename index_t>
int64_t first_bad_position(const Layout& L, const index_t* idx, const int64_t* off) {
  for (int64_t f = 0; f < L.features; ++f) {
    const uint64_t rows = static_cast<uint64_t>(L.rows[L.table_of[f]]);
    for (int64_t i = off[f * L.batch]; i < off[(f + 1) * L.batch]; ++i) {
      if (static_cast<uint64_t>(static_cast<int64_t>(idx[i])) >= rows) return i;
    }
  }
  return L.n;
}

// Work item fb = f * batch + b, the order of 'offsets' (feature-major, as FBGEMM's TBE): a
// task takes a run of bags of one feature, or the end of one and the start of the next, so
// each feature's table, dim and mode are read once per run, the run's ids are one stretch of
// 'values' (prefetched ahead across its bags), and the tight loops are the single-table
// kernel's. (Bag-major items looked every feature's description up again for each bag:
// 2.4x slower than FBGEMM's TBE at Criteo's one id per bag.)
template <typename scalar_t, typename index_t>
void pool_all(const Layout& L, const std::vector<const scalar_t*>& weights, const scalar_t* psw,
              scalar_t* out, int64_t* arg_pos, const char* op) {
  const index_t* idx = L.values.const_data_ptr<index_t>();
  const int64_t* off = L.offsets.const_data_ptr<int64_t>();
  const int64_t bags = L.features * L.batch;
  std::atomic<int64_t> first_bad{L.n};
  std::atomic<bool> skipped{false};  // the register blocks skip a bad id and say so
  auto generic = &pool_feature_bags_portable<scalar_t, index_t>;
#if defined(__x86_64__)
  if (cpu_isa() == kAvx512) generic = &pool_feature_bags_avx512<scalar_t, index_t>;
  if (cpu_isa() == kAvx2) generic = &pool_feature_bags_avx2<scalar_t, index_t>;
#endif
  // A bag's work is about its ids times its row bytes; size tasks from the average.
  const int64_t ids_per_bag = bags > 0 ? std::max<int64_t>(1, L.n / bags) : 1;
  const int64_t avg_dim = L.features > 0 ? std::max<int64_t>(1, L.total_dim / L.features) : 1;
  const int64_t grain = grain_for(ids_per_bag * avg_dim * static_cast<int64_t>(sizeof(scalar_t)));
  const auto pool_run = [&](int64_t f, int64_t b0, int64_t b1) {
    const int64_t t = L.table_of[f], dim = L.dims[t], mode = L.mode[t];
    const int64_t* feature_off = off + f * L.batch;
    scalar_t* feature_out = out + L.col_of[f];
    const uint64_t rows = static_cast<uint64_t>(L.rows[t]);
    if (dim >= 16 && mode != kBagMax) {
      const PoolArgs<scalar_t, index_t> args{weights[t], dim, idx, feature_off, dim, mode, psw,
                                              L.pad[t], feature_out, nullptr, rows,
                                              /*out_stride=*/L.total_dim};
      if (pool_register_blocks_any<false>(args, b0, b1)) skipped = true;
    } else {
      const FeatureBags<scalar_t, index_t> run{
          weights[t], idx, feature_off, psw, feature_out,
          arg_pos == nullptr ? nullptr : arg_pos + L.col_of[f], L.total_dim, dim, mode,
          L.pad[t], rows, dim};
      generic(run, b0, b1, first_bad);
    }
  };
  at::parallel_for(0, bags, grain, [&](int64_t begin, int64_t end) {
    for (int64_t fb = begin; fb < end;) {
      const int64_t f = fb / L.batch, b0 = fb - f * L.batch;
      const int64_t b1 = std::min(L.batch, b0 + (end - fb));
      pool_run(f, b0, b1);
      fb += b1 - b0;
    }
  });
  const int64_t bad = skipped ? std::min(first_bad.load(), first_bad_position(L, idx, off))
                              : first_bad.load();
  if (bad < L.n) throw_collection_index_error(L, static_cast<int64_t>(idx[bad]), bad, op);
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_collection_forward_cpu(
    at::TensorList weights, const at::Tensor& values, const at::Tensor& offsets,
    at::IntArrayRef feature_table, at::IntArrayRef modes, at::IntArrayRef padding_idx,
    const c10::optional<at::Tensor>& per_sample_weights, c10::SymInt batch_size) {
  const char* op = "embedding_bag_collection_forward";
  const CollectionTables T = collection_tables(weights, values, per_sample_weights, op);
  const std::vector<at::Tensor>& tables = T.tables;
  const auto dtype = weights[0].scalar_type();
  Layout L = make_layout(T.rows, T.dims, values, offsets, feature_table, modes, padding_idx,
                         per_sample_weights, batch_size.expect_int(), op);
  // From the cache of freed large outputs: a fresh (B, sum D) block page-faulted on every
  // call (output_allocator.h).
  at::Tensor out = empty_output({L.batch, L.total_dim}, weights[0].options());
  const auto long_options = values.options().dtype(at::kLong);
  // -1 in the columns of sum/mean features too: every element of every output is written.
  at::Tensor arg_pos = L.any_max ? at::full({L.batch, L.total_dim}, -1, long_options)
                                 : at::empty({0}, long_options);
  at::Tensor psw = per_sample_weights.has_value() ? per_sample_weights->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "embedding_bag_collection",
                                  [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& w : tables) ptrs.push_back(w.const_data_ptr<scalar_t>());
    const scalar_t* p = psw.defined() ? psw.const_data_ptr<scalar_t>() : nullptr;
    int64_t* a = L.any_max ? arg_pos.data_ptr<int64_t>() : nullptr;
    AT_DISPATCH_INDEX_TYPES(L.values.scalar_type(), "embedding_bag_collection", [&] {
      pool_all<scalar_t, index_t>(L, ptrs, p, out.data_ptr<scalar_t>(), a, op);
    });
  });
  return {out, arg_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_bag_collection_forward", &embedding_bag_collection_forward_cpu);
}

}  // namespace cpu
}  // namespace embedding_ext
