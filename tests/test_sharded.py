"""ee.Embedding on DTensor tables (gloo on the CPU, 2 and 4 ranks) under tensor parallel plans
(RowwiseParallel to Replicate() and to Shard(1), ColwiseParallel to Shard(-1) and to
Replicate()), with ee.embedding_bag on row- and column-sharded weights (sharded_bags.py) and
fused optimizers on row-parallel tables (sharded_fused.py) in the same process group. Each
case trains a few SGD steps and compares outputs, weight gradients and weights with one
process's nn.Embedding on the same data. V in {3, 9, 10, 11}: uneven shards, and with 4 ranks
V = 3 and V = 9 leave rank 3 with no rows. Collectives are counted with CommDebugMode.

Every rank runs all cases of its world size in one process group (starting ranks costs
seconds; a case costs milliseconds); a mismatch is recorded and the rank goes on, so that
the ranks' collectives stay matched, and the parent reports every mismatch."""
import json
import os

import pytest
import torch

import embedding_ext as ee
from ranks import end_group, run_with_retry, start_group
from sharded_bags import BAG_CASES, bag_case, bag_refusals
from sharded_fused import FUSED_RULES, fused_case, fused_state_case
from sharding import DIM, STEPS, VS, counts, ids_for, tp_plan

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

# (padding_idx, scale_grad_by_freq, max_norm, dtype); padding_idx as an offset from V
# (-2: the last rank's rows; 1: rank 0's).
OPTIONS = [
    (None, False, None, torch.float32),
    (-2, True, None, torch.float32),
    (1, True, None, torch.bfloat16),
    (1, False, 1.0, torch.float32),
]
PLANS = ["row->replicate", "row->shard1", "col->shard", "col->replicate"]


def _tp_case(rank: int, world: int, mesh, plan: str, V: int, options, failures: list,
             comms: dict):
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module
    pad_offset, freq, max_norm, dtype = options
    pad = None if pad_offset is None else pad_offset % V
    name = f"{plan} V={V} padding={pad} freq={freq} max_norm={max_norm} {dtype}"
    torch.manual_seed(V)
    ref = torch.nn.Embedding(V, DIM, padding_idx=pad, scale_grad_by_freq=freq,
                             max_norm=max_norm, dtype=dtype)
    ours = ee.Embedding(V, DIM, padding_idx=pad, scale_grad_by_freq=freq, max_norm=max_norm,
                        dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, mesh, tp_plan(plan))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(ours.parameters(), lr=0.5)
    # What this rank's output holds of the full (4, 5, D) output.
    seq_first, seq_len = ee.distributed.shard_rows(5, world, rank)
    col_first, col_len = ee.distributed.shard_rows(DIM, world, rank)
    view = {"row->shard1": lambda t: t[:, seq_first:seq_first + seq_len],
            "col->shard": lambda t: t[..., col_first:col_first + col_len]}.get(plan, lambda t: t)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    problems = []
    for step in range(STEPS):
        ids = ids_for(V, step, pad)
        grad_out = torch.randn(4, 5, DIM, generator=torch.Generator().manual_seed(step)).to(dtype)
        out_ref = ref(ids)
        (out_ref * grad_out).sum().backward()
        with CommDebugMode() as comm_forward:
            out = ours(ids)
        with CommDebugMode() as comm_backward:
            (out * view(grad_out)).sum().backward()
        grad = ours.weight.grad
        full_grad = grad.full_tensor()
        if step == 0:
            comms[name] = {"forward": counts(comm_forward), "backward": counts(comm_backward),
                           "grad placements": [f"{type(p).__name__}({getattr(p, 'dim', '')})"
                                               for p in grad.placements],
                           "grad local rows": grad.to_local().shape[0]}
        for what, a, b in [("output", out, view(out_ref)), ("weight grad", full_grad, ref.weight.grad)]:
            try:
                torch.testing.assert_close(torch.as_tensor(a), b, **tol)
            except AssertionError as e:
                problems.append(f"step {step} {what}: {e}")
        opt.step(); opt.zero_grad(); opt_ref.step(); opt_ref.zero_grad()
    try:
        torch.testing.assert_close(ours.weight.full_tensor(), ref.weight.detach(), **tol)
    except AssertionError as e:
        problems.append(f"weights after {STEPS} steps: {e}")
    failures += [f"rank {rank} {name}: {p}" for p in problems]


def _refusals(mesh, failures: list):
    """Options that cannot work sharded raise a clear error naming them."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module
    cases = [("row->replicate", dict(sparse=True), NotImplementedError, "sparse=True"),
             ("col->shard", dict(max_norm=1.0), NotImplementedError, "max_norm"),
             ("col->shard", dict(sparse=True), NotImplementedError, "sparse=True")]
    for plan, kwargs, error, words in cases:
        m = ee.Embedding(10, DIM, **kwargs)
        parallelize_module(m, mesh, tp_plan(plan))
        try:
            m(torch.tensor([[1, 2]]))
            failures.append(f"{plan} {kwargs}: no error")
        except error as e:
            if words not in str(e):
                failures.append(f"{plan} {kwargs}: the error does not name {words!r}: {e}")
    # A bad id: IndexError naming it (it would otherwise be a zero row on every rank).
    m = ee.Embedding(10, DIM)
    parallelize_module(m, mesh, tp_plan("row->replicate"))
    for bad, position in ((10, 1), (-1, 2)):
        try:
            m(torch.tensor([[1, 10 if bad == 10 else 3, bad]]) if bad < 0 else torch.tensor([[1, bad]]))
            failures.append(f"bad id {bad}: no error")
        except IndexError as e:
            if f"index {bad} at position {position}" not in str(e):
                failures.append(f"bad id {bad}: the error does not name it: {e}")
    # A replicated weight: max_norm renorms every copy alike; sparse=True is refused.
    from torch.distributed.tensor import Replicate, distribute_tensor
    torch.manual_seed(5)
    ref = ee.Embedding(10, DIM, max_norm=0.5)
    ours = ee.Embedding(10, DIM, max_norm=0.5)
    ours.load_state_dict(ref.state_dict())
    ours.weight = torch.nn.Parameter(distribute_tensor(ours.weight.detach(), mesh, [Replicate()]))
    ids = torch.tensor([[1, 2, 2, 7]])
    out, expected = ours(ids).full_tensor(), ref(ids)
    out.sum().backward()
    expected.sum().backward()
    for what, a, b in [("output", out, expected), ("grad", ours.weight.grad.full_tensor(), ref.weight.grad),
                       ("renormed weight", ours.weight.full_tensor(), ref.weight.detach())]:
        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            failures.append(f"replicated weight with max_norm: {what} differs")
    sparse = ee.Embedding(10, DIM, sparse=True)
    sparse.weight = torch.nn.Parameter(distribute_tensor(sparse.weight.detach(), mesh, [Replicate()]))
    try:
        sparse(ids)
        failures.append("replicated sparse=True: no error")
    except NotImplementedError as e:
        if "sparse=True" not in str(e):
            failures.append(f"replicated sparse=True: unclear error: {e}")
    # Sharded ids.
    weight = ee.Embedding(10, DIM).weight
    w = torch.distributed.tensor.distribute_tensor(weight.detach(), mesh, [Shard(0)])
    ids = DTensor.from_local(torch.tensor([1, 2]), mesh, [Shard(0)])
    try:
        ee.embedding(ids, w)
        failures.append("sharded ids: no error")
    except NotImplementedError as e:
        if "sharded ids" not in str(e):
            failures.append(f"sharded ids: unclear error: {e}")


def _default_rowwise_case(rank: int, world: int, mesh, failures: list):
    """RowwiseParallel() with its default input_layouts (Shard(-1): each rank passes its
    piece of the sequence, DTensor all-gathers the ids) gives the full lookup."""
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
    torch.manual_seed(3)
    ref = torch.nn.Embedding(10, DIM, padding_idx=4)
    ours = ee.Embedding(10, DIM, padding_idx=4)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, mesh, RowwiseParallel())
    ids = ids_for(10, 0, 4).repeat(1, world)  # (4, 5 * world): rank r passes columns 5r..5r+4
    out = ours(ids[:, 5 * rank:5 * rank + 5])
    expected = ref(ids)
    if not torch.allclose(torch.as_tensor(out), expected, rtol=1e-5, atol=1e-6):
        failures.append(f"rank {rank} RowwiseParallel() with sharded ids: output differs")


def _tp_worker(rank: int, world: int, out_dir: str):
    from torch.distributed.device_mesh import init_device_mesh
    start_group(rank, world, out_dir)
    mesh = init_device_mesh("cpu", (world,))
    failures, comms = [], {}
    for plan in PLANS:
        for V in VS:
            for options in OPTIONS:
                if options[2] is not None and plan.startswith("col"):
                    continue  # max_norm is refused column-wise (_refusals)
                _tp_case(rank, world, mesh, plan, V, options, failures, comms)
    _refusals(mesh, failures)
    bag_grads = {}
    for V in VS:
        for case in BAG_CASES:
            bag_case(rank, mesh, V, case, failures, bag_grads)
    bag_refusals(mesh, failures)
    fused_comms = {}
    for V in VS:
        for rule in FUSED_RULES:
            fused_case(rank, mesh, V, rule, failures, fused_comms)
    fused_state_case(mesh, failures)
    _default_rowwise_case(rank, world, mesh, failures)
    with open(os.path.join(out_dir, f"result{rank}.json"), "w") as f:
        json.dump({"failures": failures, "comms": comms, "bag grads": bag_grads,
                   "fused backward comms": fused_comms}, f)
    end_group()


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_plans_match_one_process(tmp_path, world):
    out = run_with_retry(_tp_worker, lambda folder: (world, folder), tmp_path, world)
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(world)]
    failures = [f for r in results for f in r["failures"]]
    assert not failures, "\n".join(failures)
    for rank, result in enumerate(results):
        # Every plan with every option, but max_norm column-wise (refused: _refusals).
        assert len(result["comms"]) == len(VS) * (len(PLANS) * len(OPTIONS) - 2)
        for name, c in result["comms"].items():
            plan, V = name.split()[0], int(name.split()[1][2:])
            if plan.startswith("row"):
                # The gradient stays sharded: this rank's rows only.
                first, rows = ee.distributed.shard_rows(V, world, rank)
                assert c["grad placements"] == ["Shard(0)"] and c["grad local rows"] == rows, (name, c)
            expected = {"row->replicate": ({"all_reduce": 1}, {}),
                        "row->shard1": ({"reduce_scatter_tensor": 1}, {"all_gather_into_tensor": 1}),
                        "col->shard": ({}, {}),
                        "col->replicate": ({"all_gather_into_tensor": 1}, {})}[plan]
            assert (c["forward"], c["backward"]) == expected, (name, c)
        assert result["fused backward comms"] == {
            f"fused {c.__name__} V={V}": {} for c, _ in FUSED_RULES for V in VS}
        assert len(result["bag grads"]) == len(VS) * len(BAG_CASES)
        for name, placements in result["bag grads"].items():
            # Each weight gradient keeps the weight's placement (no gathered V x D copy).
            expected = "Replicate()" if "Replicate" in name.split()[1] else name.split()[1]
            assert placements == [expected], (name, placements)
