"""``Embedding``: a subclass of ``torch.nn.Embedding`` whose forward runs our kernels.

Construction, ``reset_parameters``, ``from_pretrained``, ``extra_repr``, ``state_dict`` and
pickling are inherited unchanged, so the module is interchangeable with ``nn.Embedding``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import embedding, embedding_bag
from . import fused, fused_bags


class Embedding(fused.Fusable, torch.nn.Embedding):
    """Equivalent to :class:`torch.nn.Embedding`; see :func:`embedding_ext.embedding`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: Tensor | None = None, _freeze: bool = False,
                 device: torch.device | str | int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if num_embeddings < 0 or embedding_dim < 0:
            raise ValueError(
                "Embedding: 'num_embeddings' and 'embedding_dim' must be >= 0, got "
                f"num_embeddings={num_embeddings}, embedding_dim={embedding_dim}")
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, _freeze, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        optimizer = self._fused_optimizer()
        if optimizer is not None:
            return fused.fused_lookup(input, self.weight, optimizer, self.padding_idx,
                                      self.max_norm, self.norm_type, self.scale_grad_by_freq)
        return embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                         self.scale_grad_by_freq, self.sparse)


class EmbeddingBag(fused.Fusable, torch.nn.EmbeddingBag):
    """Equivalent to :class:`torch.nn.EmbeddingBag` on the CPU and CUDA; see
    :func:`embedding_ext.embedding_bag`. Construction, ``from_pretrained`` and
    ``state_dict`` are inherited unchanged."""

    def forward(self, input: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        optimizer = self._fused_optimizer()
        if optimizer is not None:
            return fused_bags.fused_bag_lookup(self, input, offsets, per_sample_weights, optimizer)
        return embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type,
                             self.scale_grad_by_freq, self.mode, self.sparse,
                             per_sample_weights, self.include_last_offset, self.padding_idx)
