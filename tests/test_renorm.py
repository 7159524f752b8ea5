"""max_norm renorm: which rows change, by how much, for every p; no gradient through it."""
import math

import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from embedding_ext import reference
from conftest import DEVICES, FLOAT_DTYPES, INDEX_DTYPES, TOL, make_indices, make_weight

NORM_TYPES = [1.0, 2.0, math.inf, 0.5, 3.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("noncontig", [False, True])
def test_renorm_against_reference(device, dtype, index_dtype, norm_type, noncontig):
    weight = (make_weight(20, 9, dtype, device, noncontig) * 3)
    idx = make_indices((6, 5), 20, device, index_dtype, padding_idx=0)
    max_norm = 1.5 if norm_type != 0.5 else 40.0  # fractional p gives large "norms"
    before = weight.clone()
    expected = reference.renorm(before, idx, max_norm, norm_type)
    out = ee.embedding(idx, weight, padding_idx=0, max_norm=max_norm, norm_type=norm_type)
    torch.testing.assert_close(weight.double(), expected, **TOL[dtype])
    # The output is the lookup of the renormed weight.
    assert torch.equal(out, weight[idx])
    # Rows not referenced are untouched, bit for bit.
    untouched = torch.ones(20, dtype=torch.bool, device=device)
    untouched[idx.reshape(-1).long()] = False
    assert torch.equal(weight[untouched], before[untouched])
    # Referenced rows now respect max_norm (up to rounding of the scaled row).
    norms = reference.vector_norm(weight[idx.reshape(-1).long()], norm_type)
    assert (norms <= max_norm * (1 + 4 * TOL[dtype]["rtol"])).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.0])
def test_renorm_matches_pytorch(device, norm_type):
    """Against F.embedding where PyTorch is right. Its CUDA renorm is not for p outside
    {1, 2}: it omits abs() (p = 3) and computes pow(sum(pow(|x|, inf)), 1/inf) = 1 for
    p = inf, so it never renorms with max_norm=1 (docs/SPEC.md, beyond PyTorch): there the
    float64 reference is the expected result."""
    w_ours = make_weight(30, 16, torch.float32, device) * 2
    w_ref = w_ours.clone()
    idx = make_indices((40,), 30, device, padding_idx=3)
    out = ee.embedding(idx, w_ours, padding_idx=3, max_norm=1.0, norm_type=norm_type)
    if device == "cuda" and norm_type not in (1.0, 2.0):
        expected = reference.renorm(w_ref, idx, 1.0, norm_type)
        torch.testing.assert_close(w_ours.double(), expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(out, w_ours[idx])
        return
    ref = F.embedding(idx, w_ref, padding_idx=3, max_norm=1.0, norm_type=norm_type)
    torch.testing.assert_close(w_ours, w_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_renorm_version_counter_and_no_gradient(device):
    weight = (make_weight(10, 4, torch.float64, device) * 5).requires_grad_()
    idx = make_indices((8,), 10, device, padding_idx=1)
    version = weight._version
    out = ee.embedding(idx, weight, padding_idx=1, max_norm=1.0)
    assert weight._version > version
    out.sum().backward()
    # The gradient is that of a plain lookup: the renorm is not differentiated.
    expected = reference.dense_backward(torch.ones_like(out), idx, 10, 1)
    torch.testing.assert_close(weight.grad, expected.to(weight.grad.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_renorm_touches_padding_row_when_referenced(device):
    weight = torch.full((4, 3), 10.0, device=device)
    ee.embedding(torch.tensor([0, 2], device=device), weight, padding_idx=0, max_norm=1.0)
    assert torch.allclose(weight[0].norm(), torch.tensor(1.0, device=device))
    assert torch.equal(weight[1], torch.full((3,), 10.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_renorm_row_at_the_limit_is_left_alone(device):
    """Only norms strictly greater than max_norm are scaled."""
    weight = torch.tensor([[3.0, 4.0], [6.0, 8.0]], device=device)
    ee.embedding(torch.tensor([0, 1, 1], device=device), weight, max_norm=5.0)
    assert torch.equal(weight[0], torch.tensor([3.0, 4.0], device=device))
    torch.testing.assert_close(weight[1], torch.tensor([3.0, 4.0], device=device))
