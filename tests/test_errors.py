"""Every bad input gets an error that names the argument, the rule and the value."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from conftest import DEVICES, call_op, make_weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,name", [(torch.float32, "Float"), (torch.int16, "Short"),
                                        (torch.uint8, "Byte"), (torch.bool, "Bool")])
def test_index_dtype(device, dtype, name):
    weight = make_weight(5, 3, device=device)
    idx = torch.tensor([1, 2], device=device).to(dtype)
    with pytest.raises(RuntimeError, match=f"'indices' must be an int64 or int32 tensor, got {name}"):
        ee.embedding(idx, weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_weight_must_be_2d(device, shape):
    weight = torch.randn(shape, device=device)
    with pytest.raises(RuntimeError, match="'weight' must be 2-D"):
        ee.embedding(torch.tensor([0], device=device), weight)
    with pytest.raises(RuntimeError, match="'weight' must be 2-D"):
        torch.ops.embedding_ext.embedding_forward(weight, torch.tensor([0], device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [10, -1, 1 << 40])
@pytest.mark.parametrize("options", [dict(), dict(max_norm=1.0), dict(scale_grad_by_freq=True)])
def test_out_of_range_index(device, bad, options):
    weight = make_weight(10, 3, device=device).requires_grad_()
    idx = torch.tensor([[1, 2], [bad, 3]], device=device)
    ee.set_synchronous_index_checks(True)
    try:
        with pytest.raises(IndexError, match=rf"index {bad} at position 2 .* 10 rows; valid indices are 0 <= index < 10"):
            ee.embedding(idx, weight, **options)
    finally:
        ee.set_synchronous_index_checks(False)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_index_in_backward_ops(device):
    g = torch.randn(3, 2, device=device)
    idx = torch.tensor([0, 7, 1], device=device)
    ee.set_synchronous_index_checks(True)
    try:
        for call in (lambda: torch.ops.embedding_ext.embedding_dense_backward(g, idx, 5, -1, False),
                     lambda: torch.ops.embedding_ext.embedding_sparse_backward(g, idx, 5, -1, False),
                     lambda: torch.ops.embedding_ext.embedding_scaled_gather(torch.randn(5, 2, device=device), idx, -1, True)):
            with pytest.raises(IndexError, match="index 7 at position 1"):
                call()
    finally:
        ee.set_synchronous_index_checks(False)


@pytest.mark.parametrize("padding_idx", [10, 11, -11, -100])
def test_padding_idx_out_of_range(padding_idx):
    weight = make_weight(10, 3)
    for fn in (ee.embedding, F.embedding):
        with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
            fn(torch.tensor([1]), weight, padding_idx=padding_idx)
    with pytest.raises(AssertionError, match="Padding_idx must be within num_embeddings"):
        ee.Embedding(10, 3, padding_idx=padding_idx)


def test_weight_shape_mismatch():
    with pytest.raises(AssertionError, match="Shape of weight does not match num_embeddings and embedding_dim"):
        ee.Embedding(10, 3, _weight=torch.randn(10, 4))


def test_from_pretrained_needs_2d():
    with pytest.raises(AssertionError, match="Embeddings parameter is expected to be 2-dimensional"):
        ee.Embedding.from_pretrained(torch.randn(4))


@pytest.mark.parametrize("num_embeddings,embedding_dim", [(-1, 3), (3, -2)])
def test_negative_sizes(num_embeddings, embedding_dim):
    with pytest.raises(ValueError, match=rf"num_embeddings={num_embeddings}, embedding_dim={embedding_dim}"):
        ee.Embedding(num_embeddings, embedding_dim)


@pytest.mark.parametrize("max_norm,norm_type,message", [
    (math.nan, 2.0, "'max_norm' must be a finite number >= 0, got nan"),
    (math.inf, 2.0, "'max_norm' must be a finite number >= 0, got inf"),
    (-1.0, 2.0, "'max_norm' must be a finite number >= 0, got -1"),
    (1.0, 0.0, "'norm_type' must be > 0 \\(inf allowed\\), got 0"),
    (1.0, -2.0, "'norm_type' must be > 0 \\(inf allowed\\), got -2"),
    (1.0, math.nan, "'norm_type' must be > 0 \\(inf allowed\\), got nan"),
])
def test_renorm_arguments(max_norm, norm_type, message):
    weight = make_weight(5, 3)
    before = weight.clone()
    with pytest.raises(RuntimeError, match=message):
        ee.embedding(torch.tensor([1]), weight, max_norm=max_norm, norm_type=norm_type)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("op", ["embedding_dense_backward", "embedding_sparse_backward"])
@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("num_weights,padding_idx,message", [
    (-1, -1, "'num_weights' must be >= 0, got -1"),
    (5, 5, r"'padding_idx' must be < num_weights \(5\) or negative for none, got 5"),
], ids=["num_weights", "padding_idx"])
def test_backward_arguments(op, fake, num_weights, padding_idx, message):
    """One backward check (csrc/checks.h check_backward_args) for every backward op, and the
    fake kernels say the same. (A padding_idx no id can equal once let the CUDA sparse
    backward write outside its output.)"""
    args = (torch.randn(2, 3), torch.tensor([0, 1]), num_weights, padding_idx, False)
    with pytest.raises(RuntimeError, match=f"{op}: {message}" if fake else f"^{op}: {message}"):
        call_op(getattr(torch.ops.embedding_ext, op), args, fake)


def test_grad_output_shape():
    with pytest.raises(RuntimeError, match=r"'grad_output' must have shape indices.shape \+ \(D,\)"):
        torch.ops.embedding_ext.embedding_dense_backward(torch.randn(3, 4), torch.tensor([1, 2]), 5, -1, False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_mixed_devices():
    """A CUDA tensor among the arguments dispatches to the CUDA kernel, whose first failing
    check (csrc/checks.h, csrc/cuda/) decides the message. The whole message is matched,
    device names included."""
    def exactly(message):
        return "^" + re.escape(message) + r"\Z"

    cuda = torch.device("cuda", torch.cuda.current_device())  # what c10 prints: "cuda:0"
    weight_cuda = make_weight(5, 3, device=cuda)
    weight_cpu = make_weight(5, 3)
    idx_cpu = torch.tensor([1])
    idx_cuda = torch.tensor([1], device=cuda)
    # The lookups: check_lookup_args -> check_same_device(weight, indices), weight first.
    with pytest.raises(RuntimeError, match=exactly(
            f"embedding_forward: 'weight' and 'indices' must be on the same device, got {cuda} and cpu")):
        ee.embedding(idx_cpu, weight_cuda)
    with pytest.raises(RuntimeError, match=exactly(
            f"embedding_forward: 'weight' and 'indices' must be on the same device, got cpu and {cuda}")):
        ee.embedding(idx_cuda, weight_cpu)
    big = weight_cpu * 10
    before = big.clone()
    with pytest.raises(RuntimeError, match=exactly(
            f"embedding_renorm_: 'weight' and 'indices' must be on the same device, got cpu and {cuda}")):
        ee.embedding(idx_cuda, big, max_norm=1.0)
    assert torch.equal(big, before)  # nothing renormed
    # The CUDA gradient ops first require grad_output on CUDA, then on the indices' device.
    with pytest.raises(RuntimeError, match=exactly(
            "embedding_dense_backward: 'grad_output' must be a CUDA tensor here, got cpu")):
        torch.ops.embedding_ext.embedding_dense_backward(torch.randn(1, 3), idx_cuda, 5, -1, False)
    with pytest.raises(RuntimeError, match=exactly(
            f"embedding_dense_backward: 'grad_output' and 'indices' must be on the same device, "
            f"got {cuda} and cpu")):
        torch.ops.embedding_ext.embedding_dense_backward(torch.randn(1, 3, device=cuda), idx_cpu,
                                                         5, -1, False)
