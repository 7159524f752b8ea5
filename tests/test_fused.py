"""ee.fuse_optimizer (issue 14): the optimizer step inside ee.Embedding's backward, against the
same torch optimizer on the sparse gradient over many steps (duplicates, padding,
scale_grad_by_freq, max_norm), lr changes, state_dict moves both ways, and every refusal."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import embedding_ext as ee
from conftest import DEVICES, cpu_isas, each_cpu_isa

CASES = [
    (torch.optim.SGD, dict(lr=0.3)),
    (torch.optim.Adagrad, dict(lr=0.2, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-9)),
    (torch.optim.SparseAdam, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-7)),
    (ee.optim.RowWiseAdagrad, dict(lr=0.2, eps=1e-8)),
]
IDS = ["SGD", "Adagrad", "SparseAdam", "RowWiseAdagrad"]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _batch(num_weights, n, padding_idx, dim, dtype):
    ids = torch.randint(0, num_weights, (n,))
    ids[::3] = 4  # a hot row: its duplicates are summed before one update
    if padding_idx is not None:
        ids[1::5] = padding_idx
    return ids.reshape(2, n // 2), torch.randn(2, n // 2, dim, dtype=dtype)


def _pair(num_weights, dim, dtype, padding_idx, scale, max_norm=None):
    fused = ee.Embedding(num_weights, dim, padding_idx=padding_idx, scale_grad_by_freq=scale,
                         max_norm=max_norm, dtype=dtype)
    # The unfused reference: nn.Embedding's sparse gradient (ours where PyTorch lacks the
    # option combination), the same initial weights.
    cls = ee.Embedding if scale else torch.nn.Embedding
    plain = cls(num_weights, dim, padding_idx=padding_idx, scale_grad_by_freq=scale,
                max_norm=max_norm, sparse=True, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(fused.weight)
    return fused, plain


def _step_both(fused, opt, plain, ref, inputs: tuple, grad_out):
    """One training step of the fused module and of its unfused reference on the same
    batch; the fused weight never gets a gradient."""
    fused(*inputs).backward(grad_out)
    assert fused.weight.grad is None
    opt.step()
    opt.zero_grad()
    plain(*inputs).backward(grad_out)
    ref.step()
    ref.zero_grad()


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("padding_idx, scale", [(None, False), (0, False), (2, True)])
@pytest.mark.parametrize("dim", [6, 70])  # 70: the row-wise sum of squares' 16 lanes + a tail
def test_matches_the_unfused_optimizer_over_steps(optimizer_class, kwargs, dtype, padding_idx,
                                                  scale, dim):
    fused, plain = _pair(17, dim, dtype, padding_idx, scale)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    before_pad = None if padding_idx is None else fused.weight[padding_idx].detach().clone()
    for step in range(8):
        ids, grad_out = _batch(17, 24, padding_idx, dim, dtype)
        _step_both(fused, opt, plain, ref, (ids,), grad_out)
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[dtype])
    if before_pad is not None:
        assert torch.equal(fused.weight[padding_idx], before_pad)
    theirs = ref.state_dict()["state"]
    ours = opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].keys() == theirs[k].keys()
        for name in ours[k]:
            torch.testing.assert_close(torch.as_tensor(ours[k][name]).double(),
                                       torch.as_tensor(theirs[k][name]).double(), **TOL[dtype])


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [False, True])
def test_a_sparsely_touched_table_matches_the_unfused_optimizer(optimizer_class, kwargs, dtype,
                                                                scale):
    """Under a quarter of the table's rows touched (SGD and row-wise Adagrad then update the
    rows seen once first, in position order, then the rest by row): as unfused, with
    duplicates, padding and scale_grad_by_freq, over steps."""
    fused, plain = _pair(3000, 12, dtype, 5, scale)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    for _ in range(4):
        ids = torch.randint(0, 3000, (4, 30))
        ids[0, :4] = 9  # a row seen 4 times
        ids[1, 1::6] = 5  # padding
        ids[2, 7] = ids[3, 20]  # a row seen twice, far apart
        _step_both(fused, opt, plain, ref, (ids,), torch.randn(4, 30, 12, dtype=dtype))
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[dtype])
    ours, theirs = opt.state_dict()["state"], ref.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for k in ours:
        for name in ours[k]:
            torch.testing.assert_close(torch.as_tensor(ours[k][name]).double(),
                                       torch.as_tensor(theirs[k][name]).double(), **TOL[dtype])


@pytest.mark.parametrize("rule", [0, 3], ids=["SGD", "RowWiseAdagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_rows_seen_once_in_position_order_give_the_bits_of_the_walk_by_row(rule, dtype):
    """The same rows, state and gradient on a sparsely touched table (rows seen once go
    first, in position order) and on a table of just the touched rows (walked by row): the
    touched rows and their state come out bit for bit the same."""
    ids = torch.randint(0, 4000, (200,))
    ids[:5] = 17
    ids[9::11] = 33
    used, compact_ids = torch.unique(ids, return_inverse=True)  # order-preserving map
    dim = 40
    sparse_w = torch.randn(4000, dim, dtype=dtype)
    compact_w = sparse_w[used].clone()
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sparse_s = torch.rand(4000, dtype=state_dtype) if rule == 3 else None
    compact_s = sparse_s[used].clone() if rule == 3 else None
    grad = torch.randn(200, dim, dtype=dtype)
    for w, s, i in ((sparse_w, sparse_s, ids), (compact_w, compact_s, compact_ids)):
        ee.ops.embedding_fused_update_(w, grad, i, -1, False, rule, s, None, 0.1, 1e-8, 0.9,
                                       0.999, 0.0, 1)
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(sparse_w[used].view(bits), compact_w.view(bits))
    if rule == 3:
        assert torch.equal(sparse_s[used], compact_s)


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_max_norm_renorms_as_without_fusion(optimizer_class, kwargs):
    fused, plain = _pair(11, 5, torch.float64, 1, False, max_norm=0.7)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    for _ in range(4):
        ids, grad_out = _batch(11, 10, 1, 5, torch.float64)
        _step_both(fused, opt, plain, ref, (ids,), grad_out)
    torch.testing.assert_close(fused.weight, plain.weight, **TOL[torch.float64])


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_lr_change_takes_effect_at_the_next_backward(optimizer_class, kwargs):
    fused, plain = _pair(9, 4, torch.float64, None, False)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    for lr in (kwargs["lr"], kwargs["lr"] / 3, kwargs["lr"] * 2):
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        ids, grad_out = _batch(9, 8, None, 4, torch.float64)
        _step_both(fused, opt, plain, ref, (ids,), grad_out)
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[torch.float64])


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_state_dict_moves_between_fused_and_unfused(optimizer_class, kwargs):
    """Three steps fused, then three unfused from its state_dict; and the other way round:
    both give the weights of six unfused steps."""
    batches = [_batch(13, 12, 0, 4, torch.float64) for _ in range(6)]
    fused, plain = _pair(13, 4, torch.float64, 0, False)
    start = copy.deepcopy(plain.state_dict())

    def unfused_steps(module, optimizer, chunk):
        for ids, grad_out in chunk:
            module(ids).backward(grad_out)
            optimizer.step()
            optimizer.zero_grad()

    def fused_steps(module, optimizer, chunk):
        for ids, grad_out in chunk:
            module(ids).backward(grad_out)
            optimizer.step()

    ref = optimizer_class(plain.parameters(), **kwargs)
    unfused_steps(plain, ref, batches)
    for first, second in (("fused", "unfused"), ("unfused", "fused")):
        a = ee.Embedding(13, 4, padding_idx=0, dtype=torch.float64)
        b = torch.nn.Embedding(13, 4, padding_idx=0, sparse=True, dtype=torch.float64)
        a.load_state_dict(start)
        b.load_state_dict(start)
        if first == "fused":
            opt_a = ee.fuse_optimizer(a, optimizer_class, **kwargs)
            fused_steps(a, opt_a, batches[:3])
            b.load_state_dict(a.state_dict())
            opt_b = optimizer_class(b.parameters(), **kwargs)
            opt_b.load_state_dict(opt_a.state_dict())
            unfused_steps(b, opt_b, batches[3:])
            result = b.weight
        else:
            opt_b = optimizer_class(b.parameters(), **kwargs)
            unfused_steps(b, opt_b, batches[:3])
            a.load_state_dict(b.state_dict())
            opt_a = ee.fuse_optimizer(a, optimizer_class, **kwargs)
            opt_a.load_state_dict(opt_b.state_dict())
            fused_steps(a, opt_a, batches[3:])
            result = a.weight
        torch.testing.assert_close(result, plain.weight, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_fp32_state(dtype):
    emb = ee.Embedding(10, 8, dtype=dtype)
    opt = ee.fuse_optimizer(emb, torch.optim.SparseAdam, lr=0.01)
    reference = emb.weight.detach().float().clone().requires_grad_()
    ref = torch.optim.SparseAdam([reference], lr=0.01)
    ids, grad_out = _batch(10, 12, None, 8, torch.float32)
    emb(ids).backward(grad_out.to(dtype))
    opt.step()
    torch.nn.functional.embedding(ids, reference, sparse=True).backward(grad_out.to(dtype).float())
    ref.step()
    assert opt.state[emb.weight]["exp_avg"].dtype == torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(emb.weight.float(), reference.detach(), **tol)


@pytest.mark.parametrize("optimizer_class, kwargs, message", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9), "momentum=0.9 cannot be fused"),
    (torch.optim.SGD, dict(lr=0.1, weight_decay=0.01), "weight_decay=0.01 cannot be fused"),
    (torch.optim.Adagrad, dict(lr=0.1, weight_decay=0.1), "weight_decay=0.1 cannot be fused"),
    (torch.optim.SparseAdam, dict(lr=0.1, maximize=True), "maximize=True cannot be fused"),
    (torch.optim.Adam, dict(lr=0.1), "'optimizer_class' must be one of"),
])
def test_unsupported_optimizers_are_refused(optimizer_class, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ee.fuse_optimizer(ee.Embedding(5, 3), optimizer_class, **kwargs)


def test_refusals_during_training():
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    ids = torch.tensor([1, 2, 2])
    with pytest.raises(TypeError, match="'module' must be an ee.Embedding"):
        ee.fuse_optimizer(torch.nn.Embedding(8, 3), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="already has a fused optimizer"):
        ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="one parameter"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 2))]})
    # create_graph=True: refused, nothing applied
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(emb(ids).sum(), emb.weight, create_graph=True, allow_unused=True)
    assert torch.equal(emb.weight, before)
    # two lookups in one step: the second update is refused (the first was applied)
    first = emb(ids).sum()
    second = emb(ids).sum()
    with pytest.raises(RuntimeError, match="second backward through the fused lookup"):
        (first + second).backward()
    opt.step()
    # gradient accumulation: a second backward before step()
    out = emb(ids).sum()
    out.backward(retain_graph=True)
    after_one = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="second backward through the fused lookup"):
        out.backward()
    assert torch.equal(emb.weight, after_one)  # nothing applied twice
    opt.step()
    # tied weights: a gradient from another use of the weight
    tied = emb(ids) @ emb.weight.t()
    with pytest.raises(RuntimeError, match="received a gradient from outside its lookup"):
        tied.sum().backward()
    assert emb.weight.grad is None
    opt.step()


def test_a_failed_step_changes_nothing_and_training_goes_on():
    """A bad id: IndexError in the forward, no state or flag left behind; the next step
    trains as usual (and the step count is the number of applied updates)."""
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SparseAdam, lr=0.1)
    before = emb.weight.detach().clone()
    with pytest.raises(IndexError):
        emb(torch.tensor([1, 9])).sum().backward()
    assert torch.equal(emb.weight, before)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["step"] == 1
    assert not torch.equal(emb.weight, before)


def test_copies_are_not_fused_and_dropping_the_optimizer_unfuses():
    import pickle
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    ids = torch.tensor([1, 2])
    for clone in (copy.deepcopy(emb), pickle.loads(pickle.dumps(emb))):
        clone(ids).sum().backward()  # an ordinary lookup: its own gradient
        assert clone.weight.grad is not None and torch.equal(clone.weight, emb.weight)
    del opt
    import gc
    gc.collect()
    emb(ids).sum().backward()  # unfused now: the gradient is built, no refusal
    assert emb.weight.grad is not None


def test_version_counter_sees_the_update():
    """The in-place update is visible to autograd: a node that saved the weight and runs
    after the fused update refuses instead of reading the updated rows."""
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)  # kept: the fusion lasts while it lives
    u = torch.randn(2, 3, requires_grad=True)
    version = emb.weight._version
    z = (u * 2) @ emb.weight.detach().t()  # saves the weight (its version now)
    emb(torch.tensor([1, 2])).sum().backward()  # the fused update
    assert emb.weight._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer_class, kwargs", CASES[1:], ids=IDS[1:])
def test_low_precision_state_dict_round_trip(dtype, optimizer_class, kwargs):
    """fp32 state for fp16/bf16 weights stays fp32 through state_dict / load_state_dict
    (torch's load casts state to the weight's dtype)."""
    emb = ee.Embedding(10, 4, dtype=dtype)
    opt = ee.fuse_optimizer(emb, optimizer_class, **kwargs)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()
    resumed = ee.Embedding(10, 4, dtype=dtype)
    resumed.load_state_dict(emb.state_dict())
    resumed_opt = ee.fuse_optimizer(resumed, optimizer_class, **kwargs)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for name, value in resumed_opt.state[resumed.weight].items():
        if name != "step":
            assert value.dtype == torch.float32, name
    for module, optimizer in ((emb, opt), (resumed, resumed_opt)):
        module(torch.tensor([2, 3])).sum().backward()
        optimizer.step()
    assert torch.equal(resumed.weight, emb.weight)


def test_no_grad_and_frozen_lookups_leave_the_weight_alone():
    """Lookups without a gradient for the weight (no_grad, a frozen weight) take the plain
    path: no update, no state; training then goes on as usual."""
    emb = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(emb, torch.optim.SparseAdam, lr=0.1)
    ids = torch.tensor([1, 2])
    before = emb.weight.detach().clone()
    with torch.no_grad():
        assert emb(ids).grad_fn is None
    emb.weight.requires_grad_(False)
    x = torch.randn(2, 3, requires_grad=True)
    (emb(ids) * x).sum().backward()  # only x gets a gradient
    assert x.grad is not None and torch.equal(emb.weight, before) and not opt.state
    emb.weight.requires_grad_(True)
    emb(ids).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["step"] == 1 and not torch.equal(emb.weight, before)


def test_bad_id_changes_no_row():
    """An id outside the table raises IndexError before any row or state changes."""
    emb = ee.Embedding(10, 8)
    opt = ee.fuse_optimizer(emb, torch.optim.Adagrad, lr=0.1)
    before = emb.weight.detach().clone()
    with pytest.raises(IndexError, match="embedding_fused_update_: index 12 at position 1"):
        ee.ops.embedding_fused_update_(emb.weight.data, torch.ones(3, 8), torch.tensor([1, 12, 3]),
                                       -1, False, 1, opt.state[emb.weight]["sum"], None, 0.1,
                                       1e-10, 0.0, 0.0, 0.0, 1)
    assert torch.equal(emb.weight, before)
    assert not opt.state[emb.weight]["sum"].any()


@pytest.mark.parametrize("rule", range(4), ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_instruction_set_gives_the_same_bits(rule, dtype):
    """The portable, AVX2 and AVX-512 copies of the CPU update (whichever this CPU runs) give
    bitwise the same rows and state: rows seen once (updated from their gradient row) and
    many times, padding, scale_grad_by_freq, widths around the vector and lane sizes, with
    inf, -0 and NaN in the gradient (NaN elements compared as NaN: which NaN operand's
    payload an add keeps is not part of the contract)."""
    isas = cpu_isas()
    if len(isas) == 1:
        pytest.skip("this CPU runs only the portable copy")
    as_bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # 50 rows: most touched (walked by row); 1000: under a quarter touched (SGD and row-wise
    # Adagrad then update the rows seen once first, in position order).
    for dim, num_rows in [(1, 50), (7, 1000), (16, 50), (24, 1000), (70, 50), (128, 1000),
                          (200, 50)]:
        for padding_idx, scale in [(-1, False), (3, True)]:
            ids = torch.randint(0, num_rows, (90,))
            ids[::4] = 9  # a hot row among rows seen once
            ids[1::7] = 3
            counts = torch.bincount(ids[ids != padding_idx], minlength=num_rows)
            assert (counts == 1).any() and (counts > 1).any()
            grad = torch.randn(90, dim, dtype=dtype)
            grad[0, 0], grad[1, -1], grad[2, dim // 2] = float("inf"), -0.0, float("nan")
            weight = torch.randn(num_rows, dim, dtype=dtype)
            weight[ids[2], 0] = -0.0
            states = [torch.rand(num_rows, dim, dtype=state_dtype) if rule in (1, 2) else
                      torch.rand(num_rows, dtype=state_dtype) if rule == 3 else None,
                      torch.rand(num_rows, dim, dtype=state_dtype) if rule == 2 else None]

            def run():
                w = weight.clone()
                s = [None if t is None else t.clone() for t in states]
                ee.ops.embedding_fused_update_(w, grad, ids, padding_idx, scale, rule, s[0], s[1],
                                               0.1, 1e-8, 0.9, 0.999, 0.01, 3)
                return [w] + [t for t in s if t is not None]
            results = each_cpu_isa(run)
            for isa in isas[1:]:
                for ours, base in zip(results[isa], results["portable"]):
                    bits = as_bits if ours.dtype == dtype else (
                        torch.int64 if ours.dtype == torch.float64 else torch.int32)
                    assert torch.equal(ours.isnan(), base.isnan()), (isa, dim, padding_idx)
                    same = ours.view(bits) == base.view(bits)
                    assert (same | base.isnan()).all(), (isa, dim, padding_idx)
            assert not torch.equal(results["portable"][0], weight)


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx, scale", [(None, False), (0, True)])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_matches_the_cpu_kernel(optimizer_class, kwargs, dtype, padding_idx, scale):
    """The CUDA kernel (a warp per distinct row) against the CPU kernel, step by step, with
    a hot row, padding, scale_grad_by_freq; states compared too."""
    modules = {dev: ee.Embedding(40, 70, padding_idx=padding_idx, scale_grad_by_freq=scale,
                                 dtype=dtype, device=dev) for dev in ("cpu", "cuda")}
    with torch.no_grad():
        modules["cuda"].weight.copy_(modules["cpu"].weight)
    opts = {dev: ee.fuse_optimizer(m, optimizer_class, **kwargs) for dev, m in modules.items()}
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else (
        dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2))
    for _ in range(5):
        ids, grad_out = _batch(40, 300, padding_idx, 70, dtype)
        for dev, m in modules.items():
            m(ids.to(dev)).backward(grad_out.to(dev))
            opts[dev].step()
        torch.testing.assert_close(modules["cuda"].weight.cpu(), modules["cpu"].weight, **tol)
    for name, value in opts["cpu"].state[modules["cpu"].weight].items():
        other = opts["cuda"].state[modules["cuda"].weight][name]
        torch.testing.assert_close(torch.as_tensor(other).cpu().double(),
                                   torch.as_tensor(value).double(), rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_bad_id_changes_no_row_and_raises_later():
    emb = ee.Embedding(10, 8, device="cuda")
    opt = ee.fuse_optimizer(emb, torch.optim.Adagrad, lr=0.1)
    before = emb.weight.detach().clone()
    state_before = opt.state[emb.weight]["sum"].clone()
    out = ee.ops.embedding_forward(emb.weight.detach(), torch.tensor([1, 2], device="cuda"))
    grad = torch.ones(3, 8, device="cuda")
    ee.ops.embedding_fused_update_(emb.weight.data, grad, torch.tensor([1, 12, 3], device="cuda"),
                                   -1, False, 1, opt.state[emb.weight]["sum"], None, 0.1, 1e-10,
                                   0.0, 0.0, 0.0, 1)
    with pytest.raises(IndexError, match="embedding_fused_update_: index 12 at position 1"):
        ee.check_cuda_index_errors()
    assert torch.equal(emb.weight, before)
    assert torch.equal(opt.state[emb.weight]["sum"], state_before)
    del out


def test_unfused_modules_still_compile_fullgraph_next_to_a_fused_one():
    """The fusion check is a class-level None for every unfused module: torch.compile with
    fullgraph=True is unaffected by a fused table elsewhere in the program."""
    fused_table = ee.Embedding(8, 3)
    opt = ee.fuse_optimizer(fused_table, torch.optim.SGD, lr=0.1)
    plain = ee.Embedding(8, 3)
    compiled = torch.compile(plain, fullgraph=True, backend="eager")
    ids = torch.tensor([1, 2, 2])
    torch.testing.assert_close(compiled(ids), plain.weight[ids])
    fused_table(ids).sum().backward()
    opt.step()


class _TwoTableModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = ee.Embedding(30, 8, padding_idx=0)
        self.bags = ee.EmbeddingBag(20, 8, mode="mean")
        self.head = torch.nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, ids, bag_ids, offsets):
        x = self.tokens(ids).sum(1) + self.bags(bag_ids, offsets)
        return self.head(torch.tanh(x)).square().sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
def test_a_compiled_model_with_fused_tables_trains_as_eager(optimizer_class, kwargs, device):
    """torch.compile of a model with a fused ee.Embedding and ee.EmbeddingBag: the fused
    lookups run eagerly (a graph break each, the only ones), the rest compiles through
    AOTAutograd, and every step updates the tables as the same model run eagerly (with
    fullgraph=True the error names the reason)."""
    eager = _TwoTableModel().double().to(device)
    compiled_model = copy.deepcopy(eager)  # (a copy is not fused: fused below)
    initial = [eager.tokens.weight.detach().clone(), eager.bags.weight.detach().clone()]
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled_model)):
        opts = [ee.fuse_optimizer(model.tokens, optimizer_class, **kwargs),
                ee.fuse_optimizer(model.bags, optimizer_class, **kwargs),
                torch.optim.SGD(model.head.parameters(), lr=0.1)]
        run = torch.compile(model, backend="aot_eager") if name == "compiled" else model
        runs[name] = (model, opts, run)
    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 30, (4, 5), generator=gen)
        ids[0, :2] = 7  # a duplicate and padding
        ids[1, 0] = 0
        bag_ids = torch.randint(0, 20, (9,), generator=gen)
        offsets = torch.tensor([0, 3, 3, 7])
        ids, bag_ids, offsets = ids.to(device), bag_ids.to(device), offsets.to(device)
        for model, opts, run in runs.values():
            run(ids, bag_ids, offsets).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
    breaks = counters["graph_break"]  # only the fused lookups', each time they ran
    assert breaks and all("fused_lookup" in why or "fused_bag_lookup" in why for why in breaks)
    (eager, eager_opts, _), (comp, comp_opts, _) = runs["eager"], runs["compiled"]
    for a, b in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert not torch.equal(comp.tokens.weight, initial[0])  # the tables did train
    assert not torch.equal(comp.bags.weight, initial[1])
    for ours, theirs in zip(comp_opts[:2], eager_opts[:2]):  # states too (step counts: 3)
        ours, theirs = ours.state_dict()["state"], theirs.state_dict()["state"]
        assert ours.keys() == theirs.keys()
        for k in ours:
            assert ours[k].keys() == theirs[k].keys()
            for name in ours[k]:
                torch.testing.assert_close(torch.as_tensor(ours[k][name]),
                                           torch.as_tensor(theirs[k][name]), rtol=1e-10, atol=0)
    torch._dynamo.reset()  # (else the cached graphs, with their breaks, are reused)
    with pytest.raises(Exception, match="fused optimizer's lookup runs eagerly"):
        torch.compile(comp, backend="aot_eager", fullgraph=True)(ids, bag_ids, offsets)


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("rule, state1, state2, message", [
    (1, None, None, "rule 1 needs 'state1'"),
    (2, torch.zeros(6, 3), None, "rule 2 needs 'state2'"),
    (3, torch.zeros(6, 3), None, "'state1' must be a contiguous .* tensor of shape"),
    (1, torch.zeros(6, 3, dtype=torch.float64), None, "'state1' must be a contiguous"),
    (4, None, None, "'rule' must be 0 \\(SGD\\)"),
])
def test_fused_update_arguments_refused_alike_by_kernel_and_fake(fake, rule, state1, state2,
                                                                 message):
    args = [torch.zeros(6, 3), torch.ones(4, 3), torch.tensor([1, 2, 2, 5]), -1, False, rule,
            state1, state2, 0.1, 1e-8, 0.9, 0.99, 0.0, 1]
    with pytest.raises(RuntimeError, match=message):
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode
            with FakeTensorMode() as mode:
                torch.ops.embedding_ext.embedding_fused_update_(
                    *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        else:
            torch.ops.embedding_ext.embedding_fused_update_(*args)


@pytest.mark.parametrize("rule", [0, 1])
def test_fused_update_refuses_a_gradient_that_shares_memory_with_what_it_writes(rule):
    """The kernels read gradient rows while writing weight and state rows: a gradient
    that aliases either is refused before anything is written."""
    weight, state = torch.randn(6, 3), torch.zeros(6, 3)
    before = weight.clone()
    for grad in ([weight[1:5]] if rule == 0 else [weight[1:5], state[2:6]]):
        with pytest.raises(RuntimeError, match="refer to a single memory location"):
            torch.ops.embedding_ext.embedding_fused_update_(
                weight, grad, torch.tensor([1, 2, 2, 5]), -1, False, rule,
                state if rule else None, None, 0.1, 1e-8, 0.9, 0.99, 0.0, 1)
    assert torch.equal(weight, before) and not state.any()


# Bags (ee.EmbeddingBag, modes sum and mean): the positions' gradient rows go to the same
# fused update.
BAG_FORMS = {
    "sum+psw+pad": dict(mode="sum", padding_idx=2, psw=True),
    "sum+freq+csr-tail": dict(mode="sum", scale_grad_by_freq=True, include_last_offset=True),
    "mean+pad+freq": dict(mode="mean", padding_idx=0, scale_grad_by_freq=True),
    "mean+2d": dict(mode="mean", two_d=True),
}


def _bag_batch(form: dict, num_weights: int, dim: int, dtype, step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, num_weights, (30,), generator=g)
    ids[::3] = 4  # a hot row
    if form.get("padding_idx") is not None:
        ids[1::5] = form["padding_idx"]
    offsets = torch.tensor([0, 5, 5, 12, 20])  # an empty bag; with include_last_offset the
    if form.get("two_d"):                       # ids past 20 are in no bag
        ids, offsets = ids.reshape(5, 6), None
    psw = torch.randn(ids.shape, dtype=dtype, generator=g) if form.get("psw") else None
    bags = 5 if offsets is None else offsets.numel() - form.get("include_last_offset", False)
    return ids, offsets, psw, torch.randn(bags, dim, dtype=dtype, generator=g)


def _bag_pair(form: dict, dtype):
    kwargs = {k: form[k] for k in ("mode", "padding_idx", "scale_grad_by_freq",
                                   "include_last_offset") if k in form}
    fused = ee.EmbeddingBag(17, 6, dtype=dtype, **kwargs)
    plain = ee.EmbeddingBag(17, 6, dtype=dtype, sparse=True, **kwargs)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("form", list(BAG_FORMS), ids=list(BAG_FORMS))
def test_bags_match_the_unfused_optimizer_over_steps(optimizer_class, kwargs, form):
    """ee.EmbeddingBag fused against its own sparse gradient + the torch optimizer
    (ee.EmbeddingBag's sparse gradient is checked against PyTorch's in test_bag.py)."""
    form = BAG_FORMS[form]
    fused, plain = _bag_pair(form, torch.float64)
    opt = ee.fuse_optimizer(fused, optimizer_class, **kwargs)
    ref = optimizer_class(plain.parameters(), **kwargs)
    pad = form.get("padding_idx")
    before_pad = None if pad is None else fused.weight[pad].detach().clone()
    for step in range(6):
        ids, offsets, psw, grad_out = _bag_batch(form, 17, 6, torch.float64, step)
        _step_both(fused, opt, plain, ref, (ids, offsets, psw), grad_out)
        torch.testing.assert_close(fused.weight, plain.weight, **TOL[torch.float64])
    if before_pad is not None:
        assert torch.equal(fused.weight[pad], before_pad)
    ours, theirs = opt.state_dict()["state"], ref.state_dict()["state"]
    for k in theirs:
        for name in theirs[k]:
            torch.testing.assert_close(torch.as_tensor(ours[k][name]).double(),
                                       torch.as_tensor(theirs[k][name]).double(),
                                       **TOL[torch.float64])


def test_bag_per_sample_weights_get_their_gradient_from_the_weights_before_the_update():
    form = BAG_FORMS["sum+psw+pad"]
    fused, plain = _bag_pair(form, torch.float64)
    opt = ee.fuse_optimizer(fused, torch.optim.SGD, lr=0.5)  # kept: dropping it unfuses
    ids, offsets, psw, grad_out = _bag_batch(form, 17, 6, torch.float64, 0)
    p_fused, p_plain = psw.clone().requires_grad_(), psw.clone().requires_grad_()
    fused(ids, offsets, p_fused).backward(grad_out)
    plain(ids, offsets, p_plain).backward(grad_out)
    torch.testing.assert_close(p_fused.grad, p_plain.grad, **TOL[torch.float64])
    assert not torch.equal(fused.weight, plain.weight)  # the update did happen
    assert fused.weight.grad is None
    del opt


def test_bag_max_mode_is_refused():
    with pytest.raises(NotImplementedError, match="mode='max' cannot be fused"):
        ee.fuse_optimizer(ee.EmbeddingBag(10, 4, mode="max"), torch.optim.SGD, lr=0.1)
    bag = ee.EmbeddingBag(10, 4, mode="sum")
    opt = ee.fuse_optimizer(bag, torch.optim.SGD, lr=0.1)
    bag.mode = "max"  # changed after fusing: refused at the lookup, nothing updated
    before = bag.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="mode='max' cannot be fused"):
        bag(torch.tensor([[1, 2]]))
    assert torch.equal(bag.weight, before)
    del opt


def test_bag_second_backward_before_step_is_refused():
    bag = ee.EmbeddingBag(10, 4, mode="mean")
    opt = ee.fuse_optimizer(bag, torch.optim.SGD, lr=0.1)
    bag(torch.tensor([[1, 2]])).sum().backward()
    with pytest.raises(RuntimeError, match="second backward through the fused lookup"):
        bag(torch.tensor([[1, 3]])).sum().backward()
    opt.step()
    bag(torch.tensor([[1, 3]])).sum().backward()


@pytest.mark.parametrize("optimizer_class, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_bags_match_the_cpu_kernels(optimizer_class, kwargs, dtype):
    form = BAG_FORMS["sum+psw+pad"]
    modules = {}
    for dev in ("cpu", "cuda"):
        modules[dev] = ee.EmbeddingBag(17, 6, mode="sum", padding_idx=2, dtype=dtype, device=dev)
    with torch.no_grad():
        modules["cuda"].weight.copy_(modules["cpu"].weight)
    opts = {dev: ee.fuse_optimizer(m, optimizer_class, **kwargs) for dev, m in modules.items()}
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for step in range(4):
        ids, offsets, psw, grad_out = _bag_batch(form, 17, 6, dtype, step)
        for dev, m in modules.items():
            m(ids.to(dev), offsets.to(dev), psw.to(dev)).backward(grad_out.to(dev))
            opts[dev].step()
        torch.testing.assert_close(modules["cuda"].weight.cpu(), modules["cpu"].weight, **tol)


def test_a_weight_replaced_after_fusing_raises_at_the_lookup():
    """parallelize_module / fully_shard / an assignment after fuse_optimizer: the new weight
    would get ordinary gradients that the fused step ignores (training would silently stop),
    so the lookup raises while the old optimizer lives; fusing again works."""
    emb = ee.Embedding(10, 4)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    emb.weight = torch.nn.Parameter(emb.weight.detach().clone())
    with pytest.raises(RuntimeError, match="replaced after fusing"):
        emb(torch.tensor([1, 2]))
    del opt
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    before = emb.weight.detach().clone()
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    assert emb.weight.grad is None and not torch.equal(emb.weight, before)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_+step"])
def test_grad_scaler_is_refused_by_name(unscale_first):
    """torch.amp.GradScaler.step() on a fused optimizer raises an error that names the
    problem (the update already used the scaled gradient), not the scaler's "No inf checks
    were recorded", also after scaler.unscale_() (the gradient-clipping recipe, where the
    scaler passes no scale); the optimizer is left usable without the scaler."""
    emb = ee.Embedding(10, 4)
    opt = ee.fuse_optimizer(emb, torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(emb(torch.tensor([1, 2])).sum()).backward()
    if unscale_first:
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="GradScaler cannot drive a fused optimizer"):
        scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    opt.step()
    before = emb.weight.detach().clone()
    emb(torch.tensor([3])).sum().backward()
    opt.step()
    torch.testing.assert_close(emb.weight[3], before[3] - 0.1)
