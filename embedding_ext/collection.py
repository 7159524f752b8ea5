"""Many tables in one call: :class:`EmbeddingBagCollection`, TorchRec's names, our kernels.

Every feature of every table is pooled by one op (one parallel region on the CPU), and the
backward gives every table its gradient from one op. See docs/collections.md.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import collection_ops
from .collection_fused import (CollectionFusedOptimizer, collection_fused_optimizer_of,
                               fused_collection_lookup)
from .errors import EmbeddingIndexError
from .fused import refuse_inside_ddp
from .module import EmbeddingBag

_MODES = {"sum": 0, "mean": 1, "max": 2}


def _pooling_name(pooling: Any) -> str:
    """"sum"/"mean"/"max" from a string or an enum such as TorchRec's PoolingType (by name,
    so torchrec is never imported here)."""
    name = getattr(pooling, "name", pooling)
    if not isinstance(name, str) or name.lower() not in _MODES:
        raise ValueError(f"EmbeddingBagConfig: 'pooling' must be 'sum', 'mean' or 'max' (or "
                         f"PoolingType.SUM/MEAN), got {pooling!r}")
    return name.lower()


def check_table_config(cfg: Any) -> None:
    """The rules every table config follows (feature_names made a list, in place)."""
    kind = type(cfg).__name__
    if isinstance(cfg.feature_names, str):
        raise TypeError(f"{kind}: 'feature_names' must be a list of names, got the string "
                        f"{cfg.feature_names!r}")
    cfg.feature_names = list(cfg.feature_names)
    if not cfg.feature_names:
        raise ValueError(f"{kind} {cfg.name!r}: 'feature_names' must name at least one feature")
    if cfg.num_embeddings < 1 or cfg.embedding_dim < 1:
        raise ValueError(f"{kind} {cfg.name!r}: 'num_embeddings' and 'embedding_dim' must be "
                         f">= 1, got {cfg.num_embeddings} and {cfg.embedding_dim}")


@dataclasses.dataclass
class EmbeddingBagConfig:
    """One table: ``num_embeddings`` x ``embedding_dim``, looked up by every feature in
    ``feature_names``, pooled by ``pooling``; ``padding_idx`` rows are left out of pools."""

    num_embeddings: int
    embedding_dim: int
    feature_names: list[str]
    name: str = ""
    pooling: Any = "sum"
    padding_idx: int | None = None

    def __post_init__(self) -> None:
        check_table_config(self)
        self.pooling = _pooling_name(self.pooling)
        if self.padding_idx is not None:
            if not -self.num_embeddings <= self.padding_idx < self.num_embeddings:
                raise ValueError(f"EmbeddingBagConfig {self.name!r}: 'padding_idx' must be in "
                                 f"[-{self.num_embeddings}, {self.num_embeddings}), got "
                                 f"{self.padding_idx}")
            self.padding_idx %= self.num_embeddings


class EmbeddingBagCollectionFunction(torch.autograd.Function):
    """The pooled lookup of every feature, with one backward op for every table's gradient.
    Inputs: ``(layout, values, offsets, per_sample_weights, batch_size, *weights)`` where
    layout is ``(feature_table, modes, padding_idx, sparse)``."""

    @staticmethod
    def forward(ctx, layout, values, offsets, per_sample_weights, batch_size, *weights):
        feature_table, modes, padding_idx, _ = layout
        out, arg_max = collection_ops.collection_forward(
            weights, values, offsets, feature_table, modes, padding_idx, per_sample_weights,
            batch_size)
        ctx.layout = layout
        ctx.save_for_backward(values, offsets, arg_max, per_sample_weights, *weights)
        return out

    @staticmethod
    def backward(ctx, grad):
        values, offsets, arg_max, psw, *weights = ctx.saved_tensors
        feature_table, modes, padding_idx, sparse = ctx.layout
        rows = [w.shape[0] for w in weights]
        dims = [w.shape[1] for w in weights]
        args = (grad, values, offsets, arg_max, feature_table, modes, padding_idx, psw, rows,
                dims)
        weight_grads: list[Tensor | None] = [None] * len(weights)
        if any(ctx.needs_input_grad[5:]):
            if sparse:
                ids, vals = collection_ops.collection_sparse_backward(*args)
                weight_grads = [torch.sparse_coo_tensor(i.unsqueeze(0), v, (n, d),
                                                        check_invariants=False)
                                for i, v, n, d in zip(ids, vals, rows, dims)]
            else:
                weight_grads = list(collection_ops.collection_dense_backward(*args))
        psw_grad = None
        if psw is not None and ctx.needs_input_grad[3]:
            psw_grad = collection_ops.per_sample_weights_grad(grad, values, offsets, weights,
                                                              feature_table, padding_idx)
        return (None, None, None, psw_grad, None, *weight_grads)


# The C++ EmbeddingIndexError names the feature and table by index (csrc/cpu/bag_collection.cpp:
# throw_collection_index_error); the module adds their names. Keep the two in step.
_BAD_ID = re.compile(r"feature (\d+), bag \d+\) is out of range for table (\d+)")


class EmbeddingBagCollection(torch.nn.Module):
    """TorchRec's ``EmbeddingBagCollection`` on embedding_ext's table-batched kernels.

    ``forward(values, offsets, per_sample_weights=None)`` takes the batch feature-major (as
    TorchRec's ``KeyedJaggedTensor``): bag ``f * B + b`` of feature ``f`` (in
    :attr:`feature_names` order) is ``values[offsets[f*B+b]:offsets[f*B+b+1]]``; it returns
    ``(B, sum of the features' dims)``, features side by side in that order.
    With ``sparse=True`` the tables get sparse COO gradients."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig],
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, *, sparse: bool = False) -> None:
        super().__init__()
        self._configs = list(tables)
        if not self._configs:
            raise ValueError("EmbeddingBagCollection: 'tables' must hold at least one "
                             "EmbeddingBagConfig")
        self.sparse = bool(sparse)
        self.embedding_bags = torch.nn.ModuleDict()
        self.feature_names: list[str] = []
        self._table_names: list[str] = []
        feature_table = []
        for t, cfg in enumerate(self._configs):
            if not isinstance(cfg, EmbeddingBagConfig):
                cfg = self._configs[t] = _config_from(cfg)
            name = cfg.name or f"t_{t}"
            if name in self.embedding_bags:
                raise ValueError(f"EmbeddingBagCollection: two tables are named {name!r}")
            table = EmbeddingBag(cfg.num_embeddings, cfg.embedding_dim, mode=cfg.pooling,
                                 padding_idx=cfg.padding_idx, sparse=self.sparse,
                                 device=device, dtype=dtype)
            # TorchRec's initialisation (uniform in +-sqrt(1/V)), so trained models start alike.
            with torch.no_grad():
                bound = math.sqrt(1.0 / cfg.num_embeddings)
                table.weight.uniform_(-bound, bound)
                if cfg.padding_idx is not None:
                    table.weight[cfg.padding_idx].zero_()
            if hasattr(self.embedding_bags, name) or "." in name:
                raise ValueError(f"EmbeddingBagCollection: table name {name!r} cannot be a key "
                                 "of nn.ModuleDict (an attribute of it, or a dotted name)")
            self.embedding_bags[name] = table
            self._table_names.append(name)
            for feature in cfg.feature_names:
                if feature in self.feature_names:
                    raise ValueError(f"EmbeddingBagCollection: feature {feature!r} is listed "
                                     "by two tables")
                self.feature_names.append(feature)
                feature_table.append(t)
        self._feature_table = tuple(feature_table)
        self._modes = tuple(_MODES[c.pooling] for c in self._configs)
        self._padding = tuple(-1 if c.padding_idx is None else c.padding_idx
                              for c in self._configs)
        self._feature_dims = [self._configs[t].embedding_dim for t in feature_table]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    def is_weighted(self) -> bool:
        return False

    def forward(self, values: Tensor, offsets: Tensor | None = None,
                per_sample_weights: Tensor | None = None) -> Tensor:
        if offsets is None and hasattr(values, "length_per_key"):  # a TorchRec KeyedJaggedTensor
            return self._forward_kjt(values)
        if offsets is None:
            raise TypeError("EmbeddingBagCollection: 'offsets' is required unless the input is "
                            "a TorchRec KeyedJaggedTensor")
        num_features = len(self.feature_names)
        if offsets.dim() != 1 or offsets.shape[0] < 1 or (offsets.shape[0] - 1) % num_features:
            raise ValueError(f"EmbeddingBagCollection: 'offsets' must be 1-D with "
                             f"features * B + 1 entries ({num_features} features), got shape "
                             f"{tuple(offsets.shape)}")
        batch = (offsets.shape[0] - 1) // num_features
        weights = [self.embedding_bags[n].weight for n in self._table_names]
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights.to(weights[0].dtype)
        layout = (self._feature_table, self._modes, self._padding, self.sparse)
        fused = self._fused_optimizer()
        try:
            if fused is not None:
                for w in weights:
                    refuse_inside_ddp(w)
                return fused_collection_lookup(layout, values, offsets, per_sample_weights,
                                               batch, fused, weights)
            return EmbeddingBagCollectionFunction.apply(layout, values, offsets,
                                                        per_sample_weights, batch, *weights)
        except IndexError as exc:
            match = _BAD_ID.search(str(exc))
            if match is None:
                raise
            feature = self.feature_names[int(match.group(1))]
            table = self._table_names[int(match.group(2))]
            raise EmbeddingIndexError(f"EmbeddingBagCollection: feature {feature!r} (table "
                                      f"{table!r}): {exc}") from None

    def _forward_kjt(self, kjt: Any) -> Any:
        """TorchRec's call: a KeyedJaggedTensor in any key order (keys this collection does
        not look up are ignored; its weights, if any, are the per_sample_weights) -> a
        KeyedTensor of this collection's features."""
        from torchrec.sparse.jagged_tensor import KeyedTensor  # only a KJT's caller has it

        keys = list(kjt.keys())
        missing = [f for f in self.feature_names if f not in keys]
        if missing:
            raise ValueError(f"EmbeddingBagCollection: the KeyedJaggedTensor lacks the "
                             f"feature(s) {missing} (it has {keys})")
        if kjt.variable_stride_per_key():
            raise ValueError("EmbeddingBagCollection: a KeyedJaggedTensor with a batch size "
                             "per feature (variable stride) is not supported")
        batch, lengths = kjt.stride(), kjt.lengths()
        starts = [0]
        for n in kjt.length_per_key():
            starts.append(starts[-1] + n)
        weights = kjt.weights_or_none()
        parts = {name: [] for name in ("values", "lengths", "weights")}
        for f in self.feature_names:  # the features in this collection's order
            k = keys.index(f)
            parts["values"].append(kjt.values()[starts[k]:starts[k + 1]])
            parts["lengths"].append(lengths[k * batch:(k + 1) * batch])
            if weights is not None:
                parts["weights"].append(weights[starts[k]:starts[k + 1]])
        lengths = torch.cat(parts["lengths"]).long()
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        out = self(torch.cat(parts["values"]), offsets,
                   torch.cat(parts["weights"]) if weights is not None else None)
        return KeyedTensor(keys=list(self.feature_names), length_per_key=list(self._feature_dims),
                           values=out, key_dim=1)

    @classmethod
    def from_torchrec(cls, collection: torch.nn.Module, *,
                      sparse: bool = False) -> "EmbeddingBagCollection":
        """This collection from a TorchRec ``EmbeddingBagCollection`` (its tables, features,
        pooling, device and dtype), with a copy of its weights; ``state_dict`` keys are the
        same, so either loads the other's."""
        configs = [_config_from(c) for c in collection.embedding_bag_configs()]
        weight = next(iter(collection.parameters()))
        ours = cls(configs, device=weight.device, dtype=weight.dtype, sparse=sparse)
        ours.load_state_dict(collection.state_dict())
        return ours

    # The optimizer fused into the backward (ee.fuse_optimizer(ebc, ...)): a weak reference,
    # None on the class, dropped from copies and pickles (which are not fused).
    _ee_fused_ref = None

    def _fused_optimizer(self) -> CollectionFusedOptimizer | None:
        if self._ee_fused_ref is None or not torch.is_grad_enabled():
            return None
        optimizer = collection_fused_optimizer_of(self)
        if optimizer is not None and any(
                p is not self.embedding_bags[n].weight
                for p, n in zip(optimizer.param_groups[0]["params"], self._table_names)):
            raise RuntimeError("fuse_optimizer: a table's weight was replaced after fusing "
                               "the collection; call ee.fuse_optimizer again after replacing "
                               "it, and drop the old optimizer")
        return optimizer

    def _make_fused_optimizer(self, optimizer_class: type,
                              **kwargs: object) -> CollectionFusedOptimizer:
        return CollectionFusedOptimizer(self, optimizer_class, **kwargs)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_ee_fused_ref", None)
        return state

    def split(self, out: Tensor) -> dict[str, Tensor]:
        """``{feature: (B, D)}`` views of a :meth:`forward` output."""
        if out.dim() != 2 or out.shape[1] != sum(self._feature_dims):
            raise ValueError(f"EmbeddingBagCollection.split: 'out' must have shape (B, "
                             f"{sum(self._feature_dims)}), got {tuple(out.shape)}")
        return dict(zip(self.feature_names, torch.split(out, self._feature_dims, dim=1)))

    def extra_repr(self) -> str:
        return f"features={len(self.feature_names)}, sparse={self.sparse}"


def _config_from(cfg: Any) -> EmbeddingBagConfig:
    """Our config from an object with TorchRec's config fields (e.g. its EmbeddingBagConfig)."""
    try:
        return EmbeddingBagConfig(cfg.num_embeddings, cfg.embedding_dim, list(cfg.feature_names),
                                  name=cfg.name, pooling=cfg.pooling)
    except AttributeError as exc:
        raise TypeError(f"EmbeddingBagCollection: 'tables' must hold EmbeddingBagConfig "
                        f"objects, got {type(cfg).__name__}") from exc
