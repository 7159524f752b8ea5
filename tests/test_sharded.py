"""ee.Embedding on DTensor tables (gloo on the CPU, 2 and 4 ranks): tensor parallel plans
(RowwiseParallel to Replicate() and to Shard(1), ColwiseParallel to Shard(-1) and to
Replicate()), FSDP2 on a 1-D mesh and FSDP2 over tensor parallel on a 2-D mesh; and
ee.embedding_bag on row- and column-sharded weights (against our unsharded bags). Each case
trains a few SGD steps and compares outputs, weight gradients and weights with one process's
nn.Embedding on the same data. V in {9, 10, 11}: uneven shards, and with 4 ranks V = 9 leaves
rank 3 with no rows. Collectives are counted with CommDebugMode.

Every rank runs all cases of its world size in one process group (starting ranks costs
seconds; a case costs milliseconds); a mismatch is recorded and the rank goes on, so that
the ranks' collectives stay matched, and the parent reports every mismatch."""
import json
import os

import pytest
import torch

import embedding_ext as ee
from ranks import end_group, run_with_retry, start_group

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

DIM = 6
STEPS = 3
# (padding_idx, scale_grad_by_freq, max_norm, dtype); padding_idx as an offset from V
# (-2: the last rank's rows; 1: rank 0's).
OPTIONS = [
    (None, False, None, torch.float32),
    (-2, True, None, torch.float32),
    (1, True, None, torch.bfloat16),
    (1, False, 1.0, torch.float32),
]
PLANS = ["row->replicate", "row->shard1", "col->shard", "col->replicate"]
# Uneven shards everywhere; V = 3 leaves rank 3 of 4 empty, V = 9 too.
VS = (3, 9, 10, 11)


def _plan(name: str):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {
        "row->replicate": RowwiseParallel(input_layouts=Replicate()),
        "row->shard1": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "col->shard": ColwiseParallel(),
        "col->replicate": ColwiseParallel(output_layouts=Replicate()),
    }[name]


def _ids(V: int, step: int, pad):
    g = torch.Generator().manual_seed(10 * V + step)
    ids = torch.randint(0, V, (4, 5), generator=g)
    ids[0, :3] = V - 1  # duplicates of the last row
    if pad is not None:
        ids[1, 1] = pad
    return ids


def _counts(comm) -> dict:
    return {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items() if n}


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
    parallelize_module(ours, mesh, _plan(plan))
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
        ids = _ids(V, step, pad)
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
            comms[name] = {"forward": _counts(comm_forward), "backward": _counts(comm_backward),
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
        parallelize_module(m, mesh, _plan(plan))
        try:
            m(torch.tensor([[1, 2]]))
            failures.append(f"{plan} {kwargs}: no error")
        except error as e:
            if words not in str(e):
                failures.append(f"{plan} {kwargs}: the error does not name {words!r}: {e}")
    # A bad id: IndexError naming it (it would otherwise be a zero row on every rank).
    m = ee.Embedding(10, DIM)
    parallelize_module(m, mesh, _plan("row->replicate"))
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


# (placement dim, mode, options): ee.embedding_bag on a weight distributed by hand.
BAG_CASES = [
    (0, "sum", {}), (0, "sum", dict(padding_idx=-2, scale_grad_by_freq=True)),
    (0, "sum", dict(per_sample_weights=True, padding_idx=1)), (0, "mean", dict(padding_idx=1)),
    (0, "mean", dict(scale_grad_by_freq=True, include_last_offset=True)),
    (0, "sum", dict(max_norm=1.0)), (0, "sum", dict(two_d=True)),
    (1, "sum", dict(per_sample_weights=True, scale_grad_by_freq=True)),
    (1, "mean", dict(padding_idx=-2)), (1, "max", dict(padding_idx=1)),
    (1, "max", dict(include_last_offset=True)),
    # max_norm renorms the ids past the last offset too, as unsharded
    (0, "sum", dict(max_norm=1.0, include_last_offset=True)),
    # fp16/bf16 row-wise: partial sums rounded per rank before the all-reduce (documented:
    # within a few ulps, not equal)
    (0, "mean", dict(dtype=torch.bfloat16, padding_idx=1)),
    (1, "sum", dict(dtype=torch.bfloat16, per_sample_weights=True)),
    ("replicate", "sum", dict(max_norm=1.0, per_sample_weights=True)),
]


def _bag_case(rank: int, mesh, V: int, case, failures: list, comms: dict):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    dim_sharded, mode, options = case
    options = dict(options)
    two_d = options.pop("two_d", False)
    dtype = options.pop("dtype", torch.float32)
    with_psw = options.pop("per_sample_weights", False)
    if "padding_idx" in options:
        options["padding_idx"] %= V
    placement = Replicate() if dim_sharded == "replicate" else Shard(dim_sharded)
    name = (f"bag {type(placement).__name__}({getattr(placement, 'dim', '')}) {mode} V={V} "
            f"{options} psw={with_psw} 2d={two_d} {dtype}")
    g = torch.Generator().manual_seed(V)
    weight = torch.randn(V, DIM, generator=g).to(dtype)
    ids = torch.randint(0, V, (18,), generator=g)
    ids[:4] = V - 1
    if "padding_idx" in options:
        ids[5:7] = options["padding_idx"]
    offsets = torch.tensor([0, 4, 4, 9, 15])  # an empty bag; with include_last_offset, ids
    if two_d:                                 # 15..17 are in no bag
        ids, offsets = ids.reshape(3, 6), None
    psw = torch.randn(ids.shape, generator=g).to(dtype) if with_psw else None
    ref_w = weight.clone().requires_grad_()
    ref = ee.embedding_bag(ids, ref_w, offsets, mode=mode, per_sample_weights=psw, **options)
    grad_out = torch.randn(ref.shape, generator=g).to(dtype)
    (ref * grad_out).sum().backward()
    ours_w = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [placement]))
    out = ee.embedding_bag(ids, ours_w, offsets, mode=mode, per_sample_weights=psw, **options)
    full = out.full_tensor()
    (full * grad_out).sum().backward()
    comms[name] = [f"{type(p).__name__}({getattr(p, 'dim', '')})" for p in ours_w.grad.placements]
    checks = [("output", full, ref), ("weight grad", ours_w.grad.full_tensor(), ref_w.grad)]
    if "max_norm" in options:
        checks.append(("renormed weight", ours_w.full_tensor(), ref_w.detach()))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for what, a, b in checks:
        try:
            torch.testing.assert_close(a, b, **tol)
        except AssertionError as e:
            failures.append(f"rank {rank} {name} {what}: {e}")


def _bag_refusals(mesh, failures: list):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1])
    row = distribute_tensor(torch.randn(10, DIM), mesh, [Shard(0)])
    col = distribute_tensor(torch.randn(10, DIM), mesh, [Shard(1)])
    psw = torch.ones(3, requires_grad=True)
    rep = distribute_tensor(torch.randn(10, DIM), mesh, [Replicate()])
    cases = [(row, dict(mode="max"), "mode='max'"), (col, dict(max_norm=1.0), "max_norm"),
             (row, dict(mode="sum", per_sample_weights=psw), "per_sample_weights"),
             (col, dict(mode="sum", per_sample_weights=psw), "per_sample_weights"),
             (row, dict(sparse=True, mode="sum"), "sparse=True"),
             (rep, dict(sparse=True, mode="sum"), "sparse=True")]
    for weight, kwargs, words in cases:
        try:
            ee.embedding_bag(ids, weight, offsets, **kwargs)
            failures.append(f"bags {kwargs}: no error")
        except NotImplementedError as e:
            if words not in str(e):
                failures.append(f"bags {kwargs}: the error does not name {words!r}: {e}")
    # Bad offsets: the same error on every rank, before any collective (each rank's kernel
    # sees only its compacted offsets), naming the entry as given.
    for bad, words in [([0, 5, 3], "offsets[2] = 3 < offsets[1] = 5"), ([1, 2], "offsets[0]"),
                       ([0, 4], "last offset (4) is past the 3 ids")]:
        try:
            ee.embedding_bag(ids, row, torch.tensor(bad), mode="sum", include_last_offset=True)
            failures.append(f"bags offsets {bad}: no error")
        except ValueError as e:
            if words not in str(e):
                failures.append(f"bags offsets {bad}: the error does not say {words!r}: {e}")


FUSED_RULES = [(torch.optim.SGD, dict(lr=0.5)), (torch.optim.Adagrad, dict(lr=0.3)),
               (torch.optim.SparseAdam, dict(lr=0.1)), (ee.optim.RowWiseAdagrad, dict(lr=0.3))]


def _fused_case(rank: int, mesh, V: int, rule, failures: list, comms: dict):
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
    parallelize_module(ours, mesh, _plan("row->replicate"))
    opt_ref = optimizer_class(ref.parameters(), **kwargs)
    opt = ee.fuse_optimizer(ours, optimizer_class, **kwargs)
    for step in range(STEPS):
        ids = _ids(V, step, pad)
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
            comms[name] = _counts(comm)
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


def _default_rowwise_case(rank: int, world: int, mesh, failures: list):
    """RowwiseParallel() with its default input_layouts (Shard(-1): each rank passes its
    piece of the sequence, DTensor all-gathers the ids) gives the full lookup."""
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
    torch.manual_seed(3)
    ref = torch.nn.Embedding(10, DIM, padding_idx=4)
    ours = ee.Embedding(10, DIM, padding_idx=4)
    ours.load_state_dict(ref.state_dict())
    parallelize_module(ours, mesh, RowwiseParallel())
    ids = _ids(10, 0, 4).repeat(1, world)  # (4, 5 * world): rank r passes columns 5r..5r+4
    out = ours(ids[:, 5 * rank:5 * rank + 5])
    expected = ref(ids)
    if not torch.allclose(torch.as_tensor(out), expected, rtol=1e-5, atol=1e-6):
        failures.append(f"rank {rank} RowwiseParallel() with sharded ids: output differs")


def _fused_state_case(mesh, failures: list):
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
            whole(_ids(10, step, 1)).sum().backward()
            opt_whole.step()
        sharded = ee.Embedding(10, DIM, padding_idx=1)
        sharded.load_state_dict(whole.state_dict())
        parallelize_module(sharded, mesh, _plan("row->replicate"))
        opt = ee.fuse_optimizer(sharded, optimizer_class, **kwargs)
        opt.load_state_dict(opt_whole.state_dict())
        name = f"fused state {optimizer_class.__name__}"
        for key, value in opt.state[sharded.weight].items():
            if torch.is_tensor(value) and value.dim() and not isinstance(value, DTensor):
                failures.append(f"{name}: loaded {key} is not a DTensor")
        for step in range(2, 4):
            whole(_ids(10, step, 1)).sum().backward()
            opt_whole.step()
            sharded(_ids(10, step, 1)).sum().backward()
            opt.step()
        if not torch.allclose(sharded.weight.full_tensor(), whole.weight.detach(), rtol=1e-5,
                              atol=1e-6):
            failures.append(f"{name}: training after the load differs from unsharded")
    late = ee.Embedding(10, DIM)
    opt_late = ee.fuse_optimizer(late, torch.optim.SGD, lr=0.1)
    parallelize_module(late, mesh, _plan("row->replicate"))
    try:
        late(torch.tensor([[1, 2]]))
        failures.append("fused before parallelize_module: no error")
    except RuntimeError as e:
        if "replaced after fusing" not in str(e):
            failures.append(f"fused before parallelize_module: unclear error: {e}")
    del opt_late


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
            _bag_case(rank, mesh, V, case, failures, bag_grads)
    _bag_refusals(mesh, failures)
    fused_comms = {}
    for V in VS:
        for rule in FUSED_RULES:
            _fused_case(rank, mesh, V, rule, failures, fused_comms)
    _fused_state_case(mesh, failures)
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
        for name, c in result["comms"].items():
            plan, V = name.split()[0], int(name.split()[1][2:])
            assert len(result["comms"]) == len(VS) * (len(PLANS) * len(OPTIONS) - 2)
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
        parallelize_module(model[0], mesh["tp"], _plan(plan))
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
