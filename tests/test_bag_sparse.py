"""The sparse (COO) weight gradient of ee.embedding_bag: one entry per id in bags, PyTorch's rows
and values in its order, scale_grad_by_freq, and values from the output cache all written."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from bags import grads_of, make_bags
from conftest import DEVICES, TOL, make_weight, poison


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sum", "mean", "sum+weights"])
def test_sparse_gradient_without_padding_has_one_entry_per_id(device, mode):
    """The op, without padding: one entry per id in position order (so its size is known and
    CUDA does not synchronise), zero rows for the ids after the last offset (the CSR tail, in
    no bag). ee.embedding_bag has no such tail: with include_last_offset=True its last bag
    runs to the end of the ids (with a padding_idx the padding ids are left out)."""
    ids = torch.tensor([3, 3, 7, 1, 5, 9], device=device)
    csr = torch.tensor([0, 2, 4], device=device)  # bags [0, 2) and [2, 4); ids 5 and 9 in none
    weight = make_weight(20, 6, torch.float64, device)
    grad_out = torch.randn(2, 6, dtype=torch.float64, device=device)
    psw = torch.rand(6, dtype=torch.float64, device=device) if "weights" in mode else None
    m = mode.split("+")[0]
    coef = torch.full((4,), 0.5 if m == "mean" else 1.0, dtype=torch.float64, device=device)
    if psw is not None:
        coef = coef * psw[:4]
    in_bags = grad_out[[0, 0, 1, 1]] * coef[:, None]
    poison(6 * 6, torch.float64, device)
    rows, values = ee.ops.embedding_bag_sparse_backward(grad_out, ids, csr, 20, ee.ops.BAG_MODES[m],
                                                        psw, -1, False)
    assert torch.equal(rows, ids.reshape(1, -1))
    torch.testing.assert_close(values, torch.cat([in_bags, torch.zeros_like(in_bags[:2])]),
                               rtol=1e-12, atol=0)
    _, (grad, *_) = grads_of(ee.embedding_bag, weight, ids, csr, grad_out=grad_out, psw=psw,
                             mode=m, include_last_offset=True, sparse=True)
    assert torch.equal(grad._indices(), ids.reshape(1, -1))
    last = torch.full((4,), 0.25 if m == "mean" else 1.0, dtype=torch.float64, device=device)
    if psw is not None:
        last = last * psw[2:]
    torch.testing.assert_close(grad._values(),
                               torch.cat([in_bags[:2], grad_out[[1] * 4] * last[:, None]]),
                               rtol=1e-12, atol=0)
    _, (padded, *_) = grads_of(ee.embedding_bag, weight, ids, csr, grad_out=grad_out, psw=psw,
                               mode=m, include_last_offset=True, sparse=True, padding_idx=7)
    assert torch.equal(padded._indices().cpu(), torch.tensor([[3, 3, 1, 5, 9]]))
    # The public Function called as before (8 arguments): the tail is left out too.
    w = weight.detach().clone().requires_grad_()
    out, _ = ee.EmbeddingBagFunction.apply(w, ids, csr, ee.ops.BAG_MODES[m], psw, -1, False, True)
    out.backward(grad_out)
    assert torch.equal(w.grad._indices(), ids[:4].reshape(1, -1))
    # No offsets at all (CSR [0]: every id in no bag): no entry.
    w = weight.detach().clone().requires_grad_()
    out = ee.embedding_bag(ids, w, ids.new_empty(0), mode=m, sparse=True)
    assert out.shape == (0, 6)
    out.backward(torch.zeros_like(out))
    assert w.grad._nnz() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("mode", ["sum", "mean", "sum+weights"])
@pytest.mark.parametrize("form", ["offsets", "include_last_offset", "2d"])
def test_sparse_gradient_matches_pytorch(dtype, padding_idx, mode, form):
    """The uncoalesced COO gradient: PyTorch's rows and values, in its order."""
    weight = make_weight(17, 5, dtype)
    ids, offsets = make_bags(17, padding_idx=padding_idx)
    if form == "include_last_offset":
        offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
    elif form == "2d":
        ids, offsets = ids.reshape(6, 10), None
    psw = torch.randn(ids.shape, dtype=dtype) if "weights" in mode else None
    kwargs = dict(mode=mode.split("+")[0], padding_idx=padding_idx, sparse=True,
                  include_last_offset=form == "include_last_offset")
    bags = 6 if form == "2d" else offsets.numel() - (form == "include_last_offset")
    grad_out = torch.randn(bags, 5, dtype=dtype)
    grads = []
    for fn in (ee.embedding_bag, F.embedding_bag):
        w = weight.clone().requires_grad_()
        p = None if psw is None else psw.clone().requires_grad_()
        fn(ids, w, offsets, per_sample_weights=p, **kwargs).backward(grad_out)
        grads.append((w.grad, p.grad if p is not None else None))
    (ours, our_psw), (theirs, their_psw) = grads
    assert ours.is_sparse and not ours.is_coalesced()
    assert torch.equal(ours._indices(), theirs._indices())
    torch.testing.assert_close(ours._values(), theirs._values(), **TOL[dtype])
    if psw is not None:
        torch.testing.assert_close(our_psw, their_psw, **TOL[dtype])


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_gradient_with_scale_grad_by_freq(mode):
    """Beyond PyTorch (which refuses the pair): the sparse gradient, coalesced, equals the
    dense one with scale_grad_by_freq."""
    weight = make_weight(17, 5, torch.float64)
    ids, offsets = make_bags(17, padding_idx=2)
    grad_out = torch.randn(offsets.numel(), 5, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        w = weight.clone().requires_grad_()
        ee.embedding_bag(ids, w, offsets, mode=mode, padding_idx=2, scale_grad_by_freq=True,
                         sparse=sparse).backward(grad_out)
        grads.append(w.grad.to_dense())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_gradient_values_from_the_output_cache_are_all_written(mode):
    """The sparse gradient's values (here 4 MiB) come from the cache of freed outputs: a
    reused buffer left full of NaN by the previous step must be overwritten everywhere."""
    num_weights, dim, n = 1000, 64, 16384
    weight = make_weight(num_weights, dim, torch.float32)
    ids = torch.randint(0, num_weights, (n,))
    ids[::5] = 7  # padding, left out of the values
    offsets = torch.arange(0, n, 8)
    grad_out = torch.randn(n // 8, dim)

    def sparse_grad():
        w = weight.clone().requires_grad_()
        ee.embedding_bag(ids, w, offsets, mode=mode, sparse=True, padding_idx=7).backward(grad_out)
        return w.grad

    first = sparse_grad()
    pointer = first._values().data_ptr()
    first._values().fill_(float("nan"))
    del first
    second = sparse_grad()
    assert second._values().data_ptr() == pointer  # the same buffer, reused
    w = weight.clone().requires_grad_()
    F.embedding_bag(ids, w, offsets, mode=mode, sparse=True, padding_idx=7).backward(grad_out)
    theirs = w.grad
    assert not second._values().isnan().any()
    assert torch.equal(second._indices(), theirs._indices())
    torch.testing.assert_close(second._values(), theirs._values())
