"""torch.compile(fullgraph=True) of lookups and bags: compiled forward and backward equal eager."""
import copy

import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from embedding_ext import reference
from bags import make_bags
from conftest import DEVICES, TOL, assert_close, make_indices, make_weight

CASES = [dict(), dict(padding_idx=1, scale_grad_by_freq=True), dict(max_norm=1.0, padding_idx=0),
         dict(max_norm=2.0, norm_type=1.0, scale_grad_by_freq=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", CASES, ids=["plain", "pad-freq", "maxnorm", "maxnorm-p1-freq"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compiled_matches_eager(device, options, dynamic):
    torch._dynamo.reset()

    def step(idx, w):
        return (ee.embedding(idx, w, **options) * 1.5).sum(-1)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    padding_idx = options.get("padding_idx")
    weight = make_weight(12, 4, torch.float32, device) * 2
    w_eager = weight.clone().requires_grad_()
    w_comp = weight.clone().requires_grad_()
    # float64 reference of the (renormed) weight and of the gradient summed over the steps:
    # both sides accumulate into .grad, so after every step each must equal that sum.
    w_ref = weight.double()
    grad_ref = torch.zeros(12, 4, dtype=torch.float64, device=device)
    for shape in ((3, 5), (3, 5), (4, 7)):  # reuse, then a new shape (recompile or symbolic)
        idx = make_indices(shape, 12, device, padding_idx=padding_idx)
        if padding_idx is not None:
            idx[0, 0] = padding_idx  # the padding row is always looked up
        if "max_norm" in options:
            w_ref = reference.renorm(w_ref, idx, options["max_norm"], options.get("norm_type", 2.0))
        out_eager = step(idx, w_eager)
        out_comp = compiled(idx, w_comp)
        torch.testing.assert_close(out_comp, out_eager)
        assert_close(out_comp, (reference.forward(w_ref, idx) * 1.5).sum(-1), torch.float32)
        out_eager.sum().backward()
        out_comp.sum().backward()
        grad_ref += reference.dense_backward(torch.full((*shape, 4), 1.5, device=device), idx, 12,
                                             padding_idx, options.get("scale_grad_by_freq", False))
        assert w_comp.grad is not None and w_eager.grad is not None
        torch.testing.assert_close(w_comp.grad, w_eager.grad)
        assert_close(w_comp.grad, grad_ref, torch.float32)
        if padding_idx is not None:
            assert torch.equal(w_comp.grad[padding_idx], torch.zeros(4, device=device))
        torch.testing.assert_close(w_comp, w_eager)  # the in-place renorm happened in both
        assert_close(w_comp.detach(), w_ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_module(device):
    torch._dynamo.reset()
    module = ee.Embedding(20, 6, padding_idx=3, scale_grad_by_freq=True).to(device)
    eager = copy.deepcopy(module)  # same weights, its own parameter and .grad
    assert torch.equal(eager.weight, module.weight)
    compiled = torch.compile(module, fullgraph=True)
    for shape in ((4, 4), (4, 4)):  # the second call reuses the compiled graph
        module.weight.grad = eager.weight.grad = None
        idx = make_indices(shape, 20, device, padding_idx=3)
        idx[0, :3] = 3  # padding, repeated
        idx[1, :3] = 7  # a duplicated ordinary row: scaled by 1/count
        out = compiled(idx)
        out_eager = eager(idx)
        assert out.shape == (*shape, 6) and out.dtype == torch.float32
        assert torch.equal(out, out_eager) and torch.equal(out, module.weight.detach()[idx])
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        out_eager.backward(grad_out)
        grad = module.weight.grad
        assert grad is not None and grad.shape == (20, 6) and not grad.is_sparse
        torch.testing.assert_close(grad, eager.weight.grad, **TOL[torch.float32])
        assert_close(grad, reference.dense_backward(grad_out, idx, 20, 3, True), torch.float32)
        assert torch.equal(grad[3], torch.zeros(6, device=device))  # exactly zero, no NaN
        assert grad[7].abs().sum() > 0


def test_compiles_fullgraph_with_gradients():
    """torch.compile(fullgraph=True) through the module (static shapes, per_sample_weights,
    padding) and the function (dynamic shapes, max mode): same outputs and gradients."""
    torch._dynamo.reset()
    ours = ee.EmbeddingBag(50, 8, mode="sum", padding_idx=0)
    theirs = torch.nn.EmbeddingBag(50, 8, mode="sum", padding_idx=0)
    theirs.load_state_dict(ours.state_dict())
    ids, offsets = make_bags(50, padding_idx=0)
    psw = torch.randn(ids.shape)
    out = torch.compile(ours, fullgraph=True)(ids, offsets, psw)
    expected = theirs(ids, offsets, psw)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    lookup = torch.compile(lambda i, w: ee.embedding_bag(i, w, mode="max"), fullgraph=True,
                           dynamic=True)
    weight = make_weight(50, 8, torch.float32)
    for length in (3, 4):
        ids2d = torch.randint(0, 50, (6, length))
        torch.testing.assert_close(lookup(ids2d, weight), F.embedding_bag(ids2d, weight, mode="max"))
