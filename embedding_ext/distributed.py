"""The lookup on DTensor tables (torch.distributed.tensor): our kernels do each rank's local
lookup, DTensor does every collective. Reached from ``ee.embedding`` / ``ee.Embedding`` when
the weight is a DTensor, e.g. after ``parallelize_module(m, mesh, RowwiseParallel())`` or
``ColwiseParallel()``, or inside FSDP2 over a tensor-parallel mesh.

Placements of the weight on its (1-D) mesh:
- ``Shard(0)``, row-wise (Megatron's vocabulary-parallel scheme): ids outside this rank's
  rows are masked, the local rows looked up, masked positions give zero rows, and the output
  is ``Partial()`` (the sum over ranks): RowwiseParallel's output hook turns it into
  ``Replicate()`` (one all-reduce) or ``Shard(1)`` (a reduce-scatter). The backward needs no
  collective and the weight gradient stays ``Shard(0)``: V/world rows per rank (PyTorch's
  own row-wise embedding builds a replicated V x D gradient on every rank). A rank with no
  rows (V < world) returns zeros. ``padding_idx`` may be on any rank's rows;
  ``scale_grad_by_freq`` counts the whole call's ids (they are replicated: every rank sees
  all occurrences of its own rows); ``max_norm`` renorms each rank's referenced rows.
- ``Shard(1)``, column-wise: every rank looks its columns up for all ids; output
  ``Shard(-1)`` of the ids' shape + (D,). Every option but ``max_norm`` (a row's norm spans
  ranks: refused).
- ``Replicate()``: the local lookup, output ``Replicate()``.
``ee.fuse_optimizer`` on a row-sharded ``ee.Embedding`` (fuse after parallelize_module: a
replaced weight is not fused): each rank updates its own rows in the backward, with no
gradient and no collective; the optimizer state is DTensors placed as the weight.
``ee.embedding_bag`` / ``ee.EmbeddingBag`` with a DTensor weight (torch's
parallelize_module plans take only nn.Embedding and nn.Linear: distribute the weight with
``distribute_tensor`` or ``distribute_module``):
- ``Shard(1)``: every mode and option but ``max_norm``; output ``Shard(1)`` of (bags, D).
- ``Shard(0)``: ``sum`` and ``mean`` (with ``per_sample_weights``, ``padding_idx``,
  ``scale_grad_by_freq``, ``max_norm``); each rank pools the ids it owns (its bags
  compacted to them) and the output is ``Partial()``; mean divides by the bag's count over
  all ranks. ``max`` mode and a ``per_sample_weights`` that requires grad are refused.
The ids must be a plain tensor or a replicated DTensor on the same mesh. ``sparse=True`` is
refused for sharded tables (a DTensor gradient with a sparse local tensor is not something
torch's optimizers take).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops

_DTENSOR = None


def _dtensor_type():
    """DTensor, imported on first use (torch.distributed.tensor costs ~0.3 s to import)."""
    global _DTENSOR
    if _DTENSOR is None:
        if not torch.distributed.is_available():
            return None
        from torch.distributed.tensor import DTensor
        _DTENSOR = DTensor
    return _DTENSOR


def is_dtensor(*tensors) -> bool:
    """Whether any of the tensors is a DTensor. Plain tensors and Parameters answer without
    importing torch.distributed."""
    for t in tensors:
        if t is None or type(t) in (Tensor, torch.nn.Parameter):
            continue
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(t, dtensor):
            return True
    return False


def shard_rows(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of `rank`'s Shard(0) piece: torch.chunk's split, as DTensor uses
    (ceil(V / world) rows per rank, the last ranks short or empty)."""
    chunk = -(-num_rows // world) if world else 0
    first = min(chunk * rank, num_rows)
    return first, min(first + chunk, num_rows) - first


def _local_ids(input, mesh, op: str) -> Tensor:
    dtensor = _dtensor_type()
    if not isinstance(input, dtensor):
        return input
    from torch.distributed.tensor import Replicate
    if input.device_mesh != mesh:
        raise ValueError(f"{op}: the ids are a DTensor on another mesh than the weight's "
                         f"({input.device_mesh} vs {mesh})")
    if not all(isinstance(p, Replicate) for p in input.placements):
        raise NotImplementedError(
            f"{op}: sharded ids ({input.placements}) are not supported; give the ids "
            "replicated (RowwiseParallel and ColwiseParallel do, with input_layouts=Replicate())")
    return input.to_local()


def _mesh_and_placement(weight, op: str):
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"{op}: a weight sharded over a {mesh.ndim}-D mesh ({weight.placements}) is not "
            "supported; shard it over one mesh dimension (FSDP2 over a tensor-parallel table "
            "gathers its own dimension before the forward, which works)")
    return mesh, weight.placements[0]


def _check_ids(ids: Tensor, num_rows: int, op: str) -> None:
    """Every id in [0, V) of the whole table: an id past every shard would otherwise give a
    zero row on every rank, silently. (One host synchronisation on CUDA.)"""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: 'indices' must be int32 or int64, got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = torch.aminmax(ids)
    if int(low) < 0 or int(high) >= num_rows:
        bad = int(low) if int(low) < 0 else int(high)
        position = int((ids.reshape(-1) == bad).nonzero()[0])
        raise IndexError(f"{op}: index {bad} at position {position} (row-major) is out of range "
                         f"for 'weight' with {num_rows} rows (sharded); valid indices are "
                         f"0 <= index < {num_rows}")


class _RowShardLookup(torch.autograd.Function):
    """This rank's part of a row-sharded lookup: ids in global numbering, rows
    [first, first + rows) here; other ids give zero rows and no gradient."""

    @staticmethod
    def forward(ctx, local_weight, ids, first, padding_idx, scale_grad_by_freq):
        rows, dim = local_weight.shape
        local = ids - first
        outside = (local < 0) | (local >= rows)
        ctx.rows, ctx.padding_idx, ctx.scale_grad_by_freq = rows, padding_idx, scale_grad_by_freq
        if rows == 0:  # an empty shard (V < world): every id is elsewhere
            ctx.save_for_backward(None, None)
            return local_weight.new_zeros((*ids.shape, dim))
        local = local.masked_fill(outside, 0)
        out = ops.embedding_forward(local_weight, local)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        ctx.save_for_backward(local, outside)
        return out

    @staticmethod
    def backward(ctx, grad):
        local, outside = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dim = grad.shape[-1]
        if ctx.rows == 0:
            return grad.new_zeros((0, dim)), None, None, None, None
        # Masked positions point at local row 0 with a zero gradient row: they add nothing.
        # scale_grad_by_freq is applied here, after the sum, from the counts of the ids
        # this rank owns (the kernel would count the masked ids as row 0).
        grad = grad.masked_fill(outside.unsqueeze(-1), 0)
        result = ops.embedding_dense_backward(grad.reshape(-1, dim), local.reshape(-1), ctx.rows,
                                              ctx.padding_idx, False)
        if ctx.scale_grad_by_freq:
            counts = torch.bincount(local[~outside].reshape(-1), minlength=ctx.rows)
            result.div_(counts.clamp_min_(1).unsqueeze(1).to(result.dtype))
        return result, None, None, None, None


def _renorm_owned_rows(weight, ids: Tensor, first: int, rows: int, max_norm: float,
                       norm_type: float) -> None:
    """max_norm on a row shard: renorm the referenced rows this rank owns (a whole row is on
    one rank, so its norm is local)."""
    if rows == 0:
        return
    from .functional import renorm_rows
    local = ids.reshape(-1) - first
    with torch.no_grad():  # to_local() is then the shard itself, not a view
        shard = weight.to_local()
    renorm_rows(shard, local[(local >= 0) & (local < rows)], max_norm, norm_type)


def _row_shard(weight, mesh, padding_idx: int) -> tuple[int, int, int]:
    """(first row, rows, local padding_idx or -1) of this rank's Shard(0) piece."""
    first, rows = shard_rows(weight.shape[0], mesh.size(), mesh.get_local_rank())
    local_padding = padding_idx - first if first <= padding_idx < first + rows else -1
    return first, rows, local_padding


def _refuse_sparse(sparse: bool, placement, op: str) -> None:
    if sparse:
        raise NotImplementedError(
            f"{op}: sparse=True is not supported for a sharded weight ({placement}): torch's "
            "optimizers take no DTensor gradient with a sparse local tensor; use the dense "
            "gradient (it stays sharded) or ee.fuse_optimizer on an unsharded table")


def _refuse_column_max_norm(max_norm, op: str) -> None:
    if max_norm is not None:
        raise NotImplementedError(
            f"{op}: max_norm is not supported for a column-sharded weight (Shard(1)): a "
            "row's norm spans the ranks; shard the rows (Shard(0)) to use max_norm")


def embedding(input, weight, padding_idx: int, max_norm, norm_type: float,
              scale_grad_by_freq: bool, sparse: bool):
    """ee.embedding for a DTensor weight (see the module docstring); padding_idx already
    normalised against the global row count (-1: none)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from .functional import embedding as local_embedding
    op = "embedding"
    if not isinstance(weight, DTensor):
        raise ValueError(f"{op}: the ids are a DTensor but the weight is not; distribute the "
                         "weight (parallelize_module, distribute_tensor) or pass plain ids")
    mesh, placement = _mesh_and_placement(weight, op)
    ids = _local_ids(input, mesh, op)
    _check_ids(ids, weight.shape[0], op)
    if isinstance(placement, Replicate):
        local_weight = weight.to_local()
        out = local_embedding(ids, local_weight, None if padding_idx < 0 else padding_idx,
                              max_norm, norm_type, scale_grad_by_freq, sparse)
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)
    _refuse_sparse(sparse, placement, op)
    if isinstance(placement, Shard) and placement.dim == 0:
        first, rows, local_padding = _row_shard(weight, mesh, padding_idx)
        if max_norm is not None:
            _renorm_owned_rows(weight, ids, first, rows, max_norm, norm_type)
        local_weight = weight.to_local()
        assert rows == local_weight.shape[0], (rows, tuple(local_weight.shape))
        out = _RowShardLookup.apply(local_weight, ids, first, local_padding,
                                    bool(scale_grad_by_freq))
        return DTensor.from_local(out, mesh, [Partial()], run_check=False)
    if isinstance(placement, Shard) and placement.dim in (1, -1):
        _refuse_column_max_norm(max_norm, op)
        out = local_embedding(ids, weight.to_local(), None if padding_idx < 0 else padding_idx,
                              None, norm_type, scale_grad_by_freq, False)
        shape = (*ids.shape, weight.shape[1])
        return DTensor.from_local(out, mesh, [Shard(out.dim() - 1)], run_check=False,
                                  shape=shape, stride=torch.empty(shape, device="meta").stride())
    raise NotImplementedError(f"{op}: a weight placed as {placement} is not supported; "
                              "Shard(0), Shard(1) and Replicate() are")


def embedding_bag(ids: Tensor, csr: Tensor, weight, padding_idx: int, max_norm,
                  norm_type: float, scale_grad_by_freq: bool, mode: str, sparse: bool,
                  per_sample_weights: Tensor | None):
    """ee.embedding_bag for a DTensor weight (see the module docstring), from the 1-D ids
    and CSR offsets of functional._bag_layout; padding_idx normalised (-1: none)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from .functional import embedding_bag as local_embedding_bag
    op = "embedding_bag"
    if not isinstance(weight, DTensor):
        raise ValueError(f"{op}: the ids are a DTensor but the weight is not; distribute the "
                         "weight (distribute_tensor, distribute_module) or pass plain ids")
    mesh, placement = _mesh_and_placement(weight, op)
    ids = _local_ids(ids, mesh, op)
    csr = _local_ids(csr, mesh, op)
    psw = _local_ids(per_sample_weights, mesh, op) if per_sample_weights is not None else None
    _check_ids(ids, weight.shape[0], op)
    padding = None if padding_idx < 0 else padding_idx
    bags, dim = csr.shape[0] - 1, weight.shape[1]
    if isinstance(placement, Replicate):
        out = local_embedding_bag(ids, weight.to_local(), csr, max_norm, norm_type,
                                  scale_grad_by_freq, mode, sparse, psw, True, padding)
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)
    _refuse_sparse(sparse, placement, op)
    if isinstance(placement, Shard) and placement.dim in (1, -1):
        _refuse_column_max_norm(max_norm, op)
        out = local_embedding_bag(ids, weight.to_local(), csr, None, norm_type,
                                  scale_grad_by_freq, mode, False, psw, True, padding)
        return DTensor.from_local(out, mesh, [Shard(1)], run_check=False, shape=(bags, dim),
                                  stride=(dim, 1))
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise NotImplementedError(f"{op}: a weight placed as {placement} is not supported; "
                                  "Shard(0), Shard(1) and Replicate() are")
    if mode == "max":
        raise NotImplementedError(
            f"{op}: mode='max' is not supported for a row-sharded weight (Shard(0)); shard "
            "the columns (Shard(1)), which supports every mode")
    if psw is not None and psw.requires_grad:
        raise NotImplementedError(
            f"{op}: a per_sample_weights that requires grad is not supported for a "
            "row-sharded weight (its gradient would need a sum over the ranks); shard the "
            "columns (Shard(1)) or detach it")
    first, rows, local_padding = _row_shard(weight, mesh, padding_idx)
    if max_norm is not None:
        _renorm_owned_rows(weight, ids[:int(csr[-1])], first, rows, max_norm, norm_type)
    # This rank's positions: ids in bags that it owns; the bags keep their places.
    n = ids.shape[0]
    position = torch.arange(n, device=ids.device)
    in_bags = position < csr[-1]
    owned = in_bags & (ids >= first) & (ids < first + rows)
    kept_before = torch.cat([owned.new_zeros(1, dtype=torch.long), owned.long().cumsum(0)])
    local_csr = kept_before[csr.long()]
    local_ids = (ids[owned] - first).to(ids.dtype)
    coef = None if psw is None else psw[owned]
    if mode == "mean":
        # The bag's count over all ranks (non-padding ids), not this rank's.
        counted = in_bags if padding_idx < 0 else in_bags & (ids != padding_idx)
        counted_before = torch.cat([counted.new_zeros(1, dtype=torch.long), counted.long().cumsum(0)])
        count = (counted_before[csr[1:].long()] - counted_before[csr[:-1].long()]).clamp_min(1)
        bag_of = torch.searchsorted(csr[1:].long(), position[owned], right=True)
        coef = (1.0 / count.to(torch.float64))[bag_of].to(weight.dtype)
    out = local_embedding_bag(local_ids, weight.to_local(), local_csr, None, norm_type,
                              scale_grad_by_freq, "sum", False, coef, True,
                              None if local_padding < 0 else local_padding)
    return DTensor.from_local(out, mesh, [Partial()], run_check=False)


class _RowShardFusedLookup(torch.autograd.Function):
    """A row shard's lookup whose backward is the fused optimizer's update of this rank's
    rows, from the positions it owns: no gradient, no collective."""

    @staticmethod
    def forward(ctx, local_weight, ids, first, padding_idx, scale_grad_by_freq, optimizer):
        rows, dim = local_weight.shape
        local = (ids - first).reshape(-1)
        owned = ((local >= 0) & (local < rows)).nonzero().squeeze(1)
        local_ids = local.index_select(0, owned)
        ctx.save_for_backward(owned, local_ids)
        ctx.padding_idx, ctx.scale, ctx.optimizer, ctx.dim = padding_idx, scale_grad_by_freq, optimizer, dim
        out = local_weight.new_zeros((ids.numel(), dim))
        if owned.numel():
            out.index_copy_(0, owned, ops.embedding_forward(local_weight, local_ids))
        return out.reshape(*ids.shape, dim)

    @staticmethod
    def backward(ctx, grad):
        owned, local_ids = ctx.saved_tensors
        # Every rank runs the update (an empty shard or no owned ids included): the step
        # count and the one-update-per-step guard stay the same on all ranks.
        grad_rows = grad.reshape(-1, ctx.dim).index_select(0, owned)
        ctx.optimizer._update(grad_rows, local_ids, ctx.padding_idx, ctx.scale)
        return None, None, None, None, None, None


def fused_lookup(input, weight, optimizer, padding_idx: int, max_norm, norm_type: float,
                 scale_grad_by_freq: bool):
    """ee.Embedding's forward with a fused optimizer on a row-sharded (Shard(0)) weight:
    each rank updates its own rows in the backward; the output is Partial() as the unfused
    row-wise lookup's."""
    from torch.distributed.tensor import DTensor, Partial, Shard
    op = "fuse_optimizer"
    if not isinstance(weight, DTensor):
        raise ValueError(f"{op}: the ids are a DTensor but the weight is not")
    mesh, placement = _mesh_and_placement(weight, op)
    if not (isinstance(placement, Shard) and placement.dim == 0):
        raise NotImplementedError(
            f"{op}: a fused optimizer on a weight placed as {placement} is not supported; "
            "shard the rows (Shard(0), RowwiseParallel): each rank then updates its own rows")
    ids = _local_ids(input, mesh, op)
    _check_ids(ids, weight.shape[0], op)
    first, rows, local_padding = _row_shard(weight, mesh, padding_idx)
    if max_norm is not None:
        _renorm_owned_rows(weight, ids, first, rows, max_norm, norm_type)
    out = _RowShardFusedLookup.apply(weight.to_local(), ids, first, local_padding,
                                     bool(scale_grad_by_freq), optimizer)
    return DTensor.from_local(out, mesh, [Partial()], run_check=False)
