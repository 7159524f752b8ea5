// CPU kernels. All of them are deterministic: work is split by output row or by lookup
// position, never by atomics, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "output_allocator.h"
#include "row_convert.h"

namespace embedding_ext {
namespace {

// Chunks of parallel work should move at least this many bytes, so that thread start-up
// and scheduling stay small next to the copy itself.
constexpr int64_t kMinBytesPerTask = 32 * 1024;
// Rows ahead to prefetch while gathering: enough to cover DRAM latency for random rows.
constexpr int64_t kPrefetchDistance = 8;

// Prefetches the first cache lines of a row (the hardware prefetcher follows the rest).
inline void prefetch_row(const void* row, size_t row_bytes) {
  const char* p = static_cast<const char*>(row);
  for (size_t off = 0; off < std::min<size_t>(row_bytes, 256); off += 64) __builtin_prefetch(p + off);
}

// EMBEDDING_EXT_CPU_SORTED_BACKWARD=1 sends fp32/fp64 through the sorted path too (the
// tests use it to check that both paths agree bit for bit).
bool force_sorted_backward() {
  const char* v = std::getenv("EMBEDDING_EXT_CPU_SORTED_BACKWARD");
  return v != nullptr && v[0] == '1';
}

int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, bytes_per_item));
}

// Records the smallest bad position seen by any thread.
void record_bad(std::atomic<int64_t>& first_bad, int64_t pos) {
  int64_t cur = first_bad.load(std::memory_order_relaxed);
  while (pos < cur && !first_bad.compare_exchange_weak(cur, pos)) {
  }
}

// Raises the index error for the first out-of-range entry, if any. One read of the ids is
// cheap next to any kernel that touches D elements per id.
template <typename index_t>
void check_index_range(const index_t* idx, int64_t n, int64_t num_rows, const char* op) {
  std::atomic<int64_t> first_bad{n};
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = idx[i];
      if (k < 0 || k >= num_rows) {
        record_bad(first_bad, i);
        return;
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < n) throw_index_error(static_cast<int64_t>(idx[bad]), bad, num_rows, op);
}

// ---------------------------------------------------------------------------------------
// Forward: a dtype-agnostic row copy.

// kRowBytes > 0 fixes the row size at compile time, so each copy becomes a few vector moves
// instead of a memcpy call (which dominates for rows of 256 bytes and less).
template <int64_t kRowBytes, typename index_t>
void gather_rows_impl(const char* weight, int64_t row_stride_bytes, const index_t* idx, int64_t n,
                      int64_t num_rows, char* out, int64_t row_bytes_dynamic,
                      std::atomic<int64_t>& first_bad) {
  const int64_t row_bytes = kRowBytes > 0 ? kRowBytes : row_bytes_dynamic;
  at::parallel_for(0, n, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = idx[i];
      if (k < 0 || k >= num_rows) {
        record_bad(first_bad, i);
        return;
      }
      if (i + kPrefetchDistance < end) {
        // A prefetch of a bad address does not fault, so no range check is needed here.
        __builtin_prefetch(weight + static_cast<int64_t>(idx[i + kPrefetchDistance]) * row_stride_bytes);
      }
      std::memcpy(out + i * row_bytes, weight + k * row_stride_bytes, row_bytes);
    }
  });
}

template <typename index_t>
void gather_rows(const char* weight, int64_t row_stride_bytes, const index_t* idx, int64_t n,
                 int64_t num_rows, char* out, int64_t row_bytes, const char* op) {
  std::atomic<int64_t> first_bad{n};
  auto run = [&](auto fixed) {
    gather_rows_impl<decltype(fixed)::value, index_t>(weight, row_stride_bytes, idx, n, num_rows,
                                                      out, row_bytes, first_bad);
  };
  switch (row_bytes) {
    case 8: run(std::integral_constant<int64_t, 8>{}); break;
    case 16: run(std::integral_constant<int64_t, 16>{}); break;
    case 32: run(std::integral_constant<int64_t, 32>{}); break;
    case 64: run(std::integral_constant<int64_t, 64>{}); break;
    case 128: run(std::integral_constant<int64_t, 128>{}); break;
    case 256: run(std::integral_constant<int64_t, 256>{}); break;
    default: run(std::integral_constant<int64_t, 0>{}); break;
  }
  const int64_t bad = first_bad.load();
  if (bad < n) throw_index_error(static_cast<int64_t>(idx[bad]), bad, num_rows, op);
}

at::Tensor embedding_forward_cpu(const at::Tensor& weight_in, const at::Tensor& indices_in) {
  constexpr const char* op = "embedding_forward";
  check_lookup_args(weight_in, indices_in, op);
  const at::Tensor weight = rows_unit_stride(weight_in);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t num_rows = weight.size(0), dim = weight.size(1), n = indices.numel();
  at::Tensor out = cpu::empty_output(lookup_shape(indices, dim), weight.options());
  const int64_t elem = weight.element_size();
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_forward_cpu", [&] {
    gather_rows<index_t>(static_cast<const char*>(weight.const_data_ptr()),
                         weight.stride(0) * elem, indices.const_data_ptr<index_t>(), n, num_rows,
                         static_cast<char*>(out.mutable_data_ptr()), dim * elem, op);
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Row counts, shared by the backward kernels.

// occurrences[k] = number of positions i with idx[i] == k (padding positions excluded).
template <typename index_t>
std::vector<int64_t> count_rows(const index_t* idx, int64_t n, int64_t num_rows,
                                int64_t padding_idx) {
  std::vector<int64_t> occurrences(num_rows, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    if (k != padding_idx) ++occurrences[k];
  }
  return occurrences;
}

// Non-padding positions sorted by row, positions ascending within a row: a stable LSD
// radix sort on the row id. It touches O(N) memory only; a counting sort over the table
// would touch a V-sized array at random (~10 ms for V = 1e6 on this machine).
struct SortedLookups {
  std::vector<int64_t> rows;       // ascending
  std::vector<int64_t> positions;  // ascending within equal rows
};

template <typename index_t>
SortedLookups sort_by_row(const index_t* idx, int64_t n, int64_t num_rows, int64_t padding_idx) {
  constexpr int kBits = 11;
  constexpr int64_t kBuckets = int64_t(1) << kBits;
  SortedLookups out;
  out.rows.reserve(n);
  out.positions.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = idx[i];
    if (k != padding_idx) {
      out.rows.push_back(k);
      out.positions.push_back(i);
    }
  }
  const int64_t m = static_cast<int64_t>(out.rows.size());
  std::vector<int64_t> rows_tmp(m), pos_tmp(m), offsets(kBuckets);
  for (int shift = 0; num_rows > 1 && (int64_t(1) << shift) < num_rows; shift += kBits) {
    std::fill(offsets.begin(), offsets.end(), 0);
    for (int64_t j = 0; j < m; ++j) ++offsets[(out.rows[j] >> shift) & (kBuckets - 1)];
    int64_t running = 0;
    for (auto& o : offsets) {
      const int64_t c = o;
      o = running;
      running += c;
    }
    for (int64_t j = 0; j < m; ++j) {
      const int64_t slot = offsets[(out.rows[j] >> shift) & (kBuckets - 1)]++;
      rows_tmp[slot] = out.rows[j];
      pos_tmp[slot] = out.positions[j];
    }
    out.rows.swap(rows_tmp);
    out.positions.swap(pos_tmp);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Dense backward: every output row is owned by one thread, which zero-fills it or sums
// its positions in ascending order in the accumulation type (fp32 for fp16/bf16), so the
// zero-fill and the accumulation are one pass and the result is deterministic.

template <typename scalar_t, typename index_t>
void dense_backward_rows(const scalar_t* grad, const index_t* idx, int64_t n, int64_t num_rows,
                         int64_t dim, int64_t padding_idx, bool scale_grad_by_freq,
                         scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const SortedLookups sorted = sort_by_row(idx, n, num_rows, padding_idx);
  const int64_t* rows = sorted.rows.data();
  const int64_t m = static_cast<int64_t>(sorted.rows.size());
  const size_t row_bytes = dim * sizeof(scalar_t);
  at::parallel_for(0, num_rows, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    int64_t j = std::lower_bound(rows, rows + m, begin) - rows;
    int64_t k = begin;
    while (k < end) {
      const int64_t next = j < m ? std::min(rows[j], end) : end;
      // Untouched rows up to the next looked-up one: one memset for the whole run.
      std::memset(out + k * dim, 0, (next - k) * row_bytes);
      if (next == end) break;
      int64_t e = j + 1;
      while (e < m && rows[e] == next) ++e;
      // Sorted by row, the grad_output rows are read in random order: prefetch the ones a
      // few lookups ahead so that DRAM latency overlaps the additions.
      for (int64_t s = j; s < e; ++s) {
        if (s + kPrefetchDistance < m) prefetch_row(grad + sorted.positions[s + kPrefetchDistance] * dim, row_bytes);
        if (s == j) cpu::load_row<false>(grad + sorted.positions[s] * dim, acc.data(), dim);
        else cpu::load_row<true>(grad + sorted.positions[s] * dim, acc.data(), dim);
      }
      const acc_t scale = scale_grad_by_freq ? acc_t(1) / static_cast<acc_t>(e - j) : acc_t(1);
      cpu::store_row(acc.data(), scale, out + next * dim, dim);
      k = next + 1;
      j = e;
    }
  });
}

// Dense backward for fp32/fp64, no sort: each thread owns a range of output rows, zeroes
// it, then scans every id in position order and adds the grad_output rows that land in its
// range. grad_output is read in order (prefetcher-friendly), each thread re-reads only the
// ids (N * 4 or 8 bytes), and every row is still summed in ascending position order, so
// the result is bitwise the same as dense_backward_rows and independent of thread count.
template <typename scalar_t, typename index_t>
void dense_backward_scatter(const scalar_t* grad, const index_t* idx, int64_t n, int64_t num_rows,
                            int64_t dim, int64_t padding_idx, bool scale_grad_by_freq,
                            scalar_t* out) {
  const size_t row_bytes = dim * sizeof(scalar_t);
  at::parallel_for(0, num_rows, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    std::memset(out + begin * dim, 0, (end - begin) * row_bytes);
    std::vector<int32_t> counts(scale_grad_by_freq ? end - begin : 0, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kPrefetchDistance < n) {  // the output rows are updated in random order
        const int64_t ahead = idx[i + kPrefetchDistance];
        if (ahead >= begin && ahead < end) prefetch_row(out + ahead * dim, row_bytes);
      }
      const int64_t k = idx[i];
      if (k < begin || k >= end || k == padding_idx) continue;
      scalar_t* dst = out + k * dim;
      const scalar_t* g = grad + i * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += g[d];
      if (scale_grad_by_freq) ++counts[k - begin];
    }
    for (int64_t r = 0; r < static_cast<int64_t>(counts.size()); ++r) {
      if (counts[r] > 1) {
        const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(counts[r]);
        scalar_t* dst = out + (begin + r) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] *= inv;
      }
    }
  });
}

at::Tensor embedding_dense_backward_cpu(const at::Tensor& grad_in, const at::Tensor& indices_in,
                                        c10::SymInt num_weights_sym, int64_t padding_idx,
                                        bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_dense_backward";
  check_indices_dtype(indices_in, op);
  check_same_device(grad_in, "grad_output", indices_in, "indices", op);
  check_grad_shape(grad_in, indices_in, op);
  const int64_t num_rows = num_weights_sym.expect_int();
  TORCH_CHECK(num_rows >= 0, op, ": 'num_weights' must be >= 0, got ", num_rows);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t dim = grad.size(-1), n = indices.numel();
  at::Tensor out = cpu::empty_output({num_rows, dim}, grad.options());
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_dense_backward_cpu", [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      // Full-precision types add straight into the output; fp16/bf16 need an fp32
      // accumulator per row, which the sorted path keeps in registers/L1.
      constexpr bool full_precision = std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;
      if (full_precision && !force_sorted_backward()) {
        dense_backward_scatter<scalar_t, index_t>(grad.const_data_ptr<scalar_t>(), idx, n, num_rows,
                                                  dim, padding_idx, scale_grad_by_freq,
                                                  out.mutable_data_ptr<scalar_t>());
      } else {
        dense_backward_rows<scalar_t, index_t>(grad.const_data_ptr<scalar_t>(), idx, n, num_rows,
                                               dim, padding_idx, scale_grad_by_freq,
                                               out.mutable_data_ptr<scalar_t>());
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Scaled gather (the double backward): out[i] = weight[idx[i]] / count, 0 at padding.

template <typename scalar_t, typename index_t>
void scaled_gather_rows(const scalar_t* weight, int64_t row_stride, const index_t* idx, int64_t n,
                        int64_t num_rows, int64_t dim, int64_t padding_idx,
                        bool scale_grad_by_freq, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> occurrences;
  if (scale_grad_by_freq) occurrences = count_rows(idx, n, num_rows, padding_idx);
  at::parallel_for(0, n, grain_for(dim * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = idx[i];
      scalar_t* dst = out + i * dim;
      if (k == padding_idx) {
        std::memset(dst, 0, dim * sizeof(scalar_t));
        continue;
      }
      const scalar_t* src = weight + k * row_stride;
      if (!scale_grad_by_freq) {
        std::memcpy(dst, src, dim * sizeof(scalar_t));
        continue;
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(occurrences[k]);
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * inv);
    }
  });
}

at::Tensor embedding_scaled_gather_cpu(const at::Tensor& weight_in, const at::Tensor& indices_in,
                                       int64_t padding_idx, bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_scaled_gather";
  check_lookup_args(weight_in, indices_in, op);
  const at::Tensor weight = rows_unit_stride(weight_in);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t num_rows = weight.size(0), dim = weight.size(1), n = indices.numel();
  at::Tensor out = cpu::empty_output(lookup_shape(indices, dim), weight.options());
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_scaled_gather_cpu", [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      scaled_gather_rows<scalar_t, index_t>(weight.const_data_ptr<scalar_t>(), weight.stride(0),
                                            idx, n, num_rows, dim, padding_idx, scale_grad_by_freq,
                                            out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// Sparse backward: (row indices, values) in position order, padding positions removed.

template <typename scalar_t, typename index_t>
void sparse_backward_rows(const scalar_t* grad, const index_t* idx, int64_t n, int64_t num_rows,
                          int64_t dim, int64_t padding_idx, bool scale_grad_by_freq,
                          int64_t* rows_out, scalar_t* values) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> occurrences;
  if (scale_grad_by_freq) occurrences = count_rows(idx, n, num_rows, padding_idx);
  // source[j] = the position whose gradient becomes the j-th value.
  std::vector<int64_t> source;
  source.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<int64_t>(idx[i]) != padding_idx) {
      rows_out[source.size()] = idx[i];
      source.push_back(i);
    }
  }
  const int64_t nnz = static_cast<int64_t>(source.size());
  at::parallel_for(0, nnz, grain_for(dim * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const scalar_t* src = grad + source[j] * dim;
      scalar_t* dst = values + j * dim;
      if (!scale_grad_by_freq) {
        std::memcpy(dst, src, dim * sizeof(scalar_t));
        continue;
      }
      const acc_t inv = acc_t(1) / static_cast<acc_t>(occurrences[rows_out[j]]);
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * inv);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> embedding_sparse_backward_cpu(const at::Tensor& grad_in,
                                                                 const at::Tensor& indices_in,
                                                                 c10::SymInt num_weights_sym,
                                                                 int64_t padding_idx,
                                                                 bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_sparse_backward";
  check_indices_dtype(indices_in, op);
  check_same_device(grad_in, "grad_output", indices_in, "indices", op);
  check_grad_shape(grad_in, indices_in, op);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t num_rows = num_weights_sym.expect_int();
  const int64_t dim = grad.size(-1), n = indices.numel();
  int64_t nnz = n;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_sparse_count_cpu", [&] {
    if (padding_idx >= 0) {
      const index_t* idx = indices.const_data_ptr<index_t>();
      nnz = n - std::count(idx, idx + n, static_cast<index_t>(padding_idx));
    }
  });
  at::Tensor rows = at::empty({1, nnz}, indices.options().dtype(at::kLong));
  at::Tensor values = cpu::empty_output({nnz, dim}, grad.options());
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_sparse_backward_cpu", [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      sparse_backward_rows<scalar_t, index_t>(grad.const_data_ptr<scalar_t>(), idx, n,
                                              num_rows, dim, padding_idx, scale_grad_by_freq,
                                              rows.mutable_data_ptr<int64_t>(),
                                              values.mutable_data_ptr<scalar_t>());
    });
  });
  return {rows, values};
}

// ---------------------------------------------------------------------------------------
// max_norm renorm, in place on the distinct referenced rows.

// Sums f(row[d]) with 8 independent partial sums: a single running sum is one dependent
// add per element (~4 cycles each), which made max_norm 3x slower than the lookup itself.
template <typename acc_t, typename scalar_t, typename F>
acc_t strided_sum(const scalar_t* row, int64_t stride, int64_t dim, F f) {
  acc_t part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    for (int u = 0; u < 8; ++u) part[u] += f(static_cast<acc_t>(row[(d + u) * stride]));
  }
  for (; d < dim; ++d) part[0] += f(static_cast<acc_t>(row[d * stride]));
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename acc_t, typename scalar_t>
acc_t row_norm(const scalar_t* row, int64_t stride, int64_t dim, double p) {
  if (std::isinf(p)) {
    acc_t total = 0;
    for (int64_t d = 0; d < dim; ++d) total = std::max(total, std::abs(static_cast<acc_t>(row[d * stride])));
    return total;
  }
  if (p == 1.0) return strided_sum<acc_t>(row, stride, dim, [](acc_t x) { return std::abs(x); });
  if (p == 2.0) return std::sqrt(strided_sum<acc_t>(row, stride, dim, [](acc_t x) { return x * x; }));
  const acc_t pp = static_cast<acc_t>(p);
  const acc_t total = strided_sum<acc_t>(row, stride, dim, [pp](acc_t x) { return std::pow(std::abs(x), pp); });
  return std::pow(total, acc_t(1) / pp);
}

template <typename scalar_t>
void renorm_rows(scalar_t* weight, int64_t row_stride, int64_t col_stride, int64_t dim,
                 const std::vector<int64_t>& rows, double max_norm, double norm_type) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, static_cast<int64_t>(rows.size()), grain_for(dim * sizeof(scalar_t)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      scalar_t* row = weight + rows[j] * row_stride;
      const double norm = static_cast<double>(row_norm<acc_t>(row, col_stride, dim, norm_type));
      if (norm > max_norm) {
        const acc_t scale = static_cast<acc_t>(max_norm / (norm + 1e-7));
        for (int64_t d = 0; d < dim; ++d) {
          row[d * col_stride] = static_cast<scalar_t>(static_cast<acc_t>(row[d * col_stride]) * scale);
        }
      }
    }
  });
}

void embedding_renorm_cpu(const at::Tensor& weight, const at::Tensor& indices_in, double max_norm,
                          double norm_type) {
  constexpr const char* op = "embedding_renorm_";
  check_lookup_args(weight, indices_in, op);
  check_renorm_args(max_norm, norm_type, op);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t num_rows = weight.size(0), n = indices.numel();
  std::vector<int64_t> rows;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_renorm_cpu", [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    check_index_range(idx, n, num_rows, op);
    rows = sort_by_row(idx, n, num_rows, /*padding_idx=*/-1).rows;  // O(N) radix sort
  });
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
    renorm_rows<scalar_t>(weight.mutable_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
                          weight.size(1), rows, max_norm, norm_type);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_forward", &embedding_forward_cpu);
  m.impl("embedding_dense_backward", &embedding_dense_backward_cpu);
  m.impl("embedding_scaled_gather", &embedding_scaled_gather_cpu);
  m.impl("embedding_sparse_backward", &embedding_sparse_backward_cpu);
  m.impl("embedding_renorm_", &embedding_renorm_cpu);
}

}  // namespace embedding_ext
