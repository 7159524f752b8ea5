"""torch.compile next to and around fused tables: unfused modules still compile with
fullgraph=True, and a compiled model with fused tables trains as the same model run eagerly."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import embedding_ext as ee
from conftest import DEVICES
from fused_cases import CASES, IDS, assert_same_state


def test_unfused_modules_still_compile_fullgraph_next_to_a_fused_one():
    """The fusion check is a class-level None for every unfused module: torch.compile with
    fullgraph=True is unaffected by a fused table elsewhere in the program."""
    fused_table = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(fused_table, torch.optim.SGD, lr=0.1)
    plain = ee.Embedding(8, 3)
    compiled = torch.compile(plain, fullgraph=True, backend="eager")
    ids = torch.tensor([1, 2, 2])
    torch.testing.assert_close(compiled(ids), plain.weight[ids])
    fused_table(ids).sum().backward()
    opt.step()


class _TwoTableModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = ee.Embedding(30, 8, padding_idx=0)
        self.bags = ee.EmbeddingBag(20, 8, mode="mean")
        self.head = torch.nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, ids, bag_ids, offsets):
        x = self.tokens(ids).sum(1) + self.bags(bag_ids, offsets)
        return self.head(torch.tanh(x)).square().sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_a_compiled_model_with_fused_tables_trains_as_eager(optimizer_class, kwargs, device):
    """torch.compile of a model with a fused ee.Embedding and ee.EmbeddingBag: the fused
    lookups run eagerly (a graph break each, the only ones), the rest compiles through
    AOTAutograd, and every step updates the tables as the same model run eagerly (with
    fullgraph=True the error names the reason)."""
    eager = _TwoTableModel().double().to(device)
    compiled_model = copy.deepcopy(eager)  # (a copy is not fused: fused below)
    initial = [eager.tokens.weight.detach().clone(), eager.bags.weight.detach().clone()]
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled_model)):
        opts = [ee.fuse_optimizer(model.tokens, optimizer_class, **kwargs),
                ee.fuse_optimizer(model.bags, optimizer_class, **kwargs),
                torch.optim.SGD(model.head.parameters(), lr=0.1)]
        run = torch.compile(model, backend="aot_eager") if name == "compiled" else model
        runs[name] = (model, opts, run)
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 30, (4, 5), generator=gen)
        ids[0, :2] = 7  # a duplicate and padding
        ids[1, 0] = 0
        bag_ids = torch.randint(0, 20, (9,), generator=gen)
        offsets = torch.tensor([0, 3, 3, 7])
        ids, bag_ids, offsets = ids.to(device), bag_ids.to(device), offsets.to(device)
        for model, opts, run in runs.values():
            run(ids, bag_ids, offsets).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    breaks = counters["graph_break"]  # only the fused lookups', each time they ran
    assert breaks and all("fused_lookup" in why or "fused_bag_lookup" in why for why in breaks)
    (eager, eager_opts, _), (comp, comp_opts, _) = runs["eager"], runs["compiled"]
    for a, b in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert not torch.equal(comp.tokens.weight, initial[0])  # the tables did train
    assert not torch.equal(comp.bags.weight, initial[1])
    for ours, theirs in zip(comp_opts[:2], eager_opts[:2]):  # states too (step counts: 3)
        assert_same_state(ours, theirs, as_double=False, rtol=1e-10, atol=0)
    torch._dynamo.reset()  # (else the cached graphs, with their breaks, are reused)
    with pytest.raises(Exception, match="fused optimizer's lookup runs eagerly"):
        torch.compile(comp, backend="aot_eager", fullgraph=True)(ids, bag_ids, offsets)
