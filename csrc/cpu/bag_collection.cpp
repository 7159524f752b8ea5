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
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "bag_collection.h"
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
  Layout L;
  L.tables = static_cast<int64_t>(rows.size());
  L.features = static_cast<int64_t>(feature_table.size());
  L.batch = batch;
  TORCH_CHECK(batch >= 0, op, ": 'batch_size' must be >= 0, got ", batch);
  TORCH_CHECK(static_cast<int64_t>(modes.size()) == L.tables, op,
              ": 'modes' must have one entry per table (", L.tables, "), got ", modes.size());
  TORCH_CHECK(static_cast<int64_t>(padding_idx.size()) == L.tables, op,
              ": 'padding_idx' must have one entry per table (", L.tables, "), got ",
              padding_idx.size());
  L.rows = rows;
  L.dims = dims;
  L.features_of.resize(L.tables);
  for (int64_t t = 0; t < L.tables; ++t) {
    check_bag_mode(modes[t], op);
    TORCH_CHECK(padding_idx[t] < rows[t], op, ": 'padding_idx[", t, "]' must be < the table's ",
                rows[t], " rows or negative for none, got ", padding_idx[t]);
    L.mode.push_back(modes[t]);
    L.pad.push_back(padding_idx[t]);
    L.any_max = L.any_max || modes[t] == kBagMax;
    L.max_dim = std::max(L.max_dim, dims[t]);
  }
  for (int64_t f = 0; f < L.features; ++f) {
    const int64_t t = feature_table[f];
    TORCH_CHECK(t >= 0 && t < L.tables, op, ": 'feature_table[", f, "]' must name one of the ",
                L.tables, " tables, got ", t);
    TORCH_CHECK(!psw.has_value() || modes[t] == kBagSum, op, ": 'per_sample_weights' needs sum "
                "mode (0), but feature ", f, " pools table ", t, " in mode ", modes[t]);
    L.table_of.push_back(t);
    L.col_of.push_back(L.total_dim);
    L.total_dim += dims[t];
    L.features_of[t].push_back(f);
  }
  check_indices_dtype(values, op);
  TORCH_CHECK(values.dim() == 1, op, ": 'values' must be 1-D, got shape ", values.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, op,
              ": 'offsets' must be an int64 or int32 tensor, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == L.features * batch + 1, op,
              ": 'offsets' must be 1-D with features * batch_size + 1 = ", L.features, " * ", batch,
              " + 1 = ", L.features * batch + 1, " entries, got shape ", offsets.sizes());
  check_same_device(offsets, "offsets", values, "values", op);
  L.n = values.size(0);
  if (psw.has_value()) {
    TORCH_CHECK(psw->dim() == 1 && psw->size(0) == L.n, op,
                ": 'per_sample_weights' must have the shape of 'values' ", values.sizes(),
                ", got ", psw->sizes());
    check_same_device(*psw, "per_sample_weights", values, "values", op);
  }
  L.values = values.contiguous();
  L.offsets = offsets.to(at::kLong).contiguous();
  check_bag_offsets(L.offsets.const_data_ptr<int64_t>(), L.features * batch + 1, L.n, op);
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

// Prefetching: about kAhead rows ahead of the pooling, as the single-table kernel. Within a
// bag, the row kAhead ids ahead; across bags (Criteo-like batches have one id per bag, so
// prefetching only within a bag would never fire), the first kAhead rows of the bag
// `ahead_bags` work items ahead, that distance set from the average bag so that it too is
// about kAhead rows.
constexpr int64_t kAhead = 16;

template <typename scalar_t, typename index_t>
struct PoolTask {
  const Layout& L;
  const std::vector<const scalar_t*>& weights;
  const index_t* idx;
  const int64_t* off;
  const scalar_t* psw;
  scalar_t* out;
  int64_t* arg_pos;
  std::atomic<int64_t>* first_bad;
  int64_t ahead_bags;
};

// One fp32 sum/mean bag whose row width is known at compile time: the accumulators stay in
// registers for the whole bag (with a run-time width they went back to memory after every
// row). The same operations in the same order as the general loop below, so the same bits.
template <int kDim, typename index_t>
__attribute__((always_inline)) inline void sum_bag_fixed(const float* w, const index_t* idx,
                                                         int64_t s, int64_t e, uint64_t num_rows,
                                                         int64_t pad, bool mean, float* o,
                                                         std::atomic<int64_t>& first_bad) {
  float acc[kDim] = {};  // every lane is set by the first row; the zeros quiet -Wuninitialized
  int64_t count = 0;
  for (int64_t i = s; i < e; ++i) {
    if (i + kAhead < e) {
      const uint64_t next = static_cast<uint64_t>(static_cast<int64_t>(idx[i + kAhead]));
      if (next < num_rows) prefetch_row(w + next * kDim, kDim * sizeof(float));
    }
    const int64_t k = static_cast<int64_t>(idx[i]);
    if (static_cast<uint64_t>(k) >= num_rows) {
      record_bad(first_bad, i);
      break;
    }
    if (k == pad) continue;
    const float* __restrict row = w + k * kDim;
    if (++count == 1) {
      for (int d = 0; d < kDim; ++d) acc[d] = row[d];
    } else {
      for (int d = 0; d < kDim; ++d) acc[d] += row[d];
    }
  }
  if (count == 0) {
    for (int d = 0; d < kDim; ++d) o[d] = 0.f;
    return;
  }
  const float scale = mean ? 1.f / static_cast<float>(count) : 1.f;
  for (int d = 0; d < kDim; ++d) o[d] = acc[d] * scale;
}

// Work items [begin, end) of the flattened (bag, feature) range. Always inlined into one copy
// per instruction set (isa.h), so the row loops below compile to AVX2 / AVX-512 there.
template <typename scalar_t, typename index_t>
__attribute__((always_inline)) inline void pool_bags(const PoolTask<scalar_t, index_t>& c,
                                                     int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Layout& L = c.L;
  std::vector<acc_t> acc_buffer(L.max_dim);
  std::vector<int64_t> won(L.max_dim);
  acc_t* __restrict acc = acc_buffer.data();
  const int64_t features = L.features;
  auto prefetch = [&](int64_t t, int64_t pos) {
    const uint64_t k = static_cast<uint64_t>(static_cast<int64_t>(c.idx[pos]));
    if (k < static_cast<uint64_t>(L.rows[t])) {
      prefetch_row(c.weights[t] + k * L.dims[t], L.dims[t] * sizeof(scalar_t));
    }
  };
  // Work item = b * features + f: bag-major, so that the output is written row after row
  // (feature-major order wrote a 256-byte slice into every row of a large output per
  // feature: a TLB and cache miss per bag). Features and bags are counted, not divided.
  int64_t b = begin / features, f = begin - b * features;
  int64_t ahead_b = b, ahead_f = f;  // the item c.ahead_bags ahead of (b, f)
  for (int64_t j = 0; j < c.ahead_bags; ++j) {
    if (++ahead_f == features) {
      ahead_f = 0;
      ++ahead_b;
    }
  }
  auto next_item = [&]() {
    if (++f == features) {
      f = 0;
      ++b;
    }
  };
  for (int64_t item = begin; item < end; ++item) {
    if (item + c.ahead_bags < end) {
      const int64_t bag = ahead_f * L.batch + ahead_b;
      const int64_t ps = c.off[bag], pe = std::min(c.off[bag + 1], ps + kAhead);
      for (int64_t i = ps; i < pe; ++i) prefetch(L.table_of[ahead_f], i);
    }
    if (++ahead_f == features) {
      ahead_f = 0;
      ++ahead_b;
    }
    const int64_t fb = f * L.batch + b;
    const int64_t t = L.table_of[f];
    const int64_t dim = L.dims[t], pad = L.pad[t], mode = L.mode[t];
    const uint64_t num_rows = static_cast<uint64_t>(L.rows[t]);
    const scalar_t* w = c.weights[t];
    scalar_t* o = c.out + b * L.total_dim + L.col_of[f];
    const int64_t s = c.off[fb], e = c.off[fb + 1];
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (mode != kBagMax && c.psw == nullptr && (dim == 16 || dim == 64 || dim == 128)) {
        const bool mean = mode == kBagMean;
        if (dim == 16) {
          sum_bag_fixed<16>(w, c.idx, s, e, num_rows, pad, mean, o, *c.first_bad);
        } else if (dim == 64) {
          sum_bag_fixed<64>(w, c.idx, s, e, num_rows, pad, mean, o, *c.first_bad);
        } else {
          sum_bag_fixed<128>(w, c.idx, s, e, num_rows, pad, mean, o, *c.first_bad);
        }
        next_item();
        continue;
      }
    }
    int64_t count = 0;
    if (mode == kBagMax) std::fill(won.begin(), won.begin() + dim, int64_t(-1));
    for (int64_t i = s; i < e; ++i) {
      if (i + kAhead < e) prefetch(t, i + kAhead);
      const int64_t k = static_cast<int64_t>(c.idx[i]);
      if (static_cast<uint64_t>(k) >= num_rows) {
        record_bad(*c.first_bad, i);
        break;
      }
      if (k == pad) continue;
      ++count;
      const scalar_t* __restrict row = w + k * dim;
      if (mode == kBagMax) {
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t v = static_cast<acc_t>(row[d]);
          if (won[d] < 0 || v > acc[d]) {
            acc[d] = v;
            won[d] = i;
          }
        }
      } else if (c.psw != nullptr) {
        // The first row initialises the accumulators (0 + x == x; only a -0.0 row keeps its
        // sign), which saves clearing them for every bag.
        const acc_t weight = static_cast<acc_t>(c.psw[i]);
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
      int64_t* a = c.arg_pos + b * L.total_dim + L.col_of[f];
      for (int64_t d = 0; d < dim; ++d) {
        o[d] = won[d] < 0 ? scalar_t(0) : static_cast<scalar_t>(acc[d]);
        a[d] = won[d];
      }
    } else if (count == 0) {
      std::fill(o, o + dim, scalar_t(0));
    } else {
      const acc_t scale = (mode == kBagMean && count > 0) ? acc_t(1) / acc_t(count) : acc_t(1);
      store_row(acc, scale, o, dim);
    }
    next_item();
  }
}

template <typename scalar_t, typename index_t>
void pool_bags_portable(const PoolTask<scalar_t, index_t>& c, int64_t begin, int64_t end) {
  pool_bags(c, begin, end);
}

#if defined(__x86_64__)
template <typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX2 void pool_bags_avx2(const PoolTask<scalar_t, index_t>& c,
                                              int64_t begin, int64_t end) {
  pool_bags(c, begin, end);
}

template <typename scalar_t, typename index_t>
EMBEDDING_EXT_TARGET_AVX512 void pool_bags_avx512(const PoolTask<scalar_t, index_t>& c,
                                                  int64_t begin, int64_t end) {
  pool_bags(c, begin, end);
}
#endif

template <typename scalar_t, typename index_t>
void pool_all(const Layout& L, const std::vector<const scalar_t*>& weights, const scalar_t* psw,
              scalar_t* out, int64_t* arg_pos, const char* op) {
  const index_t* idx = L.values.const_data_ptr<index_t>();
  const int64_t bags = L.features * L.batch;
  std::atomic<int64_t> first_bad{L.n};
  const int64_t ahead_bags = std::clamp<int64_t>(kAhead * bags / std::max<int64_t>(1, L.n), 1,
                                                 kAhead);
  const PoolTask<scalar_t, index_t> task{L, weights, idx, L.offsets.const_data_ptr<int64_t>(),
                                         psw, out, arg_pos, &first_bad, ahead_bags};
  auto run = &pool_bags_portable<scalar_t, index_t>;
#if defined(__x86_64__)
  if (cpu_isa() == kAvx512) run = &pool_bags_avx512<scalar_t, index_t>;
  if (cpu_isa() == kAvx2) run = &pool_bags_avx2<scalar_t, index_t>;
#endif
  // A bag's work is about its ids times its row bytes; size tasks from the average.
  const int64_t ids_per_bag = bags > 0 ? std::max<int64_t>(1, L.n / bags) : 1;
  const int64_t avg_dim = L.features > 0 ? std::max<int64_t>(1, L.total_dim / L.features) : 1;
  const int64_t grain = grain_for(ids_per_bag * avg_dim * static_cast<int64_t>(sizeof(scalar_t)));
  at::parallel_for(0, bags, grain, [&](int64_t begin, int64_t end) { run(task, begin, end); });
  const int64_t bad = first_bad.load();
  if (bad < L.n) throw_collection_index_error(L, static_cast<int64_t>(idx[bad]), bad, op);
}

std::tuple<at::Tensor, at::Tensor> embedding_bag_collection_forward_cpu(
    at::TensorList weights, const at::Tensor& values, const at::Tensor& offsets,
    at::IntArrayRef feature_table, at::IntArrayRef modes, at::IntArrayRef padding_idx,
    const c10::optional<at::Tensor>& per_sample_weights, c10::SymInt batch_size) {
  const char* op = "embedding_bag_collection_forward";
  TORCH_CHECK(!weights.empty(), op, ": 'weights' must hold at least one table");
  std::vector<int64_t> rows, dims;
  std::vector<at::Tensor> tables;
  const auto dtype = weights[0].scalar_type();
  for (size_t t = 0; t < weights.size(); ++t) {
    const at::Tensor& w = weights[t];
    TORCH_CHECK(w.dim() == 2, op, ": 'weights[", t, "]' must be 2-D, got shape ", w.sizes());
    TORCH_CHECK(w.scalar_type() == dtype, op, ": every table must have one dtype; 'weights[", t,
                "]' is ", w.scalar_type(), ", 'weights[0]' ", dtype);
    check_same_device(w, "weights", values, "values", op);
    rows.push_back(w.size(0));
    dims.push_back(w.size(1));
    tables.push_back(w.contiguous());
  }
  if (per_sample_weights.has_value()) {
    TORCH_CHECK(per_sample_weights->scalar_type() == dtype, op, ": 'per_sample_weights' must "
                "have the tables' dtype (", dtype, "), got ", per_sample_weights->scalar_type());
  }
  Layout L = make_layout(rows, dims, values, offsets, feature_table, modes, padding_idx,
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
