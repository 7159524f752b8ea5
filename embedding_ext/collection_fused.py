"""An optimizer fused into an :class:`~embedding_ext.EmbeddingBagCollection`'s backward:
every table's step in one op, straight from the collection's output gradient, by the rules
``ee.fuse_optimizer`` applies to one table (no gradient is stored, no optimizer step reads
one)."""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import collection_ops
from .fused import _SGD, _SPARSE_ADAM, FusedOptimizer
from .step_boundary import fused_step_backward

_MAX = 2  # the collection's mode code of max pooling


class CollectionFusedOptimizer(torch.optim.Optimizer):
    """``optimizer_class(ebc.parameters(), **kwargs)``, applied inside the collection's
    backward (made by ``ee.fuse_optimizer(ebc, ...)``).

    The rules, options and refusals of :class:`~embedding_ext.FusedOptimizer`, for every
    table (tables pooled with ``max`` are refused: their gradient is per column). One
    parameter group over the tables' weights in table order: ``param_groups[0]["lr"]`` (an
    LR scheduler) reaches every table at the next backward, and :meth:`state_dict` is the
    torch optimizer's over ``ebc.parameters()``, so checkpoints move between the fused
    collection and an unfused one trained with ``optimizer_class``.
    """

    def __init__(self, collection: torch.nn.Module, optimizer_class: type, **kwargs: object):
        names = collection._table_names
        maxed = [n for n, m in zip(names, collection._modes) if m == _MAX]
        if maxed:
            raise NotImplementedError(
                f"fuse_optimizer: table(s) {maxed} pool with 'max', which cannot be fused (the "
                "gradient is per column, not per row: no per-row update); use sum or mean")
        if collection_fused_optimizer_of(collection) is not None:
            raise RuntimeError("fuse_optimizer: this collection already has a fused optimizer")
        # Each table's optimizer validates the arguments; built together, so a refusal
        # leaves no table fused (dropping an optimizer unfuses its table).
        self._tables = [FusedOptimizer(collection.embedding_bags[n], optimizer_class, **kwargs)
                        for n in names]
        super().__init__([collection.embedding_bags[n].weight for n in names],
                         self._tables[0].defaults)
        collection._ee_fused_ref = weakref.ref(self)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "param_groups", None):
            raise RuntimeError("fuse_optimizer: a fused collection's optimizer has one "
                               "parameter group (its tables); use another optimizer for "
                               "other parameters")
        super().add_param_group(param_group)

    def _update(self, grad: Tensor, values: Tensor, offsets: Tensor, psw: Tensor | None,
                layout) -> None:
        """The backward: every table's step from the collection's output gradient, in one
        op (hyperparameters from this group; each table's own state and step count)."""
        group = self.param_groups[0]
        hyper = {k: v for k, v in group.items() if k != "params"}
        prepared = []
        for optimizer in self._tables:
            optimizer.param_groups[0].update(hyper)
            prepared.append(optimizer._prepare())
        rule = self._tables[0]._rule
        local = [p[1] for p in prepared]
        betas = group.get("betas", (0.0, 0.0))
        feature_table, modes, padding_idx, _ = layout
        with torch.no_grad():
            collection_ops.collection_fused_update_(
                [w for w, _, _ in local], grad.to(local[0][0].dtype), values, offsets,
                feature_table, modes, padding_idx, psw, rule,
                [s for _, s, _ in local] if rule != _SGD else [],
                [s for _, _, s in local] if rule == _SPARSE_ADAM else [], float(group["lr"]),
                float(group.get("eps", 0.0)), float(betas[0]), float(betas[1]),
                float(group.get("lr_decay", 0.0)), [p[2] for p in prepared])
        for optimizer, (weight, _, _) in zip(self._tables, local):
            optimizer._finish(values, weight)

    def state_dict(self) -> dict:
        state = {}
        for t, optimizer in enumerate(self._tables):
            table_state = optimizer.state_dict()["state"]
            if 0 in table_state:
                state[t] = table_state[0]
        group = dict(self.param_groups[0], params=list(range(len(self._tables))))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups", [])
        if len(groups) != 1 or len(groups[0]["params"]) != len(self._tables):
            raise ValueError(f"fuse_optimizer: the state_dict must have one parameter group of "
                             f"{len(self._tables)} parameters (the collection's tables), got "
                             f"{[len(g['params']) for g in groups]}")
        group = groups[0]
        state = state_dict.get("state", {})
        for t, (param_id, optimizer) in enumerate(zip(group["params"], self._tables)):
            table = {"state": {0: state[param_id]} if param_id in state else {},
                     "param_groups": [dict(group, params=[0])]}
            optimizer.load_state_dict(table)
        self.param_groups[0].update({k: v for k, v in group.items() if k != "params"})

    def step(self, closure: Callable[[], float] | None = None):
        """The updates already happened in the backward: re-arms every table (``closure``
        runs once, in the first table's step)."""
        loss = self._tables[0].step(closure)
        for optimizer in self._tables[1:]:
            optimizer.step()
        return loss


def collection_fused_optimizer_of(collection: torch.nn.Module) -> CollectionFusedOptimizer | None:
    ref = getattr(collection, "_ee_fused_ref", None)
    return None if ref is None else ref()


class FusedCollectionFunction(torch.autograd.Function):
    """The collection's pooled lookup whose backward is the fused update of every table
    (per_sample_weights still get their gradient, from the weights before the update)."""

    @staticmethod
    def forward(ctx, layout, values: Tensor, offsets: Tensor, psw: Tensor | None, batch: int,
                optimizer: CollectionFusedOptimizer, *weights: Tensor) -> Tensor:
        feature_table, modes, padding_idx, _ = layout
        out, arg_max = collection_ops.collection_forward(
            weights, values, offsets, feature_table, modes, padding_idx, psw, batch)
        ctx.save_for_backward(values, offsets, arg_max, psw, *weights)
        ctx.layout, ctx.optimizer = layout, optimizer
        return out

    @staticmethod
    @fused_step_backward
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("fuse_optimizer: backward(create_graph=True) is not supported "
                               "with a fused optimizer (the update has no graph)")
        values, offsets, _, psw, *weights = ctx.saved_tensors
        feature_table, _, padding_idx, _ = ctx.layout
        psw_grad = None
        if psw is not None and ctx.needs_input_grad[3]:
            psw_grad = collection_ops.per_sample_weights_grad(grad, values, offsets, weights,
                                                              feature_table, padding_idx)
        ctx.optimizer._update(grad, values, offsets, psw, ctx.layout)
        return (None, None, None, psw_grad, None, None) + (None,) * len(weights)


_NOT_COMPILED = ("a fused collection's lookup runs eagerly (its backward is the optimizer "
                 "step); compile without fullgraph=True, or unfuse")


@torch.compiler.disable(reason=_NOT_COMPILED)
def fused_collection_lookup(layout, values: Tensor, offsets: Tensor, psw: Tensor | None,
                            batch: int, optimizer: CollectionFusedOptimizer,
                            weights: Sequence[Tensor]) -> Tensor:
    return FusedCollectionFunction.apply(layout, values, offsets, psw, batch, optimizer,
                                         *weights)
