"""Compiled autograd (torch._dynamo.compiled_autograd) over every gradient node of ours: a
model trained with its backward captured and compiled, its forward eager or compiled too,
gives the eager losses and tables, with no graph break but the named ones of fused tables
and those Dynamo has for sparse gradients and DTensor."""
import contextlib
import copy

import pytest
import torch
from torch._dynamo import compiled_autograd
from torch._dynamo.utils import counters

import embedding_ext as ee

BACKENDS = ["aot_eager", "inductor"]


class _Model(torch.nn.Module):
    """A table, then a small dense head, so the gradient flows through ours into torch's."""

    def __init__(self, table: torch.nn.Module, dim: int):
        super().__init__()
        self.table = table
        self.head = torch.nn.Linear(dim, 1)

    def forward(self, *inputs):
        return self.head(torch.tanh(self.table(*inputs))).square().sum()


def _lookup_inputs(gen):
    ids = torch.randint(0, 20, (4, 5), generator=gen)
    ids[0, 0] = 1  # the padding row of the padded tables
    return (ids,)


def _bag_inputs(gen):
    ids = torch.randint(0, 20, (12,), generator=gen)
    return ids, torch.tensor([0, 3, 3, 7]), None


def _weighted_bag_inputs(gen):
    ids, offsets, _ = _bag_inputs(gen)
    return ids, offsets, torch.rand(12, generator=gen, dtype=torch.float64)


def _configs():
    return [ee.EmbeddingBagConfig(20, 6, ["user", "last_user"], name="users"),
            ee.EmbeddingBagConfig(15, 6, ["item"], name="products", pooling="mean", padding_idx=2)]


class _CollectionModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ebc = ee.EmbeddingBagCollection(_configs())
        self.head = torch.nn.Linear(18, 1)

    def forward(self, values, offsets):
        return self.head(torch.tanh(self.ebc(values, offsets))).square().sum()


def _collection_inputs(gen):
    lengths = torch.randint(0, 4, (3 * 4,), generator=gen)  # 3 features, 4 bags each
    values = torch.randint(0, 15, (int(lengths.sum()),), generator=gen)
    return values, torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


TABLES = {
    "embedding": (lambda: ee.Embedding(20, 6), _lookup_inputs),
    "embedding-padding-freq": (lambda: ee.Embedding(20, 6, padding_idx=1,
                                                     scale_grad_by_freq=True), _lookup_inputs),
    "embedding-max_norm": (lambda: ee.Embedding(20, 6, max_norm=1.0), _lookup_inputs),
    "bag-sum-weighted": (lambda: ee.EmbeddingBag(20, 6, mode="sum"), _weighted_bag_inputs),
    "bag-mean": (lambda: ee.EmbeddingBag(20, 6, mode="mean", padding_idx=1), _bag_inputs),
    "bag-max": (lambda: ee.EmbeddingBag(20, 6, mode="max"), _bag_inputs),
}


def _train(model, inputs, optimizers, backward_backend, forward_backend, steps=3):
    """Losses and final state of ``steps`` training steps; the backward captured by compiled
    autograd and compiled with ``backward_backend`` (None: eager), the forward compiled with
    ``forward_backend`` (None: eager), both inside compiled autograd's context (the forward
    records its nodes knowing it is on)."""
    forward = torch.compile(model, backend=forward_backend) if forward_backend else model
    backward_compiler = torch.compile(backend=backward_backend) if backward_backend else None
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        with (compiled_autograd._enable(backward_compiler) if backward_compiler
              else contextlib.nullcontext()):
            loss = forward(*inputs(gen))
            loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), {k: v.clone() for k, v in model.state_dict().items()}


def _no_break(reason: str) -> bool:
    return False


def _compare(make_model, inputs, make_optimizers, backend, compile_forward,
             expected_break=_no_break):
    torch.manual_seed(0)
    # float64: Inductor's fused kernels round differently from eager (as for torch's own
    # nn.Embedding); in float64 that stays far inside assert_close's tolerance.
    eager_model = make_model().double()
    captured_model = copy.deepcopy(eager_model)  # (copies are not fused: each fuses its own)
    expected = _train(eager_model, inputs, make_optimizers(eager_model), None, None)
    torch._dynamo.reset()
    counters.clear()
    got = _train(captured_model, inputs, make_optimizers(captured_model), backend,
                 backend if compile_forward else None)
    assert counters["compiled_autograd"]["captures"] > 0, "compiled autograd did not run"
    unexpected = [reason for reason in counters["graph_break"] if not expected_break(reason)]
    assert not unexpected, f"graph breaks: {unexpected}"
    torch.testing.assert_close(got[0], expected[0])
    for name, value in expected[1].items():
        torch.testing.assert_close(got[1][name], value, msg=lambda m: f"{name}: {m}")


def _sgd(model):
    return [torch.optim.SGD(model.parameters(), lr=0.2)]


@pytest.mark.parametrize("compile_forward", [False, True], ids=["eager-forward", "compiled"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table", list(TABLES))
def test_compiled_autograd_trains_as_eager(table, backend, compile_forward):
    make_table, inputs = TABLES[table]
    _compare(lambda: _Model(make_table(), 6), inputs, _sgd, backend, compile_forward)


@pytest.mark.parametrize("compile_forward", [False, True], ids=["eager-forward", "compiled"])
def test_compiled_autograd_collection_trains_as_eager(compile_forward):
    _compare(_CollectionModel, _collection_inputs, _sgd, "aot_eager", compile_forward)


def _fused(optimizer_class, kwargs):
    def make_optimizers(model):
        return [ee.fuse_optimizer(model.table, optimizer_class, **kwargs),
                torch.optim.SGD(model.head.parameters(), lr=0.2)]
    return make_optimizers


@pytest.mark.parametrize("compile_forward", [False, True], ids=["eager-forward", "compiled"])
@pytest.mark.parametrize("table", ["embedding-padding-freq", "bag-mean"])
def test_compiled_autograd_fused_table_trains_as_eager(table, compile_forward):
    make_table, inputs = TABLES[table]
    _compare(lambda: _Model(make_table(), 6), inputs,
             _fused(torch.optim.Adagrad, dict(lr=0.2)), "aot_eager", compile_forward,
             expected_break=_fused_break)


def _fused_break(reason: str) -> bool:
    """The fused tables' named breaks: the lookup (forward) and the step (backward)."""
    return "fused optimizer's" in reason or "fused collection's" in reason


@pytest.mark.parametrize("compile_forward", [False, True], ids=["eager-forward", "compiled"])
def test_compiled_autograd_fused_collection_trains_as_eager(compile_forward):
    def make_optimizers(model):
        return [ee.fuse_optimizer(model.ebc, ee.optim.RowWiseAdagrad, lr=0.2),
                torch.optim.SGD(model.head.parameters(), lr=0.2)]
    _compare(_CollectionModel, _collection_inputs, make_optimizers, "aot_eager",
             compile_forward, expected_break=_fused_break)


@pytest.mark.parametrize("compile_forward", [False, True], ids=["eager-forward", "compiled"])
def test_compiled_autograd_sparse_table_trains_as_eager(compile_forward):
    """sparse=True: the same training; Dynamo breaks the graph where it meets the sparse
    gradient (as it does for nn.Embedding(sparse=True) in a compiled model)."""
    _compare(lambda: _Model(ee.Embedding(20, 6, sparse=True), 6), _lookup_inputs, _sgd,
             "aot_eager", compile_forward, expected_break=_sparse_break)


def _sparse_break(reason: str) -> bool:
    return "sparse Tensor" in reason or "sparse_coo_tensor" in reason


def _sharded_training(lookup, placement, capture):
    """Losses, final table and graph breaks of 3 steps on a one-rank DTensor table."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    mesh = init_device_mesh("cpu", (1,))
    weight = torch.nn.Parameter(distribute_tensor(
        torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
        mesh, [placement]))
    opt = torch.optim.SGD([weight], lr=0.1)
    compiler = torch.compile(backend="aot_eager")
    gen = torch.Generator().manual_seed(2)
    torch._dynamo.reset()
    counters.clear()
    losses = []
    for _ in range(3):
        ids = torch.randint(0, 20, (4, 5), generator=gen)
        with compiled_autograd._enable(compiler) if capture else contextlib.nullcontext():
            loss = lookup(ids, weight, mesh).full_tensor().tanh().square().sum()
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    assert not capture or counters["compiled_autograd"]["captures"] > 0
    return torch.stack(losses), weight.full_tensor(), set(counters["graph_break"])


def _torch_lookup(ids, weight, mesh):
    from torch.distributed.tensor import Replicate, distribute_tensor
    return torch.nn.functional.embedding(distribute_tensor(ids, mesh, [Replicate()]), weight)


@pytest.mark.parametrize("placement", ["row", "column"])
def test_compiled_autograd_sharded_lookup_trains_as_eager(tmp_path, placement):
    """A DTensor table (one rank, gloo): the same training, and no graph break beyond those
    torch's own embedding has on the same table (DTensor's own, in the backward)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        shard = Shard(0 if placement == "row" else 1)
        ours = lambda ids, weight, mesh: ee.embedding(ids, weight)  # noqa: E731
        losses, table, _ = _sharded_training(ours, shard, capture=False)
        got_losses, got_table, breaks = _sharded_training(ours, shard, capture=True)
        *_, torch_breaks = _sharded_training(_torch_lookup, shard, capture=True)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got_losses, losses)
    torch.testing.assert_close(got_table, table)
    assert breaks <= torch_breaks, breaks - torch_breaks
