"""Forward lookup against F.embedding over device x dtype x index dtype x shape x options."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from conftest import DEVICES, FLOAT_DTYPES, INDEX_DTYPES, SHAPES, make_indices, make_weight, poison


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_forward_matches_pytorch(device, dtype, index_dtype, shape, padding_idx):
    weight = make_weight(11, 7, dtype, device)
    idx = make_indices(shape, 11, device, index_dtype, padding_idx)
    poison(idx.numel() * 7, dtype, device)
    out = ee.embedding(idx, weight, padding_idx=padding_idx)
    ref = F.embedding(idx, weight, padding_idx=padding_idx)
    assert out.shape == (*idx.shape, 7) and out.dtype == dtype and out.device == weight.device
    assert out.is_contiguous()
    # A row copy: bitwise equal, and padding rows come back as stored.
    assert torch.equal(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [1, 3, 4, 8, 64, 257, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_row_widths(device, dim, dtype):
    """Every vector width the CUDA kernel picks (1..16 bytes) and rows longer than a warp."""
    weight = make_weight(50, dim, dtype, device)
    idx = make_indices((33,), 50, device)
    poison(33 * dim, dtype, device)
    assert torch.equal(ee.embedding(idx, weight), weight[idx])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_noncontiguous_weight_and_offset_storage(device):
    weight = make_weight(20, 6, torch.float32, device, noncontig=True)
    idx = make_indices("3d", 20, device)
    assert torch.equal(ee.embedding(idx, weight), F.embedding(idx, weight))
    # A view whose storage offset breaks 16-byte alignment.
    base = torch.randn(21 * 8 + 1, device=device)
    shifted = base[1:].view(21, 8)
    assert torch.equal(ee.embedding(idx, shifted), F.embedding(idx, shifted))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_fresh_tensor(device):
    weight = make_weight(5, 3, device=device)
    out = ee.embedding(torch.tensor(2, device=device), weight)
    assert out.shape == (3,)
    out.add_(1)
    assert not torch.equal(out, weight[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_weights,dim", [(0, 4), (5, 0), (0, 0)])
def test_degenerate_tables(device, num_weights, dim):
    weight = torch.randn(num_weights, dim, device=device, requires_grad=True)
    idx = torch.zeros(0, 3, dtype=torch.long, device=device)
    out = ee.embedding(idx, weight)
    assert out.shape == (0, 3, dim)
    out.sum().backward()
    assert weight.grad.shape == (num_weights, dim) and not weight.grad.any()
    if num_weights:
        idx = make_indices((4,), num_weights, device)
        out = ee.embedding(idx, weight)
        assert out.shape == (4, 0)
        out.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_integer_and_complex_weights_forward(device):
    """Like torch.embedding, the forward is a row copy for any dtype."""
    for dtype in (torch.int64, torch.int8, torch.complex64, torch.bool):
        weight = torch.randint(0, 2, (9, 5), device=device).to(dtype)
        idx = make_indices((4, 3), 9, device)
        assert torch.equal(ee.embedding(idx, weight), F.embedding(idx, weight))
