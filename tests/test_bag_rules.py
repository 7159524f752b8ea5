"""The rules of ee.embedding_bag / ee.EmbeddingBag beyond the common case: include_last_offset
(the last bag runs to the end of the ids) in every mode, empty, all-padding and no bags, max-mode ties and NaN,
max_norm, mixed id and offset dtypes, and the module with from_pretrained."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from embedding_ext import reference
from bags import MODES, make_bags
from conftest import DEVICES, make_weight


@pytest.mark.parametrize("mode", MODES)
def test_include_last_offset_last_bag_runs_to_the_end_in_every_mode(mode):
    """As PyTorch's tested behaviour (its max and mean modes, and any mode with a
    padding_idx): ids after the last offset join the last bag, in every mode alike (forward,
    gradient), and are range-checked."""
    weight = make_weight(10, 4, torch.float64).requires_grad_()
    ids = torch.tensor([1, 2, 2, 0, 5, 7, 7, 3])
    out = ee.embedding_bag(ids, weight, torch.tensor([0, 3, 6]), mode=mode,
                           include_last_offset=True)
    full = torch.tensor([0, 3, 8])
    torch.testing.assert_close(out, reference.bag_forward(weight, ids, full, mode))
    torch.testing.assert_close(out, ee.embedding_bag(ids, weight, full, mode=mode,
                                                     include_last_offset=True))
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    (expected,) = torch.autograd.grad(reference.bag_forward(weight, ids, full, mode), weight,
                                      grad_out)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(IndexError, match="index 10 at position 7"):
        ee.embedding_bag(torch.tensor([1, 2, 2, 0, 5, 7, 7, 10]), weight, torch.tensor([0, 3, 6]),
                         mode=mode, include_last_offset=True)
    # A single offset: no bags, whatever the ids.
    assert ee.embedding_bag(ids, weight, torch.tensor([0]), mode=mode,
                            include_last_offset=True).shape == (0, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_include_last_offset_matches_pytorchs_trailing_id_case(device, sparse, mode):
    """PyTorch's own case: offsets [0, 3, 3] (and [0, 3, 4]) over 4 ids with a padding_idx:
    the fourth id is the second bag; forward and gradient against F.embedding_bag on the
    CPU, dense and sparse."""
    if sparse and mode == "max":
        pytest.skip("max mode has no sparse gradient")
    weight = make_weight(10, 3, torch.float32)
    ids = torch.tensor([1, 2, 3, 4, 4, 6])
    for offsets in ([0, 3, 3], [0, 3, 6], [0, 2, 2, 3]):
        kwargs = dict(mode=mode, include_last_offset=True, padding_idx=1, sparse=sparse)
        ours_w = weight.detach().clone().to(device).requires_grad_()
        ours = ee.embedding_bag(ids.to(device), ours_w, torch.tensor(offsets, device=device),
                                **kwargs)
        theirs_w = weight.detach().clone().requires_grad_()
        theirs = F.embedding_bag(ids, theirs_w, torch.tensor(offsets), **kwargs)
        torch.testing.assert_close(ours.cpu(), theirs)
        grad_out = torch.randn_like(theirs)
        ours.backward(grad_out.to(device))
        theirs.backward(grad_out)
        torch.testing.assert_close(ours_w.grad.to_dense().cpu(), theirs_w.grad.to_dense())
    out = ee.embedding_bag(ids[:4].to(device), weight.to(device), torch.tensor([0, 3, 3], device=device),
                           mode=mode, include_last_offset=True, padding_idx=1)
    torch.testing.assert_close(out[1].cpu(), weight[4])  # the fourth id, 4, alone in bag 1


@pytest.mark.parametrize("device", DEVICES)
def test_include_last_offset_module_and_fused_match_the_function(device):
    """ee.EmbeddingBag, plain and with a fused optimizer, pools the ids after the last offset
    into the last bag, as ee.embedding_bag does."""
    ids = torch.tensor([1, 2, 3, 4, 5], device=device)
    offsets = torch.tensor([0, 2, 3], device=device)
    for mode in ("sum", "mean"):
        bag = ee.EmbeddingBag(10, 4, mode=mode, include_last_offset=True, device=device)
        expected = ee.embedding_bag(ids, bag.weight.detach(), torch.tensor([0, 2, 5], device=device),
                                    mode=mode, include_last_offset=True)
        torch.testing.assert_close(bag(ids, offsets), expected)
        before = bag.weight.detach().clone()
        opt = ee.fuse_optimizer(bag, torch.optim.SGD, lr=1.0)  # noqa: F841 (kept alive)
        out = bag(ids, offsets)
        torch.testing.assert_close(out, expected)
        out.sum().backward()
        touched = (bag.weight.detach() != before).any(1).nonzero().flatten().tolist()
        assert touched == [1, 2, 3, 4, 5]


def test_include_last_offset_errors_as_pytorch():
    weight = make_weight(10, 3, torch.float32)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="include_last_offset: number of offset should be at "
                                           "least 1"):
        ee.embedding_bag(ids, weight, ids.new_empty(0), include_last_offset=True)
    with pytest.raises(RuntimeError, match="offsets\\[-1\\] can not be greater than input's length"):
        ee.embedding_bag(ids, weight, torch.tensor([0, 4]), include_last_offset=True)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_include_last_offset_trailing_ids_have_gradients(mode):
    """Ids after the last offset are in the last bag: per_sample_weights gradient, and
    counted by scale_grad_by_freq."""
    weight = make_weight(6, 3, torch.float64).requires_grad_()
    ids = torch.tensor([1, 2, 1])
    psw = torch.ones(3, dtype=torch.float64, requires_grad=(mode == "sum"))
    out = ee.embedding_bag(ids, weight, torch.tensor([0, 2]), mode=mode, include_last_offset=True,
                           scale_grad_by_freq=True, per_sample_weights=psw if mode == "sum" else None)
    out.backward(torch.ones_like(out))
    scale = 1.0 if mode == "sum" else 1.0 / 3
    # Row 1 is in the bag twice: count 2, so the gradient is 2 * scale / 2.
    torch.testing.assert_close(weight.grad[1], torch.full((3,), scale, dtype=torch.float64))
    if mode == "sum":
        torch.testing.assert_close(psw.grad[2], weight[1].detach().sum())


@pytest.mark.parametrize("mode", MODES)
def test_empty_and_all_padding_bags_are_zero(mode):
    weight = make_weight(6, 3, torch.float32).requires_grad_()
    ids = torch.tensor([4, 4, 1, 5])
    out = ee.embedding_bag(ids, weight, torch.tensor([0, 0, 2, 2]), mode=mode, padding_idx=4)
    assert out.shape == (4, 3)
    assert not out[:3].any()
    torch.testing.assert_close(out[3], reference.bag_forward(weight, ids, torch.tensor([2, 4]),
                                                             mode, None, 4)[0].float())
    out.sum().backward()
    assert not weight.grad[4].any()


def test_no_bags():
    """Empty offsets: no bags, a (0, D) output. PyTorch 2.14's CPU agrees in sum and mean
    mode and crashes (SIGSEGV) in max mode, so max is checked against the shape alone."""
    weight = make_weight(10, 4, torch.float32)
    ids = torch.tensor([1, 2])
    for mode in MODES:
        out = ee.embedding_bag(ids, weight, torch.tensor([], dtype=torch.int64), mode=mode)
        assert out.shape == (0, 4)
        if mode != "max":
            assert F.embedding_bag(ids, weight, torch.tensor([], dtype=torch.int64),
                                   mode=mode).shape == (0, 4)


def test_max_ties_go_to_the_first_occurrence():
    weight = torch.tensor([[1.0, 5.0], [1.0, 2.0], [0.0, 5.0]], requires_grad=True)
    ids = torch.tensor([1, 0, 2])
    out = ee.embedding_bag(ids, weight, torch.tensor([0]), mode="max")
    out.backward(torch.tensor([[10.0, 20.0]]))
    # Feature 0: rows 1 and 0 tie at 1.0 -> row 1 (first); feature 1: rows 0 and 2 -> row 0.
    assert torch.equal(weight.grad, torch.tensor([[0.0, 20.0], [10.0, 0.0], [0.0, 0.0]]))
    w2 = weight.detach().clone().requires_grad_()
    F.embedding_bag(ids, w2, torch.tensor([0]), mode="max").backward(torch.tensor([[10.0, 20.0]]))
    assert torch.equal(weight.grad, w2.grad), "PyTorch breaks ties the same way"


def test_max_nan_follows_pytorch():
    """A NaN is taken only as a bag's first value (PyTorch's CPU rule)."""
    weight = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0], [3.0, 0.0]])
    ids = torch.tensor([0, 1, 2, 1, 0])
    offsets = torch.tensor([0, 3])
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = ee.embedding_bag(ids, w1, offsets, mode="max")
    theirs = F.embedding_bag(ids, w2, offsets, mode="max")
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    ours.backward(torch.ones_like(ours))
    theirs.backward(torch.ones_like(theirs))
    torch.testing.assert_close(w1.grad, w2.grad)


def test_max_norm_renorms_the_referenced_rows():
    weight = make_weight(12, 4, torch.float64) * 4
    theirs = weight.clone()
    ids, offsets = torch.tensor([1, 2, 2, 7]), torch.tensor([0, 2])
    out = ee.embedding_bag(ids, weight, offsets, mode="mean", max_norm=1.0)
    expected = F.embedding_bag(ids, theirs, offsets, mode="mean", max_norm=1.0)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weight, theirs)


def test_mixed_id_and_offset_dtypes_are_promoted():
    weight = make_weight(8, 3, torch.float32)
    ids = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    offsets = torch.tensor([0, 2], dtype=torch.int64)
    torch.testing.assert_close(ee.embedding_bag(ids, weight, offsets),
                               F.embedding_bag(ids.long(), weight, offsets))


def test_module_and_from_pretrained():
    torch.manual_seed(0)
    ours = ee.EmbeddingBag(20, 6, mode="sum", padding_idx=1)
    theirs = torch.nn.EmbeddingBag(20, 6, mode="sum", padding_idx=1)
    theirs.load_state_dict(ours.state_dict())
    ids, offsets = make_bags(20, padding_idx=1)
    psw = torch.randn(ids.shape)
    torch.testing.assert_close(ours(ids, offsets, psw), theirs(ids, offsets, psw))
    ours(ids, offsets).sum().backward()
    theirs(ids, offsets).sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    pre = ee.EmbeddingBag.from_pretrained(ours.weight.detach(), mode="max", freeze=True)
    assert type(pre) is ee.EmbeddingBag and not pre.weight.requires_grad and pre.mode == "max"
    assert repr(pre).startswith("EmbeddingBag(20, 6")
