"""Typed wrappers over the quantized-table ops (``torch.ops.embedding_ext.quantize_rows``,
``quantized_embedding_forward``, ``quantized_embedding_bag_forward``) and their fake kernels.

The fakes repeat the C++ checks (csrc/quantized_format.h) and size outputs from shapes only:
a packed row's width gives D (int8: width - 8, int4: 2 * (width - 4), fp8: width - 4).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops

_ops = torch.ops.embedding_ext

# The layout names the ops take, and the bytes after each row's codes (scale, bias).
FORMATS = {"int8": 8, "int4": 4, "fp8": 4}
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def format_name(bits: int, fp8: bool) -> str:
    """The op's layout name for the user's (bits, fp8) choice."""
    if fp8:
        if bits != 8:
            raise ValueError(f"fp8 tables have 8-bit codes: 'bits' must be 8 with fp8=True, "
                             f"got {bits}")
        return "fp8"
    if bits not in (8, 4):
        raise ValueError(f"'bits' must be 8 or 4, got {bits!r}")
    return "int8" if bits == 8 else "int4"


def dim_of(packed_width: int, format: str) -> int:
    """D of a packed row of ``packed_width`` bytes."""
    codes = packed_width - FORMATS[format]
    return 2 * codes if format == "int4" else codes


def row_bytes(dim: int, format: str) -> int:
    return (dim // 2 if format == "int4" else dim) + FORMATS[format]


def quantize_rows(weight: Tensor, format: str) -> Tensor:
    """``(V, row_bytes)`` uint8: each row of the float table quantized (CPU)."""
    return _ops.quantize_rows(weight, format)


def quantized_embedding_forward(packed: Tensor, format: str, indices: Tensor,
                                dtype: torch.dtype) -> Tensor:
    """Dequantized rows ``indices``, shape ``indices.shape + (D,)``, in ``dtype``."""
    return _ops.quantized_embedding_forward(packed, format, indices, dtype)


def quantized_embedding_bag_forward(packed: Tensor, format: str, indices: Tensor,
                                    offsets: Tensor, mode: int,
                                    per_sample_weights: Tensor | None, padding_idx: int,
                                    dtype: torch.dtype) -> Tensor:
    """Bags of dequantized rows pooled in fp32 (CSR offsets), ``(bags, D)`` in ``dtype``."""
    return _ops.quantized_embedding_bag_forward(packed, format, indices, offsets, mode,
                                                per_sample_weights, padding_idx, dtype)


def _check_table(packed: Tensor, format: str, op: str) -> int:
    torch._check(format in FORMATS, lambda: f"{op}: 'format' must be 'int8', 'int4' or 'fp8', "
                                            f"got '{format}'")
    torch._check(packed.dtype == torch.uint8,
                 lambda: f"{op}: 'packed' must be a uint8 tensor, got {packed.dtype}")
    torch._check(packed.dim() == 2, lambda: f"{op}: 'packed' must be 2-D (rows, row bytes), "
                                            f"got shape {tuple(packed.shape)}")
    torch._check(packed.shape[1] >= FORMATS[format],
                 lambda: f"{op}: 'packed' rows of format '{format}' hold at least "
                         f"{FORMATS[format]} bytes, got {packed.shape[1]}")
    return dim_of(packed.shape[1], format)


def _check_dtype(dtype: torch.dtype, op: str) -> None:
    torch._check(dtype in OUTPUT_DTYPES, lambda: f"{op}: 'dtype' must be float32, float16 or "
                                                 f"bfloat16, got {dtype}")


@torch.library.register_fake("embedding_ext::quantize_rows")
def _quantize_rows_fake(weight, format):
    op = "quantize_rows"
    torch._check(format in FORMATS, lambda: f"{op}: 'format' must be 'int8', 'int4' or 'fp8', "
                                            f"got '{format}'")
    torch._check(weight.dim() == 2, lambda: f"{op}: 'weight' must be 2-D, got a {weight.dim()}-D "
                                            f"tensor of shape {tuple(weight.shape)}")
    torch._check(weight.dtype.is_floating_point,
                 lambda: f"{op}: 'weight' must be a floating-point tensor, got {weight.dtype}")
    torch._check(format != "int4" or weight.shape[1] % 2 == 0,
                 lambda: f"{op}: 'weight' must have an even embedding_dim for int4, got "
                         f"{weight.shape[1]}")
    return weight.new_empty((weight.shape[0], row_bytes(weight.shape[1], format)),
                            dtype=torch.uint8)


@torch.library.register_fake("embedding_ext::quantized_embedding_forward")
def _quantized_forward_fake(packed, format, indices, dtype):
    op = "quantized_embedding_forward"
    dim = _check_table(packed, format, op)
    ops._check_indices(indices, op)
    ops._check_devices(packed, "packed", indices, op)
    _check_dtype(dtype, op)
    return packed.new_empty((*indices.shape, dim), dtype=dtype)


@torch.library.register_fake("embedding_ext::quantized_embedding_bag_forward")
def _quantized_bag_forward_fake(packed, format, indices, offsets, mode, per_sample_weights,
                                padding_idx, dtype):
    op = "quantized_embedding_bag_forward"
    dim = _check_table(packed, format, op)
    ops._check_bag_mode(mode, op)
    _check_dtype(dtype, op)
    ops._check_bag(packed, "packed", indices, offsets, per_sample_weights, op)
    if per_sample_weights is not None:
        torch._check(mode == 0, lambda: f"{op}: 'per_sample_weights' is only supported in sum "
                                        f"mode (0), got mode {mode}")
        torch._check(per_sample_weights.dtype == torch.float32,
                     lambda: f"{op}: 'per_sample_weights' must be float32, got "
                             f"{per_sample_weights.dtype}")
    return packed.new_empty((offsets.shape[0] - 1, dim), dtype=dtype)
