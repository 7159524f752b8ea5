"""ee.EmbeddingBag's fused lookup (modes sum and mean): the pooled lookup whose backward is
the fused optimizer's update (see fused.py for the optimizer)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed, lookup, ops
from .autograd import bag_sparse_gradient
from .fused import _MAX_MODE_REFUSAL, _NOT_COMPILED, FusedOptimizer, refuse_inside_ddp
from .lookup import bag_arguments, csr_may_end_early, renorm_rows
from .step_boundary import fused_step_backward


class FusedBagFunction(torch.autograd.Function):
    """The pooled lookup (sum, mean) whose backward is the fused optimizer's update: the
    positions' gradient rows (as the sparse gradient's values: grad_output of the bag times
    1/count, per_sample_weights and 1/frequency; padding left out), each row's summed once
    and the rule applied once per row. per_sample_weights still get their gradient."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, csr: Tensor, mode: int, psw: Tensor | None,
                padding_idx: int, scale_grad_by_freq: bool, optimizer: FusedOptimizer,
                csr_tail: bool) -> Tensor:
        output, _ = ops.embedding_bag_forward(weight, ids, csr, mode, psw, padding_idx)
        # The weight only for the per_sample_weights gradient (read before the update).
        ctx.save_for_backward(ids, csr, psw, weight if ctx.needs_input_grad[4] else None)
        ctx.num_weights, ctx.mode, ctx.padding_idx = weight.shape[0], mode, padding_idx
        ctx.scale, ctx.optimizer, ctx.csr_tail = scale_grad_by_freq, optimizer, csr_tail
        return output

    @staticmethod
    @fused_step_backward
    def backward(ctx, grad_output: Tensor):
        ids, csr, psw, weight = ctx.saved_tensors
        grad_psw = None
        if ctx.needs_input_grad[4]:
            grad_psw = ops.embedding_bag_per_sample_weights_backward(grad_output, weight, ids,
                                                                     csr, ctx.padding_idx)
        rows, values = bag_sparse_gradient(grad_output, ids, csr, ctx.num_weights, ctx.mode,
                                           psw, ctx.padding_idx, ctx.scale, ctx.csr_tail)
        if ctx.padding_idx < 0:
            # One value per id in order: the ids themselves, so that a bad one stops the
            # update (the op names it row 0, a zero row SparseAdam would step).
            rows = ids.reshape(1, -1)[:, :values.shape[0]]
        elif ids.is_cuda:
            # With padding the op leaves bad ids out (reported): then every row is made bad,
            # so the update changes nothing, not just the others (no synchronisation).
            bad = ((ids < 0) | (ids >= ctx.num_weights)).any()
            rows = rows.masked_fill(bad, -1)
        # Padding is already left out and the frequency scaling already in the values.
        ctx.optimizer._update(values, rows[0], -1, False)
        return None, None, None, None, grad_psw, None, None, None, None


@torch.compiler.disable(reason=_NOT_COMPILED)
def fused_bag_lookup(module, input: Tensor, offsets: Tensor | None,
                     per_sample_weights: Tensor | None, optimizer: FusedOptimizer) -> Tensor:
    """ee.EmbeddingBag's forward with a fused optimizer (modes sum and mean): the pooled
    lookup (after the max_norm renorm, as without fusion) whose backward is the update."""
    weight = module.weight
    if module.mode == "max":
        raise NotImplementedError(_MAX_MODE_REFUSAL)
    refuse_inside_ddp(weight)
    ids, csr, psw, padding = bag_arguments(input, weight, offsets, module.scale_grad_by_freq,
                                           module.mode, False, per_sample_weights,
                                           module.include_last_offset, module.padding_idx)
    if distributed.is_dtensor(weight, ids, csr, psw):
        raise NotImplementedError("fuse_optimizer: an ee.EmbeddingBag with a DTensor weight is "
                                  "not supported fused (ee.Embedding row-sharded is)")
    if module.max_norm is not None:
        lookup.check_bag_before_renorm(weight, ids, csr, module.mode, psw, padding)
        ids = renorm_rows(weight, ids, module.max_norm, module.norm_type)
    return FusedBagFunction.apply(weight, ids, csr, ops.BAG_MODES[module.mode], psw, padding,
                                  bool(module.scale_grad_by_freq), optimizer,
                                  csr_may_end_early(input, offsets, module.include_last_offset))
