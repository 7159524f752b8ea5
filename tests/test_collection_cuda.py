"""ee.EmbeddingBagCollection's CUDA kernels (skipped without a GPU): against the float64
reference and our CPU kernels, one kernel per pass, bad ids raised later without a
synchronisation, the deterministic-algorithms alert and the refused fused update."""
from __future__ import annotations

import copy

import pytest
import torch

import embedding_ext as ee

from conftest import INDEX_DTYPES, TOL, poison, switched
from test_collection import make_batch, make_ebc, ref_grad, reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]

HALF_TOL = dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dims", [(3, 8, 5), (24, 72, 130)])
def test_cuda_matches_the_reference_and_our_cpu(dtype, index_dtype, sparse, dims):
    cpu = make_ebc(dtype=dtype, sparse=sparse, dims=dims)
    gpu = copy.deepcopy(cpu).cuda()
    values, offsets = make_batch(cpu, 6, index_dtype=index_dtype, empty_feature="f2")
    values[int(offsets[2 * 6]):int(offsets[3 * 6]):2] = 3  # table_1's padding row, in f1
    poison(6 * 64, dtype, "cuda")
    out = gpu(values.cuda(), offsets.cuda())
    cpu_out = cpu(values, offsets)
    ref, ref_w = reference(cpu, values, offsets)
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else HALF_TOL
    torch.testing.assert_close(out.cpu().double(), ref, **tol)
    torch.testing.assert_close(out.cpu(), cpu_out, **tol)
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    out.backward(grad.cuda())
    cpu_out.backward(grad)
    ref.backward(grad.double())
    for name in cpu._table_names:
        g = gpu.embedding_bags[name].weight.grad
        c = cpu.embedding_bags[name].weight.grad
        assert g.is_sparse == sparse and g.dtype == dtype and g.is_cuda
        if sparse:  # one slot per pooled id, in position order, as on the CPU
            assert torch.equal(g._indices().cpu(), c._indices())
            torch.testing.assert_close(g._values().cpu().double(), c._values().double(), **tol)
        torch.testing.assert_close(g.cpu().double().to_dense(), ref_grad(ref_w, name), **tol)


@pytest.mark.parametrize("batch", [0, 1, 5])
def test_cuda_small_batches_psw_and_all_padding_bags(batch):
    cpu = make_ebc(pooling=("sum",) * 3, padding=(0, 3, 1))
    gpu = copy.deepcopy(cpu).cuda()
    values, offsets = make_batch(cpu, batch, max_len=3)
    if values.numel():
        values[: values.numel() // 2] = 0  # all-padding bags in table 0
    psw = torch.rand(values.shape[0], requires_grad=True)
    psw_gpu = psw.detach().cuda().requires_grad_()
    out = gpu(values.cuda(), offsets.cuda(), psw_gpu)
    cpu_out = cpu(values, offsets, psw)
    torch.testing.assert_close(out.cpu(), cpu_out, **TOL[torch.float32])
    out.sum().backward()
    cpu_out.sum().backward()
    torch.testing.assert_close(psw_gpu.grad.cpu(), psw.grad, **TOL[torch.float32])
    for name in cpu._table_names:
        torch.testing.assert_close(gpu.embedding_bags[name].weight.grad.cpu(),
                                   cpu.embedding_bags[name].weight.grad, **TOL[torch.float32])


def test_cuda_one_kernel_per_pass():
    ebc = make_ebc(dims=(16, 64, 7)).cuda()
    values, offsets = make_batch(ebc, 64)
    values, offsets = values.cuda(), offsets.cuda()
    ebc(values, offsets).sum().backward()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ebc(values, offsets).sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("collection_pool_kernel" in n for n in names) == 1, names
    assert sum("collection_grad_kernel" in n for n in names) == 1, names


@pytest.fixture
def asynchronous_checks():
    """The asynchronous error path, whatever EMBEDDING_EXT_SYNC_INDEX_CHECKS says."""
    yield from switched(ee.synchronous_index_checks, ee.set_synchronous_index_checks, False)


@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_more_features_than_one_launch_takes(sparse):
    """300 features (two launches of up to 256) over two shared tables."""
    tables = [ee.EmbeddingBagConfig(40, 8, [f"a{i}" for i in range(150)], name="a"),
              ee.EmbeddingBagConfig(9, 5, [f"b{i}" for i in range(150)], name="b",
                                    pooling="mean", padding_idx=1)]
    cpu = ee.EmbeddingBagCollection(tables, sparse=sparse)
    gpu = copy.deepcopy(cpu).cuda()
    values, offsets = make_batch(cpu, 3, max_len=2)
    out, ref = gpu(values.cuda(), offsets.cuda()), cpu(values, offsets)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])
    grad = torch.randn(ref.shape)
    out.backward(grad.cuda())
    ref.backward(grad)
    for (name, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        torch.testing.assert_close(p.grad.cpu().to_dense(), q.grad.to_dense(),
                                   **TOL[torch.float32], msg=name)


def test_cuda_bad_id_raises_later_and_the_context_survives(asynchronous_checks):
    ebc = make_ebc().cuda()
    values, offsets = make_batch(ebc, 4)
    values[-1] = 100  # past table_2's 2 rows
    with torch.no_grad():
        ebc(values.cuda(), offsets.cuda())  # queued: no synchronisation here
    with pytest.raises(IndexError, match="out of range"):
        ee.check_cuda_index_errors()
    good, offsets = make_batch(ebc, 4)
    torch.testing.assert_close(ebc(good.cuda(), offsets.cuda()).cpu(),
                               ebc.cpu()(good, offsets))


def test_cuda_bad_offsets_raise_later_and_pool_nothing_outside(asynchronous_checks):
    ebc = make_ebc().cuda()
    values, offsets = make_batch(ebc, 4)
    offsets[3] = offsets[-1] + 5  # past the ids
    with torch.no_grad():
        ebc(values.cuda(), offsets.cuda())
    with pytest.raises(IndexError, match="offsets"):
        ee.check_cuda_index_errors()


def test_cuda_dense_gradient_alerts_under_deterministic_algorithms(deterministic):
    ebc = make_ebc().cuda()
    values, offsets = make_batch(ebc, 4)
    out = ebc(values.cuda(), offsets.cuda())
    with pytest.raises(RuntimeError, match="deterministic"):
        out.sum().backward()


def test_cuda_fused_collection_is_refused_with_a_message():
    ebc = make_ebc(pooling=("sum",) * 3).cuda()
    opt = ee.fuse_optimizer(ebc, torch.optim.SGD, lr=0.1)
    values, offsets = make_batch(ebc, 4)
    before = {n: p.detach().clone() for n, p in ebc.named_parameters()}
    with pytest.raises(NotImplementedError, match="no CUDA kernel yet"):
        ebc(values.cuda(), offsets.cuda()).sum().backward()
    for n, p in ebc.named_parameters():
        assert torch.equal(p.detach(), before[n])
    del opt
