"""torch.compile(fullgraph=True): compiled forward and backward equal eager."""
import pytest
import torch

import embedding_ext as ee
from conftest import DEVICES, make_indices, make_weight

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
    weight = make_weight(12, 4, torch.float32, device) * 2
    w_eager = weight.clone().requires_grad_()
    w_comp = weight.clone().requires_grad_()
    for shape in ((3, 5), (3, 5), (4, 7)):  # reuse, then a new shape (recompile or symbolic)
        idx = make_indices(shape, 12, device, padding_idx=options.get("padding_idx"))
        out_eager = step(idx, w_eager)
        out_comp = compiled(idx, w_comp)
        torch.testing.assert_close(out_comp, out_eager)
        out_eager.sum().backward()
        out_comp.sum().backward()
        torch.testing.assert_close(w_comp.grad, w_eager.grad)
        torch.testing.assert_close(w_comp, w_eager)  # the in-place renorm happened in both


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_module(device):
    torch._dynamo.reset()
    module = ee.Embedding(20, 6, padding_idx=3).to(device)
    compiled = torch.compile(module, fullgraph=True)
    idx = make_indices((4, 4), 20, device, padding_idx=3)
    out = compiled(idx)
    torch.testing.assert_close(out, module.weight[idx])
    out.sum().backward()
    assert module.weight.grad is not None and not module.weight.grad[3].any()
