"""DistributedDataParallel on the CPU (gloo, 2 processes): dense and sparse gradients give
identical weights on both ranks, equal to a single-process run on the same data."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import embedding_ext as ee

WORLD = 2
STEPS = 3


def _model(sparse: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(ee.Embedding(60, 8, padding_idx=0, sparse=sparse),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 5, 1))


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    ids = torch.randint(0, 60, (6, 5), generator=g)
    ids[0, 0] = 0  # padding
    ids[1, :3] = 7  # duplicates
    return ids, torch.randn(6, 1, generator=g)


def _worker(rank: int, init_file: str, sparse: bool, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    model = _model(sparse)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(STEPS):
        ids, y = _batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(ids), y).backward()
        opt.step()
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    # Without this barrier torch 2.13's gloo can abort a rank whose peer has already torn
    # the group down ("terminate called without an active exception", seen in CI).
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_ddp_matches_single_process(tmp_path, sparse):
    mp.spawn(_worker, args=(str(tmp_path / "init"), sparse, str(tmp_path)), nprocs=WORLD)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"ranks disagree on {key}"
    # One process, the loss averaged over the ranks' batches: the same gradient DDP averages.
    model = _model(sparse)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(model(ids), y)
                   for ids, y in (_batch(step, r) for r in range(WORLD))) / WORLD
        loss.backward()
        opt.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(states[0][key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(states[0]["0.weight"], _model(sparse).state_dict()["0.weight"])
