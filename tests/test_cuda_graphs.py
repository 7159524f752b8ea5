"""Whole training steps in CUDA graphs: torch.compile(mode="reduce-overhead") and a manual
torch.cuda.CUDAGraph capture of forward, backward and the optimizer step (torch's, or a fused
one) replay to the eager results; a bad id met by a replay is raised by the next call."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import embedding_ext as ee

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = ee.Embedding(30, 8, padding_idx=0, scale_grad_by_freq=True)
        self.bags = ee.EmbeddingBag(20, 8, mode="sum")
        self.head = torch.nn.Linear(8, 1)

    def forward(self, ids, bag_ids, offsets, bag_weights):
        x = self.tokens(ids).sum(1) + self.bags(bag_ids, offsets, per_sample_weights=bag_weights)
        return self.head(torch.tanh(x)).square().sum()


def _batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 30, (4, 5), generator=gen)
        ids[0, :2] = 7  # a duplicate
        ids[1, 0] = 0  # padding
        bag_ids = torch.randint(0, 20, (9,), generator=gen)
        offsets = torch.tensor([0, 3, 3, 7])  # an empty bag
        bag_weights = torch.rand(9, generator=gen, dtype=torch.float64)
        yield tuple(t.cuda() for t in (ids, bag_ids, offsets, bag_weights))


def _eager_run(model, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for batch in _batches(steps):
        loss = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_reduce_overhead_training_matches_eager():
    """Forward and backward compiled into CUDA graphs (no skip: our ops neither synchronise
    nor leave the GPU), torch's optimizer after each replay."""
    torch.manual_seed(0)
    # float64: Inductor's kernels round differently from eager; in float64 that stays far
    # inside assert_close's tolerance.
    eager = _Model().double().cuda()
    graphed = copy.deepcopy(eager)
    expected = _eager_run(eager, 4)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(graphed, mode="reduce-overhead")
    opt = torch.optim.SGD(graphed.parameters(), lr=0.1)
    losses = []
    for batch in _batches(4):
        torch.compiler.cudagraph_mark_step_begin()
        loss = compiled(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())  # (the graph's output is reused by the next replay)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(torch.stack(losses), expected)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a)


def _warm_up_and_capture(step, static_inputs, warm_up_batches):
    """PyTorch's whole-network recipe: warm-up steps on a side stream (their results are
    part of the run: the eager twin takes the same steps), then one step captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for batch in warm_up_batches:
            for static, value in zip(static_inputs, batch):
                static.copy_(value)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    return graph, static_loss


@pytest.mark.parametrize("fused", [False, True], ids=["torch-sgd", "fused-sgd"])
def test_captured_training_step_replays_eager(fused):
    """One training step (forward, backward, the optimizer's update) captured once and
    replayed on new batches gives the losses and tables of the same steps run eagerly."""
    torch.manual_seed(0)
    eager = _Model().double().cuda()
    graphed = copy.deepcopy(eager)
    models = {"eager": eager, "graphed": graphed}
    opts = {}
    for name, model in models.items():
        if fused:  # the tables' update in the backward, the head's by torch's SGD
            opts[name] = [ee.fuse_optimizer(model.tokens, torch.optim.SGD, lr=0.1),
                          ee.fuse_optimizer(model.bags, torch.optim.SGD, lr=0.1),
                          torch.optim.SGD(model.head.parameters(), lr=0.1)]
        else:
            opts[name] = [torch.optim.SGD(model.parameters(), lr=0.1)]
    batches = list(_batches(6))
    static_inputs = [t.clone() for t in batches[0]]

    def graphed_step():
        loss = graphed(*static_inputs)
        loss.backward()
        for opt in opts["graphed"]:
            opt.step()
        # Grads stay allocated (set_to_none would free the captured buffers): zeroed in place.
        for p in graphed.parameters():
            if p.grad is not None:
                p.grad.zero_()
        return loss

    graph, static_loss = _warm_up_and_capture(graphed_step, static_inputs, batches[:3])
    graph_losses = []
    for batch in batches[3:]:
        for static, value in zip(static_inputs, batch):
            static.copy_(value)
        graph.replay()
        graph_losses.append(static_loss.clone())
    ee.check_cuda_index_errors()
    eager_losses = []
    for batch in batches:  # the graphed model's 3 warm-up steps and 3 replays
        loss = eager(*batch)
        loss.backward()
        for opt in opts["eager"]:
            opt.step()
            opt.zero_grad()
        eager_losses.append(loss.detach())
    # The capture itself ran no kernel: the graphed model took 3 warm-up steps + 3 replays.
    torch.testing.assert_close(torch.stack(graph_losses), torch.stack(eager_losses[3:]))
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a)


def test_bad_id_in_a_captured_fused_step_is_raised_by_the_next_call():
    """A replay that meets a bad id leaves the fused table as it was (the update is skipped)
    and zero-fills its row; the next embedding_ext call raises the IndexError; later replays
    with good ids train again."""
    torch.manual_seed(0)
    table = ee.Embedding(10, 4).cuda()
    opt = ee.fuse_optimizer(table, torch.optim.SGD, lr=0.5)
    static_ids = torch.tensor([1, 2, 3], device="cuda")

    def step():
        loss = table(static_ids).square().sum()
        loss.backward()
        opt.step()
        return loss

    graph, _ = _warm_up_and_capture(step, [static_ids], [(static_ids.clone(),)])
    before = table.weight.detach().clone()
    static_ids.copy_(torch.tensor([1, 12, 3], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(table.weight.detach(), before), "a bad id skips the whole update"
    with pytest.raises(IndexError, match="index 12 at position 1"):
        ee.embedding(torch.tensor([0], device="cuda"), table.weight.detach())
    static_ids.copy_(torch.tensor([4, 5, 5], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ee.check_cuda_index_errors()
    changed = (table.weight.detach() != before).any(1)
    assert changed.tolist() == [i in (4, 5) for i in range(10)]
