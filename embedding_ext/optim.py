"""Optimizers for embedding tables, alone or fused into the backward (ee.fuse_optimizer).

``RowWiseAdagrad``: Adagrad with one accumulator per row, the rule of FBGEMM's
``EXACT_ROWWISE_ADAGRAD``: for each row ``k`` with gradient ``g`` (duplicates summed first),
``m[k] += mean(g * g)`` over the row, then ``w[k] -= lr * g / (sqrt(m[k]) + eps)``. It is an
ordinary ``torch.optim.Optimizer`` for dense and sparse (COO) gradients of 2-D parameters.
State per parameter: ``"sum"`` (one accumulator per row, fp32, fp64 for fp64 parameters) and
``"step"``. fp16/bf16 rows are updated in fp32 and rounded once.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def _state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state in fp32 at least (fp64 for fp64 parameters)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad: one accumulator per row of each (2-D) parameter.

    Args:
        params: parameters or parameter groups; every parameter must be 2-D (rows x features).
        lr: learning rate (default 1e-2, as ``torch.optim.Adagrad``).
        eps: added to the square root of the accumulator (default 1e-8, as FBGEMM's
            ``EXACT_ROWWISE_ADAGRAD``).
        initial_accumulator_value: the accumulators' starting value (default 0).

    Rows whose gradient is entirely zero (or absent from a sparse gradient) are left as they
    are, accumulator included, so dense and sparse gradients of the same lookup give the same
    result.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-8,
                 initial_accumulator_value: float = 0.0):
        if not lr >= 0.0:
            raise ValueError(f"RowWiseAdagrad: 'lr' must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"RowWiseAdagrad: 'eps' must be >= 0, got {eps}")
        if not initial_accumulator_value >= 0.0:
            raise ValueError("RowWiseAdagrad: 'initial_accumulator_value' must be >= 0, got "
                             f"{initial_accumulator_value}")
        defaults = dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError("RowWiseAdagrad: every parameter must be 2-D (one "
                                     f"accumulator per row), got shape {tuple(p.shape)}")

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["sum"] = torch.full((p.shape[0],), group["initial_accumulator_value"],
                                      dtype=_state_dtype(p), device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p, group)
                state["step"] += 1
                rowwise_adagrad_update_(p, p.grad, state["sum"], group["lr"], group["eps"])
        return loss


def rowwise_adagrad_update_(weight: Tensor, grad: Tensor, accumulator: Tensor, lr: float,
                            eps: float) -> None:
    """One row-wise Adagrad step on ``weight`` in place, for a dense or sparse COO ``grad``
    (duplicates summed); ``accumulator`` holds one value per row, updated in place."""
    if grad.is_sparse:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
    else:
        # Rows with an all-zero gradient are left alone (as absent rows of a sparse gradient).
        rows = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)
        values = grad.index_select(0, rows)
    if rows.numel() == 0:
        return
    compute = accumulator.dtype
    g = values.to(compute).reshape(rows.numel(), -1)
    mean_square = g.square().mean(dim=1) if g.shape[1] else g.new_zeros(rows.numel())
    acc = accumulator.index_select(0, rows) + mean_square
    accumulator.index_copy_(0, rows, acc)
    scale = lr / (acc.sqrt() + eps)
    updated = weight.index_select(0, rows).to(compute).reshape(rows.numel(), -1)
    updated -= g * scale[:, None]
    weight.index_copy_(0, rows, updated.reshape((rows.numel(),) + weight.shape[1:]).to(weight.dtype))


__all__ = ["RowWiseAdagrad"]
