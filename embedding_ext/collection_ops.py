"""Typed wrappers and fake kernels of the table-batched pooled lookup
(``torch.ops.embedding_ext.embedding_bag_collection_*``, csrc/embedding_ext.cpp).

The fake kernels repeat the C++ checks (csrc/cpu/bag_collection.cpp) that need no data and
size every output from shapes and the SymInt arguments only.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ops = torch.ops.embedding_ext
_INDEX_DTYPES = (torch.int32, torch.int64)


def collection_forward(weights: Sequence[Tensor], values: Tensor, offsets: Tensor,
                       feature_table: Sequence[int], modes: Sequence[int],
                       padding_idx: Sequence[int], per_sample_weights: Tensor | None,
                       batch_size: int) -> tuple[Tensor, Tensor]:
    """``(output (B, sum D), arg_max)``: every feature's bags pooled from its table."""
    return _ops.embedding_bag_collection_forward(list(weights), values, offsets,
                                                 list(feature_table), list(modes),
                                                 list(padding_idx), per_sample_weights,
                                                 batch_size)


def collection_dense_backward(grad_output: Tensor, values: Tensor, offsets: Tensor,
                              arg_max: Tensor, feature_table: Sequence[int],
                              modes: Sequence[int], padding_idx: Sequence[int],
                              per_sample_weights: Tensor | None, num_weights: Sequence[int],
                              dims: Sequence[int]) -> list[Tensor]:
    """Every table's ``(num_weights[t], dims[t])`` weight gradient."""
    return _ops.embedding_bag_collection_dense_backward(
        grad_output, values, offsets, arg_max, list(feature_table), list(modes),
        list(padding_idx), per_sample_weights, list(num_weights), list(dims))


def collection_sparse_backward(grad_output: Tensor, values: Tensor, offsets: Tensor,
                               arg_max: Tensor, feature_table: Sequence[int],
                               modes: Sequence[int], padding_idx: Sequence[int],
                               per_sample_weights: Tensor | None, num_weights: Sequence[int],
                               dims: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Every table's ``(rows (nnz,) int64, values (nnz, D))`` sparse weight gradient."""
    return _ops.embedding_bag_collection_sparse_backward(
        grad_output, values, offsets, arg_max, list(feature_table), list(modes),
        list(padding_idx), per_sample_weights, list(num_weights), list(dims))


def per_sample_weights_grad(grad, values, offsets, weights, feature_table, padding_idx):
    """d out / d psw[i] = <grad[bag of i, feature's columns], weight[values[i]]>, feature by
    feature (0 at padding ids and at ids in no bag)."""
    batch = grad.shape[0]
    out = torch.zeros(values.shape[0], dtype=grad.dtype, device=grad.device)
    col = 0
    off = offsets.long()
    # Every feature's first position in one host copy (on CUDA, one synchronisation).
    starts = off[::batch].tolist() if batch > 0 else [0] * (len(feature_table) + 1)
    for f, t in enumerate(feature_table):
        w = weights[t]
        dim = w.shape[1]
        s, e = starts[f], starts[f + 1]
        lengths = off[f * batch + 1:(f + 1) * batch + 1] - off[f * batch:(f + 1) * batch]
        bag_of = torch.repeat_interleave(torch.arange(batch, device=grad.device), lengths,
                                         output_size=e - s)
        ids = values[s:e].long()
        dots = (w.detach()[ids].to(grad.dtype) * grad[bag_of, col:col + dim]).sum(1)
        if padding_idx[t] >= 0:
            dots = dots.masked_fill(ids == padding_idx[t], 0)
        out[s:e] = dots
        col += dim
    return out


def _check_layout(rows, dims, values, offsets, feature_table, modes, padding_idx,
                  per_sample_weights, batch_size, op: str) -> int:
    """The shape rules of make_layout (C++); returns the output's column count."""
    tables = len(rows)
    torch._check(batch_size >= 0, lambda: f"{op}: 'batch_size' must be >= 0, got {batch_size}")
    torch._check(len(modes) == tables and len(padding_idx) == tables,
                 lambda: f"{op}: 'modes' and 'padding_idx' must have one entry per table "
                 f"({tables}), got {len(modes)} and {len(padding_idx)}")
    for t in range(tables):
        torch._check(modes[t] in (0, 1, 2),
                     lambda: f"{op}: 'mode' must be 0 (sum), 1 (mean) or 2 (max), got {modes[t]}")
        torch._check(padding_idx[t] < rows[t],
                     lambda: f"{op}: 'padding_idx[{t}]' must be < the table's {rows[t]} rows or "
                     f"negative for none, got {padding_idx[t]}")
    total = 0
    for f, t in enumerate(feature_table):
        torch._check(0 <= t < tables, lambda: f"{op}: 'feature_table[{f}]' must name one of "
                     f"the {tables} tables, got {t}")
        torch._check(per_sample_weights is None or modes[t] == 0,
                     lambda: f"{op}: 'per_sample_weights' needs sum mode (0), but feature {f} "
                     f"pools table {t} in mode {modes[t]}")
        total = total + dims[t]
    torch._check(values.dtype in _INDEX_DTYPES,
                 lambda: f"{op}: 'indices' must be an int64 or int32 tensor, got {values.dtype}")
    torch._check(values.dim() == 1, lambda: f"{op}: 'values' must be 1-D, got {values.shape}")
    torch._check(offsets.dtype in _INDEX_DTYPES,
                 lambda: f"{op}: 'offsets' must be an int64 or int32 tensor, got {offsets.dtype}")
    features = len(feature_table)
    torch._check(offsets.dim() == 1 and offsets.shape[0] == features * batch_size + 1,
                 lambda: f"{op}: 'offsets' must be 1-D with features * batch_size + 1 entries, "
                 f"got shape {tuple(offsets.shape)}")
    if per_sample_weights is not None:
        torch._check(per_sample_weights.dim() == 1
                     and per_sample_weights.shape[0] == values.shape[0],
                     lambda: f"{op}: 'per_sample_weights' must have the shape of 'values'")
    return total


@torch.library.register_fake("embedding_ext::embedding_bag_collection_forward")
def _forward_fake(weights, values, offsets, feature_table, modes, padding_idx,
                  per_sample_weights, batch_size):
    op = "embedding_bag_collection_forward"
    torch._check(len(weights) > 0, lambda: f"{op}: 'weights' must hold at least one table")
    for t, w in enumerate(weights):
        torch._check(w.dim() == 2, lambda: f"{op}: 'weights[{t}]' must be 2-D, got {w.shape}")
        torch._check(w.dtype == weights[0].dtype,
                     lambda: f"{op}: every table must have one dtype")
    if per_sample_weights is not None:
        torch._check(per_sample_weights.dtype == weights[0].dtype,
                     lambda: f"{op}: 'per_sample_weights' must have the tables' dtype")
    total = _check_layout([w.shape[0] for w in weights], [w.shape[1] for w in weights], values,
                          offsets, feature_table, modes, padding_idx, per_sample_weights,
                          batch_size, op)
    out = weights[0].new_empty((batch_size, total))
    arg_shape = (batch_size, total) if 2 in modes else (0,)
    return out, values.new_empty(arg_shape, dtype=torch.long)


def _check_backward(grad_output, values, offsets, arg_max, feature_table, modes, padding_idx,
                    per_sample_weights, num_weights, dims, op):
    torch._check(len(num_weights) == len(dims),
                 lambda: f"{op}: 'num_weights' and 'dims' must both have one entry per table")
    torch._check(grad_output.dim() == 2,
                 lambda: f"{op}: 'grad_output' must be 2-D (B, sum D), got {grad_output.shape}")
    total = _check_layout(num_weights, dims, values, offsets, feature_table, modes, padding_idx,
                          per_sample_weights, grad_output.shape[0], op)
    torch._check(grad_output.shape[1] == total,
                 lambda: f"{op}: 'grad_output' must have shape (B, sum of the features' dims = "
                 f"{total}), got {tuple(grad_output.shape)}")


def _register_backward_fake(name: str, outputs):
    """The fake kernel of a collection gradient op: _check_backward's checks, then
    ``outputs(grad_output, values, num_weights, dims)``."""
    @torch.library.register_fake(f"embedding_ext::{name}")
    def fake(grad_output, values, offsets, arg_max, feature_table, modes, padding_idx,
             per_sample_weights, num_weights, dims):
        _check_backward(grad_output, values, offsets, arg_max, feature_table, modes, padding_idx,
                        per_sample_weights, num_weights, dims, name)
        return outputs(grad_output, values, num_weights, dims)
    return fake


def _dense_gradients(grad_output, values, num_weights, dims):
    return [grad_output.new_empty((n, d)) for n, d in zip(num_weights, dims)]


def _sparse_gradients(grad_output, values, num_weights, dims):
    ctx = torch.library.get_ctx()
    rows, vals = [], []
    for d in dims:
        nnz = ctx.new_dynamic_size()  # the non-padding ids of the table's features: data
        rows.append(values.new_empty((nnz,), dtype=torch.long))
        vals.append(grad_output.new_empty((nnz, d)))
    return rows, vals


_register_backward_fake("embedding_bag_collection_dense_backward", _dense_gradients)
_register_backward_fake("embedding_bag_collection_sparse_backward", _sparse_gradients)


def collection_fused_update_(weights: Sequence[Tensor], grad_output: Tensor, values: Tensor,
                             offsets: Tensor, feature_table: Sequence[int],
                             modes: Sequence[int], padding_idx: Sequence[int],
                             per_sample_weights: Tensor | None, rule: int,
                             state1: Sequence[Tensor], state2: Sequence[Tensor], lr: float,
                             eps: float, beta1: float, beta2: float, lr_decay: float,
                             steps: Sequence[int]) -> None:
    """Every table's fused optimizer step from the collection's ``grad_output``, in place."""
    _ops.embedding_bag_collection_fused_update_(
        list(weights), grad_output, values, offsets, list(feature_table), list(modes),
        list(padding_idx), per_sample_weights, rule, list(state1), list(state2), lr, eps,
        beta1, beta2, lr_decay, list(steps))


@torch.library.register_fake("embedding_ext::embedding_bag_collection_fused_update_")
def _fused_update_fake(weights, grad_output, values, offsets, feature_table, modes, padding_idx,
                       per_sample_weights, rule, state1, state2, lr, eps, beta1, beta2,
                       lr_decay, steps):
    op = "embedding_bag_collection_fused_update_"
    tables = len(weights)
    torch._check(tables > 0, lambda: f"{op}: 'weights' must hold at least one table")
    torch._check(0 <= rule <= 3, lambda: f"{op}: 'rule' must be 0 (SGD), 1 (Adagrad), 2 "
                 f"(SparseAdam) or 3 (RowWiseAdagrad), got {rule}")
    torch._check(len(steps) == tables, lambda: f"{op}: 'steps' must have one entry per table")
    torch._check(len(state1) == (tables if rule != 0 else 0),
                 lambda: f"{op}: rule {rule} needs one 'state1' tensor per table (none for SGD)")
    torch._check(len(state2) == (tables if rule == 2 else 0),
                 lambda: f"{op}: rule {rule} needs one 'state2' tensor per table (SparseAdam)")
    for t, w in enumerate(weights):
        torch._check(w.dim() == 2 and w.dtype == weights[0].dtype,
                     lambda: f"{op}: 'weights[{t}]' must be a contiguous 2-D "
                     f"{weights[0].dtype} tensor, got {w.dtype} of shape {tuple(w.shape)}")
    torch._check(all(m != 2 for m in modes),
                 lambda: f"{op}: a table pools with max, which has no per-row update")
    _check_backward(grad_output, values, offsets, None, feature_table, modes, padding_idx,
                    per_sample_weights, [w.shape[0] for w in weights],
                    [w.shape[1] for w in weights], op)
