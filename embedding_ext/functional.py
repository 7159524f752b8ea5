"""``embedding()`` and ``embedding_bag()``: the signatures and semantics of
``torch.nn.functional.embedding`` / ``embedding_bag``. Arguments are checked here; DTensor
tables go to distributed.py, plain ones to lookup.py."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import distributed, distributed_bag
from .lookup import (_bag_layout, _embedding_direct, bag_arguments,  # noqa: F401 (tests)
                     csr_may_end_early, embedding_bag_local, embedding_local,
                     normalize_padding_idx)

_PLAIN = (Tensor, torch.nn.Parameter)


def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """Equivalent to :func:`torch.nn.functional.embedding`, computed by embedding_ext's kernels.

    Beyond PyTorch: ``scale_grad_by_freq`` works with ``sparse=True``; fp16/bf16 gradients
    accumulate in fp32; ``max_norm`` uses a true p-norm on every device; out-of-range ids on
    CUDA raise :class:`~embedding_ext.EmbeddingIndexError` (an ``IndexError``, as PyTorch's CPU
    raises, and a ``RuntimeError``) instead of killing the CUDA context.
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
    # Plain tensors skip the DTensor test's call: the tiny lookup's per-call cost is Python's.
    if (type(weight) not in _PLAIN or type(input) not in _PLAIN) and \
            distributed.is_dtensor(weight, input):
        return distributed.embedding(input, weight, padding, max_norm, norm_type,
                                     scale_grad_by_freq, sparse)
    return embedding_local(input, weight, padding, max_norm, norm_type, scale_grad_by_freq,
                           sparse)


def embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None,
                  max_norm: float | None = None, norm_type: float = 2.0,
                  scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                  per_sample_weights: Tensor | None = None, include_last_offset: bool = False,
                  padding_idx: int | None = None) -> Tensor:
    """Equivalent to :func:`torch.nn.functional.embedding_bag`, computed by embedding_ext's
    CPU and CUDA kernels (docs/bags.md).

    Beyond PyTorch: offsets are validated (first 0, non-decreasing, none past the ids) with
    an error naming the bad entry (on CUDA without a synchronisation: raised as
    EmbeddingIndexError by a later call, like a bad id); with ``include_last_offset=True``
    the last bag runs to the end of the ids in every mode (PyTorch's fp32/fp16 sum path
    without padding drops the ids after the last offset); fp16/bf16 pool in fp32;
    ``sparse=True`` works with ``scale_grad_by_freq``. An out-of-range id raises
    :class:`~embedding_ext.EmbeddingIndexError`, both ``RuntimeError`` (as PyTorch's) and
    ``IndexError``.
    """
    if has_torch_function_variadic(input, weight, offsets, per_sample_weights):
        return handle_torch_function(
            embedding_bag, (input, weight, offsets, per_sample_weights), input, weight,
            offsets=offsets, max_norm=max_norm, norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq, mode=mode, sparse=sparse,
            per_sample_weights=per_sample_weights, include_last_offset=include_last_offset,
            padding_idx=padding_idx)
    ids, csr, psw, padding = bag_arguments(input, weight, offsets, scale_grad_by_freq, mode,
                                           sparse, per_sample_weights, include_last_offset,
                                           padding_idx)
    if distributed.is_dtensor(weight, ids, csr, psw):
        return distributed_bag.embedding_bag(ids, csr, weight, padding, max_norm, norm_type,
                                         scale_grad_by_freq, mode, sparse, psw)
    return embedding_bag_local(ids, csr, weight, padding, max_norm, norm_type,
                               scale_grad_by_freq, mode, sparse, psw,
                               csr_may_end_early(input, offsets, include_last_offset))
