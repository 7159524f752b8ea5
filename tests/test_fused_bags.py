"""ee.fuse_optimizer on ee.EmbeddingBag (modes sum and mean): against the unfused sparse gradient
and the same torch optimizer over steps, per_sample_weights gradients, the refusals of max mode
and of a second backward, and the CUDA kernels against the CPU ones."""
import pytest
import torch

import embedding_ext as ee
from fused_cases import CASES, IDS, TOL, assert_same_state, step_both


# Bags (ee.EmbeddingBag, modes sum and mean): the positions' gradient rows go to the same
# fused update.
BAG_FORMS = {
    "sum+psw+pad": dict(mode="sum", padding_idx=2, psw=True),
    "sum+freq+last-offset": dict(mode="sum", scale_grad_by_freq=True, include_last_offset=True),
    "mean+pad+freq": dict(mode="mean", padding_idx=0, scale_grad_by_freq=True),
    "mean+2d": dict(mode="mean", two_d=True),
}


def _bag_batch(form: dict, num_weights: int, dim: int, dtype, step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, num_weights, (30,), generator=g)
    ids[::3] = 4  # a hot row
    if form.get("padding_idx") is not None:
        ids[1::5] = form["padding_idx"]
    offsets = torch.tensor([0, 5, 5, 12, 20])  # an empty bag; with include_last_offset the
    if form.get("two_d"):                       # ids past 20 join the last bag
        ids, offsets = ids.reshape(5, 6), None
    psw = torch.randn(ids.shape, dtype=dtype, generator=g) if form.get("psw") else None
    bags = 5 if offsets is None else offsets.numel() - form.get("include_last_offset", False)
    return ids, offsets, psw, torch.randn(bags, dim, dtype=dtype, generator=g)


def _bag_pair(form: dict, dtype):
    kwargs = {k: form[k] for k in ("mode", "padding_idx", "scale_grad_by_freq",
                                   "include_last_offset") if k in form}
    fused = ee.EmbeddingBag(17, 6, dtype=dtype, **kwargs)
    plain = ee.EmbeddingBag(17, 6, dtype=dtype, sparse=True, **kwargs)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("form", list(BAG_FORMS), ids=list(BAG_FORMS))
def test_bags_match_the_unfused_optimizer_over_steps(optimizer_class, kwargs, form):
    """ee.EmbeddingBag fused against its own sparse gradient + the torch optimizer
    (ee.EmbeddingBag's sparse gradient is checked against PyTorch's in test_bag_sparse.py)."""
    form = BAG_FORMS[form]
    fused, plain = _bag_pair(form, torch.float64)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    pad = form.get("padding_idx")
    before_pad = None if pad is None else fused.weight[pad].detach().clone()
    for step in range(6):
        ids, offsets, psw, grad_out = _bag_batch(form, 17, 6, torch.float64, step)
        step_both(fused, opt, plain, ref, (ids, offsets, psw), grad_out)
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[torch.float64])
    if before_pad is not None:
        assert torch.equal(fused.weight[pad], before_pad)
    assert_same_state(opt, ref, **TOL[torch.float64])


def test_bag_per_sample_weights_get_their_gradient_from_the_weights_before_the_update():
    form = BAG_FORMS["sum+psw+pad"]
    fused, plain = _bag_pair(form, torch.float64)
    opt = ee.fuse_optimizer(fused, torch.optim.SGD, lr=0.5)  # kept: dropping it unfuses
    ids, offsets, psw, grad_out = _bag_batch(form, 17, 6, torch.float64, 0)
    p_fused, p_plain = psw.clone().requires_grad_(), psw.clone().requires_grad_()
    fused(ids, offsets, p_fused).backward(grad_out)
    plain(ids, offsets, p_plain).backward(grad_out)
    torch.testing.assert_close(p_fused.grad, p_plain.grad, **TOL[torch.float64])
    assert not torch.equal(fused.weight, plain.weight)  # the update did happen
    assert fused.weight.grad is None
    del opt


def test_bag_max_mode_is_refused():
    with pytest.raises(NotImplementedError, match="mode='max' cannot be fused"):
        ee.fuse_optimizer(ee.EmbeddingBag(10, 4, mode="max"), torch.optim.SGD, lr=0.1)
    bag = ee.EmbeddingBag(10, 4, mode="sum")
    opt = ee.fuse_optimizer(bag, torch.optim.SGD, lr=0.1)
    bag.mode = "max"  # changed after fusing: refused at the lookup, nothing updated
    before = bag.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="mode='max' cannot be fused"):
        bag(torch.tensor([[1, 2]]))
    assert torch.equal(bag.weight, before)
    del opt


def test_bag_second_backward_before_step_is_refused():
    bag = ee.EmbeddingBag(10, 4, mode="mean")
    opt = ee.fuse_optimizer(bag, torch.optim.SGD, lr=0.1)
    bag(torch.tensor([[1, 2]])).sum().backward()
    with pytest.raises(RuntimeError, match="second backward through the fused lookup"):
        bag(torch.tensor([[1, 3]])).sum().backward()
    opt.step()
    bag(torch.tensor([[1, 3]])).sum().backward()


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_bags_match_the_cpu_kernels(optimizer_class, kwargs, dtype):
    form = BAG_FORMS["sum+psw+pad"]
    modules = {}
    for dev in ("cpu", "cuda"):
        modules[dev] = ee.EmbeddingBag(17, 6, mode="sum", padding_idx=2, dtype=dtype, device=dev)
    with torch.no_grad():
        modules["cuda"].weight.copy_(modules["cpu"].weight)
    opts = {dev: ee.fuse_optimizer(m, optimizer_class, **kwargs) for dev, m in modules.items()}
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for step in range(4):
        ids, offsets, psw, grad_out = _bag_batch(form, 17, 6, dtype, step)
        for dev, m in modules.items():
            m(ids.to(dev), offsets.to(dev), psw.to(dev)).backward(grad_out.to(dev))
            opts[dev].step()
        torch.testing.assert_close(modules["cuda"].weight.cpu(), modules["cpu"].weight, **tol)
