"""What the sharded tests (test_sharded*.py, sharded_*.py) share: the sizes, the tensor
parallel plans by name, the ids of each step, and CommDebugMode's counts."""
import torch

DIM = 6
STEPS = 3
# Uneven shards everywhere; V = 3 leaves rank 3 of 4 empty, V = 9 too.
VS = (3, 9, 10, 11)


def tp_plan(name: str):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {
        "row->replicate": RowwiseParallel(input_layouts=Replicate()),
        "row->shard1": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "col->shard": ColwiseParallel(),
        "col->replicate": ColwiseParallel(output_layouts=Replicate()),
    }[name]


def ids_for(V: int, step: int, pad):
    """The (4, 5) ids of a step, the same on every rank: duplicates of the last row, and the
    padding row when given."""
    g = torch.Generator().manual_seed(10 * V + step)
    ids = torch.randint(0, V, (4, 5), generator=g)
    ids[0, :3] = V - 1  # duplicates of the last row
    if pad is not None:
        ids[1, 1] = pad
    return ids


def counts(comm) -> dict:
    """The collectives a CommDebugMode saw, by name."""
    return {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items() if n}
