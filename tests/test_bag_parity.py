"""ee.embedding_bag (CPU, and CUDA where a GPU is visible): outputs and gradients against
PyTorch and the float64 reference, every mode, padding, per_sample_weights, both input forms,
CSR offsets, scale_grad_by_freq, fp16/bf16 pooled in fp32, the register-blocked widths, and
any bags hypothesis draws. Duplicates and empty bags in every case."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import embedding_ext as ee
from embedding_ext import reference
from bags import MODES, grads_of, make_bags
from conftest import DEVICES, TOL, make_weight, poison

_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("padding_idx", [None, 0, -2])
@pytest.mark.parametrize("mode", MODES + ["sum+weights", "sum+freq", "mean+freq",
                                  "sum+weights+freq"])
@pytest.mark.parametrize("form", ["offsets", "include_last_offset", "2d"])
@pytest.mark.parametrize("device", DEVICES)
def test_bag_matches_pytorch(dtype, index_dtype, padding_idx, mode, form, device):
    num_weights, dim = 17, 5
    pad = None if padding_idx is None else padding_idx % num_weights
    weight = make_weight(num_weights, dim, dtype, device)
    ids, offsets = make_bags(num_weights, index_dtype, pad)
    if form == "include_last_offset":
        offsets = torch.cat([offsets, torch.tensor([ids.numel()], dtype=index_dtype)])
    elif form == "2d":
        ids, offsets = ids.reshape(6, 10), None
    ids = ids.to(device)
    offsets = None if offsets is None else offsets.to(device)
    kwargs = dict(mode=mode.split("+")[0], padding_idx=padding_idx,
                  include_last_offset=form == "include_last_offset",
                  scale_grad_by_freq="freq" in mode)
    psw = torch.randn(ids.shape, dtype=dtype, device=device) if "weights" in mode else None
    bags = 6 if form == "2d" else offsets.numel() - (form == "include_last_offset")
    grad_out = torch.randn(bags, dim, dtype=dtype, device=device)
    poison(bags * dim, dtype, device)
    ours, our_grads = grads_of(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out, psw=psw,
                               **kwargs)
    theirs, their_grads = grads_of(F.embedding_bag, weight, ids, offsets, grad_out=grad_out,
                                   psw=psw, **kwargs)
    if kwargs["scale_grad_by_freq"] and _TORCH < (2, 14):
        # PyTorch < 2.14's CPU scales by the wrong row's count (pytorch/pytorch#190063, fixed
        # in 2.14): compare the weight gradient with the float64 reference instead.
        their_grads = (_freq_scaled_reference_grad(weight, ids, offsets, psw, grad_out, pad,
                                                   **kwargs),) + tuple(their_grads[1:])
    assert ours.dtype == dtype and ours.shape == (bags, dim)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])
    if pad is not None:
        assert not our_grads[0][pad].any(), "the padding row gets no gradient"


def _freq_scaled_reference_grad(weight, ids, offsets, psw, grad_out, pad, mode,
                                include_last_offset, **_):
    """The float64 weight gradient with scale_grad_by_freq: the reference's gradient, each
    row divided by its count among the ids in bags (padding excluded)."""
    from embedding_ext.functional import _bag_layout
    flat, csr, flat_psw = _bag_layout(ids, offsets, psw, include_last_offset)
    w64 = weight.double().requires_grad_()
    p64 = None if flat_psw is None else flat_psw.double()
    out = reference.bag_forward(w64, flat, csr, mode, p64, pad)
    (grad,) = torch.autograd.grad(out, w64, grad_out.double())
    in_bags = flat[:int(csr[-1])].long()
    if pad is not None:
        in_bags = in_bags[in_bags != pad]
    counts = torch.bincount(in_bags, minlength=weight.shape[0]).clamp_min(1)
    return (grad / counts[:, None]).to(weight.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES + ["sum+weights"])
def test_bag_low_precision_pools_in_fp32(dtype, mode):
    """Against the float64 reference (PyTorch's CPU pools fp16/bf16 in the low precision
    on some paths): one rounding of an fp32 pool, and fp32-accumulated gradients."""
    weight = make_weight(40, 24, dtype)
    ids, offsets = make_bags(40, padding_idx=2)
    csr = torch.cat([offsets, torch.tensor([ids.numel()])])
    psw = torch.randn(ids.shape, dtype=dtype) if mode == "sum+weights" else None
    m = mode.split("+")[0]
    grad_out = torch.randn(csr.numel() - 1, 24, dtype=dtype)
    ours, our_grads = grads_of(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out, psw=psw,
                               mode=m, padding_idx=2)
    w64 = weight.double().requires_grad_()
    p64 = None if psw is None else psw.double().requires_grad_()
    expected = reference.bag_forward(w64, ids, csr, m, p64, 2)
    ref_grads = torch.autograd.grad(expected, (w64,) if p64 is None else (w64, p64),
                                    grad_out.double())
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.double(), expected.detach(), **tol)
    for a, b in zip(our_grads, ref_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)


# Two terms of one row's gradient that cancel: (1 + u)^2 - (1 + 2u) = u^2, with u the
# dtype's ulp at 1 (exact in float64). Rounded to the dtype one term at a time, the
# first term loses its u^2 and the row sums to 0.
_CANCELLING_U = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_bag_low_precision_gradient_terms_are_not_rounded_before_the_sum(dtype, device):
    """The fp16/bf16 weight gradient of a row sums its terms (grad_output times
    per_sample_weights) in fp32 and rounds once, as PyTorch does: a row whose terms cancel
    keeps the remainder. (The first GPU run found the CUDA kernels rounding each term.)"""
    u = _CANCELLING_U[dtype]
    weight = make_weight(4, 8, dtype, device)
    ids = torch.tensor([1, 1, 3], device=device)
    offsets = torch.tensor([0, 1, 2], device=device)  # bag 0: term 1, bag 1: term 2, bag 2: row 3
    psw = torch.tensor([1 + u, -1.0, 1.0], dtype=dtype, device=device)
    grad_out = torch.tensor([[1 + u] * 8, [1 + 2 * u] * 8, [0.5] * 8], dtype=dtype, device=device)
    assert psw[0].item() == 1 + u and grad_out[1, 0].item() == 1 + 2 * u  # exact in the dtype
    _, (grad_weight, _) = grads_of(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out,
                                   psw=psw, mode="sum")
    expected = torch.zeros(4, 8, dtype=torch.float64)
    expected[1] = u * u
    expected[3] = 0.5
    assert u * u == expected.to(dtype)[1, 0].item()  # the remainder is exact in the dtype
    torch.testing.assert_close(grad_weight.cpu(), expected.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [16, 32, 48, 64, 80, 128, 144, 256])
@pytest.mark.parametrize("mode", MODES + ["sum+weights"])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_bag_register_blocks(dtype, dim, mode, padding_idx):
    """Widths that are multiples of 16 take the register-blocked loops (blocks of 8 vector
    registers for sum/mean, rows of half, 1, 2 or 4 such blocks as a special case, then
    16 columns; blocks of 4 vectors, then 16 columns, for max), compiled for the best
    instruction set the CPU has:
    against the float64 reference, and PyTorch for fp32/fp64, ties included."""
    weight = make_weight(40, dim, dtype)
    weight[5] = weight[6]  # a tie between two rows for max
    ids, offsets = make_bags(40, padding_idx=padding_idx)
    ids[31:33] = torch.tensor([5, 6])
    csr = torch.cat([offsets, torch.tensor([ids.numel()])])
    psw = torch.randn(ids.shape, dtype=dtype) if mode == "sum+weights" else None
    m = mode.split("+")[0]
    poison(csr.numel() * dim, dtype, "cpu")
    ours = ee.embedding_bag(ids, weight, offsets, mode=m, padding_idx=padding_idx,
                            per_sample_weights=psw)
    expected = reference.bag_forward(weight, ids, csr, m, psw, padding_idx)
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.double(), expected, **tol)
    if dtype in (torch.float32, torch.float64):
        kwargs = dict(mode=m, padding_idx=padding_idx, grad_out=torch.randn_like(ours), psw=psw)
        theirs, their_grads = grads_of(F.embedding_bag, weight, ids, offsets, **kwargs)
        ours, our_grads = grads_of(ee.embedding_bag, weight, ids, offsets, **kwargs)
        torch.testing.assert_close(ours, theirs, **TOL[dtype])
        for a, b in zip(our_grads, their_grads):  # max: the arg-max rows match PyTorch's
            # The per_sample_weights gradient is a D-term dot product per id, summed in
            # another order than PyTorch's: its rounding grows with D.
            atol = TOL[dtype]["atol"] * (dim if a.dim() == 1 else 1)
            torch.testing.assert_close(a, b, rtol=TOL[dtype]["rtol"], atol=atol)


@settings(max_examples=120, deadline=None)
@given(data=st.data(), mode=st.sampled_from(MODES), num_weights=st.integers(1, 12),
       dim=st.sampled_from([0, 1, 3, 5, 9, 16, 32, 48, 64]), padding=st.booleans(),
       index_dtype=st.sampled_from([torch.int32, torch.int64]), weighted=st.booleans(),
       freq=st.booleans(), sparse=st.booleans(), trailing=st.integers(0, 3))
def test_bag_hypothesis_against_reference(data, mode, num_weights, dim, padding, index_dtype,
                                          weighted, freq, sparse, trailing):
    """Any bag lengths (empty bags included), duplicates, padding, offsets with ids after the
    last offset (include_last_offset: they join the last bag), int32/int64 ids, per_sample_weights, scale_grad_by_freq and sparse
    gradients, register-block widths: output, weight gradient and per_sample_weights
    gradient against the float64 reference."""
    weighted = weighted and mode == "sum"
    freq = freq and mode != "max"
    sparse = sparse and mode != "max"
    lengths = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=8))
    n = sum(lengths) + trailing
    ids = torch.tensor(data.draw(st.lists(st.integers(0, num_weights - 1), min_size=n,
                                          max_size=n)), dtype=index_dtype)
    csr = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=index_dtype)
    pad = data.draw(st.integers(0, num_weights - 1)) if padding else None
    weight = torch.randn(num_weights, dim, dtype=torch.float64, requires_grad=True)
    psw = torch.randn(n, dtype=torch.float64, requires_grad=True) if weighted else None
    out = ee.embedding_bag(ids, weight, csr, mode=mode, padding_idx=pad, include_last_offset=True,
                           per_sample_weights=psw, scale_grad_by_freq=freq, sparse=sparse)
    # include_last_offset: the ids after the last offset join the last bag.
    full = torch.cat([csr[:-1], csr.new_full((1,), n)])
    expected = reference.bag_forward(weight, ids, full, mode, psw, pad)
    torch.testing.assert_close(out, expected.detach())
    grad_out = torch.randn_like(out)
    inputs = (weight,) if psw is None else (weight, psw)
    ours = torch.autograd.grad(out, inputs, grad_out)
    ref = list(torch.autograd.grad(expected, inputs, grad_out, allow_unused=True))
    ref = [torch.zeros_like(x) if g is None else g for g, x in zip(ref, inputs)]
    if freq:  # each row's gradient over its count among the pooled, non-padding ids
        pooled = ids.long()
        pooled = pooled[pooled != (-1 if pad is None else pad)]
        counts = torch.bincount(pooled, minlength=num_weights).clamp(min=1)
        ref[0] = ref[0] / counts[:, None]
    assert ours[0].is_sparse == sparse
    torch.testing.assert_close(ours[0].to_dense() if sparse else ours[0], ref[0])
    if psw is not None:
        torch.testing.assert_close(ours[1], ref[1])
