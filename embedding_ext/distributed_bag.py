"""Pooled lookups (``ee.embedding_bag`` / ``ee.EmbeddingBag``) on DTensor tables; the
placements and their rules are in distributed.py's docstring."""
from __future__ import annotations

import torch
from torch import Tensor

from .distributed import (_check_ids, _local_ids, _local_shard, _mesh_and_placement,
                          _refuse_column_max_norm, _refuse_sparse, _renorm_owned_rows,
                          _row_shard, local_piece)
from .lookup import check_bag_before_renorm, embedding_bag_local


def _check_offsets(csr: Tensor, n: int, op: str) -> None:
    """Row-wise bags: the CSR offsets checked on every rank before compaction (each rank's
    kernel sees only its own compacted offsets: a bad entry would raise on some ranks and
    not others, and the next collective would hang). One host synchronisation on CUDA."""
    csr = csr.long()
    decreasing = torch.cat([csr.new_zeros(1, dtype=torch.bool), csr[1:] < csr[:-1]])
    # The first decreasing entry by argmax (no nonzero: its count would be a second sync).
    flags = torch.stack([(csr[0] != 0).long(), csr[-1],
                         torch.where(decreasing.any(), decreasing.long().argmax(), -1)])
    first_bad, last, decreasing_at = flags.tolist()
    # RuntimeError with PyTorch's wording, as F.embedding_bag raises.
    if first_bad:
        raise RuntimeError(f"{op}: offsets[0] must be 0, got {int(csr[0])}; offsets[0] has "
                           f"to be 0, i.e., the first sequence in the mini-batch has to start "
                           f"from position 0. However, got {int(csr[0])}")
    if decreasing_at >= 0:
        raise RuntimeError(f"{op}: offsets must not decrease, got offsets[{decreasing_at}] = "
                           f"{int(csr[decreasing_at])} < offsets[{decreasing_at - 1}] = "
                           f"{int(csr[decreasing_at - 1])}")
    if last > n:
        raise RuntimeError(f"{op}: the last offset ({last}) is past the {n} ids; offsets[-1] "
                           f"can not be greater than input's length {n} but got offsets[-1] "
                           f"of {last}")


def embedding_bag(ids: Tensor, csr: Tensor, weight, padding_idx: int, max_norm,
                  norm_type: float, scale_grad_by_freq: bool, mode: str, sparse: bool,
                  per_sample_weights: Tensor | None):
    """ee.embedding_bag for a DTensor weight (see the module docstring), from the 1-D ids
    and CSR offsets of lookup.bag_arguments; padding_idx normalised (-1: none)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    op = "embedding_bag"
    mesh, placement = _mesh_and_placement(weight, op)
    ids = _local_ids(ids, mesh, op)
    csr = _local_ids(csr, mesh, op, "offsets")
    psw = _local_ids(per_sample_weights, mesh, op, "per_sample_weights")
    bags, dim = csr.shape[0] - 1, weight.shape[1]
    _refuse_sparse(sparse, placement, op)
    if isinstance(placement, Replicate):
        if max_norm is not None:  # every rank renorms its whole copy alike
            check_bag_before_renorm(local_piece(weight), ids, csr, mode, psw, padding_idx)
            _renorm_owned_rows(weight, ids, 0, weight.shape[0], max_norm, norm_type)
        out = embedding_bag_local(ids, csr, local_piece(weight), padding_idx, None,
                                  norm_type, scale_grad_by_freq, mode, False, psw, True)
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)
    if psw is not None and psw.requires_grad:
        raise NotImplementedError(
            f"{op}: a per_sample_weights that requires grad is not supported for a sharded "
            f"weight ({placement}): each rank would get only its own shard's part of the "
            "gradient; detach it, or replicate the weight")
    if isinstance(placement, Shard) and placement.dim in (1, -1):
        _refuse_column_max_norm(max_norm, op)
        out = embedding_bag_local(ids, csr, local_piece(weight), padding_idx, None,
                                  norm_type, scale_grad_by_freq, mode, False, psw, True)
        return DTensor.from_local(out, mesh, [Shard(1)], run_check=False, shape=(bags, dim),
                                  stride=(dim, 1))
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise NotImplementedError(f"{op}: a weight placed as {placement} is not supported; "
                                  "Shard(0), Shard(1) and Replicate() are")
    if mode == "max":
        raise NotImplementedError(
            f"{op}: mode='max' is not supported for a row-sharded weight (Shard(0)); shard "
            "the columns (Shard(1)), which supports every mode")
    n = ids.shape[0]
    _check_ids(ids, weight.shape[0], op)
    _check_offsets(csr, n, op)
    first, rows, local_padding = _row_shard(weight, mesh, padding_idx)
    if max_norm is not None:  # every id, those past the last offset too (as unsharded)
        _renorm_owned_rows(weight, ids, first, rows, max_norm, norm_type)
    # This rank's positions: ids in bags that it owns, compacted; the bags keep their places.
    position = torch.arange(n, device=ids.device)
    in_bags = position < csr[-1]
    owned_mask = in_bags & (ids >= first) & (ids < first + rows)
    owned = owned_mask.nonzero().squeeze(1)
    kept_before = torch.cat([owned_mask.new_zeros(1, dtype=torch.long), owned_mask.long().cumsum(0)])
    local_csr = kept_before[csr.long()]
    local_ids = (ids.index_select(0, owned) - first).to(ids.dtype)
    coef = None if psw is None else psw.index_select(0, owned)
    if mode == "mean":
        # The bag's count over all ranks (non-padding ids), not this rank's.
        counted = in_bags if padding_idx < 0 else in_bags & (ids != padding_idx)
        counted_before = torch.cat([counted.new_zeros(1, dtype=torch.long), counted.long().cumsum(0)])
        count = (counted_before[csr[1:].long()] - counted_before[csr[:-1].long()]).clamp_min(1)
        bag_of = torch.searchsorted(csr[1:].long(), owned, right=True)
        coef = (1.0 / count.to(torch.float64))[bag_of].to(weight.dtype)
    out = embedding_bag_local(local_ids, local_csr, _local_shard(weight, rows, op),
                              local_padding, None, norm_type, scale_grad_by_freq, "sum", False,
                              coef, True)
    return DTensor.from_local(out, mesh, [Partial()], run_check=False)
