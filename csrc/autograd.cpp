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
#include <ATen/core/Tensor.h>
#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
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

using ForwardSig = at::Tensor(const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op = find_op<ForwardSig>("embedding_ext::embedding_forward");
  return op;
}

using DenseBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, int64_t, bool);
using ScaledGatherSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool);

const c10::TypedOperatorHandle<DenseBackwardSig>& dense_backward_op() {
  static const auto op = find_op<DenseBackwardSig>("embedding_ext::embedding_dense_backward");
  return op;
}

const c10::TypedOperatorHandle<ScaledGatherSig>& scaled_gather_op() {
  static const auto op = find_op<ScaledGatherSig>("embedding_ext::embedding_scaled_gather");
  return op;
}

at::Tensor call_dense_backward(const at::Tensor& grad, const at::Tensor& indices,
                               const c10::SymInt& num_weights, int64_t padding_idx, bool scale) {
  return dense_backward_op().call(grad, indices, num_weights, padding_idx, scale);
}

at::Tensor call_scaled_gather(const at::Tensor& weight, const at::Tensor& indices,
                              int64_t padding_idx, bool scale) {
  return scaled_gather_op().call(weight, indices, padding_idx, scale);
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
  if (padding_idx < 0 && !scale && indices.is_cpu()) {
    // Nothing to drop or scale: the values are grad_output itself (as in PyTorch), so no
    // kernel and no copy. The CPU forward raised on a bad id, and autograd's version
    // counter guarantees these ids have not changed since. Not on CUDA: its forward only
    // records a bad id, and the raw id in the gradient would send an optimizer's step out
    // of bounds before any later call could raise; the kernel writes such an entry as a
    // zero row 0 and reports it.
    rows = indices.reshape({1, -1}).to(at::kLong);
    values = grad.reshape_symint({rows.sym_size(1), grad.sym_size(-1)});
  } else {
    std::tie(rows, values) = call_sparse_backward(grad, indices, num_weights, padding_idx, scale);
  }
  return at::_sparse_coo_tensor_unsafe_symint(rows, values, {num_weights, grad.sym_size(-1)},
                                              values.scalar_type(), at::kSparse,
                                              values.device(), std::nullopt,
                                              /*is_coalesced=*/false);
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>&
lookup_op() {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>(
          "embedding_ext::embedding");
  return op;
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

// The backward node of all three ops. Each op is linear in its differentiable input, and
// their adjoints map onto each other: lookup -> dense backward -> scaled gather -> dense
// backward -> ...; the node calls the adjoint op through the dispatcher, so create_graph
// records the next node.
struct EmbeddingNode : public Node {
  enum class Kind { kLookup, kDenseBackward, kScaledGather };
  Kind kind = Kind::kLookup;
  SavedVariable indices;
  c10::SymInt num_weights;  // rows of the weight the gradient is for (kLookup, kScaledGather)
  int64_t padding_idx = -1;
  bool scale = false;
  bool sparse = false;  // kLookup: a sparse COO gradient

  std::string name() const override {
    switch (kind) {
      case Kind::kLookup: return "embedding_ext::LookupBackward";
      case Kind::kDenseBackward: return "embedding_ext::DenseBackwardBackward";
      default: return "embedding_ext::ScaledGatherBackward";
    }
  }
  // Both lock the node, as PyTorch's own nodes do: two threads may run backward through
  // a shared graph, one of them releasing what the other unpacks.
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    indices.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor ids = indices.unpack();
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return {at::Tensor()};
    if (kind == Kind::kDenseBackward) return {call_scaled_gather(grad, ids, padding_idx, scale)};
    if (sparse) return {sparse_gradient(grad, ids, num_weights, padding_idx, scale)};
    return {call_dense_backward(grad, ids, num_weights, padding_idx, scale)};
  }
};

// out = below() for an op linear in `input`: when a gradient can flow from `input`, an
// EmbeddingNode becomes out's grad_fn; when `input` carries a forward-mode tangent, out's
// tangent is tangent_op(tangent) (the op itself, by linearity).
// num_weights: the rows of the gradient the node produces; none: input's rows (read only
// after below() has checked that input is 2-D).
template <typename Below, typename TangentOp>
at::Tensor record(EmbeddingNode::Kind kind, const at::Tensor& input, const at::Tensor& indices,
                  std::optional<c10::SymInt> num_weights, int64_t padding_idx, bool scale,
                  bool sparse, Below&& below, TangentOp&& tangent_op) {
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = below();
  }
  if (torch::autograd::compute_requires_grad(input)) {
    auto node = make_node<EmbeddingNode>();
    node->kind = kind;
    node->indices = SavedVariable(indices, /*is_output=*/false);
    node->num_weights = num_weights ? std::move(*num_weights) : input.sym_size(0);
    node->padding_idx = padding_idx;
    node->scale = scale;
    node->sparse = sparse;
    node->set_next_edges(torch::autograd::collect_next_edges(input));
    torch::autograd::set_history(out, node);
  }
  const at::Tensor& tangent = input._fw_grad(/*level=*/0);
  if (tangent.defined()) out._set_fw_grad(tangent_op(tangent), /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

at::Tensor embedding_autograd(c10::DispatchKeySet keys, const at::Tensor& weight,
                              const at::Tensor& indices, int64_t padding_idx, bool scale,
                              bool sparse) {
  return record(
      EmbeddingNode::Kind::kLookup, weight, indices, std::nullopt, padding_idx, scale, sparse,
      // Straight to embedding_forward's backend kernel: a redispatch with the keys below
      // autograd is the cheapest way down, as in PyTorch's own ops.
      [&] { return forward_op().redispatch(keys & c10::after_autograd_keyset, weight, indices); },
      [&](const at::Tensor& t) { return lookup_op().call(t, indices, padding_idx, scale, sparse); });
}

at::Tensor dense_backward_autograd(c10::DispatchKeySet keys, const at::Tensor& grad,
                                   const at::Tensor& indices, c10::SymInt num_weights,
                                   int64_t padding_idx, bool scale) {
  return record(
      EmbeddingNode::Kind::kDenseBackward, grad, indices, num_weights, padding_idx, scale, false,
      [&] {
        return dense_backward_op().redispatch(keys & c10::after_autograd_keyset, grad, indices,
                                              num_weights, padding_idx, scale);
      },
      [&](const at::Tensor& t) {
        return call_dense_backward(t, indices, num_weights, padding_idx, scale);
      });
}

at::Tensor scaled_gather_autograd(c10::DispatchKeySet keys, const at::Tensor& weight,
                                  const at::Tensor& indices, int64_t padding_idx, bool scale) {
  return record(
      EmbeddingNode::Kind::kScaledGather, weight, indices, std::nullopt, padding_idx, scale,
      false,
      [&] {
        return scaled_gather_op().redispatch(keys & c10::after_autograd_keyset, weight, indices,
                                             padding_idx, scale);
      },
      [&](const at::Tensor& t) { return call_scaled_gather(t, indices, padding_idx, scale); });
}

// Below autograd (inference mode, tracing without autograd) the lookup is the forward op.
at::Tensor embedding_below_autograd(const at::Tensor& weight, const at::Tensor& indices,
                                    int64_t /*padding_idx*/, bool /*scale*/, bool /*sparse*/) {
  return forward_op().call(weight, indices);
}

// The in-place ops bump the version of every tensor they write, after the kernel ran (a
// call that raises changes nothing, the version included): autograd then refuses a backward
// that would read a saved weight the op changed, however the op was called.
void renorm_inplace(c10::DispatchKeySet keys, const at::Tensor& weight, const at::Tensor& indices,
                    double max_norm, double norm_type) {
  static const auto op = find_op<void(const at::Tensor&, const at::Tensor&, double, double)>(
      "embedding_ext::embedding_renorm_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, weight, indices, max_norm, norm_type);
  }
  torch::autograd::impl::bump_version(weight);
}

using FusedUpdateSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            bool, int64_t, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double, double, double, double,
                            double, int64_t);

void fused_update_inplace(c10::DispatchKeySet keys, const at::Tensor& weight,
                          const at::Tensor& grad, const at::Tensor& indices, int64_t padding_idx,
                          bool scale, int64_t rule, const std::optional<at::Tensor>& state1,
                          const std::optional<at::Tensor>& state2, double lr, double eps,
                          double beta1, double beta2, double lr_decay, int64_t step) {
  static const auto op = find_op<FusedUpdateSig>("embedding_ext::embedding_fused_update_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, weight, grad, indices, padding_idx,
                  scale, rule, state1, state2, lr, eps, beta1, beta2, lr_decay, step);
  }
  torch::autograd::impl::bump_version(weight);
  for (const auto* state : {&state1, &state2}) {
    if (state->has_value()) torch::autograd::impl::bump_version(**state);
  }
}

using CollectionUpdateSig = void(at::TensorList, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, const std::optional<at::Tensor>&, int64_t,
                                 at::TensorList, at::TensorList, double, double, double, double,
                                 double, at::IntArrayRef);

void collection_fused_update_inplace(
    c10::DispatchKeySet keys, at::TensorList weights, const at::Tensor& grad,
    const at::Tensor& values, const at::Tensor& offsets, at::IntArrayRef feature_table,
    at::IntArrayRef modes, at::IntArrayRef padding_idx, const std::optional<at::Tensor>& psw,
    int64_t rule, at::TensorList state1, at::TensorList state2, double lr, double eps,
    double beta1, double beta2, double lr_decay, at::IntArrayRef steps) {
  static const auto op = find_op<CollectionUpdateSig>(
      "embedding_ext::embedding_bag_collection_fused_update_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, weights, grad, values, offsets,
                  feature_table, modes, padding_idx, psw, rule, state1, state2, lr, eps, beta1,
                  beta2, lr_decay, steps);
  }
  for (at::TensorList list : {weights, state1, state2}) {
    for (const at::Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(embedding_ext, ADInplaceOrView, m) {
  m.impl("embedding_renorm_", &renorm_inplace);
  m.impl("embedding_fused_update_", &fused_update_inplace);
  m.impl("embedding_bag_collection_fused_update_", &collection_fused_update_inplace);
}

TORCH_LIBRARY_IMPL(embedding_ext, CompositeExplicitAutograd, m) {
  m.impl("embedding", &embedding_below_autograd);
}

TORCH_LIBRARY_IMPL(embedding_ext, Autograd, m) {
  m.impl("embedding", &embedding_autograd);
  m.impl("embedding_dense_backward", &dense_backward_autograd);
  m.impl("embedding_scaled_gather", &scaled_gather_autograd);
}

}  // namespace embedding_ext
