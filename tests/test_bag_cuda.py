"""ee.embedding_bag's CUDA kernels (skipped without a GPU): against our CPU kernels, bad ids and
offsets raised later without a synchronisation, and the deterministic-algorithms mode."""
import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from bags import MODES, grads_of, make_bags
from conftest import TOL, make_weight, poison


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
    ids, offsets = make_bags(40, padding_idx=2)
    ids = torch.cat([ids, torch.tensor([5, 39])])  # after the last offset: in the last bag
    csr = torch.cat([offsets, torch.tensor([ids.numel() - 2])])
    psw = torch.randn(ids.shape, dtype=dtype) if "weights" in mode else None
    grad_out = torch.randn(csr.numel() - 1, dim, dtype=dtype)
    kwargs = dict(mode=m, padding_idx=2, include_last_offset=True, sparse=sparse,
                  scale_grad_by_freq="freq" in mode)
    results = []
    for device in ("cpu", "cuda"):
        poison(csr.numel() * dim, dtype, device)
        to = (lambda t: None if t is None else t.to(device))
        results.append(grads_of(ee.embedding_bag, to(weight), to(ids), to(csr),
                                grad_out=to(grad_out), psw=to(psw), **kwargs))
    (cpu_out, cpu_grads), (cuda_out, cuda_grads) = results
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, **tol)
    for a, b in zip(cuda_grads, cpu_grads):
        if sparse and a.is_sparse:
            assert torch.equal(a._indices().cpu(), b._indices())
            a, b = a._values(), b._values()
        torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_cuda_sparse_bag_gradient_with_every_position_kept(dtype, mode):
    """No padding, every id in a bag: the CUDA sparse gradient keeps the position rows as
    they are (no compaction copy); values and rows as our CPU kernels give them."""
    weight = make_weight(40, 24, dtype)
    ids, offsets = make_bags(40)
    grad_out = torch.randn(offsets.numel(), 24, dtype=dtype)
    results = [grads_of(ee.embedding_bag, weight.to(device), ids.to(device), offsets.to(device),
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
            runs = [grads_of(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out,
                             mode=mode)[1][0] for _ in range(2)]
            assert torch.equal(runs[0], runs[1])
        with pytest.raises(RuntimeError, match="embedding_bag_dense_backward"):
            grads_of(ee.embedding_bag, weight, ids, offsets, grad_out=grad_out, mode="max")
    finally:
        torch.use_deterministic_algorithms(False)
