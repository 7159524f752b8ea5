"""Autograd wiring. ``EmbeddingFunction`` is the lookup; its dense gradient goes through a
pair of mutually adjoint linear functions (dense backward <-> scaled gather), so gradients
of every order stay on our kernels."""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import ops


# The lookup's context and derivatives, shared by the Function variants below.
def _save(ctx, weight, indices, padding_idx, scale_grad_by_freq, sparse):
    ctx.save_for_backward(indices)
    ctx.save_for_forward(indices)
    ctx.num_weights = weight.shape[0]
    ctx.padding_idx = padding_idx
    ctx.scale_grad_by_freq = scale_grad_by_freq
    ctx.sparse = sparse


def _backward(ctx, grad_output):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    (indices,) = ctx.saved_tensors
    args = (grad_output, indices, ctx.num_weights, ctx.padding_idx, ctx.scale_grad_by_freq)
    if ctx.sparse:
        grad_weight = _sparse_gradient(*args)
    elif torch.is_grad_enabled():  # create_graph=True: keep the gradient differentiable
        grad_weight = _DenseBackward.apply(*args)
    else:
        grad_weight = ops.embedding_dense_backward(*args)
    return grad_weight, None, None, None, None


def _jvp(ctx, weight_tangent, *_):
    (indices,) = ctx.saved_tensors
    return ops.embedding_forward(weight_tangent, indices)


class EmbeddingFunction(torch.autograd.Function):
    """``weight[indices]`` with PyTorch's embedding gradient semantics.

    ``apply(weight, indices, padding_idx, scale_grad_by_freq, sparse)`` where
    ``padding_idx`` is already normalised to ``[0, num_embeddings)`` or ``-1`` for none.
    Works with torch.func transforms; :func:`embedding` uses a cheaper twin in plain eager
    mode (see ``apply_embedding``).
    """

    @staticmethod
    def forward(weight, indices, padding_idx: int, scale_grad_by_freq: bool, sparse: bool):
        return ops.embedding_forward(weight, indices)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


class _EagerEmbeddingFunction(torch.autograd.Function):
    """EmbeddingFunction in the older ``forward(ctx, ...)`` style: ``apply`` costs ~5 us
    instead of ~25 us (no functorch dispatch), but it cannot run under torch.func."""

    @staticmethod
    def forward(ctx, weight, indices, padding_idx, scale_grad_by_freq, sparse):
        _save(ctx, weight, indices, padding_idx, scale_grad_by_freq, sparse)
        return ops.embedding_forward(weight, indices)

    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


class _EmbeddingFunctionForCompile(EmbeddingFunction):
    """EmbeddingFunction without the custom ``jvp``, which Dynamo cannot trace; used inside
    ``torch.compile`` regions, where forward-mode AD is not available anyway."""

    jvp = staticmethod(torch.autograd.Function.jvp)


def apply_embedding(weight, indices, padding_idx: int, scale_grad_by_freq: bool, sparse: bool):
    """The entry point of functional.embedding: the cheapest variant that supports what the
    caller can ask for. Without any possible derivative (inference, frozen tables) it calls
    the op directly."""
    args = (weight, indices, padding_idx, scale_grad_by_freq, sparse)
    if torch.compiler.is_compiling():
        return _EmbeddingFunctionForCompile.apply(*args)
    if torch._C._are_functorch_transforms_active():
        return EmbeddingFunction.apply(*args)
    if (not (weight.requires_grad and torch.is_grad_enabled())
            and forward_ad._current_level < 0):  # no dual tensors can exist
        return ops.embedding_forward(weight, indices)
    return _EagerEmbeddingFunction.apply(*args)


def _sparse_gradient(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    if torch.is_grad_enabled() and grad_output.requires_grad:
        raise NotImplementedError(
            "embedding_ext: double backward through sparse=True gradients is not supported; "
            "use sparse=False for higher-order gradients")
    if padding_idx < 0 and not scale_grad_by_freq:
        # Nothing to drop or scale: the values are grad_output itself (as in PyTorch), so no
        # kernel and no copy. The forward already checked these ids, and autograd's version
        # counter guarantees they have not changed since.
        rows = indices.reshape(1, -1).to(torch.int64)
        values = grad_output.reshape(rows.shape[1], grad_output.shape[-1])
    else:
        rows, values = ops.embedding_sparse_backward(grad_output, indices, num_weights,
                                                     padding_idx, scale_grad_by_freq)
    return torch.sparse_coo_tensor(rows, values, (num_weights, grad_output.shape[-1]),
                                   is_coalesced=False, check_invariants=False)


class _DenseBackward(torch.autograd.Function):
    """grad_output -> (num_weights, D) gradient; linear in grad_output."""

    @staticmethod
    def forward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
        return ops.embedding_dense_backward(grad_output, indices, num_weights, padding_idx,
                                            scale_grad_by_freq)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, indices, num_weights, padding_idx, scale_grad_by_freq = inputs
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)
        ctx.num_weights = num_weights
        ctx.args = (padding_idx, scale_grad_by_freq)

    @staticmethod
    def backward(ctx, grad_grad_weight):
        (indices,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return _ScaledGather.apply(grad_grad_weight, indices, *ctx.args), None, None, None, None

    @staticmethod
    def jvp(ctx, grad_output_tangent, *_):
        (indices,) = ctx.saved_tensors
        return ops.embedding_dense_backward(grad_output_tangent, indices, ctx.num_weights,
                                            *ctx.args)


class _ScaledGather(torch.autograd.Function):
    """(num_weights, D) -> per-position rows scaled by 1/count, zero at padding; the adjoint
    of _DenseBackward."""

    @staticmethod
    def forward(weight, indices, padding_idx, scale_grad_by_freq):
        return ops.embedding_scaled_gather(weight, indices, padding_idx, scale_grad_by_freq)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, indices, padding_idx, scale_grad_by_freq = inputs
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)
        ctx.num_weights = weight.shape[0]
        ctx.args = (padding_idx, scale_grad_by_freq)

    @staticmethod
    def backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return _DenseBackward.apply(grad_output, indices, ctx.num_weights, *ctx.args), None, None, None

    @staticmethod
    def jvp(ctx, weight_tangent, *_):
        (indices,) = ctx.saved_tensors
        return ops.embedding_scaled_gather(weight_tangent, indices, *ctx.args)
