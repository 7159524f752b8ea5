"""Quantized embedding tables for inference: ``QuantizedEmbedding``, ``QuantizedEmbeddingBag``
and ``quantize_embeddings`` (docs/quantized.md).

A table is one uint8 buffer ``packed`` of shape ``(V, row_bytes)``, each row its codes then
its scale (and bias): int8 and int4 rows are exactly PyTorch's prepacked rows
(``torch.ops.quantized.embedding_bag_byte_prepack`` / ``embedding_bag_4bit_prepack``), fp8
rows are e4m3 codes and an fp32 scale. Lookups dequantize in fp32 and return ``dtype``.
Nothing here has a gradient: a call that would need one raises (``_refuse_gradients``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import quantized_ops as qops
from .lookup import bag_arguments, normalize_padding_idx
from .module import Embedding, EmbeddingBag

_FLOAT_EMBEDDINGS = (Embedding, torch.nn.Embedding)
_FLOAT_BAGS = (EmbeddingBag, torch.nn.EmbeddingBag)


def _refuse_gradients(per_sample_weights: Tensor | None, who: str) -> None:
    """The tables are inference only: their codes have no gradient, and the lookups have no
    backward at all, so a call that autograd would have to differentiate is refused rather
    than silently cut from the graph. Only per_sample_weights can ask for one (ids are
    integers, the table is a buffer)."""
    if (per_sample_weights is not None and per_sample_weights.requires_grad
            and torch.is_grad_enabled()):
        raise RuntimeError(
            f"{who}: quantized tables are inference only and have no gradient, but "
            "'per_sample_weights' requires grad; call under torch.no_grad() / "
            "torch.inference_mode(), or pass per_sample_weights.detach()")


def _renormed(weight: Tensor, max_norm: float | None, norm_type: float) -> Tensor:
    """The table as a max_norm lookup leaves every row it reads: rows whose norm exceeds
    max_norm scaled to it (csrc/renorm_math.h's rule). Quantizing these rows gives what the
    float module returns, without writing to a quantized table at lookup time."""
    if max_norm is None:
        return weight
    norms = torch.linalg.vector_norm(weight.double(), ord=norm_type, dim=1, keepdim=True)
    factor = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return (weight.double() * factor).to(weight.dtype)


class _QuantizedTable(torch.nn.Module):
    """The packed table and what the two modules share."""

    def __init__(self, packed: Tensor, bits: int = 8, fp8: bool = False,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.format = qops.format_name(bits, fp8)
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ValueError(f"{type(self).__name__}: 'packed' must be a 2-D uint8 tensor, got "
                             f"{packed.dtype} of shape {tuple(packed.shape)}")
        if packed.shape[1] < qops.FORMATS[self.format]:
            raise ValueError(f"{type(self).__name__}: 'packed' rows of format '{self.format}' "
                             f"hold at least {qops.FORMATS[self.format]} bytes, got "
                             f"{packed.shape[1]}")
        if dtype not in qops.OUTPUT_DTYPES:
            raise ValueError(f"{type(self).__name__}: 'dtype' must be float32, float16 or "
                             f"bfloat16, got {dtype}")
        self.register_buffer("packed", packed)
        self.bits, self.fp8, self.dtype = bits, fp8, dtype
        self.num_embeddings = packed.shape[0]
        self.embedding_dim = qops.dim_of(packed.shape[1], self.format)
        self.padding_idx = (None if padding_idx is None
                            else normalize_padding_idx(padding_idx, self.num_embeddings))

    @staticmethod
    def _quantize(module: torch.nn.Module, bits: int, fp8: bool) -> Tensor:
        """The module's weight (renormed as its max_norm lookups would) packed; on the CPU,
        then moved back to the weight's device."""
        weight = module.weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"from_float: the module's weight must be 2-D, got shape "
                             f"{tuple(weight.shape)}")
        weight = _renormed(weight, getattr(module, "max_norm", None),
                           getattr(module, "norm_type", 2.0))
        packed = qops.quantize_rows(weight.cpu(), qops.format_name(bits, fp8))
        return packed.to(weight.device)

    @staticmethod
    def _output_dtype(weight: Tensor) -> torch.dtype:
        return weight.dtype if weight.dtype in qops.OUTPUT_DTYPES else torch.float32

    @classmethod
    def from_prepacked(cls, packed: Tensor, bits: int = 8, fp8: bool = False, **options):
        """A module over an already packed table (e.g. the output of PyTorch's
        ``embedding_bag_byte_prepack`` with ``bits=8``, ``embedding_bag_4bit_prepack`` with
        ``bits=4``), shared, not copied. ``options``: the module's keyword arguments."""
        return cls(packed, bits=bits, fp8=fp8, **options)

    def prepacked(self) -> Tensor:
        """The packed table itself (not a copy): PyTorch's prepacked layout for int8/int4."""
        return self.packed

    def dequantize(self) -> Tensor:
        """The ``(V, D)`` fp32 table the lookups read: scale * code + bias per row."""
        ids = torch.arange(self.num_embeddings, device=self.packed.device)
        return qops.quantized_embedding_forward(self.packed, self.format, ids, torch.float32)

    def table_bytes(self) -> int:
        return self.packed.numel()

    def extra_repr(self) -> str:
        text = (f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}, "
                f"dtype={self.dtype}")
        return text + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class QuantizedEmbedding(_QuantizedTable):
    """``nn.Embedding``'s lookup over a quantized table: ``forward(input)`` has shape
    ``input.shape + (D,)`` in ``dtype``. ``padding_idx`` is kept (it changes no forward)."""

    def __init__(self, packed: Tensor, bits: int = 8, fp8: bool = False,
                 padding_idx: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(packed, bits, fp8, padding_idx, dtype)

    @classmethod
    def from_float(cls, module: torch.nn.Module, bits: int = 8, fp8: bool = False,
                   dtype: torch.dtype | None = None) -> "QuantizedEmbedding":
        """The quantized copy of an ``nn.Embedding`` / ``ee.Embedding`` (output dtype: the
        weight's, or fp32 for other dtypes, unless ``dtype`` says). A ``max_norm`` module's
        rows are renormed before quantizing (what its lookups would return)."""
        packed = cls._quantize(module, bits, fp8)
        return cls(packed, bits, fp8, module.padding_idx,
                   dtype or cls._output_dtype(module.weight))

    def forward(self, input: Tensor) -> Tensor:
        return qops.quantized_embedding_forward(self.packed, self.format, input, self.dtype)


class QuantizedEmbeddingBag(_QuantizedTable):
    """``nn.EmbeddingBag``'s pooled lookup over a quantized table: modes sum, mean and max,
    ``per_sample_weights`` (sum), ``padding_idx``, offsets or 2-D input,
    ``include_last_offset``; rows pooled in fp32, output ``(bags, D)`` in ``dtype``."""

    def __init__(self, packed: Tensor, bits: int = 8, fp8: bool = False, mode: str = "mean",
                 include_last_offset: bool = False, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(packed, bits, fp8, padding_idx, dtype)
        if mode not in ("sum", "mean", "max"):
            raise ValueError(f"QuantizedEmbeddingBag: 'mode' must be 'sum', 'mean' or 'max', "
                             f"got {mode!r}")
        self.mode, self.include_last_offset = mode, include_last_offset

    @classmethod
    def from_float(cls, module: torch.nn.Module, bits: int = 8, fp8: bool = False,
                   dtype: torch.dtype | None = None) -> "QuantizedEmbeddingBag":
        """The quantized copy of an ``nn.EmbeddingBag`` / ``ee.EmbeddingBag``: mode,
        include_last_offset and padding_idx kept; output dtype as QuantizedEmbedding's."""
        packed = cls._quantize(module, bits, fp8)
        return cls(packed, bits, fp8, module.mode, module.include_last_offset,
                   module.padding_idx, dtype or cls._output_dtype(module.weight))

    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        _refuse_gradients(per_sample_weights, "QuantizedEmbeddingBag")
        ids, csr, psw, padding = bag_arguments(input, self.packed, offsets, False, self.mode,
                                               False, per_sample_weights,
                                               self.include_last_offset, self.padding_idx)
        if psw is not None:
            psw = psw.detach().to(torch.float32)
        return qops.quantized_embedding_bag_forward(self.packed, self.format, ids, csr,
                                                    qops.ops.BAG_MODES[self.mode], psw, padding,
                                                    self.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode}" + (
            ", include_last_offset=True" if self.include_last_offset else "")


def quantize_embeddings(model: torch.nn.Module, bits: int = 8,
                        fp8: bool = False) -> torch.nn.Module:
    """Replace, in place, every ``ee.Embedding`` / ``nn.Embedding`` of ``model`` by its
    :class:`QuantizedEmbedding` and every ``ee.EmbeddingBag`` / ``nn.EmbeddingBag`` by its
    :class:`QuantizedEmbeddingBag` (``from_float``); returns ``model``, or the quantized module
    when ``model`` itself is one. A module reached under several names (tied) becomes one
    quantized module. Subclasses with their own behaviour are left alone, as
    :func:`~embedding_ext.replace_embeddings` leaves them."""
    qops.format_name(bits, fp8)  # refuse bad arguments before changing anything
    done: dict[int, torch.nn.Module] = {}

    def quantized(module: torch.nn.Module) -> torch.nn.Module | None:
        kind = (QuantizedEmbedding if type(module) in _FLOAT_EMBEDDINGS else
                QuantizedEmbeddingBag if type(module) in _FLOAT_BAGS else None)
        if kind is None:
            return None
        if id(module) not in done:
            done[id(module)] = kind.from_float(module, bits, fp8)
        return done[id(module)]

    # Every module is quantized before any is swapped in: an error leaves the model as it was.
    for module in model.modules():
        quantized(module)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in done:
                setattr(parent, name, done[id(child)])
    return done.get(id(model), model)
