"""Swap embedding_ext into an existing model, and back.

The swap changes the class of each ``torch.nn.Embedding`` in place: the module object, its
Parameter, hooks, ``state_dict`` keys, optimizer state and weight tying are untouched, so
it can be done before or after building the optimizer.
"""
from __future__ import annotations

import torch

from .module import Embedding, EmbeddingBag


def replace_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """Make every plain ``torch.nn.Embedding`` in ``model`` (``model`` itself included) an
    ``embedding_ext.Embedding``, in place; returns ``model``.

    Every plain ``torch.nn.EmbeddingBag`` becomes an ``embedding_ext.EmbeddingBag`` the same
    way. Subclasses with their own behaviour are left alone. Undo with
    :func:`restore_embeddings`.
    """
    for module in model.modules():
        if type(module) is torch.nn.Embedding:
            module.__class__ = Embedding
        elif type(module) is torch.nn.EmbeddingBag:
            module.__class__ = EmbeddingBag
    return model


def restore_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`replace_embeddings`: every ``embedding_ext.Embedding`` and
    ``embedding_ext.EmbeddingBag`` becomes the plain torch module again, in place; returns
    ``model``."""
    for module in model.modules():
        if type(module) is Embedding:
            module.__class__ = torch.nn.Embedding
        elif type(module) is EmbeddingBag:
            module.__class__ = torch.nn.EmbeddingBag
    return model
