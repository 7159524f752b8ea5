"""ee.Embedding is interchangeable with nn.Embedding."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from embedding_ext import reference
from conftest import DEVICES, assert_close, make_indices, RecordOps


def test_is_a_torch_embedding_with_same_repr_and_state_dict():
    ours = ee.Embedding(10, 4, padding_idx=-1, max_norm=2.0, norm_type=1.0,
                        scale_grad_by_freq=True, sparse=True)
    ref = torch.nn.Embedding(10, 4, padding_idx=-1, max_norm=2.0, norm_type=1.0,
                             scale_grad_by_freq=True, sparse=True)
    assert isinstance(ours, torch.nn.Embedding)
    assert ours.extra_repr() == ref.extra_repr()
    assert ours.padding_idx == 9
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    assert torch.equal(ours.weight, ref.weight)


def test_padding_row_zeroed_at_construction_only():
    assert not ee.Embedding(6, 3, padding_idx=2).weight[2].any()
    w = torch.ones(6, 3)
    assert ee.Embedding(6, 3, padding_idx=2, _weight=w).weight[2].eq(1).all()
    assert ee.Embedding.from_pretrained(w, padding_idx=2).weight[2].eq(1).all()


def test_weight_used_without_copy_and_from_pretrained_shares_storage():
    w = torch.randn(6, 3)
    assert ee.Embedding(6, 3, _weight=w).weight.data_ptr() == w.data_ptr()
    emb = ee.Embedding.from_pretrained(w)
    assert emb.weight.data_ptr() == w.data_ptr()
    assert not emb.weight.requires_grad and isinstance(emb, ee.Embedding)
    assert ee.Embedding.from_pretrained(w, freeze=False).weight.requires_grad


def _check_runs_our_kernels_in(emb, dtype, device):
    """Forward (bitwise F.embedding) and backward (the float64 reference, within TOL) of the
    module in `dtype`, both computed by embedding_ext's ops."""
    assert emb.weight.dtype == dtype and emb.weight.device.type == device
    idx = make_indices((6, 7), emb.num_embeddings, device, padding_idx=emb.padding_idx)
    idx[0, :2] = emb.padding_idx
    emb.weight.grad = None
    with RecordOps() as rec:
        out = emb(idx)
        grad_out = torch.randn(out.shape, device=device).to(dtype)
        out.backward(grad_out)
    assert "embedding_ext.embedding_forward.default" in rec.ops
    assert "embedding_ext.embedding_dense_backward.default" in rec.ops
    assert not any(op.startswith("aten.embedding") for op in rec.ops)
    assert out.dtype == dtype and out.shape == (6, 7, emb.embedding_dim)
    assert torch.equal(out, F.embedding(idx, emb.weight.detach(), padding_idx=emb.padding_idx))
    grad = emb.weight.grad
    assert grad.dtype == dtype and grad.shape == emb.weight.shape
    expected = reference.dense_backward(grad_out, idx, emb.num_embeddings, emb.padding_idx,
                                        emb.scale_grad_by_freq)
    assert_close(grad, expected, dtype)
    assert torch.equal(grad[emb.padding_idx], torch.zeros_like(grad[0]))


@pytest.mark.parametrize("device", DEVICES)
def test_pickle_deepcopy_to_and_dtype(device):
    emb = ee.Embedding(8, 5, padding_idx=1, scale_grad_by_freq=True).to(device)
    for clone in (pickle.loads(pickle.dumps(emb)), copy.deepcopy(emb)):
        assert type(clone) is ee.Embedding and torch.equal(clone.weight, emb.weight)
    buf = io.BytesIO()
    torch.save(emb, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is ee.Embedding
    # .to(dtype) converts the module in place: each dtype on its own copy.
    for dtype in (torch.float64, torch.bfloat16, torch.float16, torch.float32):
        moved = copy.deepcopy(emb).to(dtype)
        assert type(moved) is ee.Embedding
        assert torch.equal(moved.weight.detach(), emb.weight.detach().to(dtype))
        _check_runs_our_kernels_in(moved, dtype, device)
    emb_bf16 = ee.Embedding(8, 5, padding_idx=1, dtype=torch.bfloat16, device=device)
    _check_runs_our_kernels_in(emb_bf16, torch.bfloat16, device)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_tying_with_output_layer(device):
    """A language model's tied input/output embedding: gradients from both uses add up."""
    emb = ee.Embedding(12, 4).to(device)
    head = torch.nn.Linear(4, 12, bias=False).to(device)
    head.weight = emb.weight
    ref_emb = torch.nn.Embedding(12, 4).to(device)
    ref_emb.load_state_dict(emb.state_dict())
    ref_head = torch.nn.Linear(4, 12, bias=False).to(device)
    ref_head.weight = ref_emb.weight
    idx = make_indices((5, 3), 12, device)
    head(emb(idx)).logsumexp(-1).sum().backward()
    ref_head(ref_emb(idx)).logsumexp(-1).sum().backward()
    torch.testing.assert_close(emb.weight.grad, ref_emb.weight.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_module_forward_matches_nn_embedding_with_every_option(device):
    kwargs = dict(padding_idx=0, max_norm=1.0, norm_type=2.0, scale_grad_by_freq=True)
    ref = torch.nn.Embedding(15, 6, **kwargs).to(device)
    ours = ee.Embedding(15, 6, **kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    idx = make_indices((4, 5), 15, device, padding_idx=0)
    out, out_ref = ours(idx), ref(idx)
    torch.testing.assert_close(out, out_ref)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
