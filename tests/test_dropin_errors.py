"""Failing as PyTorch fails: each bad input raises an instance of the class PyTorch raises
(an out-of-range id: ee.EmbeddingIndexError, both IndexError and RuntimeError, on every op
family and device), with a message that keeps our detail and contains PyTorch's wording."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from embedding_ext import distributed
from conftest import DEVICES, make_weight


def _both(err):
    assert isinstance(err, IndexError) and isinstance(err, RuntimeError)
    assert isinstance(err, ee.EmbeddingIndexError)


def test_the_index_error_class_is_both_kinds():
    assert issubclass(ee.EmbeddingIndexError, IndexError)
    assert issubclass(ee.EmbeddingIndexError, RuntimeError)


def _lookup(device, ids, weight):
    return ee.embedding(ids, weight)


def _bag(device, ids, weight):
    return ee.embedding_bag(ids, weight, torch.tensor([0, 1], device=device), mode="sum")


def _bag_2d(device, ids, weight):
    return ee.embedding_bag(ids.reshape(1, -1), weight, mode="max")


def _module(device, ids, weight):
    emb = ee.Embedding(weight.shape[0], weight.shape[1], device=device)
    return emb(ids)


def _bag_module(device, ids, weight):
    bag = ee.EmbeddingBag(weight.shape[0], weight.shape[1], mode="mean", device=device)
    return bag(ids, torch.tensor([0], device=device))


def _fused(device, ids, weight):
    emb = ee.Embedding(weight.shape[0], weight.shape[1], device=device)
    ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    return emb(ids)


def _fused_bag(device, ids, weight):
    bag = ee.EmbeddingBag(weight.shape[0], weight.shape[1], mode="sum", device=device)
    ee.fuse_optimizer(bag, torch.optim.SGD, lr=0.1)
    return bag(ids, torch.tensor([0], device=device))


def _renorm(device, ids, weight):
    return ee.embedding(ids, weight, max_norm=1.0)


def _sharded_check(device, ids, weight):  # the row-sharded lookups' check before any collective
    distributed._check_ids(ids, weight.shape[0], "embedding")


FAMILIES = [_lookup, _bag, _bag_2d, _module, _bag_module, _fused, _fused_bag, _renorm,
            _sharded_check]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_id_is_both_index_and_runtime_error(device, family, bad):
    weight = make_weight(10, 4, device=device)
    ids = torch.tensor([1, bad, 2], device=device)
    previous = ee.synchronous_index_checks()
    ee.set_synchronous_index_checks(False)
    try:
        with pytest.raises(RuntimeError) as info:  # as F.embedding_bag raises
            family(device, ids, weight)
            if device == "cuda":
                ee.check_cuda_index_errors()  # the asynchronous path raises from a later call
    finally:
        ee.set_synchronous_index_checks(previous)
    _both(info.value)
    message = str(info.value)
    assert f"index {bad} at position 1" in message
    bag = family in (_bag, _bag_2d, _bag_module, _fused_bag)
    assert ("Expected idx >= 0 && idx < num_embeddings" if bag else
            "index out of range in self") in message


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_synchronous_index_error_is_both_kinds():
    weight = make_weight(10, 4, device="cuda")
    previous = ee.synchronous_index_checks()
    ee.set_synchronous_index_checks(True)
    try:
        with pytest.raises(IndexError) as info:
            ee.embedding_bag(torch.tensor([1, 12], device="cuda"), weight,
                             torch.tensor([0], device="cuda"))
    finally:
        ee.set_synchronous_index_checks(previous)
    _both(info.value)


def test_out_of_range_id_in_backward_is_both_kinds():
    weight = make_weight(10, 4).requires_grad_()
    grad = torch.ones(2, 4)
    with pytest.raises(IndexError) as info:
        ee.ops.embedding_dense_backward(grad, torch.tensor([1, 11]), 10, -1, False)
    _both(info.value)


def test_out_of_range_id_under_torch_compile_is_both_kinds():
    weight = make_weight(10, 4)
    compiled = torch.compile(lambda ids: ee.embedding_bag(ids, weight, torch.tensor([0]),
                                                          mode="sum") + 1, backend="eager")
    with pytest.raises(RuntimeError) as info:
        compiled(torch.tensor([1, 10]))
    _both(info.value)


# Every bad input beside out-of-range ids: (call, the class PyTorch raises, its wording).
W = torch.randn(10, 3)
L = torch.tensor
BAD_INPUTS = {
    "float ids": (lambda f: f.embedding(L([1.0]), W), RuntimeError,
                  "Expected tensor for argument #1 'indices' to have one of the following "
                  "scalar types: Long, Int"),
    "1-D weight": (lambda f: f.embedding(L([1]), torch.randn(10)), RuntimeError,
                   "'weight' must be 2-D"),
    "padding_idx": (lambda f: f.embedding(L([1]), W, padding_idx=10), AssertionError,
                    "Padding_idx must be within num_embeddings"),
    "bag float ids": (lambda f: f.embedding_bag(L([1.0]), W, L([0])), RuntimeError,
                      "to have one of the following scalar types: Long, Int"),
    "bag float offsets": (lambda f: f.embedding_bag(L([1]), W, L([0.0])), RuntimeError,
                          "to have one of the following scalar types: Long, Int"),
    "bag 3-D input": (lambda f: f.embedding_bag(L([[[1]]]), W), ValueError,
                      "input has to be 1D or 2D Tensor, but got Tensor of dimension 3"),
    "bag 2-D with offsets": (lambda f: f.embedding_bag(L([[1]]), W, L([0])), ValueError,
                             "if input is 2D, then offsets has to be None"),
    "bag no offsets": (lambda f: f.embedding_bag(L([1]), W), ValueError,
                       "offsets has to be a 1D Tensor but got None"),
    "bag 2-D offsets": (lambda f: f.embedding_bag(L([1]), W, L([[0]])), ValueError,
                        "offsets has to be a 1D Tensor"),
    "bag offsets[0]": (lambda f: f.embedding_bag(L([1, 2]), W, L([1])), RuntimeError,
                       "offsets[0] has to be 0, i.e., the first sequence in the mini-batch has "
                       "to start from position 0. However, got 1"),
    "bag offsets past": (lambda f: f.embedding_bag(L([1, 2]), W, L([0, 3])), RuntimeError,
                         "offsets[-1] can not be greater than input's length 2 but got "
                         "offsets[-1] of 3"),
    "bag padding_idx": (lambda f: f.embedding_bag(L([1]), W, L([0]), padding_idx=10),
                        RuntimeError, "padding_idx must be within the number of embeddings, "
                                      "-10 through 9, but got 10"),
    "bag mode": (lambda f: f.embedding_bag(L([1]), W, L([0]), mode="foo"), ValueError,
                 "mode has to be one of sum, mean or max"),
    "bag psw mode": (lambda f: f.embedding_bag(L([1]), W, L([0]), mode="mean",
                                               per_sample_weights=torch.ones(1)),
                     NotImplementedError, "per_sample_weights is only supported for mode='sum' "
                                          "(got mode='mean')"),
    "bag psw shape": (lambda f: f.embedding_bag(L([1]), W, L([0]), mode="sum",
                                                per_sample_weights=torch.ones(2)),
                      ValueError, "must have the same shape as the input"),
    "bag psw dtype": (lambda f: f.embedding_bag(L([1]), W, L([0]), mode="sum",
                                                per_sample_weights=torch.ones(1).double()),
                      RuntimeError, "have the same type as"),
    "bag max freq": (lambda f: f.embedding_bag(L([1]), W, L([0]), mode="max",
                                               scale_grad_by_freq=True),
                     ValueError, "max mode does not support scaling the gradient by the "
                                 "frequency"),
    "bag max sparse": (lambda f: f.embedding_bag(L([1]), W, L([0]), mode="max", sparse=True),
                       ValueError, "max mode does not support sparse weights"),
    "bag 1-D weight": (lambda f: f.embedding_bag(L([1]), torch.randn(10), L([0])), ValueError,
                       "weight has to be a 2D Tensor, but got Tensor of dimension 1"),
    "bag include_last_offset": (lambda f: f.embedding_bag(L([1]), W, L([], dtype=torch.long),
                                                          include_last_offset=True),
                                RuntimeError, "include_last_offset: number of offset should be "
                                              "at least 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_pytorchs_class_and_wording(case):
    call, kind, wording = BAD_INPUTS[case]
    with pytest.raises(kind) as theirs:
        call(F)
    assert wording in str(theirs.value), "PyTorch's own text changed"
    with pytest.raises(kind) as ours:
        call(ee)
    assert wording in str(ours.value)
    assert len(str(ours.value)) > len(wording)  # and our detail besides


@pytest.mark.parametrize("cls, wording", [(ee.Embedding, "Padding_idx must be within "
                                                         "num_embeddings"),
                                          (ee.EmbeddingBag, "padding_idx must be within "
                                                            "num_embeddings")])
def test_module_padding_idx_out_of_range_as_pytorch(cls, wording):
    with pytest.raises(AssertionError, match=wording):
        cls(10, 3, padding_idx=10)
