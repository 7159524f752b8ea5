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


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(), dict(padding_idx=0, scale_grad_by_freq=True)],
                         ids=["plain", "pad-freq"])
def test_dense_backward_bitwise_reproducible(device, dtype, options, deterministic):
    # Many positions on few rows: the order of additions matters in floating point.
    weight = make_weight(64, 96, dtype, device)
    idx = make_indices((4096,), 64, device, padding_idx=0)
    grad_out = torch.randn(4096, 96, dtype=dtype, device=device)
    first = _grad(weight, idx, grad_out, **options)
    for _ in range(3):
        assert torch.equal(_grad(weight, idx, grad_out, **options), first)


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
@pytest.mark.parametrize("options", [dict(), dict(padding_idx=3, scale_grad_by_freq=True)],
                         ids=["plain", "pad-freq"])
def test_cpu_scatter_and_sorted_paths_agree_bitwise(dtype, options, monkeypatch):
    """fp32/fp64 take the sort-free scatter path, fp16/bf16 the sorted one; both sum each
    row in ascending position order, so forcing the sorted path changes no bit."""
    weight = make_weight(500, 24, dtype)
    idx = make_indices((30000,), 500, padding_idx=3)
    grad_out = torch.randn(30000, 24, dtype=dtype)
    scatter = _grad(weight, idx, grad_out, **options)
    monkeypatch.setenv("EMBEDDING_EXT_CPU_SORTED_BACKWARD", "1")
    sorted_path = _grad(weight, idx, grad_out, **options)
    assert torch.equal(scatter, sorted_path)
    expected = reference.dense_backward(grad_out, idx, 500, options.get("padding_idx"),
                                        options.get("scale_grad_by_freq", False))
    # Hot rows sum thousands of fp32 terms: allow for their rounding.
    torch.testing.assert_close(scatter.double(), expected, rtol=1e-4, atol=1e-3)
