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
- ``Replicate()``: the local lookup, output ``Replicate()`` (``max_norm`` renorms every
  rank's copy alike).
``ee.fuse_optimizer`` on a row-sharded ``ee.Embedding`` (fuse after parallelize_module: a
weight replaced after fusing raises at the next lookup): each rank updates its own rows in
the backward, with no gradient and no collective; the optimizer state is DTensors placed as
the weight.
``ee.embedding_bag`` / ``ee.EmbeddingBag`` with a DTensor weight (torch's
parallelize_module plans take only nn.Embedding and nn.Linear: distribute the weight with
``distribute_tensor`` or ``distribute_module``):
- ``Shard(1)``: every mode and option but ``max_norm``; output ``Shard(1)`` of (bags, D).
- ``Shard(0)``: ``sum`` (with ``per_sample_weights``) and ``mean``, with ``padding_idx``,
  ``scale_grad_by_freq`` and ``max_norm``; each rank pools the ids it owns (its bags
  compacted to them) and the output is ``Partial()``; mean divides by the bag's count over
  all ranks. fp16/bf16: each rank's partial sum is rounded before the all-reduce adds them
  (and mean's 1/count is a per_sample_weight in the weight's dtype), so the result is
  within a few ulps of the unsharded one, not equal. ``max`` mode is refused.
- A ``per_sample_weights`` that requires grad is refused for sharded weights (each rank
  would get its own shard's part of its gradient).
The ids must be a plain tensor or a replicated DTensor on the same mesh. ``sparse=True`` is
refused for DTensor tables (a DTensor gradient with a sparse local tensor is not something
torch's optimizers take).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops
from .errors import EmbeddingIndexError
from .lookup import embedding_local, renorm_rows
from .step_boundary import fused_step_backward

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


def shard_like(full: Tensor, weight):
    """A full (unsharded) optimizer state for a row-sharded weight (a (V, D) or (V,)
    tensor, e.g. from a checkpoint of unsharded training) as a DTensor sharded as the
    weight's rows. Every rank holds the same full tensor, so no communication: each keeps
    its rows."""
    from torch.distributed.tensor import DTensor, Shard
    mesh, placement = weight.device_mesh, weight.placements[0]
    if not (isinstance(placement, Shard) and placement.dim == 0 and mesh.ndim == 1):
        raise ValueError(f"load_state_dict: a full state for a weight placed as "
                         f"{weight.placements} is not supported (row-sharded weights are)")
    if full.shape[:1] != weight.shape[:1] or (full.dim() == 2 and full.shape != weight.shape):
        raise ValueError(f"load_state_dict: a state of shape {tuple(full.shape)} does not fit "
                         f"the weight of shape {tuple(weight.shape)}")
    first, rows = shard_rows(full.shape[0], mesh.size(), mesh.get_local_rank())
    return DTensor.from_local(full[first:first + rows].contiguous(), mesh, [Shard(0)],
                              run_check=False, shape=full.shape, stride=full.stride())


def _local_ids(input, mesh, op: str, name: str = "ids") -> Tensor:
    """The local tensor of a replicated DTensor argument (a plain tensor as it is)."""
    dtensor = _dtensor_type()
    if not isinstance(input, dtensor):
        return input
    from torch.distributed.tensor import Replicate
    if input.device_mesh != mesh:
        raise ValueError(f"{op}: the {name} are a DTensor on another mesh than the weight's "
                         f"({input.device_mesh} vs {mesh})")
    if not all(isinstance(p, Replicate) for p in input.placements):
        raise NotImplementedError(
            f"{op}: sharded {name} ({input.placements}) are not supported; give them "
            "replicated (RowwiseParallel and ColwiseParallel do, with input_layouts=Replicate())")
    return input.to_local()


def _mesh_and_placement(weight, op: str):
    """The weight's (1-D) mesh and placement; a plain weight next to a DTensor argument is
    refused."""
    if not isinstance(weight, _dtensor_type()):
        raise ValueError(f"{op}: an argument is a DTensor but the weight is not; distribute "
                         "the weight (parallelize_module, distribute_tensor) or pass plain "
                         "tensors")
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"{op}: a weight sharded over a {mesh.ndim}-D mesh ({weight.placements}) is not "
            "supported; shard it over one mesh dimension (FSDP2 over a tensor-parallel table "
            "gathers its own dimension before the forward, which works)")
    return mesh, weight.placements[0]


def _check_ids(ids: Tensor, num_rows: int, op: str) -> None:
    """Row-wise: every id in [0, V) of the whole table, on every rank before any
    collective (an id past every shard would otherwise give a zero row on every rank,
    silently; the local kernels see only their own rows). One host synchronisation on CUDA.
    (Column-wise and replicated lookups leave this to the local kernels, which see all ids.)"""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: 'indices' must be int32 or int64, got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = torch.stack(list(torch.aminmax(ids))).tolist()
    if low < 0 or high >= num_rows:
        bad = low if low < 0 else high
        position = int((ids.reshape(-1) == bad).nonzero()[0])
        wording = ("Expected idx >= 0 && idx < num_embeddings but found idx to be "
                   f"{bad}" if "bag" in op else "index out of range in self")
        raise EmbeddingIndexError(
            f"{op}: index {bad} at position {position} (row-major) is out of range for "
            f"'weight' with {num_rows} rows (sharded); valid indices are 0 <= index < "
            f"{num_rows}; {wording}")


class _RowShardLookup(torch.autograd.Function):
    """This rank's part of a row-sharded lookup: ids in global numbering, rows
    [first, first + rows) here; other ids give zero rows and no gradient. First-order
    gradients only (double backward raises, as once_differentiable says)."""

    @staticmethod
    def forward(ctx, local_weight, ids, first, padding_idx, scale_grad_by_freq):
        rows, dim = local_weight.shape
        local = ids - first
        outside = (local < 0) | (local >= rows)
        # For the backward, the masked positions go to a row the kernel skips: the local
        # padding row, else one past the shard (a gradient of rows + 1 rows, the last one
        # dropped). The kernel then sums, counts (scale_grad_by_freq) and scales in one pass,
        # exactly as unsharded: the masked ids are neither added nor counted.
        sink = padding_idx if padding_idx >= 0 else rows
        ctx.save_for_backward(local.masked_fill(outside, sink))
        ctx.rows, ctx.sink, ctx.scale_grad_by_freq = rows, sink, scale_grad_by_freq
        if rows == 0:  # an empty shard (V < world): every id is elsewhere
            return local_weight.new_zeros((*ids.shape, dim))
        out = ops.embedding_forward(local_weight, local.masked_fill(outside, 0))
        return out.masked_fill_(outside.unsqueeze(-1), 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (local,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        dim = grad.shape[-1]
        extra = int(ctx.sink == ctx.rows)
        result = ops.embedding_dense_backward(grad.reshape(-1, dim), local.reshape(-1),
                                              ctx.rows + extra, ctx.sink, ctx.scale_grad_by_freq)
        return (result[:ctx.rows] if extra else result), None, None, None, None


def _renorm_owned_rows(weight, ids: Tensor, first: int, rows: int, max_norm: float,
                       norm_type: float) -> None:
    """max_norm on a row shard: renorm the referenced rows this rank owns (a whole row is on
    one rank, so its norm is local)."""
    if rows == 0:
        return
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
            f"{op}: sparse=True is not supported for a DTensor weight ({placement}): torch's "
            "optimizers take no DTensor gradient with a sparse local tensor; use the dense "
            "gradient (it stays sharded) or ee.fuse_optimizer")


class _LocalPiece(torch.autograd.Function):
    """``weight.to_local()`` whose backward builds the weight's DTensor gradient with the
    weight's own placements, global shape and stride. (torch 2.11's to_local backward
    computes the stride of an uneven shard wrongly, e.g. D = 6 columns on 4 ranks: the
    gradient was then all-gathered into a Replicate() V x D tensor on every rank.)"""

    @staticmethod
    def forward(ctx, weight):
        ctx.spec = (weight.device_mesh, weight.placements, weight.shape, weight.stride())
        # A view: the output gets this Function as its grad_fn, the DTensor's own local
        # tensor is left as it is.
        local = weight.to_local()
        return local.view(local.shape)

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor
        mesh, placements, shape, stride = ctx.spec
        return DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape,
                                  stride=stride)


def local_piece(weight) -> Tensor:
    """This rank's piece of a DTensor weight, differentiable back to the weight."""
    return _LocalPiece.apply(weight) if torch.is_grad_enabled() and weight.requires_grad \
        else weight.to_local()


def _local_shard(weight, rows: int, op: str) -> Tensor:
    """local_piece(weight), checked to hold the rows shard_rows gives this rank."""
    local = local_piece(weight)
    if local.shape[0] != rows:
        raise RuntimeError(f"{op}: this rank holds {local.shape[0]} rows of the Shard(0) weight "
                           f"but torch.chunk's split gives it {rows}; an unevenly sharded "
                           "weight must follow DTensor's own split")
    return local


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
    op = "embedding"
    mesh, placement = _mesh_and_placement(weight, op)
    ids = _local_ids(input, mesh, op)
    _refuse_sparse(sparse, placement, op)
    if isinstance(placement, Replicate):
        if max_norm is not None:  # every rank renorms its whole copy alike
            _renorm_owned_rows(weight, ids, 0, weight.shape[0], max_norm, norm_type)
        out = embedding_local(ids, local_piece(weight), padding_idx, None, norm_type,
                              scale_grad_by_freq, False)
        return DTensor.from_local(out, mesh, [Replicate()], run_check=False)
    if isinstance(placement, Shard) and placement.dim == 0:
        _check_ids(ids, weight.shape[0], op)
        first, rows, local_padding = _row_shard(weight, mesh, padding_idx)
        if max_norm is not None:
            _renorm_owned_rows(weight, ids, first, rows, max_norm, norm_type)
        local_weight = _local_shard(weight, rows, op)
        out = _RowShardLookup.apply(local_weight, ids, first, local_padding,
                                    bool(scale_grad_by_freq))
        return DTensor.from_local(out, mesh, [Partial()], run_check=False)
    if isinstance(placement, Shard) and placement.dim in (1, -1):
        _refuse_column_max_norm(max_norm, op)
        out = embedding_local(ids, local_piece(weight), padding_idx, None, norm_type,
                              scale_grad_by_freq, False)
        shape = (*ids.shape, weight.shape[1])
        return DTensor.from_local(out, mesh, [Shard(out.dim() - 1)], run_check=False,
                                  shape=shape, stride=torch.empty(shape, device="meta").stride())
    raise NotImplementedError(f"{op}: a weight placed as {placement} is not supported; "
                              "Shard(0), Shard(1) and Replicate() are")


class _RowShardFusedLookup(torch.autograd.Function):
    """A row shard's lookup whose backward is the fused optimizer's update of this rank's
    rows, from the positions it owns: no gradient, no collective."""

    @staticmethod
    def forward(ctx, weight, ids, first, padding_idx, scale_grad_by_freq, optimizer):
        # The DTensor itself is the input (its shard taken here, where autograd records
        # nothing): with weight.to_local() outside, torch 2.11's to_local backward turned this
        # Function's None gradient into a zero DTensor gradient for the weight.
        local_weight = weight.to_local()
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
    @fused_step_backward
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
    with torch.no_grad():
        _local_shard(weight, rows, op)
    out = _RowShardFusedLookup.apply(weight, ids, first, local_padding,
                                     bool(scale_grad_by_freq), optimizer)
    return DTensor.from_local(out, mesh, [Partial()], run_check=False)


def row_state_like(weight: Tensor, value: float, dtype: torch.dtype) -> Tensor:
    """A (V,) state filled with `value`: for a row-sharded DTensor weight, a DTensor sharded
    alike (this rank's rows); else a plain tensor on the weight's device."""
    if is_dtensor(weight):
        from torch.distributed.tensor import DTensor
        local = weight.to_local()
        rows = torch.full(local.shape[:1], value, dtype=dtype, device=local.device)
        return DTensor.from_local(rows, weight.device_mesh, weight.placements, run_check=False,
                                  shape=weight.shape[:1], stride=(1,))
    return torch.full(weight.shape[:1], value, dtype=dtype, device=weight.device)
