"""A plain-PyTorch float64 reference of everything embedding_ext computes. Tests and the
benchmark compare against it where PyTorch itself deviates from the contract (docs/SPEC.md):
fp16/bf16 accumulation, p-norms on CUDA, scale_grad_by_freq in sparse and double backward.
It uses no embedding op, only indexing and index_add."""
from __future__ import annotations

import torch
from torch import Tensor


def forward(weight: Tensor, indices: Tensor) -> Tensor:
    return weight.double()[indices.long()]


def position_scales(indices: Tensor, num_weights: int, padding_idx: int | None,
                    scale_grad_by_freq: bool) -> Tensor:
    """Per position: 0 at padding, 1/count(index) with scale_grad_by_freq, else 1."""
    flat = indices.reshape(-1).long()
    keep = torch.ones_like(flat, dtype=torch.bool) if padding_idx is None else flat != padding_idx
    scale = keep.double()
    if scale_grad_by_freq and flat.numel():
        counts = torch.bincount(flat[keep], minlength=num_weights).double()
        scale = torch.where(keep, 1.0 / counts[flat].clamp_min(1), 0.0)
    return scale


def dense_backward(grad_output: Tensor, indices: Tensor, num_weights: int,
                   padding_idx: int | None = None, scale_grad_by_freq: bool = False) -> Tensor:
    dim = grad_output.shape[-1]
    flat = indices.reshape(-1).long()
    g = grad_output.double().reshape(flat.numel(), dim)
    scale = position_scales(indices, num_weights, padding_idx, scale_grad_by_freq)
    out = torch.zeros(num_weights, dim, dtype=torch.float64, device=grad_output.device)
    return out.index_add_(0, flat, g * scale[:, None])


def sparse_backward(grad_output: Tensor, indices: Tensor, num_weights: int,
                    padding_idx: int | None = None, scale_grad_by_freq: bool = False):
    """(rows, values) in position order with padding positions removed."""
    dim = grad_output.shape[-1]
    flat = indices.reshape(-1).long()
    keep = torch.ones_like(flat, dtype=torch.bool) if padding_idx is None else flat != padding_idx
    scale = position_scales(indices, num_weights, padding_idx, scale_grad_by_freq)
    values = grad_output.double().reshape(flat.numel(), dim) * scale[:, None]
    return flat[keep], values[keep]


def vector_norm(rows: Tensor, norm_type: float) -> Tensor:
    """A true p-norm along the last dim, for any p > 0 (inf included); 0 for empty rows."""
    if rows.shape[-1] == 0:
        return rows.new_zeros(rows.shape[:-1], dtype=torch.float64)
    return torch.linalg.vector_norm(rows.double(), ord=norm_type, dim=-1)


def renorm(weight: Tensor, indices: Tensor, max_norm: float, norm_type: float) -> Tensor:
    """The weight after embedding's max_norm renorm, in float64 (a new tensor)."""
    out = weight.double().clone()
    rows = torch.unique(indices.reshape(-1).long())
    norms = vector_norm(out[rows], norm_type)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    out[rows] *= scale[:, None]
    return out


def bag_forward(weight: Tensor, indices: Tensor, offsets: Tensor, mode: str,
                per_sample_weights: Tensor | None = None,
                padding_idx: int | None = None) -> Tensor:
    """The pooled lookup in float64, bag by bag: 1-D ids, CSR offsets (bags + 1 entries;
    ids after the last offset belong to no bag). Padding entries are left out of the pooling
    and of mean's count; an empty or all-padding bag gives zeros; max takes per feature."""
    w = weight.double()
    rows = []
    for b in range(offsets.numel() - 1):
        ids = indices[int(offsets[b]):int(offsets[b + 1])].long()
        keep = ids != (-1 if padding_idx is None else padding_idx)
        picked = w[ids[keep]]
        if per_sample_weights is not None:
            picked = picked * per_sample_weights[int(offsets[b]):int(offsets[b + 1])][keep].double()[:, None]
        if picked.shape[0] == 0:
            rows.append(picked.sum(0))  # zeros, still connected to `weight` for autograd
        elif mode == "sum":
            rows.append(picked.sum(0))
        elif mode == "mean":
            rows.append(picked.mean(0))
        else:
            rows.append(picked.max(0).values)
    if not rows:
        return w[:0]
    return torch.stack(rows)
