"""Lookups on plain (local) tensors, their arguments already in the kernels' form: the
layer under ``ee.embedding`` / ``ee.embedding_bag`` (functional.py, which also routes DTensor
tables to distributed.py), and what the sharded and fused lookups call for their local
pieces."""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from ._torch_private import compiled_autograd_state, direct_call
from .autograd import EmbeddingBagFunction, EmbeddingFunction, _EmbeddingBagEagerFunction

# The lookup op; its autograd, forward-mode AD and torch.func support are in C++
# (csrc/autograd.cpp). Called through its direct C++ entry: per-call cost matters for small
# lookups (bench/notes/cpu-lookup.md, section 5); torch.compile traces it as the op.
_embedding_direct = direct_call(torch.ops.embedding_ext.embedding.default)


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int:
    """PyTorch's rule: ``-num_embeddings <= padding_idx < num_embeddings``, negatives wrap;
    ``None`` becomes -1 ("no padding") for the kernels."""
    if padding_idx is None:
        return -1
    if padding_idx >= num_embeddings or padding_idx < -num_embeddings:
        raise AssertionError(f"Padding_idx must be within num_embeddings: {-num_embeddings} "
                             f"<= padding_idx < {num_embeddings}, got {padding_idx}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def renorm_rows(weight: Tensor, ids: Tensor, max_norm: float, norm_type: float) -> Tensor:
    """max_norm: the rows ``ids`` references renormed in place, before the lookup; returns
    the ids made contiguous (the renorm reads them once more: contiguous once for both)."""
    ids = ids.contiguous()
    with torch.no_grad():  # the op bumps weight's version (autograd's saved-tensor checks)
        ops.embedding_renorm_(weight, ids, max_norm, norm_type)
    return ids


def check_bag_before_renorm(weight: Tensor, ids: Tensor, csr: Tensor, mode: str,
                            per_sample_weights: Tensor | None, padding_idx: int) -> None:
    """Raises what the pooled lookup would raise for these inputs (bad offsets included),
    before the max_norm renorm writes the weight: a call that raises changes nothing. On
    the CPU the forward op's own checks run, on a zero-width view of the weight (no row is
    read or pooled). Elsewhere its checks of shapes, dtypes and devices; the offsets' values
    are checked by the CUDA kernels, asynchronously (reading them here would cost a host
    synchronisation per call)."""
    psw = None if per_sample_weights is None else per_sample_weights.detach()
    if weight.device.type == "cpu":
        ops.embedding_bag_forward(weight.detach()[:, :0], ids, csr, ops.BAG_MODES[mode], psw,
                                  padding_idx)
    else:
        ops.check_bag_forward(weight, ids, csr, ops.BAG_MODES[mode], psw)


def _bag_layout(input: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None,
                include_last_offset: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(1-D ids, CSR offsets with bags + 1 entries, 1-D per_sample_weights) from either
    form F.embedding_bag takes; ids and offsets in one dtype (int64 if either is)."""
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("embedding_bag: 'offsets' must be None for a 2-D input (each row "
                             f"is a bag), got a tensor of shape {tuple(offsets.shape)}; if input "
                             "is 2D, then offsets has to be None")
        bags, length = input.shape
        csr = torch.arange(bags + 1, device=input.device, dtype=input.dtype) * length
        flat = input.reshape(-1)
        psw = None if per_sample_weights is None else per_sample_weights.reshape(-1)
        return flat, csr, psw
    if input.dim() != 1:
        raise ValueError(f"embedding_bag: 'input' must be 1-D (with offsets) or 2-D, got a "
                         f"{input.dim()}-D tensor of shape {tuple(input.shape)}; input has to "
                         f"be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    if offsets is None:
        raise ValueError("embedding_bag: 'offsets' is required for a 1-D input; offsets has "
                         "to be a 1D Tensor but got None")
    if offsets.dim() != 1:
        raise ValueError(f"embedding_bag: 'offsets' must be 1-D, got shape "
                         f"{tuple(offsets.shape)}; offsets has to be a 1D Tensor")
    if offsets.dtype != input.dtype and {offsets.dtype, input.dtype} <= {torch.int32, torch.int64}:
        input, offsets = input.long(), offsets.long()
    if not include_last_offset:
        # Empty offsets: no bags (PyTorch: a (0, D) output), so CSR [0] and every id is in none.
        end = input.shape[0] if offsets.numel() else 0
        return input, torch.cat([offsets, offsets.new_full((1,), end)]), per_sample_weights
    if offsets.numel() == 0:
        raise RuntimeError("embedding_bag: include_last_offset=True needs at least one offset "
                           "(bags + 1 entries), got none; include_last_offset: number of "
                           "offset should be at least 1")
    if offsets.numel() > 1:
        # As PyTorch: the last bag runs to the end of the ids, whatever offsets[-1] says
        # below that; one past the ids, or below offsets[-2], is still refused by the
        # kernels' CSR check (left as given).
        offsets = offsets.clone()
        last = offsets[-1:]
        offsets[-1:] = torch.where(last >= offsets[-2:-1], last.clamp(min=input.shape[0]), last)
    return input, offsets, per_sample_weights


def csr_may_end_early(input: Tensor, offsets: Tensor | None, include_last_offset: bool) -> bool:
    """Whether _bag_layout's CSR can end before the last id (ids in no bag): only with no
    bags at all (no offsets, or include_last_offset with a single one: CSR [0])."""
    return input.dim() == 1 and offsets.numel() <= (1 if include_last_offset else 0)


def bag_arguments(input: Tensor, weight: Tensor, offsets: Tensor | None,
                  scale_grad_by_freq: bool, mode: str, sparse: bool,
                  per_sample_weights: Tensor | None, include_last_offset: bool,
                  padding_idx: int | None) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """embedding_bag's arguments checked (errors as F.embedding_bag's), in the kernels' form:
    (1-D ids, CSR offsets, 1-D per_sample_weights or None, padding_idx or -1)."""
    if mode not in ops.BAG_MODES:
        raise ValueError(f"embedding_bag: 'mode' must be 'sum', 'mean' or 'max', got {mode!r}; "
                         "mode has to be one of sum, mean or max")
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("embedding_bag: max mode does not support scaling the gradient by the "
                         "frequency (scale_grad_by_freq=True), as in PyTorch: max mode does not "
                         "support scaling the gradient by the frequency")
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError(
            f"embedding_bag: 'per_sample_weights' is only supported in mode='sum', got "
            f"mode={mode!r}; per_sample_weights was not None. per_sample_weights is only "
            f"supported for mode='sum' (got mode='{mode}')")
    if per_sample_weights is not None and per_sample_weights.shape != input.shape:
        raise ValueError(f"embedding_bag: 'per_sample_weights' must have the shape of 'input' "
                         f"{tuple(input.shape)}, got {tuple(per_sample_weights.shape)}; If "
                         f"per_sample_weights ({per_sample_weights.shape}) is not None, then it "
                         f"must have the same shape as the input ({input.shape})")
    if weight.dim() != 2:
        raise ValueError(f"embedding_bag: 'weight' must be 2-D, got a {weight.dim()}-D tensor "
                         f"of shape {tuple(weight.shape)}; weight has to be a 2D Tensor, but got "
                         f"Tensor of dimension {weight.dim()}")
    if sparse and mode == "max":
        raise ValueError("embedding_bag: sparse=True is not supported in mode='max', as in "
                         "PyTorch: max mode does not support sparse weights")
    try:
        padding = normalize_padding_idx(padding_idx, weight.shape[0])
    except AssertionError:
        raise RuntimeError(f"embedding_bag: padding_idx must be within the number of "
                           f"embeddings, {-weight.shape[0]} through {weight.shape[0] - 1}, but got "
                           f"{padding_idx}") from None
    ids, csr, psw = _bag_layout(input, offsets, per_sample_weights, include_last_offset)
    return ids, csr, psw, padding


def embedding_local(input: Tensor, weight: Tensor, padding_idx: int, max_norm: float | None,
                    norm_type: float, scale_grad_by_freq: bool, sparse: bool) -> Tensor:
    """The lookup of a plain weight; padding_idx normalised (-1: none)."""
    if max_norm is not None:
        input = renorm_rows(weight, input, max_norm, norm_type)
    if compiled_autograd_state.compiled_autograd_enabled and not torch.compiler.is_compiling():
        # Compiled autograd captures a C++ node of ours only through compiled_args /
        # apply_with_saved and an internal interface that keeps changing between torch
        # releases; a Python Function's backward it captures on every release we build
        # against. So while it is on (and Dynamo is not tracing: a compiled forward keeps the
        # op, its backward derived by AOTAutograd), the lookup records the Python Function:
        # same ops, same gradients. Eager calls pay one flag read for this (docs/lookup.md,
        # "Compiled autograd and CUDA graphs").
        return EmbeddingFunction.apply(weight, input, padding_idx, bool(scale_grad_by_freq),
                                       bool(sparse))
    return _embedding_direct(weight, input, padding_idx, bool(scale_grad_by_freq), bool(sparse))


def embedding_bag_local(ids: Tensor, csr: Tensor, weight: Tensor, padding_idx: int,
                        max_norm: float | None, norm_type: float, scale_grad_by_freq: bool,
                        mode: str, sparse: bool, per_sample_weights: Tensor | None,
                        csr_tail: bool) -> Tensor:
    """The pooled lookup of a plain weight from 1-D ids and CSR offsets (bag_arguments'
    form); ``csr_tail``: whether the CSR may end before the last id (csr_may_end_early)."""
    if max_norm is not None:
        check_bag_before_renorm(weight, ids, csr, mode, per_sample_weights, padding_idx)
        ids = renorm_rows(weight, ids, max_norm, norm_type)
    function = (EmbeddingBagFunction if torch._C._are_functorch_transforms_active()
                else _EmbeddingBagEagerFunction)
    output, _ = function.apply(weight, ids, csr, ops.BAG_MODES[mode], per_sample_weights,
                               padding_idx, bool(scale_grad_by_freq), bool(sparse), csr_tail)
    return output
