"""ee.optim.RowWiseAdagrad: the row-wise Adagrad rule against a float64 reference
over many steps, with duplicates and padding, dense and sparse gradients, parameter groups,
learning-rate changes, state_dict round trips and argument errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from conftest import TOL


def reference_rowwise_adagrad(weight, accumulator, grad_rows, lr, eps):
    """float64, row by row: duplicates summed, m += mean(g^2), w -= lr * g / (sqrt(m) + eps);
    rows without a gradient untouched. grad_rows: {row: summed gradient}."""
    w, m = weight.clone(), accumulator.clone()
    for k, g in grad_rows.items():
        if not g.ne(0).any():
            continue
        m[k] += (g * g).mean()
        w[k] -= lr * g / (m[k].sqrt() + eps)
    return w, m


def _ids(num_weights, n, padding_idx):
    ids = torch.randint(0, num_weights, (n,))
    ids[::3] = 2  # a hot row: duplicates summed before the update
    if padding_idx is not None:
        ids[1::7] = padding_idx
    return ids


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference_over_steps(sparse, padding_idx, dtype):
    num_weights, dim, lr, eps = 13, 5, 0.3, 1e-8
    emb = torch.nn.Embedding(num_weights, dim, padding_idx=padding_idx, sparse=sparse,
                             dtype=dtype)
    opt = ee.optim.RowWiseAdagrad(emb.parameters(), lr=lr, eps=eps)
    w_ref = emb.weight.detach().double().clone()
    m_ref = torch.zeros(num_weights, dtype=torch.float64)
    for step in range(6):
        ids = _ids(num_weights, 20, padding_idx)
        grad_out = torch.randn(20, dim, dtype=dtype)
        opt.zero_grad()
        emb(ids).backward(grad_out)
        assert emb.weight.grad.is_sparse == sparse
        rows = {}
        for i, k in enumerate(ids.tolist()):
            if k == padding_idx:
                continue
            rows[k] = rows.get(k, torch.zeros(dim, dtype=torch.float64)) + grad_out[i].double()
        w_ref, m_ref = reference_rowwise_adagrad(w_ref, m_ref, rows, lr, eps)
        opt.step()
        tol = TOL[dtype] if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb.weight.detach().double(), w_ref, **tol)
        torch.testing.assert_close(opt.state[emb.weight]["sum"].double(), m_ref, **tol)
    assert int(opt.state[emb.weight]["step"]) == 6
    if padding_idx is not None:  # never touched: no gradient, no accumulator
        assert opt.state[emb.weight]["sum"][padding_idx] == 0


def test_dense_and_sparse_gradients_give_the_same_result():
    weights = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(11, 4, padding_idx=3, sparse=sparse, dtype=torch.float64)
        opt = ee.optim.RowWiseAdagrad(emb.parameters(), lr=0.1)
        for _ in range(4):
            opt.zero_grad()
            emb(_ids(11, 15, 3)).pow(2).sum().backward()
            opt.step()
        weights[sparse] = (emb.weight.detach().clone(), opt.state[emb.weight]["sum"].clone())
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_fp32_state(dtype):
    emb = torch.nn.Embedding(9, 8, sparse=True).to(dtype)
    opt = ee.optim.RowWiseAdagrad(emb.parameters(), lr=0.05)
    w64 = emb.weight.detach().double().clone()
    m64 = torch.zeros(9, dtype=torch.float64)
    ids = torch.tensor([1, 1, 4, 8, 4])
    grad_out = torch.randn(5, 8).to(dtype)
    emb(ids).backward(grad_out)
    opt.step()
    assert opt.state[emb.weight]["sum"].dtype == torch.float32
    assert emb.weight.dtype == dtype
    # The rule applied to the gradient as PyTorch hands it over (its duplicates are summed
    # in bf16/fp16 by coalesce(), before the optimizer sees them).
    grad = emb.weight.grad.coalesce()
    rows = {int(k): g.double() for k, g in zip(grad.indices()[0], grad.values())}
    w_ref, m_ref = reference_rowwise_adagrad(w64, m64, rows, 0.05, 1e-8)
    torch.testing.assert_close(emb.weight.double(), w_ref, **TOL[dtype])
    torch.testing.assert_close(opt.state[emb.weight]["sum"].double(), m_ref, rtol=1e-5, atol=1e-7)


def test_lr_change_and_param_groups():
    a = torch.nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(6, 3, dtype=torch.float64))
    opt = ee.optim.RowWiseAdagrad([{"params": [a], "lr": 0.5}, {"params": [b]}], lr=0.01)
    a.grad = torch.ones_like(a)
    b.grad = torch.ones_like(b)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step()
    # m = 1 after one step of unit gradients: w -= lr * 1 / (1 + eps)
    torch.testing.assert_close(a.detach(), a0 - 0.5 / (1 + 1e-8))
    torch.testing.assert_close(b.detach(), b0 - 0.01 / (1 + 1e-8))
    opt.param_groups[0]["lr"] = 0.25
    a1 = a.detach().clone()
    opt.step()  # m = 2
    torch.testing.assert_close(a.detach(), a1 - 0.25 / (2 ** 0.5 + 1e-8))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    emb = torch.nn.Embedding(10, 4, sparse=True, dtype=torch.float64)
    opt = ee.optim.RowWiseAdagrad(emb.parameters(), lr=0.2)
    steps = [(_ids(10, 12, None), torch.randn(12, 4, dtype=torch.float64)) for _ in range(6)]

    def train(module, optimizer, batches):
        for ids, grad_out in batches:
            optimizer.zero_grad()
            module(ids).backward(grad_out)
            optimizer.step()

    train(emb, opt, steps[:3])
    saved_weights, saved_state = copy.deepcopy(emb.state_dict()), copy.deepcopy(opt.state_dict())
    train(emb, opt, steps[3:])
    resumed = torch.nn.Embedding(10, 4, sparse=True, dtype=torch.float64)
    resumed.load_state_dict(saved_weights)
    resumed_opt = ee.optim.RowWiseAdagrad(resumed.parameters(), lr=0.2)
    resumed_opt.load_state_dict(saved_state)
    train(resumed, resumed_opt, steps[3:])
    assert torch.equal(resumed.weight, emb.weight)
    assert torch.equal(resumed_opt.state[resumed.weight]["sum"], opt.state[emb.weight]["sum"])


def test_trains_an_embedding_bag_model():
    """End to end with ee.EmbeddingBag (sparse gradients): the loss goes down."""
    torch.manual_seed(2)
    bag = ee.EmbeddingBag(50, 8, mode="sum", sparse=True)
    target = torch.randn(4, 8)
    opt = ee.optim.RowWiseAdagrad(bag.parameters(), lr=0.5)
    ids = torch.randint(0, 50, (4, 6))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(bag(ids), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "'lr' must be >= 0, got -1.0"),
    (dict(eps=-1e-3), "'eps' must be >= 0"),
    (dict(initial_accumulator_value=-1.0), "'initial_accumulator_value' must be >= 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ee.optim.RowWiseAdagrad([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_non_2d_parameters_are_refused():
    with pytest.raises(ValueError, match=r"every parameter must be 2-D .* got shape \(4,\)"):
        ee.optim.RowWiseAdagrad([torch.nn.Parameter(torch.zeros(4))])
