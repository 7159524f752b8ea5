"""``embedding()``: the same signature and semantics as ``torch.nn.functional.embedding``."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import ops
from ._torch_private import direct_call

# The lookup op; its autograd, forward-mode AD and torch.func support are in C++
# (csrc/autograd.cpp). Called through its direct C++ entry: per-call cost matters for small
# lookups (bench/NOTES-cpu.md); torch.compile traces it as the op.
_embedding_direct = direct_call(torch.ops.embedding_ext.embedding.default)


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int:
    """PyTorch's rule: ``-num_embeddings <= padding_idx < num_embeddings``, negatives wrap;
    ``None`` becomes -1 ("no padding") for the kernels."""
    if padding_idx is None:
        return -1
    if padding_idx >= num_embeddings or padding_idx < -num_embeddings:
        raise AssertionError("Padding_idx must be within num_embeddings")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """Equivalent to :func:`torch.nn.functional.embedding`, computed by embedding_ext's kernels.

    Beyond PyTorch: ``scale_grad_by_freq`` works with ``sparse=True``; fp16/bf16 gradients
    accumulate in fp32; ``max_norm`` uses a true p-norm on every device; out-of-range ids on
    CUDA raise ``IndexError`` instead of killing the CUDA context.
    """
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(
            embedding, (input, weight), input, weight, padding_idx=padding_idx,
            max_norm=max_norm, norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse)
    padding = -1
    if padding_idx is not None:
        if weight.dim() != 2:  # before weight.shape[0] below; the ops check it otherwise
            raise RuntimeError(f"embedding: 'weight' must be 2-D, got a {weight.dim()}-D tensor "
                               f"of shape {tuple(weight.shape)}")
        padding = normalize_padding_idx(padding_idx, weight.shape[0])
    if max_norm is not None:
        # The renorm reads the indices once more; make them contiguous once for both.
        input = input.contiguous()
        with torch.no_grad():
            ops.embedding_renorm_(weight, input, max_norm, norm_type)
        # As in PyTorch, the in-place renorm is visible to autograd's saved-tensor checks.
        torch.autograd.graph.increment_version(weight)
    return _embedding_direct(weight, input, padding, bool(scale_grad_by_freq), bool(sparse))
