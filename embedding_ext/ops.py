"""Typed wrappers over ``torch.ops.embedding_ext.*`` and their fake (meta) kernels.

The fake kernels repeat the C++ boundary checks (csrc/checks.h) with ``torch._check`` and
size outputs from shapes and the ``num_weights`` argument only, so ``torch.compile`` never
reads data.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_ops = torch.ops.embedding_ext
_INDEX_DTYPES = (torch.int32, torch.int64)


def embedding(weight: Tensor, indices: Tensor, padding_idx: int, scale_grad_by_freq: bool,
              sparse: bool) -> Tensor:
    """The lookup with F.embedding's gradient rule (C++ autograd); ``padding_idx < 0``: none."""
    return _ops.embedding.default(weight, indices, padding_idx, scale_grad_by_freq, sparse)


def embedding_forward(weight: Tensor, indices: Tensor) -> Tensor:
    """``weight[indices]`` as a fresh contiguous tensor of shape ``indices.shape + (D,)``."""
    return _ops.embedding_forward(weight, indices)


def embedding_dense_backward(grad_output: Tensor, indices: Tensor, num_weights: int,
                             padding_idx: int, scale_grad_by_freq: bool) -> Tensor:
    """The ``(num_weights, D)`` gradient of the lookup; ``padding_idx < 0`` means none."""
    return _ops.embedding_dense_backward(grad_output, indices, num_weights, padding_idx,
                                         scale_grad_by_freq)


def embedding_scaled_gather(weight: Tensor, indices: Tensor, padding_idx: int,
                            scale_grad_by_freq: bool) -> Tensor:
    """The adjoint of :func:`embedding_dense_backward` (used for double backward)."""
    return _ops.embedding_scaled_gather(weight, indices, padding_idx, scale_grad_by_freq)


def embedding_sparse_backward(grad_output: Tensor, indices: Tensor, num_weights: int,
                              padding_idx: int, scale_grad_by_freq: bool) -> tuple[Tensor, Tensor]:
    """``(rows (1, nnz) int64, values (nnz, D))`` of the sparse gradient."""
    return _ops.embedding_sparse_backward(grad_output, indices, num_weights, padding_idx,
                                          scale_grad_by_freq)


def embedding_renorm_(weight: Tensor, indices: Tensor, max_norm: float, norm_type: float) -> None:
    """Scales, in place, each referenced row whose norm exceeds ``max_norm``."""
    _ops.embedding_renorm_(weight, indices, float(max_norm), float(norm_type))


def embedding_fused_update_(weight: Tensor, grad_output: Tensor, indices: Tensor,
                            padding_idx: int, scale_grad_by_freq: bool, rule: int,
                            state1: Tensor | None, state2: Tensor | None, lr: float, eps: float,
                            beta1: float, beta2: float, lr_decay: float, step: int) -> None:
    """One optimizer step, in place, on the rows ``indices`` touched (csrc/embedding_ext.cpp:
    the rules and states)."""
    _ops.embedding_fused_update_(weight, grad_output, indices, padding_idx, scale_grad_by_freq,
                                 rule, state1, state2, lr, eps, beta1, beta2, lr_decay, step)


# The pooled lookup (csrc/embedding_ext.cpp documents the contract). mode: 0 sum, 1 mean,
# 2 max; offsets: CSR, bags + 1 entries.
BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


def embedding_bag_forward(weight: Tensor, indices: Tensor, offsets: Tensor, mode: int,
                          per_sample_weights: Tensor | None,
                          padding_idx: int) -> tuple[Tensor, Tensor]:
    """``(output (bags, D), arg_max (bags, D) int64 in max mode, else empty)``."""
    return _ops.embedding_bag_forward(weight, indices, offsets, mode, per_sample_weights,
                                      padding_idx)


def embedding_bag_dense_backward(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                                 arg_max: Tensor, num_weights: int, mode: int,
                                 per_sample_weights: Tensor | None, padding_idx: int,
                                 scale_grad_by_freq: bool) -> Tensor:
    """The ``(num_weights, D)`` weight gradient of :func:`embedding_bag_forward`."""
    return _ops.embedding_bag_dense_backward(grad_output, indices, offsets, arg_max, num_weights,
                                             mode, per_sample_weights, padding_idx,
                                             scale_grad_by_freq)


def embedding_bag_sparse_backward(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                                  num_weights: int, mode: int, per_sample_weights: Tensor | None,
                                  padding_idx: int,
                                  scale_grad_by_freq: bool) -> tuple[Tensor, Tensor]:
    """``(rows (1, nnz) int64, values (nnz, D))`` of the sparse weight gradient (sum, mean).
    Without padding (``padding_idx`` -1) one entry per id, in position order (ids in no bag:
    zero rows; on CUDA a bad id, reported, is a zero row at row 0), a size known without a
    synchronisation; with padding, the non-padding ids in bags."""
    return _ops.embedding_bag_sparse_backward(grad_output, indices, offsets, num_weights, mode,
                                              per_sample_weights, padding_idx, scale_grad_by_freq)


def embedding_bag_per_sample_weights_backward(grad_output: Tensor, weight: Tensor,
                                              indices: Tensor, offsets: Tensor,
                                              padding_idx: int) -> Tensor:
    """The gradient w.r.t. ``per_sample_weights`` (sum mode): one value per id."""
    return _ops.embedding_bag_per_sample_weights_backward(grad_output, weight, indices, offsets,
                                                          padding_idx)


# --------------------------------------------------------------------------------------
# Fake kernels: the rules of csrc/checks.h.

def _check_indices(indices: Tensor, op: str) -> None:
    torch._check(indices.dtype in _INDEX_DTYPES,
                 lambda: f"{op}: 'indices' must be an int64 or int32 tensor, got {indices.dtype}")


def _check_weight(weight: Tensor, op: str) -> None:
    torch._check(weight.dim() == 2,
                 lambda: f"{op}: 'weight' must be 2-D, got a {weight.dim()}-D tensor "
                         f"of shape {tuple(weight.shape)}")


def _check_grad(grad: Tensor, indices: Tensor, op: str) -> None:
    torch._check(grad.dim() == indices.dim() + 1 and grad.shape[:-1] == indices.shape,
                 lambda: f"{op}: 'grad_output' must have shape indices.shape + (D,) = "
                         f"{tuple(indices.shape)} + (D,), got {tuple(grad.shape)}")


def _check_devices(a: Tensor, a_name: str, indices: Tensor, op: str) -> None:
    torch._check(a.device == indices.device,
                 lambda: f"{op}: '{a_name}' and 'indices' must be on the same device, got "
                         f"{a.device} and {indices.device}")


def _check_lookup(weight: Tensor, indices: Tensor, op: str) -> None:
    """check_lookup_args"""
    _check_weight(weight, op)
    _check_indices(indices, op)
    _check_devices(weight, "weight", indices, op)


def _check_backward(grad_output: Tensor, indices: Tensor, num_weights, padding_idx: int,
                    op: str) -> None:
    """check_backward_args: every backward op, dense and sparse."""
    _check_indices(indices, op)
    _check_devices(grad_output, "grad_output", indices, op)
    _check_grad(grad_output, indices, op)
    torch._check(num_weights >= 0, lambda: f"{op}: 'num_weights' must be >= 0, got {num_weights}")
    torch._check(padding_idx < num_weights,
                 lambda: f"{op}: 'padding_idx' must be < num_weights ({num_weights}) or negative "
                         f"for none, got {padding_idx}")


def _check_renorm(weight: Tensor, indices: Tensor, max_norm: float, norm_type: float) -> None:
    """check_renorm_args"""
    op = "embedding_renorm_"
    _check_lookup(weight, indices, op)
    torch._check(math.isfinite(max_norm) and max_norm >= 0,
                 lambda: f"{op}: 'max_norm' must be a finite number >= 0, got {max_norm:g}")
    torch._check(not math.isnan(norm_type) and norm_type > 0,
                 lambda: f"{op}: 'norm_type' must be > 0 (inf allowed), got {norm_type:g}")


@torch.library.register_fake("embedding_ext::embedding_forward")
def _forward_fake(weight, indices):
    _check_lookup(weight, indices, "embedding_forward")
    return weight.new_empty((*indices.shape, weight.shape[1]))


@torch.library.register_fake("embedding_ext::embedding_dense_backward")
def _dense_backward_fake(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    _check_backward(grad_output, indices, num_weights, padding_idx, "embedding_dense_backward")
    return grad_output.new_empty((num_weights, grad_output.shape[-1]))


@torch.library.register_fake("embedding_ext::embedding_scaled_gather")
def _scaled_gather_fake(weight, indices, padding_idx, scale_grad_by_freq):
    _check_lookup(weight, indices, "embedding_scaled_gather")
    return weight.new_empty((*indices.shape, weight.shape[1]))


@torch.library.register_fake("embedding_ext::embedding_sparse_backward")
def _sparse_backward_fake(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    _check_backward(grad_output, indices, num_weights, padding_idx, "embedding_sparse_backward")
    # Removing padding positions makes the count data-dependent.
    nnz = torch.library.get_ctx().new_dynamic_size() if padding_idx >= 0 else indices.numel()
    rows = indices.new_empty((1, nnz), dtype=torch.int64)
    values = grad_output.new_empty((nnz, grad_output.shape[-1]))
    return rows, values


@torch.library.register_fake("embedding_ext::embedding_renorm_")
def _renorm_fake(weight, indices, max_norm, norm_type):
    _check_renorm(weight, indices, max_norm, norm_type)
    return None


@torch.library.register_fake("embedding_ext::embedding_fused_update_")
def _fused_update_fake(weight, grad_output, indices, padding_idx, scale_grad_by_freq, rule,
                       state1, state2, lr, eps, beta1, beta2, lr_decay, step):
    """check_fused_update_args (csrc/optimizer_rules.h)."""
    op = "embedding_fused_update_"
    _check_weight(weight, op)
    _check_backward(grad_output, indices, weight.shape[0], padding_idx, op)
    torch._check(grad_output.shape[-1] == weight.shape[1],
                 lambda: f"{op}: 'grad_output' rows must have weight's width {weight.shape[1]}, "
                         f"got {grad_output.shape[-1]}")
    torch._check(grad_output.dtype == weight.dtype,
                 lambda: f"{op}: 'grad_output' must have weight's dtype {weight.dtype}, got "
                         f"{grad_output.dtype}")
    torch._check(grad_output.device == weight.device,
                 lambda: f"{op}: 'grad_output' and 'weight' must be on the same device, got "
                         f"{grad_output.device} and {weight.device}")
    torch._check(weight.stride(1) == 1,
                 lambda: f"{op}: 'weight' rows must be contiguous (stride(1) == 1)")
    torch._check(0 <= rule <= 3, lambda: f"{op}: 'rule' must be 0 (SGD), 1 (Adagrad), 2 "
                                         f"(SparseAdam) or 3 (RowWiseAdagrad), got {rule}")
    torch._check(step >= 1, lambda: f"{op}: 'step' must be >= 1, got {step}")
    state_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

    def check_state(state, name, shape):
        torch._check(state is not None, lambda: f"{op}: rule {rule} needs '{name}'")
        torch._check(state.dtype == state_dtype and tuple(state.shape) == tuple(shape)
                     and state.is_contiguous() and state.device == weight.device,
                     lambda: f"{op}: '{name}' must be a contiguous {state_dtype} tensor of "
                             f"shape {tuple(shape)} on {weight.device}, got {state.dtype} of "
                             f"shape {tuple(state.shape)} on {state.device}")
    if rule in (1, 2):
        check_state(state1, "state1", weight.shape)
    if rule == 2:
        check_state(state2, "state2", weight.shape)
    if rule == 3:
        check_state(state1, "state1", weight.shape[:1])
    return None


@torch.library.register_fake("embedding_ext::embedding")
def _embedding_fake(weight, indices, padding_idx, scale_grad_by_freq, sparse):
    _check_lookup(weight, indices, "embedding_forward")  # the eager kernels are the forward
    return weight.new_empty((*indices.shape, weight.shape[1]))


def _check_bag(table: Tensor, table_name: str, indices: Tensor, offsets: Tensor,
               per_sample_weights: Tensor | None, op: str) -> None:
    """check_bag_args (the offsets' values are checked by the kernels)."""
    _check_indices(indices, op)
    torch._check(indices.dim() == 1, lambda: f"{op}: 'indices' must be 1-D, got shape "
                                             f"{tuple(indices.shape)}")
    torch._check(offsets.dtype in _INDEX_DTYPES,
                 lambda: f"{op}: 'offsets' must be an int64 or int32 tensor, got {offsets.dtype}")
    torch._check(offsets.dim() == 1 and offsets.shape[0] >= 1,
                 lambda: f"{op}: 'offsets' must be 1-D with at least one entry (CSR: bags + 1), "
                         f"got shape {tuple(offsets.shape)}")
    _check_devices(table, table_name, indices, op)
    _check_devices(offsets, "offsets", indices, op)
    if per_sample_weights is not None:
        torch._check(per_sample_weights.shape == indices.shape,
                     lambda: f"{op}: 'per_sample_weights' must have the shape of 'indices' "
                             f"{tuple(indices.shape)}, got {tuple(per_sample_weights.shape)}")


def _check_bag_mode(mode: int, op: str) -> None:
    torch._check(mode in (0, 1, 2),
                 lambda: f"{op}: 'mode' must be 0 (sum), 1 (mean) or 2 (max), got {mode}")


def check_bag_forward(weight: Tensor, indices: Tensor, offsets: Tensor, mode: int,
                      per_sample_weights: Tensor | None) -> None:
    """What embedding_bag_forward checks before reading any data (its fake's checks)."""
    op = "embedding_bag_forward"
    _check_weight(weight, op)
    _check_bag_mode(mode, op)
    _check_bag(weight, "weight", indices, offsets, per_sample_weights, op)
    if per_sample_weights is not None:
        torch._check(mode == 0, lambda: f"{op}: 'per_sample_weights' is only supported in sum "
                                        f"mode (0), got mode {mode}")
        torch._check(per_sample_weights.dtype == weight.dtype,
                     lambda: f"{op}: 'per_sample_weights' must have the dtype of 'weight' "
                             f"({weight.dtype}), got {per_sample_weights.dtype}")


@torch.library.register_fake("embedding_ext::embedding_bag_forward")
def _bag_forward_fake(weight, indices, offsets, mode, per_sample_weights, padding_idx):
    check_bag_forward(weight, indices, offsets, mode, per_sample_weights)
    bags = offsets.shape[0] - 1
    out = weight.new_empty((bags, weight.shape[1]))
    arg_max = weight.new_empty((bags if mode == 2 else 0, weight.shape[1]), dtype=torch.int64)
    return out, arg_max


def _check_bag_gradient(grad_output: Tensor, indices: Tensor, offsets: Tensor,
                        per_sample_weights: Tensor | None, num_weights, mode: int,
                        padding_idx: int, sparse: bool, op: str) -> None:
    """What both bag weight gradients check, in the order of csrc/checks.h's
    bag_gradient_inputs: the mode (no sparse max), grad_output (bags, D), the row count and a
    padding_idx below it."""
    _check_bag_mode(mode, op)
    torch._check(not sparse or mode != 2,
                 lambda: f"{op}: max mode (2) has no sparse gradient (as in PyTorch)")
    _check_weight(grad_output, op)
    _check_bag(grad_output, "grad_output", indices, offsets, per_sample_weights, op)
    torch._check(num_weights >= 0, lambda: f"{op}: 'num_weights' must be >= 0, got {num_weights}")
    torch._check(padding_idx < num_weights,
                 lambda: f"{op}: 'padding_idx' must be < num_weights ({num_weights}), got "
                         f"{padding_idx}")
    torch._check(grad_output.shape[0] == offsets.shape[0] - 1,
                 lambda: f"{op}: 'grad_output' must have one row per bag "
                         f"({offsets.shape[0] - 1}), got shape {tuple(grad_output.shape)}")


@torch.library.register_fake("embedding_ext::embedding_bag_dense_backward")
def _bag_dense_backward_fake(grad_output, indices, offsets, arg_max, num_weights, mode,
                             per_sample_weights, padding_idx, scale_grad_by_freq):
    op = "embedding_bag_dense_backward"
    _check_bag_gradient(grad_output, indices, offsets, per_sample_weights, num_weights, mode,
                        padding_idx, False, op)
    torch._check(not (mode == 2 and scale_grad_by_freq),
                 lambda: f"{op}: max mode (2) does not support scale_grad_by_freq")
    if mode == 2:
        _check_devices(arg_max, "arg_max", indices, op)
        bags, dim = offsets.shape[0] - 1, grad_output.shape[1]
        torch._check(arg_max.dim() == 2 and arg_max.shape[0] == bags and arg_max.shape[1] == dim
                     and arg_max.dtype == torch.int64,
                     lambda: f"{op}: 'arg_max' must be an int64 tensor of shape (bags, D) = "
                             f"({bags}, {dim}) in max mode, got {arg_max.dtype} of shape "
                             f"{tuple(arg_max.shape)}")
    return grad_output.new_empty((num_weights, grad_output.shape[1]))


@torch.library.register_fake("embedding_ext::embedding_bag_per_sample_weights_backward")
def _bag_psw_backward_fake(grad_output, weight, indices, offsets, padding_idx):
    op = "embedding_bag_per_sample_weights_backward"
    _check_weight(weight, op)
    _check_bag(weight, "weight", indices, offsets, None, op)
    torch._check(grad_output.dim() == 2 and grad_output.shape[0] == offsets.shape[0] - 1
                 and grad_output.shape[1] == weight.shape[1],
                 lambda: f"{op}: 'grad_output' must have shape (bags, D) = "
                         f"({offsets.shape[0] - 1}, {weight.shape[1]}), got {tuple(grad_output.shape)}")
    return weight.new_empty(indices.shape)


@torch.library.register_fake("embedding_ext::embedding_bag_sparse_backward")
def _bag_sparse_backward_fake(grad_output, indices, offsets, num_weights, mode,
                              per_sample_weights, padding_idx, scale_grad_by_freq):
    op = "embedding_bag_sparse_backward"
    _check_bag_gradient(grad_output, indices, offsets, per_sample_weights, num_weights, mode,
                        padding_idx, True, op)
    # Without padding, one entry per id (ids after the last offset: zero rows); with it (or
    # an empty table, where every id is bad), padding entries and ids after the last offset
    # are left out: data-dependent.
    every_position = padding_idx < 0 and num_weights > 0
    nnz = indices.numel() if every_position else torch.library.get_ctx().new_dynamic_size()
    return (indices.new_empty((1, nnz), dtype=torch.int64),
            grad_output.new_empty((nnz, grad_output.shape[1])))
