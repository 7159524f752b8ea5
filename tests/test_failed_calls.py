"""A call that raises changes nothing: the in-place ops (renorm, fused update, their bag
forms) check every input before their first write, their fakes refuse what their kernels
refuse, and the ops bump the versions of what they write however they are called."""
from __future__ import annotations

import pytest
import torch

import embedding_ext as ee
from conftest import DEVICES, HAS_CUDA, call_op

ops = torch.ops.embedding_ext


# --- A bag with max_norm checks its offsets (and the rest) before renorming.

BAD_BAG_LAYOUTS = [
    pytest.param([1], {}, "'offsets\\[0\\]' must be 0", id="first-offset-not-zero"),
    pytest.param([0, 5], {"include_last_offset": True}, "past the end", id="offset-past-end"),
    pytest.param([0, 2, 1], {"include_last_offset": True}, "non-decreasing", id="decreasing"),
]


@pytest.mark.parametrize("offsets, kwargs, message", BAD_BAG_LAYOUTS)
def test_bag_with_max_norm_and_bad_offsets_leaves_weight_alone(offsets, kwargs, message):
    weight = torch.full((2, 2), 3.0)
    with pytest.raises(RuntimeError, match=message):
        ee.embedding_bag(torch.tensor([0, 1]), weight, torch.tensor(offsets), max_norm=1.0,
                         **kwargs)
    assert torch.equal(weight, torch.full((2, 2), 3.0))
    assert weight._version == 0


def test_bag_module_with_max_norm_and_bad_offsets_leaves_weight_alone():
    bag = ee.EmbeddingBag(4, 3, max_norm=0.5, mode="mean")
    before = bag.weight.detach().clone()
    with pytest.raises(RuntimeError, match="must be 0"):
        bag(torch.tensor([0, 1, 2]), torch.tensor([1, 2]))
    assert torch.equal(bag.weight.detach(), before)


def test_fused_bag_with_max_norm_and_bad_offsets_leaves_weight_alone():
    bag = ee.EmbeddingBag(4, 3, max_norm=0.5)
    ee.fuse_optimizer(bag, torch.optim.SGD, lr=0.1)
    before = bag.weight.detach().clone()
    with pytest.raises(RuntimeError, match="must be 0"):
        bag(torch.tensor([0, 1, 2]), torch.tensor([2]))
    assert torch.equal(bag.weight.detach(), before)


def test_bag_with_max_norm_still_renorms_good_calls():
    weight = torch.full((2, 2), 3.0)
    ee.embedding_bag(torch.tensor([0, 1]), weight, torch.tensor([0]), max_norm=1.0)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(2))


# --- The in-place ops bump the versions of what they write, called any way.

def test_direct_renorm_bumps_the_weight_version():
    weight = torch.full((3, 2), 3.0)
    ops.embedding_renorm_(weight, torch.tensor([0]), 1.0, 2.0)
    assert weight._version == 1


def test_failed_renorm_keeps_the_version():
    weight = torch.full((3, 2), 3.0)
    with pytest.raises(IndexError):
        ops.embedding_renorm_(weight, torch.tensor([0, 3]), 1.0, 2.0)
    assert weight._version == 0 and torch.equal(weight, torch.full((3, 2), 3.0))


def test_direct_renorm_of_a_saved_weight_fails_backward():
    weight = torch.full((3, 2), 3.0, requires_grad=True)
    out = (weight * weight).sum()  # saves weight
    with torch.no_grad():
        ops.embedding_renorm_(weight, torch.tensor([1]), 1.0, 2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("rule", [0, 1, 2, 3])
def test_direct_fused_update_bumps_weight_and_state_versions(rule):
    weight = torch.ones(4, 3)
    states = {0: (None, None), 1: (torch.zeros(4, 3), None),
              2: (torch.zeros(4, 3), torch.zeros(4, 3)), 3: (torch.zeros(4), None)}[rule]
    ops.embedding_fused_update_(weight, torch.ones(2, 3), torch.tensor([0, 2]), -1, False, rule,
                                *states, 0.1, 1e-8, 0.9, 0.999, 0.0, 1)
    assert weight._version == 1
    assert [s._version for s in states if s is not None] == [1] * (rule in (1, 2, 3)) + [1] * (rule == 2)


def test_direct_fused_update_of_a_saved_weight_fails_backward():
    weight = torch.ones(4, 3, requires_grad=True)
    out = (weight * weight).sum()
    with torch.no_grad():
        ops.embedding_fused_update_(weight, torch.ones(1, 3), torch.tensor([1]), -1, False, 0,
                                    None, None, 0.1, 0.0, 0.0, 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


# --- Fakes refuse what the kernels refuse.

def _fused_args(weight, state1=None, rule=1):
    state1 = torch.zeros(4, 3) if state1 is None else state1
    return (weight, torch.ones(2, 3), torch.tensor([0, 2]), -1, False, rule, state1, None,
            0.1, 1e-8, 0.9, 0.999, 0.0, 1)


def _renorm_args(weight=None, indices=None, max_norm=1.0, norm_type=2.0):
    return (torch.ones(4, 3) if weight is None else weight,
            torch.tensor([0, 2]) if indices is None else indices, max_norm, norm_type)


def _fused_case(rule=1, step=1, grad=None, state1=None, state2=None, indices=None):
    return (torch.ones(4, 3), torch.ones(2, 3) if grad is None else grad,
            torch.tensor([0, 2]) if indices is None else indices, -1, False, rule, state1,
            state2, 0.1, 1e-8, 0.9, 0.999, 0.0, step)


# Every argument check of the mutating ops, through kernel and fake alike.
MUTATING_REFUSED = [
    (ops.embedding_renorm_.default, lambda: _renorm_args(weight=torch.ones(4)), "2-D"),
    (ops.embedding_renorm_.default, lambda: _renorm_args(indices=torch.tensor([0.0])), "int64"),
    (ops.embedding_renorm_.default, lambda: _renorm_args(max_norm=-1.0), "max_norm"),
    (ops.embedding_renorm_.default, lambda: _renorm_args(norm_type=0.0), "norm_type"),
    (ops.embedding_fused_update_.default, lambda: _fused_case(rule=0, grad=torch.ones(3, 3)),
     "grad_output"),
    (ops.embedding_fused_update_.default, lambda: _fused_case(rule=0, grad=torch.ones(2, 5)),
     "width"),
    (ops.embedding_fused_update_.default,
     lambda: _fused_case(rule=0, grad=torch.ones(2, 3, dtype=torch.float64)), "dtype"),
    (ops.embedding_fused_update_.default, lambda: _fused_case(rule=4), "rule"),
    (ops.embedding_fused_update_.default, lambda: _fused_case(rule=0, step=0), "step"),
    (ops.embedding_fused_update_.default, lambda: _fused_case(rule=1), "state1"),
    (ops.embedding_fused_update_.default,
     lambda: _fused_case(rule=2, state1=torch.zeros(4, 3)), "state2"),
    (ops.embedding_fused_update_.default,
     lambda: _fused_case(rule=3, state1=torch.zeros(4, 3)), "state1"),
    (ops.embedding_fused_update_.default,
     lambda: _fused_case(rule=1, state1=torch.zeros(4, 3, dtype=torch.float64)), "state1"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("op, make_args, message", MUTATING_REFUSED,
                         ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(MUTATING_REFUSED)])
def test_mutating_ops_refuse_alike_and_change_nothing(op, make_args, message, fake):
    args = make_args()
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(RuntimeError, match=message):
        call_op(op, args, fake)
    after = [a for a in args if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) and a._version == 0 for a, b in zip(after, before))


REFUSED = [
    pytest.param(ops.embedding_bag_sparse_backward.default,
                 lambda: (torch.ones(1, 3), torch.tensor([0, 1]), torch.tensor([0, 2]), 4, 0,
                          None, 4, False),
                 "padding_idx", id="bag-sparse-padding-idx-past-the-table"),
    pytest.param(ops.embedding_fused_update_.default,
                 lambda: _fused_args(torch.ones(3, 4).t()),
                 "stride", id="fused-weight-rows-not-contiguous"),
    pytest.param(ops.embedding_fused_update_.default,
                 lambda: _fused_args(torch.ones(4, 3), torch.zeros(3, 4).t()),
                 "contiguous", id="fused-state-not-contiguous"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("op, make_args, message", REFUSED)
def test_fake_refuses_what_the_kernel_refuses(op, make_args, message, fake):
    with pytest.raises(RuntimeError, match=message):
        call_op(op, make_args(), fake)


# --- CUDA: a bad id never reaches a torch optimizer through the sparse gradient.

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
def test_cuda_sparse_gradient_with_bad_id_and_sgd_keeps_context_usable():
    weight = torch.nn.Parameter(torch.randn(5, 4, device="cuda"))
    opt = torch.optim.SGD([weight], lr=0.1)
    out = ee.embedding(torch.tensor([1, 7, 2], device="cuda"), weight, sparse=True)
    with pytest.raises(IndexError, match="index 7 at position 1"):
        ee.check_cuda_index_errors()  # the forward's report, so that the backward runs
    out.sum().backward()
    assert int(weight.grad.coalesce().indices().max()) < 5
    opt.step()  # no out-of-bounds row: the bad entry is a zero row
    with pytest.raises(IndexError, match="index 7 at position 1"):
        ee.check_cuda_index_errors()
    torch.cuda.synchronize()  # the context is still usable
    good = torch.tensor([0, 4], device="cuda")
    assert torch.equal(ee.embedding(good, weight), weight.detach()[good])


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_gradient_of_good_ids_is_unchanged(device):
    weight = torch.randn(5, 4, device=device, requires_grad=True)
    ids = torch.tensor([1, 3, 1], device=device)
    ee.embedding(ids, weight, sparse=True).sum().backward()
    expected = torch.zeros(5, 4, device=device)
    expected.index_add_(0, ids, torch.ones(3, 4, device=device))
    torch.testing.assert_close(weight.grad.to_dense(), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.parametrize("optimizer_class, kwargs", [
    (torch.optim.SGD, {"lr": 0.1}), (torch.optim.Adagrad, {"lr": 0.1}),
    (torch.optim.SparseAdam, {"lr": 0.1})], ids=["sgd", "adagrad", "sparse-adam"])
def test_cuda_fused_bag_with_padding_and_bad_id_updates_nothing(optimizer_class, kwargs):
    bag = ee.EmbeddingBag(6, 4, mode="mean", padding_idx=0).cuda()
    opt = ee.fuse_optimizer(bag, optimizer_class, **kwargs)
    before = bag.weight.detach().clone()
    out = bag(torch.tensor([1, 0, 9, 2], device="cuda"), torch.tensor([0, 2], device="cuda"))
    with pytest.raises(IndexError, match="index 9 at position 2"):
        ee.check_cuda_index_errors()  # the forward's report, so that the backward runs
    out.sum().backward()
    with pytest.raises(IndexError, match="index"):
        ee.check_cuda_index_errors()
    assert torch.equal(bag.weight.detach(), before)
    assert all(torch.equal(v, torch.zeros_like(v)) for s in opt.state.values()
               for k, v in s.items() if k == "exp_avg")
    opt.step()
    opt.zero_grad()
    bag(torch.tensor([1, 0, 2], device="cuda"), torch.tensor([0, 2], device="cuda")).sum().backward()
    assert not torch.equal(bag.weight.detach(), before)  # good ids still update


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
@pytest.mark.parametrize("optimizer_class", [
    torch.optim.Adagrad, torch.optim.SparseAdam, ee.optim.RowWiseAdagrad],
    ids=["adagrad", "sparse-adam", "rowwise-adagrad"])
def test_cuda_fused_step_count_leaves_out_a_skipped_update(optimizer_class):
    emb = ee.Embedding(6, 4).cuda()
    ref = ee.Embedding(6, 4).cuda()
    ref.weight.data.copy_(emb.weight.data)
    opt = ee.fuse_optimizer(emb, optimizer_class, lr=0.1)
    ref_opt = ee.fuse_optimizer(ref, optimizer_class, lr=0.1)
    out = emb(torch.tensor([1, 9], device="cuda"))
    with pytest.raises(IndexError, match="index 9 at position 1"):
        ee.check_cuda_index_errors()  # the forward's report, so that the backward runs
    out.sum().backward()  # the update meets the bad id: skipped
    opt.step()
    with pytest.raises(IndexError, match="index 9 at position 1"):
        ee.check_cuda_index_errors()
    assert int(opt.state_dict()["state"].get(0, {}).get("step", 0)) == 0
    good = torch.tensor([1, 2, 1], device="cuda")
    for module, optimizer in ((emb, opt), (ref, ref_opt)):
        module(good).sum().backward()
        optimizer.step()
    assert int(opt.state_dict()["state"][0]["step"]) == 1
    assert torch.equal(emb.weight.detach(), ref.weight.detach())
    for name, value in ref_opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(opt.state_dict()["state"][0][name]),
                           torch.as_tensor(value)), name
