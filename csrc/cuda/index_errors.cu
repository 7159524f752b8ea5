// The host side of the bad-index record (see index_errors.h).
#include "index_errors.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <mutex>

#include "../checks.h"

namespace embedding_ext {
namespace cuda {
namespace {

std::atomic<bool> g_synchronous_checks{false};
constexpr int kMaxDevices = 64;

// One record and claim flag per device, set up by that device's first call and kept for
// the life of the process. g_set_up counts the devices set up so far: raising scans those.
struct DeviceRecord {
  IndexErrorRecord* record = nullptr;  // pinned, mapped host memory
  int* claimed = nullptr;              // device memory
};
std::mutex g_record_mutex;  // guards set-up and the consumption of records
DeviceRecord g_records[kMaxDevices];
std::atomic<int> g_set_up{0};
int g_device_of[kMaxDevices];  // g_device_of[i]: the i-th device set up

void set_up(int device, DeviceRecord& r) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream(), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "embedding_ext: the first embedding_ext call on CUDA device ", device,
              " is being captured into a CUDA graph, but it allocates the device's bad-index "
              "record, which cannot be captured. Make one embedding_ext call on this device "
              "before capturing (the usual warm-up).");
  void* host = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(IndexErrorRecord),
                               cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(host, 0, sizeof(IndexErrorRecord));
  int* claimed = nullptr;
  C10_CUDA_CHECK(cudaMalloc(&claimed, sizeof(int)));
  C10_CUDA_CHECK(cudaMemset(claimed, 0, sizeof(int)));  // synchronous: done before any kernel
  r.claimed = claimed;
  r.record = static_cast<IndexErrorRecord*>(host);
  g_device_of[g_set_up.load()] = device;
  g_set_up.fetch_add(1, std::memory_order_release);
}

}  // namespace

ErrorSink error_sink(const char* op) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "embedding_ext: CUDA device ", device,
              " is past the ", kMaxDevices, " devices this build supports");
  std::lock_guard<std::mutex> lock(g_record_mutex);
  DeviceRecord& r = g_records[device];
  if (r.claimed == nullptr) set_up(device, r);
  return {r.record, r.claimed, op};
}

void raise_pending_index_error(bool synchronize) {
  if (synchronize) C10_CUDA_CHECK(cudaDeviceSynchronize());
  const int devices = g_set_up.load(std::memory_order_acquire);
  for (int i = 0; i < devices; ++i) {
    volatile IndexErrorRecord* seen = g_records[g_device_of[i]].record;
    if (seen->state != 2) continue;
    std::lock_guard<std::mutex> lock(g_record_mutex);
    if (seen->state != 2) continue;  // another thread consumed it
    // The fields were written before `state`; keep their reads after it on weakly ordered
    // hosts (Arm) too.
    std::atomic_thread_fence(std::memory_order_acquire);
    const long long value = seen->value, position = seen->position, rows = seen->num_rows;
    const char* op = seen->op;
    seen->state = 0;
    // Re-arm: kernels launched from now on read the new generation and may claim again.
    seen->generation = seen->generation + 1;
    throw_index_error(value, position, rows, op,
                      synchronize ? "" : " (seen by an earlier asynchronous CUDA call)");
  }
}

void set_synchronous_index_checks(bool enabled) { g_synchronous_checks.store(enabled); }
bool synchronous_index_checks() { return g_synchronous_checks.load(); }

}  // namespace cuda
}  // namespace embedding_ext
