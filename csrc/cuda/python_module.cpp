// The Python module embedding_ext._C_cuda, built where CUDA can be: loading it registers the
// CUDA kernels (each csrc/cuda/*.cu file's TORCH_LIBRARY_IMPL), and it holds the bad-index
// controls that embedding_ext/__init__.py exposes as documented functions.
#include <torch/csrc/utils/pybind.h>

#include "../index_error_class.h"
#include "index_errors.h"

#ifndef EMBEDDING_EXT_TORCH_VERSION
#define EMBEDDING_EXT_TORCH_VERSION "unknown"
#endif
#ifndef EMBEDDING_EXT_CUDA_ARCH_LIST
#define EMBEDDING_EXT_CUDA_ARCH_LIST ""
#endif

namespace {

// Waits for every device with a record and returns a recorded bad index's message, consuming
// it ("" if none): Python raises the IndexError, so no C++ exception crosses this binding.
std::string take_cuda_index_error() {
  return embedding_ext::cuda::take_pending_index_error(/*synchronize=*/true);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, mod) {
  namespace cuda = embedding_ext::cuda;
  mod.doc() = "embedding_ext: the CUDA kernels' build facts and bad-index controls";
  mod.attr("torch_version") = EMBEDDING_EXT_TORCH_VERSION;
  mod.attr("cuda_arch_list") = EMBEDDING_EXT_CUDA_ARCH_LIST;
  mod.def("take_cuda_index_error", &take_cuda_index_error);
  mod.def("set_synchronous_index_checks", &cuda::set_synchronous_index_checks);
  mod.def("synchronous_index_checks", &cuda::synchronous_index_checks);
  // embedding_ext/__init__.py hands over embedding_ext.EmbeddingIndexError at import.
  mod.def("_set_index_error_class", &embedding_ext::set_index_error_class);
}
