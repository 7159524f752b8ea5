"""``EmbeddingFunction``: the lookup as a Python ``torch.autograd.Function``, for code that
composes autograd Functions itself. :func:`embedding_ext.embedding` does not need it: the
op ``torch.ops.embedding_ext.embedding`` records C++ autograd nodes (csrc/autograd.cpp) with
the same gradients, forward-mode tangents and torch.func support, at a fraction of the
per-call cost. The gradient ops it calls are differentiable themselves (C++ nodes too), so
gradients of every order stay on our kernels."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops


class EmbeddingFunction(torch.autograd.Function):
    """``weight[indices]`` with PyTorch's embedding gradient semantics.

    ``apply(weight, indices, padding_idx, scale_grad_by_freq, sparse)`` where
    ``padding_idx`` is already normalised to ``[0, num_embeddings)`` or ``-1`` for none.
    Works with torch.func transforms and forward-mode AD; gives the same results as
    :func:`embedding_ext.embedding`.
    """

    @staticmethod
    def forward(weight: Tensor, indices: Tensor, padding_idx: int, scale_grad_by_freq: bool,
                sparse: bool) -> Tensor:
        return ops.embedding_forward(weight, indices)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, indices, padding_idx, scale_grad_by_freq, sparse = inputs
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)
        ctx.num_weights = weight.shape[0]
        ctx.padding_idx = padding_idx
        ctx.scale_grad_by_freq = scale_grad_by_freq
        ctx.sparse = sparse

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (indices,) = ctx.saved_tensors
        args = (grad_output, indices, ctx.num_weights, ctx.padding_idx, ctx.scale_grad_by_freq)
        # The dense gradient op is differentiable itself (create_graph=True).
        grad_weight = _sparse_gradient(*args) if ctx.sparse else ops.embedding_dense_backward(*args)
        return grad_weight, None, None, None, None

    @staticmethod
    def jvp(ctx, weight_tangent, *_):
        (indices,) = ctx.saved_tensors
        return ops.embedding_forward(weight_tangent, indices)


def _sparse_gradient(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    if torch.is_grad_enabled() and grad_output.requires_grad:
        raise NotImplementedError(
            "embedding_ext: double backward through sparse=True gradients is not supported; "
            "use sparse=False for higher-order gradients")
    if padding_idx < 0 and not scale_grad_by_freq and indices.device.type == "cpu":
        # Nothing to drop or scale: the values are grad_output itself (as in PyTorch), so no
        # kernel and no copy. The CPU forward raised on a bad id, and autograd's version
        # counter guarantees these ids have not changed since. Not on CUDA (as in
        # csrc/autograd.cpp): its forward only records a bad id, and the raw id would send
        # an optimizer's step out of bounds; the kernel writes it as a zero row 0.
        rows = indices.reshape(1, -1).to(torch.int64)
        values = grad_output.reshape(rows.shape[1], grad_output.shape[-1])
    else:
        rows, values = ops.embedding_sparse_backward(grad_output, indices, num_weights,
                                                     padding_idx, scale_grad_by_freq)
    return torch.sparse_coo_tensor(rows, values, (num_weights, grad_output.shape[-1]),
                                   is_coalesced=False, check_invariants=False)


def bag_sparse_gradient(grad_output: Tensor, indices: Tensor, offsets: Tensor, num_weights: int,
                        mode: int, per_sample_weights: Tensor | None, padding_idx: int,
                        scale_grad_by_freq: bool, csr_tail: bool) -> tuple[Tensor, Tensor]:
    """The sparse bag gradient's (rows (1, nnz), values): the non-padding ids in bags. Without
    padding the op gives every id an entry (zero rows for ids in no bag), so that its size
    needs no synchronisation; where the CSR may end early (csr_tail) the ids after the last
    offset are left out here, with one (SparseAdam would step their rows)."""
    rows, values = ops.embedding_bag_sparse_backward(grad_output, indices, offsets, num_weights,
                                                     mode, per_sample_weights, padding_idx,
                                                     scale_grad_by_freq)
    if padding_idx < 0 and csr_tail:
        end = int(offsets[-1])
        rows, values = rows[:, :end], values[:end]
    return rows, values


class EmbeddingBagFunction(torch.autograd.Function):
    """The pooled lookup: ``apply(weight, indices, offsets, mode, per_sample_weights,
    padding_idx, scale_grad_by_freq, sparse, csr_tail=True)`` with 1-D ids, CSR offsets
    (bags + 1 entries), mode 0 sum / 1 mean / 2 max and ``padding_idx`` normalised (-1:
    none). Returns ``(output, arg_max)``; gradients for ``weight`` (dense, or an uncoalesced
    sparse COO with ``sparse``: the non-padding ids in bags) and ``per_sample_weights``
    (once differentiable). ``csr_tail``: whether the last offset may be below the number of
    ids; the sparse gradient then synchronises once to leave the ids after it out. Pass
    False when it cannot be (embedding_bag does whenever there is a bag: its last bag runs
    to the end of the ids): without padding, the sparse gradient then needs no
    synchronisation."""

    @staticmethod
    def forward(weight: Tensor, indices: Tensor, offsets: Tensor, mode: int,
                per_sample_weights: Tensor | None, padding_idx: int,
                scale_grad_by_freq: bool, sparse: bool,
                csr_tail: bool = True) -> tuple[Tensor, Tensor]:
        return ops.embedding_bag_forward(weight, indices, offsets, mode, per_sample_weights,
                                         padding_idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (weight, indices, offsets, mode, per_sample_weights, padding_idx, scale_grad_by_freq,
         sparse, csr_tail) = inputs
        arg_max = output[1]
        ctx.mark_non_differentiable(arg_max)
        # The weight is needed only for the per_sample_weights gradient.
        ctx.save_for_backward(weight if per_sample_weights is not None else None, indices,
                              offsets, arg_max, per_sample_weights)
        ctx.num_weights = weight.shape[0]
        ctx.mode = mode
        ctx.padding_idx = padding_idx
        ctx.scale_grad_by_freq = scale_grad_by_freq
        ctx.sparse = sparse
        ctx.csr_tail = csr_tail

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, _grad_arg_max):
        weight, indices, offsets, arg_max, per_sample_weights = ctx.saved_tensors
        grad_weight = grad_psw = None
        if ctx.needs_input_grad[0] and ctx.sparse:
            rows, values = bag_sparse_gradient(
                grad_output, indices, offsets, ctx.num_weights, ctx.mode, per_sample_weights,
                ctx.padding_idx, ctx.scale_grad_by_freq, ctx.csr_tail)
            grad_weight = torch.sparse_coo_tensor(rows, values, (ctx.num_weights, values.shape[1]),
                                                  is_coalesced=False, check_invariants=False)
        elif ctx.needs_input_grad[0]:
            grad_weight = ops.embedding_bag_dense_backward(
                grad_output, indices, offsets, arg_max, ctx.num_weights, ctx.mode,
                per_sample_weights, ctx.padding_idx, ctx.scale_grad_by_freq)
        if ctx.needs_input_grad[4]:
            grad_psw = ops.embedding_bag_per_sample_weights_backward(
                grad_output, weight, indices, offsets, ctx.padding_idx)
        return grad_weight, None, None, None, grad_psw, None, None, None, None


class _EmbeddingBagEagerFunction(EmbeddingBagFunction):
    """EmbeddingBagFunction in the form without ``setup_context`` (``forward(ctx, ...)``),
    for eager calls from :func:`embedding_ext.embedding_bag`: when a Function defines
    ``setup_context``, ``Function.apply`` binds the arguments to ``forward``'s signature with
    ``inspect`` on every call (PyTorch 2.11-2.14), 30 us, eight times the op on a small bag
    (bench/notes/cpu-bags.md section 9, item 3). torch.func transforms need ``setup_context``: under
    them the caller uses EmbeddingBagFunction itself. Same forward, context and backward."""

    setup_context = torch.autograd.Function.setup_context  # "not defined" to apply()

    @staticmethod
    def forward(ctx, *args):  # noqa: D102 (see EmbeddingBagFunction.forward)
        output = EmbeddingBagFunction.forward(*args)
        EmbeddingBagFunction.setup_context(ctx, args, output)
        return output

