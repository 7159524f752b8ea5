"""Forward lookup against F.embedding over device x dtype x index dtype x shape x options."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from embedding_ext import reference
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
        # D == 0 with rows: the lookup and its gradients are empty, but they keep their
        # shape, dtype and device, the padding/scale options still take their code paths...
        for options in (dict(), dict(padding_idx=1, scale_grad_by_freq=True),
                        dict(padding_idx=1, scale_grad_by_freq=True, sparse=True)):
            weight.grad = None
            idx = make_indices((4, 3), num_weights, device, padding_idx=options.get("padding_idx"))
            idx[0, :2] = 1  # a duplicate, at the padding row when there is one
            out = ee.embedding(idx, weight, **options)
            assert out.shape == (4, 3, 0) and out.dtype == weight.dtype and out.device == weight.device
            out.sum().backward()
            grad = weight.grad.to_dense() if options.get("sparse") else weight.grad
            assert weight.grad.is_sparse == bool(options.get("sparse"))
            assert grad.shape == (num_weights, 0) and grad.dtype == weight.dtype
            assert grad.device == weight.device
            expected = reference.dense_backward(torch.zeros(4, 3, 0, device=device), idx, num_weights,
                                                options.get("padding_idx"),
                                                options.get("scale_grad_by_freq", False))
            assert torch.equal(grad, expected.to(weight.dtype))
        # ...and an out-of-range id is still reported, by the lookup and by the backward op.
        bad = torch.tensor([1, num_weights, 0], device=device)
        message = (rf"index {num_weights} at position 1 \(row-major\) is out of range for 'weight' "
                   rf"with {num_weights} rows; valid indices are 0 <= index < {num_weights}")
        ee.set_synchronous_index_checks(True)
        try:
            with pytest.raises(IndexError, match="embedding_forward: " + message):
                ee.embedding(bad, weight)
            with pytest.raises(IndexError, match="embedding_dense_backward: " + message):
                torch.ops.embedding_ext.embedding_dense_backward(
                    torch.zeros(3, 0, device=device), bad, num_weights, -1, False)
        finally:
            ee.set_synchronous_index_checks(False)


@pytest.mark.parametrize("device", DEVICES)
def test_integer_and_complex_weights_forward(device):
    """Like torch.embedding, the forward is a row copy for any dtype."""
    for dtype in (torch.int64, torch.int8, torch.complex64, torch.bool):
        weight = torch.randint(0, 2, (9, 5), device=device).to(dtype)
        idx = make_indices((4, 3), 9, device)
        assert torch.equal(ee.embedding(idx, weight), F.embedding(idx, weight))


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode(device):
    """Inference tensors skip autograd: the lookup op's kernel below autograd runs."""
    weight = make_weight(12, 5, device=device)
    idx = make_indices((3, 4), 12, device, padding_idx=2)
    with torch.inference_mode():
        out = ee.embedding(idx, weight, padding_idx=2, scale_grad_by_freq=True)
    assert torch.equal(out, F.embedding(idx, weight)) and out.is_inference()


@pytest.mark.parametrize("dtype, dim", [(torch.float16, 128), (torch.bfloat16, 64),
                                        (torch.float32, 20), (torch.float32, 3)])
def test_large_outputs_match_index_select(dtype, dim):
    """Outputs of 4 MiB and more are written with streaming stores where rows are a
    multiple of 16 bytes (the others with plain copies): the same values as index_select."""
    weight = torch.randn(5000, dim).to(dtype)
    n = (5 << 20) // (dim * weight.element_size()) + 3
    ids = torch.randint(0, 5000, (n,))
    torch.testing.assert_close(ee.embedding(ids, weight), weight.index_select(0, ids),
                               rtol=0, atol=0)
    with pytest.raises(IndexError, match=f"index 5000 at position {n - 1}"):
        ee.embedding(torch.cat([ids[:-1], ids.new_tensor([5000])]), weight)
