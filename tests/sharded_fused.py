"""ee.fuse_optimizer on row-parallel tables against one process's unfused optimizer, and an
unsharded optimizer state loaded into a sharded fused one; run on every rank by
test_sharded.py's worker, mismatches appended to `failures`."""
import torch

import embedding_ext as ee
from sharding import DIM, STEPS, counts, ids_for, tp_plan


FUSED_RULES = [(torch.optim.SGD, dict(lr=0.5)), (torch.optim.Adagrad, dict(lr=0.3)),
               (torch.optim.SparseAdam, dict(lr=0.1)), (ee.optim.RowWiseAdagrad, dict(lr=0.3))]


def fused_case(rank: int, mesh, V: int, rule, failures: list, comms: dict):
    """ee.fuse_optimizer on a row-parallel table against one process's unfused sparse
    gradient + the same torch optimizer: each rank updates its own rows, no collective in
    the backward, the state sharded as the weight."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module
    optimizer_class, kwargs = rule
    pad = 1
    name = f"fused {optimizer_class.__name__} V={V}"
    torch.manual_seed(V)
    ref = ee.Embedding(V, DIM, padding_idx=pad, scale_grad_by_freq=True, sparse=True)
    ours = ee.Embedding(V, DIM, padding_idx=pad, scale_grad_by_freq=True)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, mesh, tp_plan("row->replicate"))
    opt_ref = optimizer_class(ref.parameters(), **kwargs)
    opt = ee.fuse_optimizer(ours, optimizer_class, **kwargs)
    for step in range(STEPS):
        ids = ids_for(V, step, pad)
        grad_out = torch.randn(4, 5, DIM, generator=torch.Generator().manual_seed(step))
        (ref(ids) * grad_out).sum().backward()
        opt_ref.step()
        opt_ref.zero_grad()
        out = ours(ids)
        with CommDebugMode() as comm:
            (out * grad_out).sum().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            comms[name] = counts(comm)
    if ours.weight.grad is not None:
        failures.append(f"rank {rank} {name}: the weight got a gradient")
    try:
        torch.testing.assert_close(ours.weight.full_tensor(), ref.weight.detach(), rtol=1e-5,
                                   atol=1e-6)
    except AssertionError as e:
        failures.append(f"rank {rank} {name}: weights after {STEPS} steps: {e}")
    for key, value in opt.state[ours.weight].items():
        if torch.is_tensor(value) and value.dim() and not isinstance(value, DTensor):
            failures.append(f"rank {rank} {name}: state {key} is not a DTensor")


def fused_state_case(mesh, failures: list):
    """A full (unsharded) optimizer state loads into a row-sharded fused optimizer (each
    rank keeps its rows) and training continues as unsharded; fusing before
    parallelize_module raises at the next lookup instead of silently not training."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    for optimizer_class, kwargs in FUSED_RULES[1:]:
        torch.manual_seed(1)
        whole = ee.Embedding(10, DIM, padding_idx=1)
        opt_whole = ee.fuse_optimizer(whole, optimizer_class, **kwargs)
        for step in range(2):
            whole(ids_for(10, step, 1)).sum().backward()
            opt_whole.step()
        sharded = ee.Embedding(10, DIM, padding_idx=1)
        sharded.load_state_dict(whole.state_dict())
        parallelize_module(sharded, mesh, tp_plan("row->replicate"))
        opt = ee.fuse_optimizer(sharded, optimizer_class, **kwargs)
        opt.load_state_dict(opt_whole.state_dict())
        name = f"fused state {optimizer_class.__name__}"
        for key, value in opt.state[sharded.weight].items():
            if torch.is_tensor(value) and value.dim() and not isinstance(value, DTensor):
                failures.append(f"{name}: loaded {key} is not a DTensor")
        for step in range(2, 4):
            whole(ids_for(10, step, 1)).sum().backward()
            opt_whole.step()
            sharded(ids_for(10, step, 1)).sum().backward()
            opt.step()
        if not torch.allclose(sharded.weight.full_tensor(), whole.weight.detach(), rtol=1e-5,
                              atol=1e-6):
            failures.append(f"{name}: training after the load differs from unsharded")
    late = ee.Embedding(10, DIM)
    opt_late = ee.fuse_optimizer(late, torch.optim.SGD, lr=0.1)
    parallelize_module(late, mesh, tp_plan("row->replicate"))
    try:
        late(torch.tensor([[1, 2]]))
        failures.append("fused before parallelize_module: no error")
    except RuntimeError as e:
        if "replaced after fusing" not in str(e):
            failures.append(f"fused before parallelize_module: unclear error: {e}")
    del opt_late
