"""sparse=True gradients: layout, order, values, and training with sparse optimizers."""
import pytest
import torch

import embedding_ext as ee
from embedding_ext import reference
from conftest import DEVICES, FLOAT_DTYPES, INDEX_DTYPES, assert_close, make_indices, make_weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("shape", ["1d", "3d", "noncontig", "scalar", "empty"])
@pytest.mark.parametrize("padding_idx", [None, 4])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_sparse_gradient(device, dtype, index_dtype, shape, padding_idx, scale_grad_by_freq):
    num_weights, dim = 12, 5
    weight = make_weight(num_weights, dim, dtype, device).requires_grad_()
    idx = make_indices(shape, num_weights, device, index_dtype, padding_idx)
    out = ee.embedding(idx, weight, padding_idx=padding_idx,
                       scale_grad_by_freq=scale_grad_by_freq, sparse=True)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grad = weight.grad
    assert grad.layout == torch.sparse_coo
    assert grad.shape == (num_weights, dim) and grad.dtype == dtype
    rows, values = reference.sparse_backward(grad_out, idx, num_weights, padding_idx,
                                             scale_grad_by_freq)
    # Uncoalesced, as in PyTorch (torch marks nnz <= 1 as coalesced by itself).
    assert grad.is_coalesced() == (rows.numel() <= 1)
    assert grad._indices().dtype == torch.int64 and grad._indices().shape == (1, rows.numel())
    assert torch.equal(grad._indices()[0], rows)  # row-major order of input, padding removed
    assert grad._values().shape == (rows.numel(), dim)
    assert_close(grad._values(), values, dtype)
    # And the same total as the dense gradient.
    dense = reference.dense_backward(grad_out, idx, num_weights, padding_idx, scale_grad_by_freq)
    assert_close(grad.double().to_dense(), dense, dtype)  # summed in float64, not by torch in dtype


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_matches_pytorch(device):
    weight = make_weight(30, 4, torch.float64, device).requires_grad_()
    idx = make_indices((7, 3), 30, device, padding_idx=2)
    ours = torch.autograd.grad(ee.embedding(idx, weight, padding_idx=2, sparse=True).sum(), weight)[0]
    ref = torch.autograd.grad(torch.nn.functional.embedding(idx, weight, padding_idx=2, sparse=True).sum(), weight)[0]
    assert torch.equal(ours._indices(), ref._indices())
    assert torch.equal(ours._values(), ref._values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["SGD", "SparseAdam", "Adagrad"])
def test_sparse_training_matches_nn_embedding(device, optimizer):
    torch_emb = torch.nn.Embedding(40, 8, padding_idx=0, sparse=True).to(device)
    our_emb = ee.Embedding(40, 8, padding_idx=0, sparse=True).to(device)
    our_emb.load_state_dict(torch_emb.state_dict())
    make = {"SGD": lambda p: torch.optim.SGD(p, lr=0.1),
            "SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=0.05),
            "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1)}[optimizer]
    opt_ref, opt_ours = make(torch_emb.parameters()), make(our_emb.parameters())
    for _ in range(6):
        idx = make_indices((16, 3), 40, device, padding_idx=0)
        target = torch.randn(16, 3, 8, device=device)
        for emb, opt in ((torch_emb, opt_ref), (our_emb, opt_ours)):
            opt.zero_grad()
            loss = ((emb(idx) - target) ** 2).mean()
            loss.backward()
            opt.step()
    torch.testing.assert_close(our_emb.weight, torch_emb.weight, atol=1e-6, rtol=1e-6)


def test_sparse_double_backward_is_refused():
    weight = make_weight(5, 3, torch.float64).requires_grad_()
    out = ee.embedding(torch.tensor([1, 2]), weight, sparse=True)
    grad_out = torch.randn_like(out, requires_grad=True)
    with pytest.raises(NotImplementedError, match="sparse=True"):
        torch.autograd.grad(out, weight, grad_out, create_graph=True)
