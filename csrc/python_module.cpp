// The Python module embedding_ext._C: how this binary was built, and the CPU runtime controls
// (output cache, instruction set) that embedding_ext/__init__.py exposes as documented
// functions. Kernels are not reached from here but through torch.ops. The CUDA controls are
// in embedding_ext._C_cuda (csrc/cuda/python_module.cpp).
#include <torch/csrc/utils/pybind.h>

#include "index_error_class.h"
#include "cpu/isa.h"
#include "cpu/dense_backward.h"
#include "cpu/output_allocator.h"

#ifndef EMBEDDING_EXT_TORCH_VERSION
#define EMBEDDING_EXT_TORCH_VERSION "unknown"
#endif

namespace embedding_ext {
namespace {

// Tests only: one named implementation of the CPU dense backward, so that a test comparing
// the two knows which one ran (the op itself picks by dtype).
at::Tensor cpu_dense_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                              int64_t num_weights, int64_t padding_idx, bool scale_grad_by_freq,
                              const std::string& path) {
  TORCH_CHECK(path == "scatter" || path == "sorted",
              "_cpu_dense_backward: 'path' must be 'scatter' or 'sorted', got '", path, "'");
  TORCH_CHECK(grad_output.device().is_cpu(), "_cpu_dense_backward: 'grad_output' must be on the CPU");
  return cpu::dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq,
                             path == "scatter" ? cpu::DenseBackwardPath::kScatter
                                               : cpu::DenseBackwardPath::kSorted);
}

}  // namespace
}  // namespace embedding_ext

PYBIND11_MODULE(_C, mod) {
  namespace ee = embedding_ext;
  mod.doc() = "embedding_ext: build facts and runtime controls (kernels: torch.ops.embedding_ext)";
  mod.attr("torch_version") = EMBEDDING_EXT_TORCH_VERSION;
#ifdef _OPENMP
  mod.attr("with_openmp") = true;
#else
  mod.attr("with_openmp") = false;
#endif

  mod.def("cpu_output_cache_bytes", &ee::cpu::cached_output_bytes);
  mod.def("set_cpu_output_cache_limit", &ee::cpu::set_output_cache_limit);
  mod.def("release_cpu_output_cache", &ee::cpu::release_cached_outputs);
  mod.def("_cpu_dense_backward", &ee::cpu_dense_backward);
  // The instruction set of the CPU loops with several copies (csrc/cpu/isa.h): tests and
  // benchmarks pin each in turn.
  mod.def("_set_cpu_isa", &ee::cpu::set_cpu_isa);
  mod.def("_cpu_isa", &ee::cpu::cpu_isa_name);
  // embedding_ext/__init__.py hands over embedding_ext.EmbeddingIndexError at import.
  mod.def("_set_index_error_class", &embedding_ext::set_index_error_class);
}
