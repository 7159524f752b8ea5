"""ee.embedding_bag / ee.EmbeddingBag (CPU): forward and gradients against PyTorch and the
float64 reference, every mode, padding, per_sample_weights, both input forms, CSR offsets,
errors. Duplicates and empty bags in every case."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import embedding_ext as ee
from embedding_ext import reference
from conftest import DEVICES, TOL, cpu_isas, each_cpu_isa, make_weight, poison

MODES = ["sum", "mean", "max"]


def _bags(num_weights, index_dtype=torch.int64, padding_idx=None):
    """1-D ids with hot rows and padding, and offsets with an empty bag, an all-padding bag
    (when padding is given) and a long one."""
    n = 60
    ids = torch.randint(0, num_weights, (n,))
    ids[::4] = 3  # a hot row
    if padding_idx is not None:
        ids[1::5] = padding_idx
        ids[10:13] = padding_idx  # bag 2 is all padding
    offsets = torch.tensor([0, 4, 4, 10, 13, 30, 31])  # bag 1 empty; last bag 31..60
    return ids.to(index_dtype), offsets.to(index_dtype)


def _grads(fn, weight, *args, grad_out=None, psw=None, **kwargs):
    w = weight.detach().clone().requires_grad_()
    p = None if psw is None else psw.detach().clone().requires_grad_()
    out = fn(args[0], w, *args[1:], per_sample_weights=p, **kwargs)
    inputs = (w,) if p is None else (w, p)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


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
    ids, offsets = _bags(num_weights, index_dtype, pad)
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
    ours, our_grads = _grads(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out, psw=psw,
                             **kwargs)
    theirs, their_grads = _grads(F.embedding_bag, weight, ids, offsets, grad_out=grad_out,
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


_TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


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
    ids, offsets = _bags(40, padding_idx=2)
    csr = torch.cat([offsets, torch.tensor([ids.numel()])])
    psw = torch.randn(ids.shape, dtype=dtype) if mode == "sum+weights" else None
    m = mode.split("+")[0]
    grad_out = torch.randn(csr.numel() - 1, 24, dtype=dtype)
    ours, our_grads = _grads(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out, psw=psw,
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
    ids, offsets = _bags(40, padding_idx=padding_idx)
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
        theirs, their_grads = _grads(F.embedding_bag, weight, ids, offsets, **kwargs)
        ours, our_grads = _grads(ee.embedding_bag, weight, ids, offsets, **kwargs)
        torch.testing.assert_close(ours, theirs, **TOL[dtype])
        for a, b in zip(our_grads, their_grads):  # max: the arg-max rows match PyTorch's
            torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES + ["sum+weights"])
def test_every_pooling_instruction_set_gives_the_same_bits(dtype, mode):
    """The portable, AVX2 and AVX-512 copies of the pooling loops (whichever this CPU runs)
    give bitwise the same outputs and arg-max rows, for every register-block shape, with
    NaN, infinities and padding."""
    isas = cpu_isas()
    assert isas[0] == "portable"
    if len(isas) == 1:
        pytest.skip("this CPU runs only the portable copy")
    m = mode.split("+")[0]
    as_bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    for dim, index_dtype in [(16, torch.int64), (32, torch.int32), (48, torch.int64),
                             (64, torch.int32), (80, torch.int64), (128, torch.int64),
                             (256, torch.int32), (272, torch.int64)]:
        weight = make_weight(40, dim, dtype) * 1e3  # fp16 / bf16 rounding of large sums
        weight[7, 1] = float("nan")
        weight[8, 2] = float("inf")
        if dtype == torch.float16:  # NaNs with payloads, one negative: kept alike by every copy
            weight.view(torch.int16)[9, 3] = 0x7E01
            weight.view(torch.int16)[10, 4] = -0x1FF  # 0xFE01
        ids, offsets = _bags(40, padding_idx=3)
        ids, csr = ids.to(index_dtype), torch.cat([offsets, torch.tensor([55])]).to(index_dtype)
        psw = torch.randn(ids.shape, dtype=dtype) if mode == "sum+weights" else None
        outputs = each_cpu_isa(lambda: torch.ops.embedding_ext.embedding_bag_forward(
            weight, ids, csr, ee.ops.BAG_MODES[m], psw, 3))  # ids 55.. in no bag
        base_out, base_arg = outputs["portable"]
        for isa in isas[1:]:
            out, arg = outputs[isa]
            assert torch.equal(out.view(as_bits), base_out.view(as_bits)), (isa, dim)
            assert torch.equal(arg, base_arg), (isa, dim)


@pytest.mark.parametrize("dim", [5, 8, 64])
def test_sparse_gradient_rows_are_copied_alike_with_streaming_stores(dim):
    """The unscaled sparse gradient copies each bag's gradient row with AVX2 streaming stores
    where rows are 32-byte multiples: the same values and rows as the plain copy."""
    ids, offsets = _bags(40, padding_idx=3)
    csr = torch.cat([offsets, torch.tensor([ids.numel()])])
    grad = torch.randn(csr.numel() - 1, dim)
    results = each_cpu_isa(lambda: torch.ops.embedding_ext.embedding_bag_sparse_backward(
        grad, ids, csr, 40, 0, None, 3, False)).values()
    keep = ids != 3
    bag_of = torch.repeat_interleave(torch.arange(csr.numel() - 1), csr.diff())
    for rows, values in results:
        assert torch.equal(rows[0], ids[keep])
        assert torch.equal(values, grad[bag_of[keep]])


def test_pooling_instruction_set_switch_refuses_bad_names():
    from embedding_ext import _C
    with pytest.raises(RuntimeError, match="'name' must be 'auto', 'portable', 'avx2' or 'avx512'"):
        _C._set_cpu_isa("sse9")
    assert _C._cpu_isa() in ("portable", "avx2", "avx512")


@pytest.mark.parametrize("mode", MODES)
def test_bag_gradcheck(mode):
    weight = make_weight(9, 3, torch.float64).requires_grad_()
    ids = torch.tensor([1, 2, 2, 0, 5, 7, 7, 3, 4])
    offsets = torch.tensor([0, 3, 3, 6])
    assert torch.autograd.gradcheck(
        lambda w: ee.embedding_bag(ids, w, offsets, mode=mode, padding_idx=0), (weight,))
    if mode == "sum":
        psw = torch.randn(9, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda w, p: ee.embedding_bag(ids, w, offsets, mode="sum", per_sample_weights=p,
                                          padding_idx=0), (weight, psw))


@pytest.mark.parametrize("mode", ["sum", "mean", "max", "sum+weights"])
def test_torch_func_grad_matches_autograd(mode):
    """Eager calls take the Function without setup_context (no per-call signature binding);
    under torch.func transforms ee.embedding_bag must switch to EmbeddingBagFunction."""
    weight = make_weight(9, 3, torch.float64)
    ids = torch.tensor([1, 2, 2, 0, 5, 7, 7, 3, 4])
    offsets = torch.tensor([0, 3, 3, 6])
    psw = torch.randn(9, dtype=torch.float64) if mode == "sum+weights" else None
    grad_out = torch.randn(4, 3, dtype=torch.float64)

    def loss(w, p, fn):
        out = fn(ids, w, offsets, mode=mode.split("+")[0], per_sample_weights=p, padding_idx=0)
        return (out * grad_out).sum()

    argnums = (0, 1) if psw is not None else 0
    ours = torch.func.grad(loss, argnums=argnums)(weight, psw, ee.embedding_bag)
    theirs = torch.func.grad(loss, argnums=argnums)(weight, psw, F.embedding_bag)
    w = weight.clone().requires_grad_()
    p = None if psw is None else psw.clone().requires_grad_()
    eager = torch.autograd.grad(loss(w, p, ee.embedding_bag), (w,) if p is None else (w, p))
    for a, b, c in zip(ours if psw is not None else (ours,),
                       theirs if psw is not None else (theirs,), eager):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("mode", MODES)
def test_include_last_offset_is_csr_in_every_mode(mode):
    """Beyond PyTorch (whose CPU gives three answers by mode): ids after the last offset
    belong to no bag, get no gradient, and are still range-checked."""
    weight = make_weight(10, 4, torch.float64).requires_grad_()
    ids = torch.tensor([1, 2, 2, 0, 5, 7, 7, 3])
    csr = torch.tensor([0, 3, 6])
    out = ee.embedding_bag(ids, weight, csr, mode=mode, include_last_offset=True)
    torch.testing.assert_close(out, reference.bag_forward(weight, ids, csr, mode))
    torch.testing.assert_close(out, ee.embedding_bag(ids[:6], weight, csr, mode=mode,
                                                     include_last_offset=True))
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, weight, grad_out)
    (trimmed,) = torch.autograd.grad(
        ee.embedding_bag(ids[:6], weight, csr, mode=mode, include_last_offset=True), weight, grad_out)
    assert torch.equal(grad, trimmed) and not grad[3].any()
    with pytest.raises(IndexError, match="index 10 at position 7"):
        ee.embedding_bag(torch.tensor([1, 2, 2, 0, 5, 7, 7, 10]), weight, csr, mode=mode,
                         include_last_offset=True)


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


def test_module_and_from_pretrained():
    torch.manual_seed(0)
    ours = ee.EmbeddingBag(20, 6, mode="sum", padding_idx=1)
    theirs = torch.nn.EmbeddingBag(20, 6, mode="sum", padding_idx=1)
    theirs.load_state_dict(ours.state_dict())
    ids, offsets = _bags(20, padding_idx=1)
    psw = torch.randn(ids.shape)
    torch.testing.assert_close(ours(ids, offsets, psw), theirs(ids, offsets, psw))
    ours(ids, offsets).sum().backward()
    theirs(ids, offsets).sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    pre = ee.EmbeddingBag.from_pretrained(ours.weight.detach(), mode="max", freeze=True)
    assert type(pre) is ee.EmbeddingBag and not pre.weight.requires_grad and pre.mode == "max"
    assert repr(pre).startswith("EmbeddingBag(20, 6")


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
     RuntimeError, "'padding_idx' must be within the number of embeddings, -10 through 9, but got 10"),
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
    ids, offsets = _bags(10, padding_idx=padding_idx)  # 60 ids, the last bag 31..60
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


@settings(max_examples=120, deadline=None)
@given(data=st.data(), mode=st.sampled_from(MODES), num_weights=st.integers(1, 12),
       dim=st.sampled_from([0, 1, 3, 5, 9, 16, 32, 48, 64]), padding=st.booleans(),
       index_dtype=st.sampled_from([torch.int32, torch.int64]), weighted=st.booleans(),
       freq=st.booleans(), sparse=st.booleans(), trailing=st.integers(0, 3))
def test_bag_hypothesis_against_reference(data, mode, num_weights, dim, padding, index_dtype,
                                          weighted, freq, sparse, trailing):
    """Any bag lengths (empty bags included), duplicates, padding, CSR offsets with ids after
    the last bag, int32/int64 ids, per_sample_weights, scale_grad_by_freq and sparse
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
    expected = reference.bag_forward(weight, ids, csr, mode, psw, pad)
    torch.testing.assert_close(out, expected.detach())
    grad_out = torch.randn_like(out)
    inputs = (weight,) if psw is None else (weight, psw)
    ours = torch.autograd.grad(out, inputs, grad_out)
    ref = list(torch.autograd.grad(expected, inputs, grad_out, allow_unused=True))
    ref = [torch.zeros_like(x) if g is None else g for g, x in zip(ref, inputs)]
    if freq:  # each row's gradient over its count among the pooled, non-padding ids
        pooled = ids[:int(csr[-1])].long()
        pooled = pooled[pooled != (-1 if pad is None else pad)]
        counts = torch.bincount(pooled, minlength=num_weights).clamp(min=1)
        ref[0] = ref[0] / counts[:, None]
    assert ours[0].is_sparse == sparse
    torch.testing.assert_close(ours[0].to_dense() if sparse else ours[0], ref[0])
    if psw is not None:
        torch.testing.assert_close(ours[1], ref[1])


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


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_csr_trailing_ids_get_nothing(mode):
    """Ids after the last offset: no per_sample_weights gradient, and not counted by
    scale_grad_by_freq."""
    weight = make_weight(6, 3, torch.float64).requires_grad_()
    ids = torch.tensor([1, 2, 1])
    csr = torch.tensor([0, 2])
    psw = torch.ones(3, dtype=torch.float64, requires_grad=(mode == "sum"))
    out = ee.embedding_bag(ids, weight, csr, mode=mode, include_last_offset=True,
                           scale_grad_by_freq=True, per_sample_weights=psw if mode == "sum" else None)
    out.backward(torch.ones_like(out))
    scale = 1.0 if mode == "sum" else 0.5
    assert torch.equal(weight.grad[1], torch.full((3,), scale, dtype=torch.float64)), \
        "row 1 is in one bag once: its count is 1, not 2"
    if mode == "sum":
        assert psw.grad[2] == 0


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


@pytest.mark.parametrize("mode", MODES)
def test_many_bags_on_several_threads(mode):
    """Enough bags for several parallel tasks (and, in max mode, tied rows): the same bits
    with 1 and 3 threads, and PyTorch's results."""
    weight = make_weight(500, 64, torch.float32)
    weight[7] = weight[3]  # ties between rows 3 and 7
    ids = torch.randint(0, 500, (40000,))
    ids[::5] = 3
    ids[1::5] = 7
    offsets = torch.arange(0, 40000, 8)
    grad_out = torch.randn(5000, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_grads(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out,
                                  mode=mode, padding_idx=0))
    finally:
        torch.set_num_threads(threads)
    (out1, (g1,)), (out3, (g3,)) = results
    assert torch.equal(out1, out3) and torch.equal(g1, g3)
    theirs, (gt,) = _grads(F.embedding_bag, weight, ids, offsets, grad_out=grad_out, mode=mode,
                           padding_idx=0)
    torch.testing.assert_close(out1, theirs)
    torch.testing.assert_close(g1, gt, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES + ["sum+weights", "mean+freq"])
@pytest.mark.parametrize("dim", [5, 64, 130])
@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_bags_match_our_cpu(dtype, mode, dim, sparse):
    """The CUDA kernels against our CPU kernels (same rules, fp32 pooling both): outputs,
    dense gradients, and sparse gradients with the same rows in the same order."""
    m = mode.split("+")[0]
    if sparse and m == "max":
        pytest.skip("max mode has no sparse gradient")
    weight = make_weight(40, dim, dtype)
    ids, offsets = _bags(40, padding_idx=2)
    ids = torch.cat([ids, torch.tensor([5, 39])])  # CSR tail: ids in no bag
    csr = torch.cat([offsets, torch.tensor([ids.numel() - 2])])
    psw = torch.randn(ids.shape, dtype=dtype) if "weights" in mode else None
    grad_out = torch.randn(csr.numel() - 1, dim, dtype=dtype)
    kwargs = dict(mode=m, padding_idx=2, include_last_offset=True, sparse=sparse,
                  scale_grad_by_freq="freq" in mode)
    results = []
    for device in ("cpu", "cuda"):
        poison(csr.numel() * dim, dtype, device)
        to = (lambda t: None if t is None else t.to(device))
        results.append(_grads(ee.embedding_bag, to(weight), to(ids), to(csr), grad_out=to(grad_out),
                              psw=to(psw), **kwargs))
    (cpu_out, cpu_grads), (cuda_out, cuda_grads) = results
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, **tol)
    for a, b in zip(cuda_grads, cpu_grads):
        if sparse and a.is_sparse:
            assert torch.equal(a._indices().cpu(), b._indices())
            a, b = a._values(), b._values()
        torch.testing.assert_close(a.cpu(), b, **tol)


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
    _, (grad_weight, _) = _grads(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out,
                                 psw=psw, mode="sum")
    expected = torch.zeros(4, 8, dtype=torch.float64)
    expected[1] = u * u
    expected[3] = 0.5
    assert u * u == expected.to(dtype)[1, 0].item()  # the remainder is exact in the dtype
    torch.testing.assert_close(grad_weight.cpu(), expected.to(dtype), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_cuda_sparse_bag_gradient_with_every_position_kept(dtype, mode):
    """No padding, every id in a bag: the CUDA sparse gradient keeps the position rows as
    they are (no compaction copy); values and rows as our CPU kernels give them."""
    weight = make_weight(40, 24, dtype)
    ids, offsets = _bags(40)
    grad_out = torch.randn(offsets.numel(), 24, dtype=dtype)
    results = [_grads(ee.embedding_bag, weight.to(device), ids.to(device), offsets.to(device),
                      grad_out=grad_out.to(device), mode=mode, sparse=True)
               for device in ("cpu", "cuda")]
    (cpu_out, (cpu_grad,)), (cuda_out, (cuda_grad,)) = results
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, **tol)
    assert cuda_grad._indices().shape == (1, ids.numel())
    assert torch.equal(cuda_grad._indices().cpu(), cpu_grad._indices())
    torch.testing.assert_close(cuda_grad._values().cpu(), cpu_grad._values(), **tol)
    # Densified in float64: to_dense sums a hot row's values in the values' dtype, in an
    # order of its own on each device (bf16 results then differ by an ulp of the sum).
    torch.testing.assert_close(cuda_grad.cpu().double().to_dense(), cpu_grad.double().to_dense(),
                               **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_bad_ids_and_offsets_raise_index_error_later():
    """No synchronisation in the call: a bad id or a bad CSR entry is recorded by the kernel
    and raised as IndexError (naming it) by ee.check_cuda_index_errors or the next call; the
    CUDA context survives and the next lookup is right."""
    weight = make_weight(10, 4, torch.float32, "cuda")
    ids = torch.tensor([1, 25, 3, 4], device="cuda")
    ee.embedding_bag(ids, weight, torch.tensor([0, 2], device="cuda"), mode="sum")
    with pytest.raises(IndexError, match=r"embedding_bag_forward: index 25 at position 1"):
        ee.check_cuda_index_errors()
    ids = torch.tensor([1, 2, 3, 4], device="cuda")
    ee.embedding_bag(ids, weight, torch.tensor([0, 3, 1], device="cuda"), mode="sum")
    with pytest.raises(IndexError, match=r"'offsets\[2\]' = 1 breaks the CSR rules"):
        ee.check_cuda_index_errors()
    ee.embedding_bag(ids, weight, torch.tensor([0, 9], device="cuda"), mode="mean")
    with pytest.raises(IndexError, match=r"'offsets\[1\]' = 9 breaks the CSR rules"):
        ee.check_cuda_index_errors()
    out = ee.embedding_bag(ids, weight, torch.tensor([0, 2], device="cuda"), mode="sum")
    torch.testing.assert_close(out, F.embedding_bag(ids, weight, torch.tensor([0, 2], device="cuda"),
                                                    mode="sum"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sum", "mean", "sum+weights"])
def test_sparse_gradient_without_padding_has_one_entry_per_id(device, mode):
    """The op, without padding: one entry per id in position order (so its size is known and
    CUDA does not synchronise), zero rows for the ids after the last offset (the CSR tail, in
    no bag). ee.embedding_bag leaves the tail out (include_last_offset=True), and with a
    padding_idx the padding ids too."""
    ids = torch.tensor([3, 3, 7, 1, 5, 9], device=device)
    csr = torch.tensor([0, 2, 4], device=device)  # bags [0, 2) and [2, 4); ids 5 and 9 in none
    weight = make_weight(20, 6, torch.float64, device)
    grad_out = torch.randn(2, 6, dtype=torch.float64, device=device)
    psw = torch.rand(6, dtype=torch.float64, device=device) if "weights" in mode else None
    m = mode.split("+")[0]
    coef = torch.full((4,), 0.5 if m == "mean" else 1.0, dtype=torch.float64, device=device)
    if psw is not None:
        coef = coef * psw[:4]
    in_bags = grad_out[[0, 0, 1, 1]] * coef[:, None]
    poison(6 * 6, torch.float64, device)
    rows, values = ee.ops.embedding_bag_sparse_backward(grad_out, ids, csr, 20, ee.ops.BAG_MODES[m],
                                                        psw, -1, False)
    assert torch.equal(rows, ids.reshape(1, -1))
    torch.testing.assert_close(values, torch.cat([in_bags, torch.zeros_like(in_bags[:2])]),
                               rtol=1e-12, atol=0)
    _, (grad, *_) = _grads(ee.embedding_bag, weight, ids, csr, grad_out=grad_out, psw=psw,
                           mode=m, include_last_offset=True, sparse=True)
    assert torch.equal(grad._indices(), ids[:4].reshape(1, -1))
    torch.testing.assert_close(grad._values(), in_bags, rtol=1e-12, atol=0)
    _, (padded, *_) = _grads(ee.embedding_bag, weight, ids, csr, grad_out=grad_out, psw=psw,
                             mode=m, include_last_offset=True, sparse=True, padding_idx=7)
    assert torch.equal(padded._indices().cpu(), torch.tensor([[3, 3, 1]]))
    # The public Function called as before (8 arguments): the tail is left out too.
    w = weight.detach().clone().requires_grad_()
    out, _ = ee.EmbeddingBagFunction.apply(w, ids, csr, ee.ops.BAG_MODES[m], psw, -1, False, True)
    out.backward(grad_out)
    assert torch.equal(w.grad._indices(), ids[:4].reshape(1, -1))
    # No offsets at all (CSR [0]: every id in no bag): no entry.
    w = weight.detach().clone().requires_grad_()
    out = ee.embedding_bag(ids, w, ids.new_empty(0), mode=m, sparse=True)
    assert out.shape == (0, 6)
    out.backward(torch.zeros_like(out))
    assert w.grad._nnz() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_sparse_bag_gradient_of_bad_ids_stays_inside_the_table():
    """A bad id in a sparse bag gradient without padding (no synchronisation, so it keeps
    its entry): a zero row at row 0, never a COO row outside the table; the bad id is
    raised as IndexError by the next check, and the context survives."""
    weight = make_weight(10, 4, torch.float32, "cuda").requires_grad_()
    ids = torch.tensor([1, 25, 3, -2], device="cuda")
    out = ee.embedding_bag(ids, weight, torch.tensor([0, 2], device="cuda"), mode="sum",
                           sparse=True)
    with pytest.raises(IndexError, match=r"embedding_bag_forward: index (25|-2) at position"):
        ee.check_cuda_index_errors()  # (else the backward's first call raises it)
    out.backward(torch.ones_like(out))
    with pytest.raises(IndexError, match=r"embedding_bag_sparse_backward: index (25 at "
                                         r"position 1|-2 at position 3)"):
        ee.check_cuda_index_errors()
    grad = weight.grad
    assert torch.equal(grad._indices().cpu(), torch.tensor([[1, 0, 3, 0]]))
    assert not grad._values()[[1, 3]].any()
    torch.testing.assert_close(grad._values()[[0, 2]], torch.ones(2, 4, device="cuda"))
    torch.testing.assert_close(grad.to_dense().sum(), torch.tensor(8.0, device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_bag_gradients_under_deterministic_algorithms():
    """Sum/mean take the lookup's sorted backward (reruns bitwise equal); max mode's atomics
    alert, as PyTorch's CUDA embedding_bag does."""
    weight = make_weight(50, 64, torch.float32, "cuda")
    ids = torch.randint(0, 50, (4096,), device="cuda")
    ids[::3] = 7  # a hot row
    offsets = torch.arange(0, 4096, 16, device="cuda")
    grad_out = torch.randn(256, 64, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        for mode in ("sum", "mean"):
            runs = [_grads(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out, mode=mode)[1][0]
                    for _ in range(2)]
            assert torch.equal(runs[0], runs[1])
        with pytest.raises(RuntimeError, match="embedding_bag_dense_backward"):
            _grads(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out, mode="max")
    finally:
        torch.use_deterministic_algorithms(False)


def test_compiles_fullgraph_with_gradients():
    """torch.compile(fullgraph=True) through the module (static shapes, per_sample_weights,
    padding) and the function (dynamic shapes, max mode): same outputs and gradients."""
    torch._dynamo.reset()
    ours = ee.EmbeddingBag(50, 8, mode="sum", padding_idx=0)
    theirs = torch.nn.EmbeddingBag(50, 8, mode="sum", padding_idx=0)
    theirs.load_state_dict(ours.state_dict())
    ids, offsets = _bags(50, padding_idx=0)
    psw = torch.randn(ids.shape)
    out = torch.compile(ours, fullgraph=True)(ids, offsets, psw)
    expected = theirs(ids, offsets, psw)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    lookup = torch.compile(lambda i, w: ee.embedding_bag(i, w, mode="max"), fullgraph=True,
                           dynamic=True)
    weight = make_weight(50, 8, torch.float32)
    for length in (3, 4):
        ids2d = torch.randint(0, 50, (6, length))
        torch.testing.assert_close(lookup(ids2d, weight), F.embedding_bag(ids2d, weight, mode="max"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("mode", ["sum", "mean", "sum+weights"])
@pytest.mark.parametrize("form", ["offsets", "include_last_offset", "2d"])
def test_sparse_gradient_matches_pytorch(dtype, padding_idx, mode, form):
    """The uncoalesced COO gradient: PyTorch's rows and values, in its order."""
    weight = make_weight(17, 5, dtype)
    ids, offsets = _bags(17, padding_idx=padding_idx)
    if form == "include_last_offset":
        offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
    elif form == "2d":
        ids, offsets = ids.reshape(6, 10), None
    psw = torch.randn(ids.shape, dtype=dtype) if "weights" in mode else None
    kwargs = dict(mode=mode.split("+")[0], padding_idx=padding_idx, sparse=True,
                  include_last_offset=form == "include_last_offset")
    bags = 6 if form == "2d" else offsets.numel() - (form == "include_last_offset")
    grad_out = torch.randn(bags, 5, dtype=dtype)
    grads = []
    for fn in (ee.embedding_bag, F.embedding_bag):
        w = weight.clone().requires_grad_()
        p = None if psw is None else psw.clone().requires_grad_()
        fn(ids, w, offsets, per_sample_weights=p, **kwargs).backward(grad_out)
        grads.append((w.grad, p.grad if p is not None else None))
    (ours, our_psw), (theirs, their_psw) = grads
    assert ours.is_sparse and not ours.is_coalesced()
    assert torch.equal(ours._indices(), theirs._indices())
    torch.testing.assert_close(ours._values(), theirs._values(), **TOL[dtype])
    if psw is not None:
        torch.testing.assert_close(our_psw, their_psw, **TOL[dtype])


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_gradient_with_scale_grad_by_freq(mode):
    """Beyond PyTorch (which refuses the pair): the sparse gradient, coalesced, equals the
    dense one with scale_grad_by_freq."""
    weight = make_weight(17, 5, torch.float64)
    ids, offsets = _bags(17, padding_idx=2)
    grad_out = torch.randn(offsets.numel(), 5, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        w = weight.clone().requires_grad_()
        ee.embedding_bag(ids, w, offsets, mode=mode, padding_idx=2, scale_grad_by_freq=True,
                         sparse=sparse).backward(grad_out)
        grads.append(w.grad.to_dense())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("mode", MODES)
def test_reused_gradient_buffer_is_zeroed(mode):
    """The dense gradient (V x D >= 1 MiB) comes from the output cache: a buffer freed by the
    previous step, full of its values, must come back zero outside this step's rows."""
    weight = make_weight(5000, 64, torch.float32).requires_grad_()
    offsets = torch.tensor([0, 3])
    pointers = []
    for ids in (torch.arange(0, 4000, 7), torch.tensor([1, 2, 2, 9, 4999])):
        weight.grad = None  # frees the previous step's gradient into the cache
        ee.embedding_bag(ids, weight, offsets, mode=mode).sum().backward()
        pointers.append(weight.grad.data_ptr())
        w = weight.detach().clone().requires_grad_()
        F.embedding_bag(ids, w, offsets, mode=mode).sum().backward()
        torch.testing.assert_close(weight.grad, w.grad)
        del w
    assert pointers[0] == pointers[1], "the second gradient did not reuse the first's buffer"


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
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode() as mode:
                torch.ops.embedding_ext.embedding_bag_dense_backward(
                    *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        else:
            torch.ops.embedding_ext.embedding_bag_dense_backward(*args)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_gradient_values_from_the_output_cache_are_all_written(mode):
    """The sparse gradient's values (here 4 MiB) come from the cache of freed outputs: a
    reused buffer left full of NaN by the previous step must be overwritten everywhere."""
    num_weights, dim, n = 1000, 64, 16384
    weight = make_weight(num_weights, dim, torch.float32)
    ids = torch.randint(0, num_weights, (n,))
    ids[::5] = 7  # padding, left out of the values
    offsets = torch.arange(0, n, 8)
    grad_out = torch.randn(n // 8, dim)

    def sparse_grad():
        w = weight.clone().requires_grad_()
        ee.embedding_bag(ids, w, offsets, mode=mode, sparse=True, padding_idx=7).backward(grad_out)
        return w.grad

    first = sparse_grad()
    pointer = first._values().data_ptr()
    first._values().fill_(float("nan"))
    del first
    second = sparse_grad()
    assert second._values().data_ptr() == pointer  # the same buffer, reused
    w = weight.clone().requires_grad_()
    F.embedding_bag(ids, w, offsets, mode=mode, sparse=True, padding_idx=7).backward(grad_out)
    theirs = w.grad
    assert not second._values().isnan().any()
    assert torch.equal(second._indices(), theirs._indices())
    torch.testing.assert_close(second._values(), theirs._values())


def test_double_backward_is_refused_clearly():
    """The bag gradients are once-differentiable (eager calls and EmbeddingBagFunction alike):
    differentiating the gradient again raises instead of returning a wrong zero."""
    weight = make_weight(9, 3, torch.float64).requires_grad_()
    out = ee.embedding_bag(torch.tensor([1, 2, 2, 5]), weight, torch.tensor([0, 2]), mode="sum")
    (grad,) = torch.autograd.grad(out.pow(2).sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()
