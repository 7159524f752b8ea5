"""DistributedDataParallel on the CPU (gloo, 2 processes): dense and sparse gradients give
identical weights on both ranks, equal to a single-process run on the same data. The ranks
run under a deadline (tests/ranks.py); a run that hit it is retried once with a fresh
rendezvous, a second one fails the test."""
import os
import time

import pytest
import torch

import embedding_ext as ee
from ranks import end_group, guard_rank, run_ranks, run_with_retry, start_group

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


def _worker(rank: int, sparse: bool, out_dir: str):
    start_group(rank, WORLD, out_dir)
    model = _model(sparse)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    for step in range(STEPS):
        ids, y = _batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(ids), y).backward()
        opt.step()
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    end_group()


def _sleeping_worker(rank: int, out_dir: str):
    guard_rank(rank, out_dir)
    time.sleep(120)


def test_a_rank_past_the_deadline_is_killed_with_its_stacks(tmp_path):
    """The guard itself: a hung rank ends the wait with its stack, not CI's time limit."""
    started = time.monotonic()
    # The deadline counts once both ranks have registered their stack handler.
    hung = run_ranks(_sleeping_worker, (str(tmp_path),), tmp_path, WORLD, deadline_s=2,
                     from_guarded=True)
    assert hung is not None and "_sleeping_worker" in hung and "rank 1 still running" in hung
    assert time.monotonic() - started < 90


def _aborting_worker(rank: int, out_dir: str, after_work: bool):
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the abort
    start_group(rank, WORLD, out_dir)
    if after_work:
        end_group()
    if rank == 0:
        os.abort()  # as gloo's "terminate called without an active exception"
    if not after_work:
        time.sleep(20)  # (killed by the parent once rank 0 died)


@pytest.mark.parametrize("after_work", [True, False])
def test_a_rank_that_dies_after_every_rank_is_done_is_a_warning_not_a_failure(tmp_path,
                                                                              after_work):
    """A crash in gloo's teardown, after end_group marked every rank's work done, is warned
    about; one before that fails the test."""
    if after_work:
        with pytest.warns(UserWarning, match="died in process-group teardown"):
            assert run_ranks(_aborting_worker, (str(tmp_path), True), tmp_path, WORLD) is None
    else:
        with pytest.raises(torch.multiprocessing.ProcessExitedException, match="SIGABRT"):
            run_ranks(_aborting_worker, (str(tmp_path), False), tmp_path, WORLD)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_ddp_matches_single_process(tmp_path, sparse):
    out = run_with_retry(_worker, lambda folder: (sparse, folder), tmp_path, WORLD)
    states = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
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


def _fused_ddp_worker(rank: int, out_dir: str):
    start_group(rank, WORLD, out_dir)
    results = {}
    for ignore in (False, True):
        model = _model(False)
        if ignore:  # the documented way out: the table stays per rank, the rest is synced
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, ["0.weight"])
        opt = ee.fuse_optimizer(model[0], torch.optim.SGD, lr=0.5)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids, y = _batch(0, rank)
        before = model[0].weight.detach().clone()
        try:
            torch.nn.functional.mse_loss(ddp(ids), y).backward()
            opt.step()
            results[ignore] = "trained" if not torch.equal(model[0].weight, before) else "no update"
        except RuntimeError as e:
            results[ignore] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    end_group()


def test_fused_optimizer_inside_ddp_is_refused(tmp_path):
    """A fused weight that DDP synchronises is refused at the lookup (each rank would
    otherwise update from its own batch alone); left out of DDP, it trains."""
    out = run_with_retry(_fused_ddp_worker, lambda folder: (folder,), tmp_path, WORLD)
    for rank in range(WORLD):
        results = torch.load(out / f"rank{rank}.pt")
        assert "runs inside DistributedDataParallel" in results[False], results
        assert results[True] == "trained", results
