"""A fused optimizer's life: the optimizers and options it refuses, what it refuses during
training (a second backward, create_graph, tied weights, a replaced weight, GradScaler), a
failed step that changes nothing, lookups without a weight gradient, copies that are not fused,
and unfusing when the optimizer is dropped."""
import copy

import pytest
import torch

import embedding_ext as ee


@pytest.mark.parametrize("optimizer_class, kwargs, message", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9), "momentum=0.9 cannot be fused"),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=0.01), "weight_decay=0.01 cannot be fused"),
    (torch.optim.Adagrad, dict(lr=0.1, weight_decay=0.1), "weight_decay=0.1 cannot be fused"),
    (torch.optim.SparseAdam, dict(lr=0.1, maximize=True), "maximize=True cannot be fused"),
    (torch.optim.Adam, dict(lr=0.1), "'optimizer_class' must be one of"),
])
def test_unsupported_optimizers_are_refused(optimizer_class, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ee.fuse_optimizer(ee.Embedding(5, 3), optimizer_class, **kwargs)


def test_refusals_during_training():
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    ids = torch.tensor([1, 2, 2])
    with pytest.raises(TypeError, match="'module' must be an ee.Embedding"):
        ee.fuse_optimizer(torch.nn.Embedding(8, 3), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="already has a fused optimizer"):
        ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="one parameter"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))]})
    # create_graph=True: refused, nothing applied
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(emb(ids).sum(), emb.weight, create_graph=True, allow_unused=True)
    assert torch.equal(emb.weight, before)
    # two lookups in one step: the second update is refused (the first was applied)
    first = emb(ids).sum()
    second = emb(ids).sum()
    with pytest.raises(RuntimeError, match="second backward through the fused lookup"):
        (first + second).backward()
    opt.step()
    # gradient accumulation: a second backward before step()
    out = emb(ids).sum()
    out.backward(retain_graph=True)
    after_one = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="second backward through the fused lookup"):
        out.backward()
    assert torch.equal(emb.weight, after_one)  # nothing applied twice
    opt.step()
    # tied weights: a gradient from another use of the weight
    tied = emb(ids) @ emb.weight.t()
    with pytest.raises(RuntimeError, match="received a gradient from outside its lookup"):
        tied.sum().backward()
    assert emb.weight.grad is None
    opt.step()


def test_a_failed_step_changes_nothing_and_training_goes_on():
    """A bad id: IndexError in the forward, no state or flag left behind; the next step
    trains as usual (and the step count is the number of applied updates)."""
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SparseAdam, lr=0.1)
    before = emb.weight.detach().clone()
    with pytest.raises(IndexError):
        emb(torch.tensor([1, 9])).sum().backward()
    assert torch.equal(emb.weight, before)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["step"] == 1
    assert not torch.equal(emb.weight, before)


def test_no_grad_and_frozen_lookups_leave_the_weight_alone():
    """Lookups without a gradient for the weight (no_grad, a frozen weight) take the plain
    path: no update, no state; training then goes on as usual."""
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SparseAdam, lr=0.1)
    ids = torch.tensor([1, 2])
    before = emb.weight.detach().clone()
    with torch.no_grad():
        assert emb(ids).grad_fn is None
    emb.weight.requires_grad_(False)
    x = torch.randn(2, 3, requires_grad=True)
    (emb(ids) * x).sum().backward()  # only x gets a gradient
    assert x.grad is not None and torch.equal(emb.weight, before) and not opt.state
    emb.weight.requires_grad_(True)
    emb(ids).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["step"] == 1 and not torch.equal(emb.weight, before)


def test_copies_are_not_fused_and_dropping_the_optimizer_unfuses():
    import pickle
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    ids = torch.tensor([1, 2])
    for clone in (copy.deepcopy(emb), pickle.loads(pickle.dumps(emb))):
        clone(ids).sum().backward()  # an ordinary lookup: its own gradient
        assert clone.weight.grad is not None and torch.equal(clone.weight, emb.weight)
    del opt
    import gc
    gc.collect()
    emb(ids).sum().backward()  # unfused now: the gradient is built, no refusal
    assert emb.weight.grad is not None


def test_version_counter_sees_the_update():
    """The in-place update is visible to autograd: a node that saved the weight and runs
    after the fused update refuses instead of reading the updated rows."""
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)  # kept: the fusion lasts while it lives
    u = torch.randn(2, 3, requires_grad=True)
    version = emb.weight._version
    z = (u * 2) @ emb.weight.detach().t()  # saves the weight (its version now)
    emb(torch.tensor([1, 2])).sum().backward()  # the fused update
    assert emb.weight._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    opt.step()


def test_a_weight_replaced_after_fusing_raises_at_the_lookup():
    """parallelize_module / fully_shard / an assignment after fuse_optimizer: the new weight
    would get ordinary gradients that the fused step ignores (training would silently stop),
    so the lookup raises while the old optimizer lives; fusing again works."""
    emb = ee.Embedding(10, 4)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    emb.weight = torch.nn.Parameter(emb.weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced after fusing"):
        emb(torch.tensor([1, 2]))
    del opt
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert emb.weight.grad is None and not torch.equal(emb.weight, before)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_+step"])
def test_grad_scaler_is_refused_by_name(unscale_first):
    """torch.amp.GradScaler.step() on a fused optimizer raises an error that names the
    problem (the update already used the scaled gradient), not the scaler's "No inf checks
    were recorded", also after scaler.unscale_() (the gradient-clipping recipe, where the
    scaler passes no scale); the optimizer is left usable without the scaler."""
    emb = ee.Embedding(10, 4)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(emb(torch.tensor([1, 2])).sum()).backward()
    if unscale_first:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="GradScaler cannot drive a fused optimizer"):
        scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    opt.step()
    before = emb.weight.detach().clone()
    emb(torch.tensor([3])).sum().backward()
    opt.step()
    torch.testing.assert_close(emb.weight[3], before[3] - 0.1)
