// The host side of the bad-index record (see index_errors.h).
#include "index_errors.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <mutex>

#include "../checks.h"

namespace embedding_ext {
namespace cuda {
namespace {

std::atomic<bool> g_synchronous_checks{false};
std::mutex g_record_mutex;
constexpr int kMaxDevices = 64;
int* g_claimed[kMaxDevices] = {};  // per device, guarded by g_record_mutex

// Pinned host memory that kernels write through unified virtual addressing.
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

}  // namespace

ErrorSink error_sink(const char* op) {
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
  return {record, g_claimed[device], device, op};
}

void raise_pending_index_error(bool synchronize) {
  if (synchronize) C10_CUDA_CHECK(cudaDeviceSynchronize());
  volatile IndexErrorRecord* seen = host_record();
  if (seen->state != 2) return;
  std::lock_guard<std::mutex> lock(g_record_mutex);
  if (seen->state != 2) return;
  // The fields were written before `state`; keep their reads after it on weakly ordered
  // hosts (Arm) too.
  std::atomic_thread_fence(std::memory_order_acquire);
  const long long value = seen->value, position = seen->position, rows = seen->num_rows;
  const char* op = seen->op;
  const int device = seen->device;
  seen->state = 0;
  // Re-arm the device's flag (the error path may synchronise).
  const int zero = 0;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  C10_CUDA_CHECK(cudaMemcpy(g_claimed[device], &zero, sizeof(int), cudaMemcpyHostToDevice));
  throw_index_error(value, position, rows, op,
                    synchronize ? "" : " (seen by an earlier asynchronous CUDA call)");
}

void set_synchronous_index_checks(bool enabled) { g_synchronous_checks.store(enabled); }
bool synchronous_index_checks() { return g_synchronous_checks.load(); }

}  // namespace cuda
}  // namespace embedding_ext
