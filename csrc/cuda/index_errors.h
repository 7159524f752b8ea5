// How CUDA kernels report an out-of-range index without a host synchronisation.
//
// A kernel that meets a bad index never reads or writes outside the tensors (the output
// row is zero-filled, the gradient contribution dropped) and records the index, its
// position, the row count and the op (a code) in its device's record, in pinned,
// device-mapped host memory. One thread per generation writes it: the first to raise the
// device's claim flag (device memory; atomics on host memory are not reliable across PCIe)
// to its generation + 1, with plain stores and a system fence before `state`. A launch
// carries the generation current when it was issued, so kernels queued before the host
// consumed a record (say, the backward of the same bad batch) do not report it twice; a
// launch being captured into a CUDA graph carries -1 instead and reads the record's live
// generation, so every replay can report. The host, having read a complete record, clears
// `state` and bumps `generation` (ordered stores to host memory): that re-arms the device
// without any CUDA call, so raising at the start of a call is safe on any stream, also
// while it is being captured.
// The host reads the records, without synchronising, at the start of every later
// embedding_ext CUDA call and raises IndexError from there; raise_pending_index_error(true)
// synchronises first and raises at once. With synchronous checks switched on, every CUDA
// call synchronises its stream after the launch (unless the stream is being captured into
// a CUDA graph) and raises from the call that saw the bad index.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace embedding_ext::cuda {

struct IndexErrorRecord {
  int state;       // 0 empty, 2 complete (written last, after a system fence)
  int generation;  // written by the host only: bumped each time it consumes a record
  // The reporting op, as a code into the host's table of op names (never a pointer: the host
  // checks the code before it uses it, so no record can make it read a bad address).
  int op;
  int kind;  // kIdOutOfRange or kBadOffset
  long long position;
  long long value;
  long long num_rows;
};

// What a record describes: an id outside [0, num_rows) at `position`, or (bags) a CSR
// offset entry `position` = `value` that is not 0 first, non-decreasing and <= num_rows ids.
constexpr int kIdOutOfRange = 0, kBadOffset = 1;

// Host and device code must agree on this layout (the host reads what kernels write).
static_assert(sizeof(IndexErrorRecord) == 40 && offsetof(IndexErrorRecord, op) == 8 &&
                  offsetof(IndexErrorRecord, position) == 16,
              "IndexErrorRecord layout");

// What a kernel needs to report a bad index: its device's record and claim flag, and the
// op's code.
struct ErrorSink {
  IndexErrorRecord* record;
  int* claimed;
  int op;          // the op's code (see IndexErrorRecord::op)
  int generation;  // the record's generation at launch; -1: read it when reporting
};

// The sink for the current device, the op `op` and a launch on `stream`. The first call on
// a device allocates its record and flag, which cannot be captured into a CUDA graph: that
// call refuses with a clear error while `stream` is capturing.
ErrorSink error_sink(const char* op, cudaStream_t stream);

// The message of a recorded bad index, consuming the record ("" if none); with
// synchronize=true it first waits for all work on every device that has a record.
std::string take_pending_index_error(bool synchronize);
// Raises IndexError if a kernel recorded a bad index. With synchronize=true it first
// waits for all work on every device that has a record, so nothing launched earlier is
// missed (a synchronisation: not while capturing).
void raise_pending_index_error(bool synchronize);
void set_synchronous_index_checks(bool enabled);
bool synchronous_index_checks();

#ifdef __CUDACC__
__device__ __forceinline__ bool row_in_range(int64_t k, int64_t num_rows) {
  return k >= 0 && k < num_rows;
}

// Called by one thread per bad position; the first of the current generation writes.
__device__ __forceinline__ void report_bad_index(const ErrorSink& sink, int64_t position,
                                                 int64_t value, int64_t num_rows,
                                                 int kind = kIdOutOfRange) {
  volatile IndexErrorRecord* record = sink.record;
  // A host-memory read, on the error path only, for captured launches.
  const int generation = sink.generation >= 0 ? sink.generation : record->generation;
  if (atomicMax(sink.claimed, generation + 1) > generation) return;  // already claimed
  record->op = sink.op;
  record->kind = kind;
  record->position = position;
  record->value = value;
  record->num_rows = num_rows;
  __threadfence_system();  // the fields reach host memory before the state does
  record->state = 2;
}
#endif

}  // namespace embedding_ext::cuda
