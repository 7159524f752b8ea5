// CUDA kernels. Every launch: device guard, the current stream, a launch check, an early
// return on empty work, and no host synchronisation (except the sparse backward with a
// padding_idx, whose output size depends on the data, and opt-in synchronous index checks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <mutex>

#include "../checks.h"
#include "index_errors.h"

namespace embedding_ext {
namespace cuda {

// ---------------------------------------------------------------------------------------
// Index error record (see index_errors.h).

enum OpCode : int {
  kForward = 0,
  kDenseBackward,
  kScaledGather,
  kSparseBackward,
  kRenorm,
};

const char* op_name(int code) {
  switch (code) {
    case kForward: return "embedding_forward";
    case kDenseBackward: return "embedding_dense_backward";
    case kScaledGather: return "embedding_scaled_gather";
    case kSparseBackward: return "embedding_sparse_backward";
    case kRenorm: return "embedding_renorm_";
    default: return "embedding_ext";
  }
}

std::atomic<bool> g_synchronous_checks{false};
std::mutex g_record_mutex;
constexpr int kMaxDevices = 64;
int* g_claimed[kMaxDevices] = {};  // per device, guarded by g_record_mutex

// Pinned host memory that kernels write through unified virtual addressing (plain stores
// only: atomics on host memory are not reliable across PCIe).
IndexErrorRecord* host_record() {
  static IndexErrorRecord* record = [] {
    void* p = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&p, sizeof(IndexErrorRecord),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(p, 0, sizeof(IndexErrorRecord));
    return static_cast<IndexErrorRecord*>(p);
  }();
  return record;
}

// What a kernel needs to report a bad index: the record, and a flag in device memory whose
// atomicCAS elects the one thread that writes it.
struct ErrorSink {
  IndexErrorRecord* record;
  int* claimed;
  int device;
};

ErrorSink error_sink() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices, "embedding_ext: more than ", kMaxDevices, " CUDA devices");
  IndexErrorRecord* record = host_record();
  std::lock_guard<std::mutex> lock(g_record_mutex);
  if (g_claimed[device] == nullptr) {  // once per device, during the first call (warm-up)
    const int zero = 0;
    C10_CUDA_CHECK(cudaMalloc(&g_claimed[device], sizeof(int)));
    C10_CUDA_CHECK(cudaMemcpy(g_claimed[device], &zero, sizeof(int), cudaMemcpyHostToDevice));
  }
  return {record, g_claimed[device], device};
}

void raise_pending_index_error(bool synchronize) {
  if (synchronize) C10_CUDA_CHECK(cudaDeviceSynchronize());
  volatile IndexErrorRecord* seen = host_record();
  if (seen->state != 2) return;
  std::lock_guard<std::mutex> lock(g_record_mutex);
  if (seen->state != 2) return;
  const long long value = seen->value, position = seen->position, rows = seen->num_rows;
  const int op = seen->op, device = seen->device;
  seen->state = 0;
  // Re-arm the device's flag (the error path may synchronise).
  const int zero = 0;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  C10_CUDA_CHECK(cudaMemcpy(g_claimed[device], &zero, sizeof(int), cudaMemcpyHostToDevice));
  throw_index_error(value, position, rows, op_name(op),
                    synchronize ? "" : " (seen by an earlier asynchronous CUDA call)");
}

void set_synchronous_index_checks(bool enabled) { g_synchronous_checks.store(enabled); }
bool synchronous_index_checks() { return g_synchronous_checks.load(); }

__device__ __forceinline__ bool row_in_range(int64_t k, int64_t num_rows) {
  return k >= 0 && k < num_rows;
}

// Called by one thread per bad position; the first to claim the device's flag writes.
__device__ void report_bad_index(ErrorSink sink, int op, int64_t position, int64_t value,
                                 int64_t num_rows) {
  if (atomicCAS(sink.claimed, 0, 1) != 0) return;
  volatile IndexErrorRecord* record = sink.record;
  record->op = op;
  record->device = sink.device;
  record->position = position;
  record->value = value;
  record->num_rows = num_rows;
  __threadfence_system();  // the fields reach host memory before the state does
  record->state = 2;
}

namespace {

// Work shared by every op's host wrapper: surface earlier errors, guard the device.
struct LaunchScope {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  ErrorSink sink;  // looked up once per call, shared by the call's launches
  explicit LaunchScope(const at::Tensor& t)
      : guard(t.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {
    raise_pending_index_error(/*synchronize=*/false);
    sink = error_sink();
  }
  // After the launches: with synchronous checks on, wait and raise from this call.
  void finish() const {
    if (!synchronous_index_checks()) return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    raise_pending_index_error(/*synchronize=*/false);
  }
};

void check_cuda_pair(const at::Tensor& a, const char* a_name, const at::Tensor& indices,
                     const char* op) {
  TORCH_CHECK(a.is_cuda(), op, ": '", a_name, "' must be a CUDA tensor here, got ", a.device());
  check_same_device(a, a_name, indices, "indices", op);
}

constexpr int kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lanes that share one row: as many as the row has vectors, up to a warp, so that short
// rows put several rows in one warp.
int lanes_for(int64_t row_vecs) {
  int lanes = 1;
  while (lanes < 32 && lanes < row_vecs) lanes *= 2;
  return lanes;
}

struct RowLaunch {
  dim3 grid, block;
};

RowLaunch row_launch(int64_t rows, int64_t row_vecs) {
  const int lanes = lanes_for(row_vecs);
  const int rows_per_block = kThreadsPerBlock / lanes;
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>(ceil_div(rows, rows_per_block), 1), kMaxBlocks);
  return {dim3(static_cast<unsigned>(blocks)), dim3(lanes, rows_per_block)};
}

// ---------------------------------------------------------------------------------------
// Forward: a dtype-agnostic row copy with the widest vector the layout allows.

template <typename vec_t, typename index_t>
__global__ void gather_rows_kernel(const vec_t* __restrict__ weight, int64_t row_stride_vecs,
                                   const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                   vec_t* __restrict__ out, int64_t row_vecs,
                                   ErrorSink record) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    vec_t* dst = out + i * row_vecs;
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(record, kForward, i, k, num_rows);
      for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst[v] = vec_t{};
      continue;
    }
    const vec_t* src = weight + k * row_stride_vecs;
    for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst[v] = src[v];
  }
}

// Largest power-of-two byte width (<= 16) dividing every address and length involved.
int vector_bytes(std::initializer_list<int64_t> quantities) {
  int bytes = 16;
  for (int64_t q : quantities) {
    while (bytes > 1 && q % bytes != 0) bytes /= 2;
  }
  return bytes;
}

template <typename index_t>
void launch_gather(const at::Tensor& weight, const index_t* idx, int64_t n, at::Tensor& out,
                   cudaStream_t stream, ErrorSink sink) {
  const int64_t elem = weight.element_size();
  const int64_t row_bytes = weight.size(1) * elem, stride_bytes = weight.stride(0) * elem;
  const char* w = static_cast<const char*>(weight.const_data_ptr());
  char* o = static_cast<char*>(out.mutable_data_ptr());
  const int vb = vector_bytes({row_bytes, stride_bytes, reinterpret_cast<int64_t>(w),
                               reinterpret_cast<int64_t>(o)});
  const int64_t row_vecs = row_bytes / vb;
  const RowLaunch l = row_launch(n, row_vecs);
  auto go = [&](auto vec_tag) {
    using vec_t = decltype(vec_tag);
    gather_rows_kernel<vec_t, index_t><<<l.grid, l.block, 0, stream>>>(
        reinterpret_cast<const vec_t*>(w), stride_bytes / vb, idx, n, weight.size(0),
        reinterpret_cast<vec_t*>(o), row_vecs, sink);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (vb) {
    case 16: go(uint4{}); break;
    case 8: go(uint2{}); break;
    case 4: go(uint32_t{}); break;
    case 2: go(uint16_t{}); break;
    default: go(uint8_t{}); break;
  }
}

at::Tensor embedding_forward_cuda(const at::Tensor& weight_in, const at::Tensor& indices_in) {
  constexpr const char* op = "embedding_forward";
  check_lookup_args(weight_in, indices_in, op);
  LaunchScope scope(weight_in);
  const at::Tensor weight = rows_unit_stride(weight_in);
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor out = at::empty(lookup_shape(indices, weight.size(1)), weight.options());
  const int64_t n = indices.numel();
  if (n == 0) return out;
  // With D == 0 there is nothing to copy, but the indices are still checked.
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_forward_cuda", [&] {
    launch_gather<index_t>(weight, indices.const_data_ptr<index_t>(), n, out, scope.stream,
                           scope.sink);
  });
  scope.finish();
  return out;
}

// ---------------------------------------------------------------------------------------
// Frequency counts: counts[k] = occurrences of k among non-padding positions (int32 is
// enough: a count above 2^31 needs more than 8 GiB of indices in one call).

template <typename index_t>
__global__ void count_rows_kernel(const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                  int64_t padding_idx, int* __restrict__ counts) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = idx[i];
    if (row_in_range(k, num_rows) && k != padding_idx) atomicAdd(counts + k, 1);
  }
}

template <typename index_t>
at::Tensor row_counts(const index_t* idx, int64_t n, int64_t num_rows, int64_t padding_idx,
                      const at::Tensor& like, cudaStream_t stream) {
  at::Tensor counts = at::zeros({num_rows}, like.options().dtype(at::kInt));
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kThreadsPerBlock), kMaxBlocks);
  count_rows_kernel<index_t><<<blocks, kThreadsPerBlock, 0, stream>>>(
      idx, n, num_rows, padding_idx, counts.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

// ---------------------------------------------------------------------------------------
// Dense backward, default path: atomic scatter-add into an accumulation-type buffer.

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void scatter_add_kernel(const scalar_t* __restrict__ grad, const index_t* __restrict__ idx,
                                   int64_t n, int64_t num_rows, int64_t dim, int64_t padding_idx,
                                   const int* __restrict__ counts, acc_t* __restrict__ out,
                                   ErrorSink record) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(record, kDenseBackward, i, k, num_rows);
      continue;
    }
    if (k == padding_idx) continue;
    const acc_t scale = counts ? acc_t(1) / static_cast<acc_t>(counts[k]) : acc_t(1);
    const scalar_t* g = grad + i * dim;
    acc_t* dst = out + k * dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      atomicAdd(dst + d, static_cast<acc_t>(g[d]) * scale);
    }
  }
}

// Deterministic path: positions sorted by row (stable), one row group per distinct row
// sums its positions in ascending order; no atomics on values.
template <typename scalar_t, typename index_t>
__global__ void segment_sum_kernel(const scalar_t* __restrict__ grad,
                                   const index_t* __restrict__ sorted_rows,
                                   const int64_t* __restrict__ positions, int64_t n,
                                   int64_t num_rows, int64_t dim, int64_t padding_idx,
                                   bool scale_grad_by_freq, scalar_t* __restrict__ out,
                                   ErrorSink record) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; j < n; j += step) {
    const int64_t k = sorted_rows[j];
    if (j > 0 && static_cast<int64_t>(sorted_rows[j - 1]) == k) continue;  // not a segment head
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(record, kDenseBackward, positions[j], k, num_rows);
      continue;
    }
    if (k == padding_idx) continue;
    int64_t e = j + 1;
    while (e < n && static_cast<int64_t>(sorted_rows[e]) == k) ++e;
    const acc_t scale = scale_grad_by_freq ? acc_t(1) / static_cast<acc_t>(e - j) : acc_t(1);
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      acc_t acc = 0;
      for (int64_t s = j; s < e; ++s) acc += static_cast<acc_t>(grad[positions[s] * dim + d]);
      out[k * dim + d] = static_cast<scalar_t>(acc * scale);
    }
  }
}

at::Tensor embedding_dense_backward_cuda(const at::Tensor& grad_in, const at::Tensor& indices_in,
                                         c10::SymInt num_weights_sym, int64_t padding_idx,
                                         bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_dense_backward";
  check_indices_dtype(indices_in, op);
  check_cuda_pair(grad_in, "grad_output", indices_in, op);
  check_grad_shape(grad_in, indices_in, op);
  const int64_t num_rows = num_weights_sym.expect_int();
  TORCH_CHECK(num_rows >= 0, op, ": 'num_weights' must be >= 0, got ", num_rows);
  LaunchScope scope(grad_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor indices = indices_in.reshape({-1}).contiguous();
  const int64_t dim = grad.size(-1), n = indices.numel();
  if (n == 0 || dim == 0 || num_rows == 0) {
    // Still surface bad indices when there is nothing to add.
    if (n > 0 && (dim == 0 || num_rows == 0)) {
      AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_probe_cuda", [&] {
        const RowLaunch l = row_launch(n, 0);
        gather_rows_kernel<uint8_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
            nullptr, 0, indices.const_data_ptr<index_t>(), n, num_rows, nullptr, 0, scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      scope.finish();
    }
    return at::zeros({num_rows, dim}, grad.options());
  }
  at::Tensor result;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_dense_backward_cuda", [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const RowLaunch l = row_launch(n, dim);
      if (at::globalContext().deterministicAlgorithms()) {
        auto sorted = at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
        const at::Tensor& sorted_rows = std::get<0>(sorted);
        const at::Tensor& positions = std::get<1>(sorted);
        result = at::zeros({num_rows, dim}, grad.options());
        segment_sum_kernel<scalar_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
            grad.const_data_ptr<scalar_t>(), sorted_rows.const_data_ptr<index_t>(),
            positions.const_data_ptr<int64_t>(), n, num_rows, dim, padding_idx, scale_grad_by_freq,
            result.mutable_data_ptr<scalar_t>(), scope.sink);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      at::Tensor counts;
      if (scale_grad_by_freq) counts = row_counts(idx, n, num_rows, padding_idx, grad, scope.stream);
      at::Tensor acc = at::zeros({num_rows, dim}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      scatter_add_kernel<scalar_t, acc_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
          grad.const_data_ptr<scalar_t>(), idx, n, num_rows, dim, padding_idx,
          scale_grad_by_freq ? counts.const_data_ptr<int>() : nullptr,
          acc.mutable_data_ptr<acc_t>(), scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // fp16/bf16 were summed in fp32 and are rounded once here.
      result = acc.scalar_type() == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
    });
  });
  scope.finish();
  return result;
}

// ---------------------------------------------------------------------------------------
// Scaled gather (double backward).

template <typename scalar_t, typename index_t>
__global__ void scaled_gather_kernel(const scalar_t* __restrict__ weight, int64_t row_stride,
                                     const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                                     int64_t dim, int64_t padding_idx,
                                     const int* __restrict__ counts, scalar_t* __restrict__ out,
                                     ErrorSink record) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    scalar_t* dst = out + i * dim;
    const bool bad = !row_in_range(k, num_rows);
    if (bad && threadIdx.x == 0) report_bad_index(record, kScaledGather, i, k, num_rows);
    if (bad || k == padding_idx) {
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = scalar_t(0);
      continue;
    }
    const acc_t scale = counts ? acc_t(1) / static_cast<acc_t>(counts[k]) : acc_t(1);
    const scalar_t* src = weight + k * row_stride;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(src[d]) * scale);
    }
  }
}

at::Tensor embedding_scaled_gather_cuda(const at::Tensor& weight_in, const at::Tensor& indices_in,
                                        int64_t padding_idx, bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_scaled_gather";
  check_lookup_args(weight_in, indices_in, op);
  LaunchScope scope(weight_in);
  const at::Tensor weight = rows_unit_stride(weight_in);
  const at::Tensor indices = indices_in.contiguous();
  at::Tensor out = at::empty(lookup_shape(indices, weight.size(1)), weight.options());
  const int64_t n = indices.numel(), num_rows = weight.size(0), dim = weight.size(1);
  if (n == 0) return out;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_scaled_gather_cuda", [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      at::Tensor counts;
      if (scale_grad_by_freq) counts = row_counts(idx, n, num_rows, padding_idx, weight, scope.stream);
      const RowLaunch l = row_launch(n, dim);
      scaled_gather_kernel<scalar_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
          weight.const_data_ptr<scalar_t>(), weight.stride(0), idx, n, num_rows, dim, padding_idx,
          scale_grad_by_freq ? counts.const_data_ptr<int>() : nullptr,
          out.mutable_data_ptr<scalar_t>(), scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  scope.finish();
  return out;
}

// ---------------------------------------------------------------------------------------
// Sparse backward: values in position order, padding positions removed.

template <typename scalar_t, typename index_t>
__global__ void sparse_values_kernel(const scalar_t* __restrict__ grad,
                                     const index_t* __restrict__ idx,
                                     const int64_t* __restrict__ slot_end,  // inclusive scan of "kept"
                                     int64_t n, int64_t num_rows, int64_t dim, int64_t padding_idx,
                                     const int* __restrict__ counts, int64_t* __restrict__ rows_out,
                                     scalar_t* __restrict__ values, ErrorSink record) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    if (k == padding_idx) continue;
    const int64_t j = slot_end ? slot_end[i] - 1 : i;
    scalar_t* dst = values + j * dim;
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) {
        report_bad_index(record, kSparseBackward, i, k, num_rows);
        rows_out[j] = 0;
      }
      for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) dst[d] = scalar_t(0);
      continue;
    }
    if (threadIdx.x == 0) rows_out[j] = k;
    const acc_t scale = counts ? acc_t(1) / static_cast<acc_t>(counts[k]) : acc_t(1);
    const scalar_t* g = grad + i * dim;
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      dst[d] = static_cast<scalar_t>(static_cast<acc_t>(g[d]) * scale);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> embedding_sparse_backward_cuda(const at::Tensor& grad_in,
                                                                  const at::Tensor& indices_in,
                                                                  c10::SymInt num_weights_sym,
                                                                  int64_t padding_idx,
                                                                  bool scale_grad_by_freq) {
  constexpr const char* op = "embedding_sparse_backward";
  check_indices_dtype(indices_in, op);
  check_cuda_pair(grad_in, "grad_output", indices_in, op);
  check_grad_shape(grad_in, indices_in, op);
  const int64_t num_rows = num_weights_sym.expect_int();
  LaunchScope scope(grad_in);
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor indices = indices_in.reshape({-1}).contiguous();
  const int64_t dim = grad.size(-1), n = indices.numel();
  at::Tensor slot_end;
  int64_t nnz = n;
  if (padding_idx >= 0 && n > 0) {
    // The only host synchronisation on this path: the output size depends on the data.
    slot_end = at::cumsum(indices.ne(padding_idx), 0, at::kLong);
    nnz = slot_end[-1].item<int64_t>();
  }
  at::Tensor rows = at::empty({1, nnz}, indices.options().dtype(at::kLong));
  at::Tensor values = at::empty({nnz, dim}, grad.options());
  if (n == 0) return {rows, values};
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_sparse_backward_cuda", [&] {
    const index_t* idx = indices.const_data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
      at::Tensor counts;
      if (scale_grad_by_freq) counts = row_counts(idx, n, num_rows, padding_idx, grad, scope.stream);
      const RowLaunch l = row_launch(n, dim);
      sparse_values_kernel<scalar_t, index_t><<<l.grid, l.block, 0, scope.stream>>>(
          grad.const_data_ptr<scalar_t>(), idx,
          slot_end.defined() ? slot_end.const_data_ptr<int64_t>() : nullptr, n, num_rows, dim,
          padding_idx, scale_grad_by_freq ? counts.const_data_ptr<int>() : nullptr,
          rows.mutable_data_ptr<int64_t>(), values.mutable_data_ptr<scalar_t>(), scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  scope.finish();
  return {rows, values};
}

// ---------------------------------------------------------------------------------------
// max_norm renorm: the first warp to claim a row renorms it, so duplicates never race.

template <typename acc_t>
__device__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename acc_t>
__device__ acc_t warp_max(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// blockDim = (32, rows per block): one full warp per position.
template <typename scalar_t, typename index_t>
__global__ void renorm_kernel(scalar_t* weight, int64_t row_stride, int64_t col_stride,
                              const index_t* __restrict__ idx, int64_t n, int64_t num_rows,
                              int64_t dim, int* __restrict__ claimed, double max_norm,
                              double norm_type, ErrorSink record) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const bool p_inf = isinf(norm_type), p_one = norm_type == 1.0, p_two = norm_type == 2.0;
  const acc_t p = static_cast<acc_t>(norm_type);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < n; i += step) {
    const int64_t k = idx[i];
    if (!row_in_range(k, num_rows)) {
      if (threadIdx.x == 0) report_bad_index(record, kRenorm, i, k, num_rows);
      continue;
    }
    int won = 0;
    if (threadIdx.x == 0) won = atomicCAS(claimed + k, 0, 1) == 0;
    won = __shfl_sync(0xffffffffu, won, 0);
    if (!won) continue;
    scalar_t* row = weight + k * row_stride;
    acc_t part = 0;
    for (int64_t d = threadIdx.x; d < dim; d += 32) {
      const acc_t a = abs(static_cast<acc_t>(row[d * col_stride]));
      if (p_inf) part = max(part, a);
      else if (p_one) part += a;
      else if (p_two) part += a * a;
      else part += pow(a, p);
    }
    acc_t total = p_inf ? warp_max(part) : warp_sum(part);
    const double norm = p_inf || p_one ? static_cast<double>(total)
                        : p_two ? static_cast<double>(sqrt(total))
                                : static_cast<double>(pow(total, acc_t(1) / p));
    if (norm > max_norm) {
      const acc_t scale = static_cast<acc_t>(max_norm / (norm + 1e-7));
      for (int64_t d = threadIdx.x; d < dim; d += 32) {
        row[d * col_stride] = static_cast<scalar_t>(static_cast<acc_t>(row[d * col_stride]) * scale);
      }
    }
  }
}

void embedding_renorm_cuda(const at::Tensor& weight, const at::Tensor& indices_in, double max_norm,
                           double norm_type) {
  constexpr const char* op = "embedding_renorm_";
  check_lookup_args(weight, indices_in, op);
  check_renorm_args(max_norm, norm_type, op);
  LaunchScope scope(weight);
  const at::Tensor indices = indices_in.contiguous();
  const int64_t n = indices.numel(), num_rows = weight.size(0), dim = weight.size(1);
  if (n == 0) return;
  at::Tensor claimed = at::zeros({num_rows}, indices.options().dtype(at::kInt));
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_renorm_cuda", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
      constexpr int rows_per_block = kThreadsPerBlock / 32;
      const int64_t blocks = std::min<int64_t>(ceil_div(n, rows_per_block), kMaxBlocks);
      renorm_kernel<scalar_t, index_t><<<blocks, dim3(32, rows_per_block), 0, scope.stream>>>(
          weight.mutable_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1),
          indices.const_data_ptr<index_t>(), n, num_rows, dim, claimed.mutable_data_ptr<int>(),
          max_norm, norm_type, scope.sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  scope.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_forward", &embedding_forward_cuda);
  m.impl("embedding_dense_backward", &embedding_dense_backward_cuda);
  m.impl("embedding_scaled_gather", &embedding_scaled_gather_cuda);
  m.impl("embedding_sparse_backward", &embedding_sparse_backward_cuda);
  m.impl("embedding_renorm_", &embedding_renorm_cuda);
}

}  // namespace cuda
}  // namespace embedding_ext
