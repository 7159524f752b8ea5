"""ee.fuse_optimizer (the optimizer step inside ee.Embedding's backward): every rule against
the same torch optimizer on the sparse gradient over many steps (duplicates, padding,
scale_grad_by_freq, max_norm, sparsely touched tables), lr changes, state_dict moves between
fused and unfused both ways, and fp32 state for fp16/bf16 weights."""
import copy

import pytest
import torch

import embedding_ext as ee
from fused_cases import CASES, IDS, TOL, assert_same_state, batch, pair, step_both


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_idx, scale", [(None, False), (0, False), (2, True)])
@pytest.mark.parametrize("dim", [6, 70])  # 70: the row-wise sum of squares' 16 lanes + a tail
def test_matches_the_unfused_optimizer_over_steps(optimizer_class, kwargs, dtype, padding_idx,
                                                  scale, dim):
    fused, plain = pair(17, dim, dtype, padding_idx, scale)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    before_pad = None if padding_idx is None else fused.weight[padding_idx].detach().clone()
    for step in range(8):
        ids, grad_out = batch(17, 24, padding_idx, dim, dtype)
        step_both(fused, opt, plain, ref, (ids,), grad_out)
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[dtype])
    if before_pad is not None:
        assert torch.equal(fused.weight[padding_idx], before_pad)
    assert_same_state(opt, ref, **TOL[dtype])


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [False, True])
def test_a_sparsely_touched_table_matches_the_unfused_optimizer(optimizer_class, kwargs, dtype,
                                                                scale):
    """Under a quarter of the table's rows touched (SGD and row-wise Adagrad then update the
    rows seen once first, in position order, then the rest by row): as unfused, with
    duplicates, padding and scale_grad_by_freq, over steps."""
    fused, plain = pair(3000, 12, dtype, 5, scale)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    for _ in range(4):
        ids = torch.randint(0, 3000, (4, 30))
        ids[0, :4] = 9  # a row seen 4 times
        ids[1, 1::6] = 5  # padding
        ids[2, 7] = ids[3, 20]  # a row seen twice, far apart
        step_both(fused, opt, plain, ref, (ids,), torch.randn(4, 30, 12, dtype=dtype))
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[dtype])
    assert_same_state(opt, ref, **TOL[dtype])


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_max_norm_renorms_as_without_fusion(optimizer_class, kwargs):
    fused, plain = pair(11, 5, torch.float64, 1, False, max_norm=0.7)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    for _ in range(4):
        ids, grad_out = batch(11, 10, 1, 5, torch.float64)
        step_both(fused, opt, plain, ref, (ids,), grad_out)
    torch.testing.assert_close(fused.weight, plain.weight, **TOL[torch.float64])


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_lr_change_takes_effect_at_the_next_backward(optimizer_class, kwargs):
    fused, plain = pair(9, 4, torch.float64, None, False)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    for lr in (kwargs["lr"], kwargs["lr"] / 3, kwargs["lr"] * 2):
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        ids, grad_out = batch(9, 8, None, 4, torch.float64)
        step_both(fused, opt, plain, ref, (ids,), grad_out)
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[torch.float64])


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_state_dict_moves_between_fused_and_unfused(optimizer_class, kwargs):
    """Three steps fused, then three unfused from its state_dict; and the other way round:
    both give the weights of six unfused steps."""
    batches = [batch(13, 12, 0, 4, torch.float64) for _ in range(6)]
    fused, plain = pair(13, 4, torch.float64, 0, False)
    start = copy.deepcopy(plain.state_dict())

    def unfused_steps(module, optimizer, chunk):
        for ids, grad_out in chunk:
            module(ids).backward(grad_out)
            optimizer.step()
            optimizer.zero_grad()

    def fused_steps(module, optimizer, chunk):
        for ids, grad_out in chunk:
            module(ids).backward(grad_out)
            optimizer.step()

    ref = optimizer_class(plain.parameters(), **kwargs)
    unfused_steps(plain, ref, batches)
    for first, second in (("fused", "unfused"), ("unfused", "fused")):
        a = ee.Embedding(13, 4, padding_idx=0, dtype=torch.float64)
        b = torch.nn.Embedding(13, 4, padding_idx=0, sparse=True, dtype=torch.float64)
        a.load_state_dict(start)
        b.load_state_dict(start)
        if first == "fused":
            opt_a = ee.fuse_optimizer(a, optimizer_class, **kwargs)
            fused_steps(a, opt_a, batches[:3])
            b.load_state_dict(a.state_dict())
            opt_b = optimizer_class(b.parameters(), **kwargs)
            opt_b.load_state_dict(opt_a.state_dict())
            unfused_steps(b, opt_b, batches[3:])
            result = b.weight
        else:
            opt_b = optimizer_class(b.parameters(), **kwargs)
            unfused_steps(b, opt_b, batches[:3])
            a.load_state_dict(b.state_dict())
            opt_a = ee.fuse_optimizer(a, optimizer_class, **kwargs)
            opt_a.load_state_dict(opt_b.state_dict())
            fused_steps(a, opt_a, batches[3:])
            result = a.weight
        torch.testing.assert_close(result, plain.weight, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_fp32_state(dtype):
    emb = ee.Embedding(10, 8, dtype=dtype)
    opt = ee.fuse_optimizer(emb, torch.optim.SparseAdam, lr=0.01)
    reference = emb.weight.detach().float().clone().requires_grad_()
    ref = torch.optim.SparseAdam([reference], lr=0.01)
    ids, grad_out = batch(10, 12, None, 8, torch.float32)
    emb(ids).backward(grad_out.to(dtype))
    opt.step()
    torch.nn.functional.embedding(ids, reference, sparse=True).backward(grad_out.to(dtype).float())
    ref.step()
    assert opt.state[emb.weight]["exp_avg"].dtype == torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(emb.weight.float(), reference.detach(), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer_class, kwargs", CASES[1:], ids=IDS[1:])
def test_low_precision_state_dict_round_trip(dtype, optimizer_class, kwargs):
    """fp32 state for fp16/bf16 weights stays fp32 through state_dict / load_state_dict
    (torch's load casts state to the weight's dtype)."""
    emb = ee.Embedding(10, 4, dtype=dtype)
    opt = ee.fuse_optimizer(emb, optimizer_class, **kwargs)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()
    resumed = ee.Embedding(10, 4, dtype=dtype)
    resumed.load_state_dict(emb.state_dict())
    resumed_opt = ee.fuse_optimizer(resumed, optimizer_class, **kwargs)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for name, value in resumed_opt.state[resumed.weight].items():
        if name != "step":
            assert value.dtype == torch.float32, name
    for module, optimizer in ((emb, opt), (resumed, resumed_opt)):
        module(torch.tensor([2, 3])).sum().backward()
        optimizer.step()
    assert torch.equal(resumed.weight, emb.weight)
