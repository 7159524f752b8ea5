"""The fused update op (ee.ops.embedding_fused_update_) itself: the same bits whatever order the
rows are walked in and whatever instruction set the CPU copy uses, its argument checks (kernel
and fake kernel alike), a bad id or an aliasing gradient refused before any write, and the
CUDA kernel against the CPU one."""
import pytest
import torch

import embedding_ext as ee
from conftest import call_op, cpu_isas, each_cpu_isa
from fused_cases import CASES, IDS, batch


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
        call_op(torch.ops.embedding_ext.embedding_fused_update_, args, fake)


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
        ids, grad_out = batch(40, 300, padding_idx, 70, dtype)
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
