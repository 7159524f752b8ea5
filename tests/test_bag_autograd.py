"""The ee.embedding_bag gradients as autograd sees them: gradcheck, torch.func, the refusal
of a double backward, and dense gradient buffers reused from the output cache."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from bags import MODES
from conftest import make_weight


@pytest.mark.parametrize("mode", MODES)
def test_bag_gradcheck(mode):
    weight = make_weight(9, 3, torch.float64).requires_grad_()
    ids = torch.tensor([1, 2, 2, 0, 5, 7, 7, 3, 4])
    offsets = torch.tensor([0, 3, 3, 6])
    assert torch.autograd.gradcheck(
        lambda w: ee.embedding_bag(ids, w, offsets, mode=mode, padding_idx=0), (weight,))
    if mode == "sum":
        psw = torch.randn(9, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda w, p: ee.embedding_bag(ids, w, offsets, mode="sum", per_sample_weights=p,
                                          padding_idx=0), (weight, psw))


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sum+weights"])
def test_torch_func_grad_matches_autograd(mode):
    """Eager calls take the Function without setup_context (no per-call signature binding);
    under torch.func transforms ee.embedding_bag must switch to EmbeddingBagFunction."""
    weight = make_weight(9, 3, torch.float64)
    ids = torch.tensor([1, 2, 2, 0, 5, 7, 7, 3, 4])
    offsets = torch.tensor([0, 3, 3, 6])
    psw = torch.randn(9, dtype=torch.float64) if mode == "sum+weights" else None
    grad_out = torch.randn(4, 3, dtype=torch.float64)

    def loss(w, p, fn):
        out = fn(ids, w, offsets, mode=mode.split("+")[0], per_sample_weights=p, padding_idx=0)
        return (out * grad_out).sum()

    argnums = (0, 1) if psw is not None else 0
    ours = torch.func.grad(loss, argnums=argnums)(weight, psw, ee.embedding_bag)
    theirs = torch.func.grad(loss, argnums=argnums)(weight, psw, F.embedding_bag)
    w = weight.clone().requires_grad_()
    p = None if psw is None else psw.clone().requires_grad_()
    eager = torch.autograd.grad(loss(w, p, ee.embedding_bag), (w,) if p is None else (w, p))
    for a, b, c in zip(ours if psw is not None else (ours,),
                       theirs if psw is not None else (theirs,), eager):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_double_backward_is_refused_clearly():
    """The bag gradients are once-differentiable (eager calls and EmbeddingBagFunction alike):
    differentiating the gradient again raises instead of returning a wrong zero."""
    weight = make_weight(9, 3, torch.float64).requires_grad_()
    out = ee.embedding_bag(torch.tensor([1, 2, 2, 5]), weight, torch.tensor([0, 2]), mode="sum")
    (grad,) = torch.autograd.grad(out.pow(2).sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@pytest.mark.parametrize("mode", MODES)
def test_reused_gradient_buffer_is_zeroed(mode):
    """The dense gradient (V x D >= 1 MiB) comes from the output cache: a buffer freed by the
    previous step, full of its values, must come back zero outside this step's rows."""
    weight = make_weight(5000, 64, torch.float32).requires_grad_()
    offsets = torch.tensor([0, 3])
    pointers = []
    for ids in (torch.arange(0, 4000, 7), torch.tensor([1, 2, 2, 9, 4999])):
        weight.grad = None  # frees the previous step's gradient into the cache
        ee.embedding_bag(ids, weight, offsets, mode=mode).sum().backward()
        pointers.append(weight.grad.data_ptr())
        w = weight.detach().clone().requires_grad_()
        F.embedding_bag(ids, w, offsets, mode=mode).sum().backward()
        torch.testing.assert_close(weight.grad, w.grad)
        del w
    assert pointers[0] == pointers[1], "the second gradient did not reuse the first's buffer"
