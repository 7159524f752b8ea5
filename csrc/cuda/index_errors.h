// How CUDA kernels report an out-of-range index without a host synchronisation.
//
// A kernel that meets a bad index never reads or writes outside the tensors (the output
// row is zero-filled, the gradient contribution dropped) and records the index, its
// position, the row count and the op's name in a small record in pinned, device-mapped
// host memory: the first bad thread wins an atomicCAS on a per-device flag in device
// memory, then writes the record with plain stores (atomics on host memory are not
// reliable across PCIe).
// The host reads that record, without synchronising, at the start of every later
// embedding_ext CUDA call and raises IndexError from there; raise_pending_index_error(true)
// synchronises first and raises at once. With synchronous checks switched on, every CUDA
// call synchronises its stream after the launch (unless the stream is being captured into
// a CUDA graph) and raises from the call that saw the bad index.
#pragma once

#include <cstdint>

namespace embedding_ext {
namespace cuda {

struct IndexErrorRecord {
  int state;       // 0 empty, 2 complete (written last, after a system fence)
  int device;      // whose flag to re-arm once the host has read it
  const char* op;  // the reporting op's name: a host string, passed through, never read here
  long long position;
  long long value;
  long long num_rows;
};

// What a kernel needs to report a bad index: the record, the device flag whose atomicCAS
// elects the one writer, and what to write besides the index.
struct ErrorSink {
  IndexErrorRecord* record;
  int* claimed;
  int device;
  const char* op;
};

// The sink for the current device (allocates its flag on first use) and the op `op`.
ErrorSink error_sink(const char* op);

// Raises IndexError if a kernel recorded a bad index. With synchronize=true it first
// waits for all work on the current device, so nothing launched earlier is missed.
void raise_pending_index_error(bool synchronize);
void set_synchronous_index_checks(bool enabled);
bool synchronous_index_checks();

#ifdef __CUDACC__
__device__ __forceinline__ bool row_in_range(int64_t k, int64_t num_rows) {
  return k >= 0 && k < num_rows;
}

// Called by one thread per bad position; the first to claim the device's flag writes.
__device__ __forceinline__ void report_bad_index(const ErrorSink& sink, int64_t position,
                                                 int64_t value, int64_t num_rows) {
  if (atomicCAS(sink.claimed, 0, 1) != 0) return;
  volatile IndexErrorRecord* record = sink.record;
  record->op = sink.op;
  record->device = sink.device;
  record->position = position;
  record->value = value;
  record->num_rows = num_rows;
  __threadfence_system();  // the fields reach host memory before the state does
  record->state = 2;
}
#endif

}  // namespace cuda
}  // namespace embedding_ext
