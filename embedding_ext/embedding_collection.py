"""Unpooled sequence features in many tables: :class:`EmbeddingCollection`, TorchRec's names.

Each feature's ids are looked up in its table by our lookup kernel (one call per feature:
the rows are not pooled, so there is no per-bag work to batch across tables); tables may have
different dims (TorchRec's collection requires one). See docs/collections.md.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .collection import check_table_config
from .errors import EmbeddingIndexError
from .module import Embedding


@dataclasses.dataclass
class EmbeddingConfig:
    """One table: ``num_embeddings`` x ``embedding_dim``, looked up by every feature in
    ``feature_names``; ``padding_idx`` rows get no gradient (as ``nn.Embedding``)."""

    num_embeddings: int
    embedding_dim: int
    feature_names: list[str]
    name: str = ""
    padding_idx: int | None = None

    def __post_init__(self) -> None:
        check_table_config(self)


_POSITION = re.compile(r"at position (\d+)")


class EmbeddingCollection(torch.nn.Module):
    """TorchRec's ``EmbeddingCollection`` (unpooled lookups) on embedding_ext's kernels.

    ``forward(values, offsets)`` takes the batch feature-major, as the bag collection does
    (feature ``f``'s ids are ``values[offsets[f*B]:offsets[(f+1)*B]]``, and the offsets must
    cover every id); it returns every id's row, ``(len(values), D)``, when the tables share
    one dim, else ``{feature: (ids of the feature, its dim)}``. :meth:`split` cuts the
    single tensor per feature. ``forward(kjt)`` with a TorchRec ``KeyedJaggedTensor`` returns
    TorchRec's ``{feature: JaggedTensor}``."""

    def __init__(self, tables: Sequence[EmbeddingConfig],
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, *, sparse: bool = False) -> None:
        super().__init__()
        self._configs = [c if isinstance(c, EmbeddingConfig) else _config_from(c) for c in tables]
        if not self._configs:
            raise ValueError("EmbeddingCollection: 'tables' must hold at least one "
                             "EmbeddingConfig")
        self.embeddings = torch.nn.ModuleDict()
        self.feature_names: list[str] = []
        self._feature_tables: list[str] = []
        for t, cfg in enumerate(self._configs):
            name = cfg.name or f"t_{t}"
            if name in self.embeddings:
                raise ValueError(f"EmbeddingCollection: two tables are named {name!r}")
            if hasattr(self.embeddings, name) or "." in name:
                raise ValueError(f"EmbeddingCollection: table name {name!r} cannot be a key "
                                 "of nn.ModuleDict (an attribute of it, or a dotted name)")
            self.embeddings[name] = Embedding(cfg.num_embeddings, cfg.embedding_dim,
                                              padding_idx=cfg.padding_idx, sparse=sparse,
                                              device=device, dtype=dtype)
            for feature in cfg.feature_names:
                if feature in self.feature_names:
                    raise ValueError(f"EmbeddingCollection: feature {feature!r} is listed by "
                                     "two tables")
                self.feature_names.append(feature)
                self._feature_tables.append(name)
        self._dims = {c.embedding_dim for c in self._configs}

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return list(self._configs)

    def need_indices(self) -> bool:
        return False

    def embedding_dim(self) -> int:
        """The tables' common dim (TorchRec's method); a ValueError when they differ."""
        if len(self._dims) != 1:
            raise ValueError(f"EmbeddingCollection: the tables have several dims "
                             f"{sorted(self._dims)}")
        return next(iter(self._dims))

    def feature_bounds(self, values: Tensor, offsets: Tensor) -> list[int]:
        """Each feature's first position in ``values``, then ``len(values)``; checks the
        offsets (a host copy of them: on CUDA, one synchronisation)."""
        features = len(self.feature_names)
        if offsets.dim() != 1 or offsets.shape[0] < 1 or (offsets.shape[0] - 1) % features:
            raise ValueError(f"EmbeddingCollection: 'offsets' must be 1-D with features * B + 1 "
                             f"entries ({features} features), got shape {tuple(offsets.shape)}")
        if offsets.dtype not in (torch.int32, torch.int64) or values.dim() != 1:
            raise ValueError("EmbeddingCollection: 'values' must be 1-D and 'offsets' int32 or "
                             f"int64, got shapes {tuple(values.shape)} and dtype {offsets.dtype}")
        # One host copy of what the checks need (every feature's start, the end, whether any
        # entry decreases) instead of every offset: a Python pass over F * B entries per call.
        batch = (offsets.shape[0] - 1) // features
        decreasing = offsets[1:] < offsets[:-1]
        host = torch.cat([offsets[::batch] if batch else offsets[:1].repeat(features + 1),
                          decreasing.any().to(offsets.dtype).view(1)]).tolist()
        bounds, any_decreasing = host[:-1], host[-1]
        if bounds[0] != 0 or bounds[-1] != values.shape[0] or any_decreasing:
            bad = int(decreasing.nonzero()[0, 0]) + 1 if any_decreasing else None
            raise RuntimeError(f"EmbeddingCollection: 'offsets' must start at 0, never decrease "
                               f"and end at len(values) = {values.shape[0]}; got offsets[0] = "
                               f"{bounds[0]}, offsets[-1] = {bounds[-1]}"
                               + (f", offsets[{bad}] < offsets[{bad - 1}]" if bad else ""))
        return bounds

    def _rows(self, values: Tensor, bounds: list[int]) -> list[Tensor]:
        rows = []
        for f, (feature, table) in enumerate(zip(self.feature_names, self._feature_tables)):
            try:
                rows.append(self.embeddings[table](values[bounds[f]:bounds[f + 1]]))
            except IndexError as exc:
                match = _POSITION.search(str(exc))
                where = f", position {bounds[f] + int(match.group(1))} of 'values'" if match else ""
                raise EmbeddingIndexError(f"EmbeddingCollection: feature {feature!r} (table "
                                          f"{table!r}){where}: {exc}") from None
        return rows

    def forward(self, values: Any, offsets: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        if offsets is None and hasattr(values, "length_per_key"):  # a TorchRec KeyedJaggedTensor
            return self._forward_kjt(values)
        if offsets is None:
            raise TypeError("EmbeddingCollection: 'offsets' is required unless the input is a "
                            "TorchRec KeyedJaggedTensor")
        rows = self._rows(values, self.feature_bounds(values, offsets))
        if len(self._dims) == 1:
            return torch.cat(rows)
        return dict(zip(self.feature_names, rows))

    def split(self, rows: Tensor, offsets: Tensor) -> dict[str, Tensor]:
        """``{feature: its rows}``: views of a single-tensor :meth:`forward` output."""
        if rows.dim() != 2:
            raise ValueError(f"EmbeddingCollection.split: 'rows' must be 2-D, got shape "
                             f"{tuple(rows.shape)}")
        bounds = self.feature_bounds(rows[:, 0], offsets)
        return {f: rows[bounds[i]:bounds[i + 1]] for i, f in enumerate(self.feature_names)}

    def _forward_kjt(self, kjt: Any) -> dict[str, Any]:
        from torchrec.sparse.jagged_tensor import JaggedTensor  # only a KJT's caller has it

        jagged = kjt.to_dict()
        missing = [f for f in self.feature_names if f not in jagged]
        if missing:
            raise ValueError(f"EmbeddingCollection: the KeyedJaggedTensor lacks the feature(s) "
                             f"{missing} (it has {list(jagged)})")
        values = [jagged[f].values() for f in self.feature_names]
        bounds = [0]
        for v in values:
            bounds.append(bounds[-1] + v.shape[0])
        rows = self._rows(torch.cat(values), bounds)
        return {f: JaggedTensor(values=r, lengths=jagged[f].lengths())
                for f, r in zip(self.feature_names, rows)}

    @classmethod
    def from_torchrec(cls, collection: torch.nn.Module, *,
                      sparse: bool = False) -> "EmbeddingCollection":
        """This collection from a TorchRec ``EmbeddingCollection``, with a copy of its
        weights; ``state_dict`` keys are the same (``embeddings.<name>.weight``)."""
        configs = [_config_from(c) for c in collection.embedding_configs()]
        weight = next(iter(collection.parameters()))
        ours = cls(configs, device=weight.device, dtype=weight.dtype, sparse=sparse)
        ours.load_state_dict(collection.state_dict())
        return ours

    def extra_repr(self) -> str:
        return f"features={len(self.feature_names)}"


def _config_from(cfg: Any) -> EmbeddingConfig:
    """Our config from an object with TorchRec's config fields."""
    try:
        return EmbeddingConfig(cfg.num_embeddings, cfg.embedding_dim,
                               list(cfg.feature_names) or [cfg.name], name=cfg.name)
    except AttributeError as exc:
        raise TypeError(f"EmbeddingCollection: 'tables' must hold EmbeddingConfig objects, got "
                        f"{type(cfg).__name__}") from exc
