// CPU row gathers: the lookup itself (embedding_forward, any dtype: a row copy) and its
// scaled variant, the double backward (embedding_scaled_gather).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"
#include "output_allocator.h"

namespace embedding_ext::cpu {
namespace {

// Outputs of at least 4 MiB are written with non-temporal (streaming) stores: such an output
// does not stay in the caches anyway, and an ordinary store first reads each output line
// from memory (read for ownership), doubling the memory traffic of the writes of a gather
// that is bound by memory bandwidth. Smaller outputs stay in the cache for the op that reads
// them next. EMBEDDING_EXT_CPU_STREAM_MIN_MB overrides the threshold (read once; a negative value
// turns streaming off), for machines whose caches differ much from the ones measured.
int64_t stream_min_bytes() {
  static const int64_t bytes = [] {
    const char* mb = std::getenv("EMBEDDING_EXT_CPU_STREAM_MIN_MB");
    const int64_t value = mb ? std::atoll(mb) : 4;
    return value < 0 ? std::numeric_limits<int64_t>::max() : value << 20;
  }();
  return bytes;
}

// One row copied with 16-byte streaming stores (dst 16-byte aligned, bytes a multiple of 16).
inline void stream_row(char* dst, const char* src, int64_t bytes) {
#if defined(__x86_64__)
  for (int64_t off = 0; off < bytes; off += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + off),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + off)));
  }
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();  // the streaming stores are visible before the parallel region ends
#endif
}

// kRowBytes > 0 fixes the row size at compile time, so each copy becomes a few vector moves
// instead of a memcpy call (which dominates for rows of 256 bytes and less). kStream: write
// with streaming stores (see stream_min_bytes).
template <int64_t kRowBytes, bool kStream, typename index_t>
void gather_rows_impl(const char* weight, int64_t row_stride_bytes, const index_t* idx, int64_t n,
                      int64_t num_rows, char* out, int64_t row_bytes_dynamic,
                      std::atomic<int64_t>& first_bad) {
  const int64_t row_bytes = kRowBytes > 0 ? kRowBytes : row_bytes_dynamic;
  at::parallel_for(0, n, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = idx[i];
      if (k < 0 || k >= num_rows) {
        record_bad(first_bad, i);
        break;
      }
      if (i + kPrefetchDistance < end) {
        // A prefetch of a bad address does not fault, so no range check is needed here.
        __builtin_prefetch(weight + static_cast<int64_t>(idx[i + kPrefetchDistance]) * row_stride_bytes);
      }
      if (kStream) {
        stream_row(out + i * row_bytes, weight + k * row_stride_bytes, row_bytes);
      } else {
        std::memcpy(out + i * row_bytes, weight + k * row_stride_bytes, row_bytes);
      }
    }
    if (kStream) stream_fence();
  });
}

template <typename index_t>
void gather_rows(const char* weight, int64_t row_stride_bytes, const index_t* idx, int64_t n,
                 int64_t num_rows, char* out, int64_t row_bytes, const char* op) {
  std::atomic<int64_t> first_bad{n};
  const bool stream = n * row_bytes >= stream_min_bytes() && row_bytes % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 16 == 0;
  auto run = [&](auto fixed) {
    constexpr int64_t kRowBytes = decltype(fixed)::value;
    // Rows of a size with no fixed-size copy below (over 256 bytes) are never streamed: the
    // 16-byte streaming loop ran at a third to a half of memcpy's speed for them on uniform
    // ids (1M x 128 fp32, 262,144 ids: 31.8 vs 12.0 ms; gpt2's 3 KB rows, 4,096 ids: 0.54-0.97x
    // PyTorch streamed, 1.22-1.45x not), where for 256-byte rows streaming still pays (the
    // Zipf rec-table rows: 2.2-2.6x PyTorch streamed, 1.3-1.6x not).
    if (stream && kRowBytes > 0) {
      gather_rows_impl<kRowBytes, true, index_t>(weight, row_stride_bytes, idx, n, num_rows, out,
                                                 row_bytes, first_bad);
    } else {
      gather_rows_impl<kRowBytes, false, index_t>(weight, row_stride_bytes, idx, n, num_rows, out,
                                                  row_bytes, first_bad);
    }
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
  const LookupInputs in = lookup_inputs(weight_in, indices_in, op);
  at::Tensor out = empty_output(in.out_shape, in.weight.options());
  const int64_t elem = in.weight.element_size();
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    gather_rows<index_t>(static_cast<const char*>(in.weight.const_data_ptr()),
                         in.weight.stride(0) * elem, in.indices.const_data_ptr<index_t>(), in.n,
                         in.num_rows, static_cast<char*>(out.mutable_data_ptr()), in.dim * elem, op);
  });
  return out;
}

// out[i] = weight[idx[i]] / count, 0 at padding.
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
  const LookupInputs in = lookup_inputs(weight_in, indices_in, op);
  at::Tensor out = empty_output(in.out_shape, in.weight.options());
  AT_DISPATCH_INDEX_TYPES(in.indices.scalar_type(), op, [&] {
    const index_t* idx = in.indices.const_data_ptr<index_t>();
    check_index_range(idx, in.n, in.num_rows, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.weight.scalar_type(), op, [&] {
      scaled_gather_rows<scalar_t, index_t>(in.weight.const_data_ptr<scalar_t>(),
                                            in.weight.stride(0), idx, in.n, in.num_rows, in.dim,
                                            padding_idx, scale_grad_by_freq,
                                            out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CPU, m) {
  m.impl("embedding_forward", &embedding_forward_cpu);
  m.impl("embedding_scaled_gather", &embedding_scaled_gather_cpu);
}

}  // namespace embedding_ext::cpu
