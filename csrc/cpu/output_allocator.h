// Allocation of large CPU outputs (gathered rows, dense gradients).
//
// A fresh multi-megabyte buffer from malloc is new mmap'd memory: the first write to each
// 4 KiB page takes a page fault in which the kernel also zeroes the page, which costs
// several times the write itself (figures: bench/NOTES-cpu.md). Outputs of this size are therefore taken from a small cache of recently freed buffers
// (a training loop frees last step's gradient before the next backward), and new buffers
// are mapped with transparent huge pages, which cuts the number of faults by 512.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

namespace embedding_ext::cpu {

// Like at::empty(sizes, options) for a CPU tensor; large ones come from the cache above.
at::Tensor empty_output(c10::IntArrayRef sizes, const c10::TensorOptions& options);

// Bytes currently held in the cache (free buffers kept for reuse).
int64_t cached_output_bytes();
// Most bytes of freed buffers to keep (initially EMBEDDING_EXT_CPU_CACHE_MB MiB, default
// 1024; 0 turns caching off).
void set_output_cache_limit(int64_t bytes);
void release_cached_outputs();

}  // namespace embedding_ext::cpu
