// Autograd kernels, one for every backend: the lookup `embedding` and the two ops of its
// gradient (embedding_dense_backward and embedding_scaled_gather, mutually adjoint, so
// gradients of any order stay on our kernels). Each records a C++ autograd node, the way
// PyTorch's own ops do, and propagates forward-mode tangents (all three are linear in their
// differentiable input, so a tangent goes through the same op). A backward pass therefore
// runs no Python, and eager training, torch.compile, forward-mode AD and torch.func
// transforms all take this one path. Why nodes and not torch::autograd::Function: a
// Function's node, context and saved-data map cost more per call than a small lookup
// (bench/NOTES-cpu.md, "Per-call overhead").
//
// PyTorch internals used (all in the installed headers): Node, SavedVariable,
// collect_next_edges, set_history, Tensor::_fw_grad/_set_fw_grad. How a node is held
// changed between releases (std::shared_ptr, then c10::intrusive_ptr); make_node() below is
// the one place that knows.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

namespace embedding_ext {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Typed handles to the ops, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor call_forward(const at::Tensor& weight, const at::Tensor& indices) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>(
      "embedding_ext::embedding_forward");
  return op.call(weight, indices);
}

at::Tensor call_dense_backward(const at::Tensor& grad, const at::Tensor& indices,
                               const c10::SymInt& num_weights, int64_t padding_idx, bool scale) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, bool)>(
          "embedding_ext::embedding_dense_backward");
  return op.call(grad, indices, num_weights, padding_idx, scale);
}

at::Tensor call_scaled_gather(const at::Tensor& weight, const at::Tensor& indices,
                              int64_t padding_idx, bool scale) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool)>(
      "embedding_ext::embedding_scaled_gather");
  return op.call(weight, indices, padding_idx, scale);
}

std::tuple<at::Tensor, at::Tensor> call_sparse_backward(const at::Tensor& grad,
                                                        const at::Tensor& indices,
                                                        const c10::SymInt& num_weights,
                                                        int64_t padding_idx, bool scale) {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, bool)>(
      "embedding_ext::embedding_sparse_backward");
  return op.call(grad, indices, num_weights, padding_idx, scale);
}

// The uncoalesced COO gradient of the lookup: rows in position order, padding removed.
at::Tensor sparse_gradient(const at::Tensor& grad, const at::Tensor& indices,
                           const c10::SymInt& num_weights, int64_t padding_idx, bool scale) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(at::GradMode::is_enabled() && grad.requires_grad()),
      "embedding_ext: double backward through sparse=True gradients is not supported; use "
      "sparse=False for higher-order gradients");
  at::Tensor rows, values;
  if (padding_idx < 0 && !scale) {
    // Nothing to drop or scale: the values are grad_output itself (as in PyTorch), so no
    // kernel and no copy. The forward already checked these ids, and autograd's version
    // counter guarantees they have not changed since.
    rows = indices.reshape({1, -1}).to(at::kLong);
    values = grad.reshape({rows.size(1), grad.size(-1)});
  } else {
    std::tie(rows, values) = call_sparse_backward(grad, indices, num_weights, padding_idx, scale);
  }
  return at::_sparse_coo_tensor_unsafe_symint(rows, values, {num_weights, grad.sym_size(-1)},
                                              values.scalar_type(), at::kSparse,
                                              values.device(), std::nullopt,
                                              /*is_coalesced=*/false);
}

at::Tensor call_lookup(const at::Tensor& weight, const at::Tensor& indices, int64_t padding_idx,
                       bool scale, bool sparse) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>(
          "embedding_ext::embedding");
  return op.call(weight, indices, padding_idx, scale, sparse);
}

// A new node of type T, held the way this torch holds nodes.
template <typename T>
auto make_node() {
  using Held = std::decay_t<decltype(std::declval<const at::Tensor&>().grad_fn())>;
  if constexpr (std::is_same_v<Held, std::shared_ptr<Node>>) {
    return std::shared_ptr<T>(new T());
  } else {
    return c10::make_intrusive<T>();
  }
}

// What the three kernels share: `out` = op(input) below autograd; when a gradient can flow
// from `input`, a node made by `make` becomes out's grad_fn; when `input` carries a
// forward-mode tangent, out's tangent is `linear(tangent)` (each op is linear in `input`).
template <typename Below, typename Make, typename Linear>
at::Tensor record(const at::Tensor& input, Below&& below, Make&& make, Linear&& linear) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = below();
  }
  if (torch::autograd::compute_requires_grad(input)) {
    auto node = make();
    node->set_next_edges(torch::autograd::collect_next_edges(input));
    torch::autograd::set_history(out, node);
  }
  const at::Tensor& tangent = input._fw_grad(/*level=*/0);
  if (tangent.defined()) out._set_fw_grad(linear(tangent), /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

// The node of the lookup: grad_output -> the weight's gradient (dense or sparse).
struct LookupBackward : public Node {
  SavedVariable indices;
  c10::SymInt num_weights;
  int64_t padding_idx = -1;
  bool scale = false;
  bool sparse = false;

  std::string name() const override { return "embedding_ext::LookupBackward"; }
  void release_variables() override { indices.reset_data(); }
  variable_list apply(variable_list&& grads) override {
    const at::Tensor ids = indices.unpack();
    if (!grads[0].defined()) return {at::Tensor()};
    return {sparse ? sparse_gradient(grads[0], ids, num_weights, padding_idx, scale)
                   // Differentiable itself (DenseBackwardBackward) when create_graph=True.
                   : call_dense_backward(grads[0], ids, num_weights, padding_idx, scale)};
  }
};

// The node of the dense backward: its adjoint is the scaled gather, and back.
struct DenseBackwardBackward : public Node {
  SavedVariable indices;
  int64_t padding_idx = -1;
  bool scale = false;

  std::string name() const override { return "embedding_ext::DenseBackwardBackward"; }
  void release_variables() override { indices.reset_data(); }
  variable_list apply(variable_list&& grads) override {
    const at::Tensor ids = indices.unpack();
    if (!grads[0].defined()) return {at::Tensor()};
    return {call_scaled_gather(grads[0], ids, padding_idx, scale)};
  }
};

struct ScaledGatherBackward : public Node {
  SavedVariable indices;
  c10::SymInt num_weights;
  int64_t padding_idx = -1;
  bool scale = false;

  std::string name() const override { return "embedding_ext::ScaledGatherBackward"; }
  void release_variables() override { indices.reset_data(); }
  variable_list apply(variable_list&& grads) override {
    const at::Tensor ids = indices.unpack();
    if (!grads[0].defined()) return {at::Tensor()};
    return {call_dense_backward(grads[0], ids, num_weights, padding_idx, scale)};
  }
};

at::Tensor embedding_autograd(c10::DispatchKeySet keys, const at::Tensor& weight,
                              const at::Tensor& indices, int64_t padding_idx, bool scale,
                              bool sparse) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>(
          "embedding_ext::embedding");
  return record(
      weight,
      // Straight to the backend kernel (cpu/forward.cpp, cuda/forward.cu): a redispatch with
      // the keys below autograd is the cheapest way down, as in PyTorch's own ops.
      [&] {
        return op.redispatch(keys & c10::after_autograd_keyset, weight, indices, padding_idx,
                             scale, sparse);
      },
      [&] {
        auto node = make_node<LookupBackward>();
        node->indices = SavedVariable(indices, /*is_output=*/false);
        node->num_weights = weight.sym_size(0);
        node->padding_idx = padding_idx;
        node->scale = scale;
        node->sparse = sparse;
        return node;
      },
      [&](const at::Tensor& t) { return call_lookup(t, indices, padding_idx, scale, sparse); });
}

at::Tensor dense_backward_autograd(const at::Tensor& grad, const at::Tensor& indices,
                                   c10::SymInt num_weights, int64_t padding_idx, bool scale) {
  return record(
      grad, [&] { return call_dense_backward(grad, indices, num_weights, padding_idx, scale); },
      [&] {
        auto node = make_node<DenseBackwardBackward>();
        node->indices = SavedVariable(indices, /*is_output=*/false);
        node->padding_idx = padding_idx;
        node->scale = scale;
        return node;
      },
      [&](const at::Tensor& t) {
        return call_dense_backward(t, indices, num_weights, padding_idx, scale);
      });
}

at::Tensor scaled_gather_autograd(const at::Tensor& weight, const at::Tensor& indices,
                                  int64_t padding_idx, bool scale) {
  return record(
      weight, [&] { return call_scaled_gather(weight, indices, padding_idx, scale); },
      [&] {
        auto node = make_node<ScaledGatherBackward>();
        node->indices = SavedVariable(indices, /*is_output=*/false);
        node->num_weights = weight.sym_size(0);
        node->padding_idx = padding_idx;
        node->scale = scale;
        return node;
      },
      [&](const at::Tensor& t) { return call_scaled_gather(t, indices, padding_idx, scale); });
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, Autograd, m) {
  m.impl("embedding", &embedding_autograd);
  m.impl("embedding_dense_backward", &dense_backward_autograd);
  m.impl("embedding_scaled_gather", &scaled_gather_autograd);
}

}  // namespace embedding_ext
