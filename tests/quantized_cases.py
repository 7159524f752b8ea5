"""Shared pieces of the quantized-table tests: an independent float64 dequantization of packed
rows (read straight from the bytes, not through our kernels) and the formats' parameters."""
from __future__ import annotations

import torch

# (bits, fp8) of each format, and its name in the ops.
FORMATS = {"int8": (8, False), "int4": (4, False), "fp8": (8, True)}


def _view(columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes (V, k) reinterpreted as (V, k / itemsize) values of dtype."""
    return columns.clone(memory_format=torch.contiguous_format).view(dtype)


def dequantize_reference(packed: torch.Tensor, format: str) -> torch.Tensor:
    """(V, D) float64: scale * code + bias of every row, from the layout's definition."""
    packed = packed.cpu()
    if format == "int8":
        codes = packed[:, :-8].double()
        scale, bias = _view(packed[:, -8:-4], torch.float32), _view(packed[:, -4:], torch.float32)
    elif format == "int4":
        body = packed[:, :-4]
        codes = torch.stack([body & 15, body >> 4], dim=-1).reshape(packed.shape[0], -1).double()
        scale, bias = _view(packed[:, -4:-2], torch.float16), _view(packed[:, -2:], torch.float16)
    else:
        codes = _view(packed[:, :-4], torch.float8_e4m3fn).double()
        scale, bias = _view(packed[:, -4:], torch.float32), torch.zeros(packed.shape[0], 1)
    return codes * scale.double() + bias.double()


def row_scales(packed: torch.Tensor, format: str) -> torch.Tensor:
    """(V, 1) float64: each row's scale."""
    packed = packed.cpu()
    if format == "int4":
        return _view(packed[:, -4:-2], torch.float16).double()
    if format == "int8":
        return _view(packed[:, -8:-4], torch.float32).double()
    return _view(packed[:, -4:], torch.float32).double()


def bag_reference(table: torch.Tensor, ids: torch.Tensor, csr: torch.Tensor, mode: str,
                  psw: torch.Tensor | None, padding_idx: int) -> torch.Tensor:
    """(bags, D) float64: the float pooled lookup of a float64 table, bag by bag."""
    rows = []
    for b in range(csr.numel() - 1):
        lo, hi = int(csr[b]), int(csr[b + 1])
        picked = [i for i in range(lo, hi) if int(ids[i]) != padding_idx]
        if not picked:
            rows.append(torch.zeros(table.shape[1], dtype=torch.float64))
            continue
        vals = table[ids[picked].long()]
        if psw is not None:
            vals = vals * psw[picked].double()[:, None]
        rows.append(vals.sum(0) if mode == "sum" else vals.mean(0) if mode == "mean"
                    else vals.max(0).values)
    return torch.stack(rows) if rows else torch.zeros(0, table.shape[1], dtype=torch.float64)


def tolerance(reference: torch.Tensor, terms: int) -> float:
    """fp32 rounding of a value built from `terms` dequantized values of this magnitude."""
    return 4e-7 * max(terms, 1) * (float(reference.abs().max()) if reference.numel() else 0.0) + 1e-30
