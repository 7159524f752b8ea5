// CUDA registrations of the table-batched pooled lookup (embedding_bag_collection_*). The GPU
// kernels are not written yet: until they are, a CUDA call raises NotImplementedError with
// a message that says so and names the way around (the tables on the CPU, or a loop of
// ee.embedding_bag per table), instead of the dispatcher's "no kernel for CUDA" error.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace embedding_ext {
namespace cuda {
namespace {

[[noreturn]] void not_yet(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": the CUDA kernel of EmbeddingBagCollection is not "
                              "written yet; keep the collection on the CPU, or loop "
                              "ee.embedding_bag over the tables on the GPU");
  __builtin_unreachable();
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(at::TensorList, const at::Tensor&,
                                                const at::Tensor&, at::IntArrayRef,
                                                at::IntArrayRef, at::IntArrayRef,
                                                const c10::optional<at::Tensor>&, c10::SymInt) {
  not_yet("embedding_bag_collection_forward");
}

std::vector<at::Tensor> dense_backward_cuda(const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&,
                                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                            const c10::optional<at::Tensor>&,
                                            c10::SymIntArrayRef, at::IntArrayRef) {
  not_yet("embedding_bag_collection_dense_backward");
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sparse_backward_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, const c10::optional<at::Tensor>&, c10::SymIntArrayRef,
    at::IntArrayRef) {
  not_yet("embedding_bag_collection_sparse_backward");
}

void fused_update_cuda(at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                       const c10::optional<at::Tensor>&, int64_t, at::TensorList, at::TensorList,
                       double, double, double, double, double, at::IntArrayRef) {
  not_yet("embedding_bag_collection_fused_update_");
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, CUDA, m) {
  m.impl("embedding_bag_collection_forward", &forward_cuda);
  m.impl("embedding_bag_collection_dense_backward", &dense_backward_cuda);
  m.impl("embedding_bag_collection_sparse_backward", &sparse_backward_cuda);
  m.impl("embedding_bag_collection_fused_update_", &fused_update_cuda);
}

}  // namespace cuda
}  // namespace embedding_ext
