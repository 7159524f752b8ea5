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

namespace embedding_ext::cuda {
namespace {

std::atomic<bool> g_synchronous_checks{false};
constexpr int kMaxDevices = 64;

// One record and claim flag per device, set up by that device's first call and kept for
// the life of the process. g_set_up counts the devices set up so far: raising scans those.
struct DeviceRecord {
  IndexErrorRecord* record = nullptr;         // pinned, mapped host memory: the host's view
  IndexErrorRecord* device_record = nullptr;  // the same memory as kernels address it
  int* claimed = nullptr;              // device memory
};
std::mutex g_record_mutex;  // guards set-up and the consumption of records
DeviceRecord g_records[kMaxDevices];
std::atomic<int> g_set_up{0};
int g_device_of[kMaxDevices];  // g_device_of[i]: the i-th device set up

// The op names kernels report by code (IndexErrorRecord::op); filled under g_record_mutex,
// read after an acquire of g_op_count. Names are the ops' string literals.
constexpr int kMaxOps = 32;
const char* g_op_names[kMaxOps];
std::atomic<int> g_op_count{0};

int op_code(const char* op) {  // under g_record_mutex
  const int count = g_op_count.load(std::memory_order_relaxed);
  for (int i = 0; i < count; ++i) {
    if (g_op_names[i] == op || std::strcmp(g_op_names[i], op) == 0) return i;
  }
  TORCH_CHECK(count < kMaxOps, "embedding_ext: more than ", kMaxOps, " ops report bad indices");
  g_op_names[count] = op;
  g_op_count.store(count + 1, std::memory_order_release);
  return count;
}

const char* op_name(int code) {
  const int count = g_op_count.load(std::memory_order_acquire);
  return code >= 0 && code < count ? g_op_names[code] : "embedding_ext (unknown op)";
}

void set_up(int device, DeviceRecord& r, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone,
              "embedding_ext: the first embedding_ext call on CUDA device ", device,
              " is being captured into a CUDA graph, but it allocates the device's bad-index "
              "record, which cannot be captured. Make one embedding_ext call on this device "
              "before capturing (the usual warm-up).");
  // Relaxed: these calls are allowed even while another stream (of this or another thread)
  // is capturing in global mode.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  void* host = nullptr;
  int* claimed = nullptr;
  cudaError_t err = cudaHostAlloc(&host, sizeof(IndexErrorRecord),
                                  cudaHostAllocMapped | cudaHostAllocPortable);
  void* device_view = nullptr;  // the same address under unified addressing; asked for anyway
  if (err == cudaSuccess) err = cudaHostGetDevicePointer(&device_view, host, 0);
  if (err == cudaSuccess) err = cudaMalloc(&claimed, sizeof(int));
  // On the op's stream, and waited for: ordered before the first kernel on any stream.
  if (err == cudaSuccess) err = cudaMemsetAsync(claimed, 0, sizeof(int), stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  cudaThreadExchangeStreamCaptureMode(&mode);
  if (err != cudaSuccess) {  // free what was allocated; the next call tries again
    if (claimed != nullptr) cudaFree(claimed);
    if (host != nullptr) cudaFreeHost(host);
  }
  C10_CUDA_CHECK(err);
  std::memset(host, 0, sizeof(IndexErrorRecord));
  r.claimed = claimed;
  r.record = static_cast<IndexErrorRecord*>(host);
  r.device_record = static_cast<IndexErrorRecord*>(device_view);
  g_device_of[g_set_up.load()] = device;
  g_set_up.fetch_add(1, std::memory_order_release);
}

}  // namespace

ErrorSink error_sink(const char* op, cudaStream_t stream) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "embedding_ext: CUDA device ", device,
              " is past the ", kMaxDevices, " devices this build supports");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  std::lock_guard<std::mutex> lock(g_record_mutex);
  DeviceRecord& r = g_records[device];
  if (r.claimed == nullptr) set_up(device, r, stream);
  const int generation = capture == cudaStreamCaptureStatusNone
                             ? __atomic_load_n(&r.record->generation, __ATOMIC_RELAXED)
                             : -1;  // a graph: replays read the live generation
  return {r.device_record, r.claimed, op_code(op), generation};
}

std::string take_pending_index_error(bool synchronize) {
  const int devices = g_set_up.load(std::memory_order_acquire);
  if (synchronize) {
    for (int i = 0; i < devices; ++i) {
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(g_device_of[i]));
      C10_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }
  for (int i = 0; i < devices; ++i) {
    IndexErrorRecord* seen = g_records[g_device_of[i]].record;
    // Acquire: the fields, written before `state` (behind the kernel's system fence), are
    // read after it, on weakly ordered hosts (Arm) too.
    if (__atomic_load_n(&seen->state, __ATOMIC_ACQUIRE) != 2) continue;
    std::lock_guard<std::mutex> lock(g_record_mutex);
    if (__atomic_load_n(&seen->state, __ATOMIC_ACQUIRE) != 2) continue;  // consumed already
    const long long value = __atomic_load_n(&seen->value, __ATOMIC_RELAXED);
    const long long position = __atomic_load_n(&seen->position, __ATOMIC_RELAXED);
    const long long rows = __atomic_load_n(&seen->num_rows, __ATOMIC_RELAXED);
    const char* op = op_name(__atomic_load_n(&seen->op, __ATOMIC_RELAXED));
    const int kind = __atomic_load_n(&seen->kind, __ATOMIC_RELAXED);
    __atomic_store_n(&seen->state, 0, __ATOMIC_RELAXED);
    // Release: the reads and the cleared state above come before the new generation, which
    // lets the next writer in.
    __atomic_store_n(&seen->generation, seen->generation + 1, __ATOMIC_RELEASE);
    const char* when = synchronize ? "" : " (seen by an earlier asynchronous CUDA call)";
    if (kind == kBadOffset) return bad_offset_message(value, position, rows, op, when);
    return index_error_message(value, position, rows, op, when);
  }
  return {};
}

void raise_pending_index_error(bool synchronize) {
  const std::string message = take_pending_index_error(synchronize);
  if (!message.empty()) raise_index_error(message);
}

void set_synchronous_index_checks(bool enabled) { g_synchronous_checks.store(enabled); }
bool synchronous_index_checks() { return g_synchronous_checks.load(); }

}  // namespace embedding_ext::cuda
