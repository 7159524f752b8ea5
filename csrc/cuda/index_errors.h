// How CUDA kernels report an out-of-range index without a host synchronisation.
//
// A kernel that meets a bad index never reads or writes outside the tensors (the output
// row is zero-filled, the gradient contribution dropped) and records the index, its
// position and the row count in a small record in pinned, device-mapped host memory
// (the first bad thread wins an atomicCAS on a per-device flag in device memory, then
// writes the record with plain stores).
// The host reads that record, without synchronising, at the start of every later
// embedding_ext CUDA call and raises IndexError from there; check_pending_index_errors()
// synchronises first and raises at once. With synchronous checks switched on, every CUDA
// call synchronises its stream after the launch (unless the stream is being captured
// into a CUDA graph) and raises from the call that saw the bad index.
#pragma once

namespace embedding_ext {
namespace cuda {

struct IndexErrorRecord {
  int state;   // 0 empty, 2 complete (written last, after a system fence)
  int op;      // which op saw it (an OpCode)
  int device;  // whose flag to re-arm once the host has read it
  long long position;
  long long value;
  long long num_rows;
};

// Raises IndexError if a kernel recorded a bad index. With synchronize=true it first
// waits for all work on the current device, so nothing launched earlier is missed.
void raise_pending_index_error(bool synchronize);
void set_synchronous_index_checks(bool enabled);
bool synchronous_index_checks();

}  // namespace cuda
}  // namespace embedding_ext
