"""ee.Embedding under FSDP2 (gloo on the CPU): on a 1-D mesh of 2 ranks, and over tensor
parallel (row- and column-wise) on a 2-D mesh of 4; a few SGD steps against one process
averaging the data-parallel ranks' losses."""
import os

import pytest
import torch

import embedding_ext as ee
from ranks import end_group, run_with_retry, start_group
from sharding import DIM, STEPS, tp_plan

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


def _fsdp_model(V: int, pad: int):
    torch.manual_seed(0)
    return torch.nn.Sequential(ee.Embedding(V, DIM, padding_idx=pad), torch.nn.Flatten(),
                               torch.nn.Linear(DIM * 5, 1))


def _fsdp_batch(V: int, step: int, dp_rank: int):
    g = torch.Generator().manual_seed(100 * step + dp_rank)
    ids = torch.randint(0, V, (4, 5), generator=g)
    ids[1, :3] = 2  # duplicates
    return ids, torch.randn(4, 1, generator=g)


def _fsdp_worker(rank: int, world: int, tp: int, plan: str, out_dir: str):
    """FSDP2 over `world // tp` data-parallel ranks; with tp > 1 the embedding is first
    sharded over the tensor-parallel mesh dimension by `plan` (a 2-D mesh, as torchtitan)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    start_group(rank, world, out_dir)
    dp = world // tp
    V, pad = 11, 3
    model = _fsdp_model(V, pad)
    if tp > 1:
        mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
        parallelize_module(model[0], mesh["tp"], tp_plan(plan))
        dp_mesh, dp_rank = mesh["dp"], mesh.get_local_rank("dp")
    else:
        dp_mesh = init_device_mesh("cpu", (dp,))
        dp_rank = rank
    fully_shard(model[0], mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        ids, y = _fsdp_batch(V, step, dp_rank)
        torch.nn.functional.mse_loss(model(ids), y).backward()
        opt.step()
        opt.zero_grad()
    state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    end_group()


@pytest.mark.parametrize("world,tp,plan", [(2, 1, None), (4, 2, "row->replicate"),
                                           (4, 2, "col->replicate")],
                         ids=["fsdp2-1d", "fsdp2-x-rowwise-2d", "fsdp2-x-colwise-2d"])
def test_fsdp2_matches_one_process(tmp_path, world, tp, plan):
    out = run_with_retry(_fsdp_worker, lambda folder: (world, tp, plan, folder), tmp_path, world)
    states = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    V, pad, dp = 11, 3, world // tp
    model = _fsdp_model(V, pad)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        # One process, the loss averaged over the data-parallel ranks' batches.
        loss = sum(torch.nn.functional.mse_loss(model(ids), y)
                   for ids, y in (_fsdp_batch(V, step, r) for r in range(dp))) / dp
        loss.backward()
        opt.step()
        opt.zero_grad()
    for key, value in model.state_dict().items():
        for rank, state in enumerate(states):
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
    assert not states[0]["0.weight"][pad].ne(_fsdp_model(V, pad)[0].weight[pad]).any(), \
        "the padding row is never updated"
    assert not torch.equal(states[0]["0.weight"], _fsdp_model(V, pad)[0].weight.detach())
