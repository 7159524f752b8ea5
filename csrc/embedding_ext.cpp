// The one place where every embedding_ext operator schema is declared, plus the pybind11
// module `embedding_ext._C` that reports how this binary was built. Backends add kernels
// in csrc/cpu and csrc/cuda with TORCH_LIBRARY_IMPL; fake (meta) kernels live in Python
// (embedding_ext/ops.py) so that torch.compile never reads data.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/output_allocator.h"
#ifdef EMBEDDING_EXT_WITH_CUDA
#include "cuda/index_errors.h"
#endif

#ifndef EMBEDDING_EXT_TORCH_VERSION
#define EMBEDDING_EXT_TORCH_VERSION "unknown"
#endif
#ifndef EMBEDDING_EXT_CUDA_ARCH_LIST
#define EMBEDDING_EXT_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(embedding_ext, m) {
  // out[i, :] = weight[indices[i], :]; out has shape indices.shape + (D,), is freshly
  // allocated and contiguous. Any weight dtype; int32 or int64 indices.
  m.def("embedding_forward(Tensor weight, Tensor indices) -> Tensor");

  // Dense gradient of embedding_forward w.r.t. weight: a (num_weights, D) tensor with
  // grad[k] = sum over positions i with indices[i] == k != padding_idx of
  // grad_output[i] (divided by the count of k in indices when scale_grad_by_freq).
  // padding_idx < 0 means "no padding". fp16/bf16 accumulate in fp32. num_weights is a
  // SymInt so the fake kernel can size the output without looking at data.
  m.def(
      "embedding_dense_backward(Tensor grad_output, Tensor indices, SymInt num_weights, "
      "int padding_idx, bool scale_grad_by_freq) -> Tensor");

  // The adjoint of embedding_dense_backward (its derivative w.r.t. grad_output, used for
  // double backward): out[i] = weight[indices[i]] / count, or 0 where indices[i] == padding_idx.
  m.def(
      "embedding_scaled_gather(Tensor weight, Tensor indices, int padding_idx, "
      "bool scale_grad_by_freq) -> Tensor");

  // Sparse gradient pieces: (row_indices (1, nnz) int64, values (nnz, D)) in the row-major
  // order of `indices` with padding positions removed; Python wraps them in an uncoalesced
  // sparse COO tensor. nnz is data-dependent only when padding_idx >= 0.
  m.def(
      "embedding_sparse_backward(Tensor grad_output, Tensor indices, SymInt num_weights, "
      "int padding_idx, "
      "bool scale_grad_by_freq) -> (Tensor, Tensor)");

  // In place: every distinct row referenced by `indices` whose norm_type-norm exceeds
  // max_norm is scaled by max_norm / (norm + 1e-7).
  m.def(
      "embedding_renorm_(Tensor(a!) weight, Tensor indices, float max_norm, "
      "float norm_type) -> ()");
}

namespace {
bool built_with_cuda() {
#ifdef EMBEDDING_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}
// Re-raises a recorded CUDA index error as Python's IndexError.
void check_cuda_index_errors() {
#ifdef EMBEDDING_EXT_WITH_CUDA
  try {
    embedding_ext::cuda::raise_pending_index_error(/*synchronize=*/true);
  } catch (const c10::IndexError& e) {
    throw pybind11::index_error(e.what_without_backtrace());
  }
#endif
}

void set_synchronous_index_checks(bool enabled) {
#ifdef EMBEDDING_EXT_WITH_CUDA
  embedding_ext::cuda::set_synchronous_index_checks(enabled);
#else
  (void)enabled;
#endif
}

bool synchronous_index_checks() {
#ifdef EMBEDDING_EXT_WITH_CUDA
  return embedding_ext::cuda::synchronous_index_checks();
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "embedding_ext compiled kernels and build facts";
  mod.attr("torch_version") = EMBEDDING_EXT_TORCH_VERSION;
  mod.attr("with_cuda") = built_with_cuda();
  mod.attr("cuda_arch_list") = EMBEDDING_EXT_CUDA_ARCH_LIST;
  mod.def("check_cuda_index_errors", &check_cuda_index_errors,
          "Synchronise the device and raise IndexError if a CUDA kernel saw a bad index.");
  mod.def("set_synchronous_index_checks", &set_synchronous_index_checks,
          "Make every CUDA call synchronise and raise bad-index errors from that call.");
  mod.def("synchronous_index_checks", &synchronous_index_checks);
  mod.def("cpu_output_cache_bytes", &embedding_ext::cpu::cached_output_bytes,
          "Bytes of freed CPU output buffers kept for reuse.");
  mod.def("set_cpu_output_cache_limit", &embedding_ext::cpu::set_output_cache_limit,
          "Most bytes of freed CPU output buffers to keep (0: keep none).");
  mod.def("release_cpu_output_cache", &embedding_ext::cpu::release_cached_outputs,
          "Return every cached CPU output buffer to the OS.");
#ifdef _OPENMP
  mod.attr("with_openmp") = true;
#else
  mod.attr("with_openmp") = false;
#endif
}
