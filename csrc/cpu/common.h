// Pieces every CPU op family shares: work splitting, prefetching, the index range check,
// per-row counts and the sort of lookups by row. All of it is deterministic: work is split
// by output row or by lookup position, never by atomics on values.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../checks.h"

namespace embedding_ext::cpu {

// Chunks of parallel work should move at least this many bytes, so that thread start-up
// and scheduling stay small next to the copy itself.
constexpr int64_t kMinBytesPerTask = 32 * 1024;
// Rows ahead to prefetch while gathering: enough to cover DRAM latency for random rows.
constexpr int64_t kPrefetchDistance = 8;

inline int64_t grain_for(int64_t bytes_per_item) {
  return std::max<int64_t>(1, kMinBytesPerTask / std::max<int64_t>(1, bytes_per_item));
}

// Prefetches the first cache lines of a row (the hardware prefetcher follows the rest).
inline void prefetch_row(const void* row, size_t row_bytes) {
  const char* p = static_cast<const char*>(row);
  for (size_t off = 0; off < std::min<size_t>(row_bytes, 256); off += 64) __builtin_prefetch(p + off);
}

// Keeps the smallest bad position seen by any thread, so the error names the first one.
inline void record_bad(std::atomic<int64_t>& first_bad, int64_t pos) {
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

// occurrences[k] = number of positions i with idx[i] == k, padding positions excluded
// (the divisor of scale_grad_by_freq). The ids must already be range-checked.
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
// would touch a V-sized array at random (bench/NOTES-cpu.md).
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

// Where each distinct row's run starts in sorted.rows, then sorted.rows.size(): segment s
// is [heads[s], heads[s + 1]).
inline std::vector<int64_t> segment_heads(const SortedLookups& sorted) {
  const int64_t m = static_cast<int64_t>(sorted.rows.size());
  std::vector<int64_t> heads;
  for (int64_t j = 0; j < m; ++j) {
    if (j == 0 || sorted.rows[j] != sorted.rows[j - 1]) heads.push_back(j);
  }
  heads.push_back(m);
  return heads;
}

}  // namespace embedding_ext::cpu
