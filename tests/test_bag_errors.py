"""ee.embedding_bag's refusals: each bad argument named, bad ids raised as IndexError on every
loop and instruction set, and a bad arg_max refused by the max-mode gradient's kernel and fake
kernel alike."""
import pytest
import torch

import embedding_ext as ee
from bags import make_bags
from conftest import call_op, each_cpu_isa, make_weight


@pytest.mark.parametrize("call, error, message", [
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([1])), RuntimeError,
     r"embedding_bag_forward: 'offsets\[0\]' must be 0"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2, 3]), w, torch.tensor([0, 2, 1])), RuntimeError,
     r"'offsets' must be non-decreasing, got offsets\[1\] = 2 > offsets\[2\] = 1"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([0, 5])), RuntimeError,
     r"'offsets\[1\]' = 5 is past the end of 'indices' \(2 ids\)"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 12]), w, torch.tensor([0])), IndexError,
     r"embedding_bag_forward: index 12 at position 1 .* 10 rows"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([0]), mode="mean",
                                per_sample_weights=torch.ones(2)), NotImplementedError,
     "only supported in mode='sum', got mode='mean'"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([0]), mode="avg"),
     ValueError, "'mode' must be 'sum', 'mean' or 'max', got 'avg'"),
    (lambda w: ee.embedding_bag(torch.tensor([[1, 2]]), w, torch.tensor([0])), ValueError,
     "'offsets' must be None for a 2-D input"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w), ValueError,
     "'offsets' is required for a 1-D input"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([0]), mode="max",
                                scale_grad_by_freq=True), ValueError, "max mode does not support"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([0]), mode="max",
                                sparse=True), ValueError, "max mode does not support sparse"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w[0], torch.tensor([0])), ValueError,
     r"'weight' must be 2-D, got a 1-D tensor"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([0]), padding_idx=10),
     RuntimeError, "padding_idx must be within the number of embeddings, -10 through 9, but got 10"),
    (lambda w: ee.embedding_bag(torch.tensor([1, 2]), w, torch.tensor([0]), mode="sum",
                                per_sample_weights=torch.ones(3)), ValueError,
     r"'per_sample_weights' must have the shape of 'input' \(2,\), got \(3,\)"),
])
def test_bag_errors_name_the_argument(call, error, message):
    weight = make_weight(10, 4, torch.float32)
    before = weight.clone()
    with pytest.raises(error, match=message):
        call(weight)
    assert torch.equal(weight, before)


# Register blocks, rows of half / 1 / 2 / 4 wide blocks, wide + 16-column blocks, the generic
# loop, and no columns at all.
@pytest.mark.parametrize("dim", [0, 5, 16, 64, 144, 256])
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sum+weights"])
@pytest.mark.parametrize("bad, where", [(-1, 37), (10, 0), (2**31 - 1, 59), (11, "trailing")])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_bad_ids_raise_index_error_in_every_path(dim, mode, bad, where, padding_idx, index_dtype):
    """Sum/mean check ids while pooling, max and the generic loop before: the same
    IndexError naming the first bad position either way, with every instruction set this CPU
    runs; -1 is an id, not "no padding"."""
    weight = make_weight(10, dim, torch.float32)
    ids, offsets = make_bags(10, padding_idx=padding_idx)  # 60 ids, the last bag 31..60
    include_last = where == "trailing"
    if include_last:  # CSR: ids 50.. in no bag, still checked (as PyTorch)
        offsets = torch.cat([offsets, torch.tensor([50])])
        where = 55
    ids[where] = bad
    ids, offsets = ids.to(index_dtype), offsets.to(index_dtype)
    psw = torch.rand(60) if mode == "sum+weights" else None

    def bad_call():
        with pytest.raises(IndexError, match=rf"index {bad} at position {where} .* 10 rows"):
            ee.embedding_bag(ids, weight, offsets, mode=mode.split("+")[0],
                             per_sample_weights=psw, include_last_offset=include_last,
                             padding_idx=padding_idx)
    assert len(each_cpu_isa(bad_call)) >= 1


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("arg_max", [torch.zeros(2, 3, dtype=torch.int64),
                                     torch.zeros(3, 4, dtype=torch.int32),
                                     torch.zeros(12, dtype=torch.int64)],
                         ids=["shape", "dtype", "1-D"])
def test_max_gradient_refuses_a_bad_arg_max(fake, arg_max):
    """The max-mode gradient reads arg_max as (bags, D) int64 row ids: a wrong shape or dtype
    is refused with the same message by the kernel and the fake kernel (torch.compile)."""
    grad = torch.randn(3, 4)
    ids, csr = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 3, 4])
    args = (grad, ids, csr, arg_max, 10, 2, None, -1, False)
    match = r"'arg_max' must be an int64 tensor of shape \(bags, D\) = \(3, 4\) in max mode"
    with pytest.raises(RuntimeError, match=match):
        call_op(torch.ops.embedding_ext.embedding_bag_dense_backward, args, fake)
