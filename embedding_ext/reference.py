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
