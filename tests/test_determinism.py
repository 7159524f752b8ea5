"""Bitwise reproducibility: always on the CPU (any thread count), under
torch.use_deterministic_algorithms(True) on CUDA."""
import pytest
import torch

import embedding_ext as ee
from embedding_ext import reference
from conftest import DEVICES, make_indices, make_weight


def _grad(weight, idx, grad_out, **options):
    w = weight.detach().clone().requires_grad_()
    ee.embedding(idx, w, **options).backward(grad_out)
    return w.grad


CUDA = [p for p in DEVICES if p.id == "cuda"]
OPTIONS = [dict(), dict(padding_idx=0, scale_grad_by_freq=True)]


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "pad-freq"])
def test_cuda_deterministic_backward_bitwise_reproducible(device, dtype, options, deterministic):
    # Many positions on few rows: with atomics the order of additions would vary.
    weight = make_weight(64, 96, dtype, device)
    idx = make_indices((4096,), 64, device, padding_idx=0)
    grad_out = torch.randn(4096, 96, dtype=dtype, device=device)
    first = _grad(weight, idx, grad_out, **options)
    for _ in range(3):
        assert torch.equal(_grad(weight, idx, grad_out, **options), first)
    torch.testing.assert_close(first.double(), reference.dense_backward(
        grad_out, idx, 64, options.get("padding_idx"), options.get("scale_grad_by_freq", False)),
        rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [1, 3, 4, 6, 96, 257])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "pad-freq"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "grad-offset"])
def test_cuda_sorted_backward_hot_rows(device, dtype, dim, options, offset, deterministic):
    """Segments far longer than the sorted path's chunks (a row hit 20,000 times, others a
    few hundred or once), every vector width (and a grad_output one element off alignment):
    right against float64, and the same bits on every run."""
    n = 30000
    idx = torch.randint(0, 5000, (n,), device=device)
    idx[torch.rand(n, device=device) < 0.66] = 7  # the hot row
    idx[torch.rand(n, device=device) < 0.05] = 0  # padding (when asked for)
    idx[torch.rand(n, device=device) < 0.03] = 4999
    weight = make_weight(5000, dim, dtype, device)
    grad_out = torch.randn(n * dim + offset, dtype=dtype, device=device)[offset:].view(n, dim)
    first = _grad(weight, idx, grad_out, **options)
    assert torch.equal(_grad(weight, idx, grad_out, **options), first)
    expected = reference.dense_backward(grad_out, idx, 5000, options.get("padding_idx"),
                                        options.get("scale_grad_by_freq", False))
    tol = dict(rtol=1e-2, atol=1e-1) if dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(first.double(), expected, **tol)


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_backward_is_reproducible_by_default(device, dtype):
    """fp16/bf16 always take the sorted path (no fp32 scratch of the table), so their
    gradient is the same on every run without use_deterministic_algorithms too."""
    idx = make_indices((20000,), 300, device, padding_idx=0)
    weight = make_weight(300, 64, dtype, device)
    grad_out = torch.randn(20000, 64, dtype=dtype, device=device)
    first = _grad(weight, idx, grad_out, padding_idx=0)
    for _ in range(2):
        assert torch.equal(_grad(weight, idx, grad_out, padding_idx=0), first)


def _position_order_sum(grad_out, idx, num_weights, padding_idx, scale_grad_by_freq):
    """The CPU contract, computed the slow way: each row sums its positions in ascending
    order in float32 (float64 for float64), is multiplied by 1/count, then rounded once."""
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    acc = torch.zeros(num_weights, grad_out.shape[-1], dtype=acc_dtype)
    counts = torch.zeros(num_weights, dtype=torch.int64)
    for i, k in enumerate(idx.tolist()):
        if k != padding_idx:
            acc[k] += grad_out[i].to(acc_dtype)
            counts[k] += 1
    if scale_grad_by_freq:
        scale = torch.where(counts > 0, 1 / counts.clamp_min(1).to(acc_dtype), 1)
        acc *= scale[:, None]
    return acc.to(grad_out.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "pad-freq"])
def test_cpu_dense_backward_sums_in_position_order(dtype, options):
    """Bitwise: any other order of additions (atomics, a tree, a thread split) changes bits
    for a row hit 1,000 times."""
    weight = make_weight(64, 24, dtype)
    idx = make_indices((3000,), 64, padding_idx=0)
    grad_out = torch.randn(3000, 24, dtype=dtype)
    got = _grad(weight, idx, grad_out, **options)
    want = _position_order_sum(grad_out, idx, 64, options.get("padding_idx", -1),
                               options.get("scale_grad_by_freq", False))
    assert torch.equal(got, want)


def test_cpu_result_independent_of_thread_count():
    weight = make_weight(300, 33)
    idx = make_indices((20000,), 300, padding_idx=5)
    grad_out = torch.randn(20000, 33)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_grad(weight, idx, grad_out, padding_idx=5, scale_grad_by_freq=True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [dict(padding_idx=-1, scale_grad_by_freq=False),
                                     dict(padding_idx=3, scale_grad_by_freq=True)],
                         ids=["plain", "pad-freq"])
def test_cpu_scatter_and_sorted_paths_agree_bitwise(dtype, options):
    """fp32/fp64 take the sort-free scatter path, fp16/bf16 the sorted one; both sum each
    row in ascending position order. _C._cpu_dense_backward runs the path it is named, so
    each result below is known to come from that path."""
    idx = make_indices((30000,), 500, padding_idx=3)
    grad_out = torch.randn(30000, 24, dtype=dtype)
    args = (grad_out, idx, 500, options["padding_idx"], options["scale_grad_by_freq"])
    scatter = ee._C._cpu_dense_backward(*args, "scatter")
    sorted_path = ee._C._cpu_dense_backward(*args, "sorted")
    assert torch.equal(scatter, sorted_path)
    assert torch.equal(torch.ops.embedding_ext.embedding_dense_backward(*args), scatter)
    expected = reference.dense_backward(grad_out, idx, 500, None if options["padding_idx"] < 0
                                        else options["padding_idx"], options["scale_grad_by_freq"])
    # Hot rows sum thousands of fp32 terms: allow for their rounding.
    torch.testing.assert_close(scatter.double(), expected, rtol=1e-4, atol=1e-3)


def test_cpu_path_hook_refuses_what_a_path_cannot_do():
    grad_out = torch.randn(4, 3, dtype=torch.bfloat16)
    idx = torch.tensor([0, 1, 1, 2])
    with pytest.raises(RuntimeError, match="scatter path takes float32/float64 gradients, got BFloat16"):
        ee._C._cpu_dense_backward(grad_out, idx, 3, -1, False, "scatter")
    with pytest.raises(RuntimeError, match="'path' must be 'scatter' or 'sorted', got 'fast'"):
        ee._C._cpu_dense_backward(grad_out.float(), idx, 3, -1, False, "fast")
    sorted_bf16 = ee._C._cpu_dense_backward(grad_out, idx, 3, -1, False, "sorted")
    assert torch.equal(sorted_bf16, torch.ops.embedding_ext.embedding_dense_backward(grad_out, idx, 3, -1, False))
