"""Reliability: inputs PyTorch users hit in practice, 64-bit sizes, threads, long runs."""
import concurrent.futures
import os

import pytest
import torch

import embedding_ext as ee
from embedding_ext import reference
from conftest import DEVICES, assert_close, make_indices, make_weight


def _available_bytes() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_float_indices_that_require_grad_are_refused():
    weight = make_weight(5, 3).requires_grad_()
    idx = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="'indices' must be an int64 or int32 tensor, got Float"):
        ee.embedding(idx, weight)


@pytest.mark.parametrize("device", DEVICES)
def test_errors_leave_the_weight_untouched(device):
    """A bad id anywhere in the call: no row is renormed, on every device (on CUDA a probe of
    the ids runs first on the same stream)."""
    weight = make_weight(6, 4, device=device) * 10
    before = weight.clone()
    ee.set_synchronous_index_checks(True)
    try:
        with pytest.raises(IndexError, match="index 6 at position 3"):
            ee.embedding(torch.tensor([1, 2, 1, 6, 0], device=device), weight, max_norm=1.0)
    finally:
        ee.set_synchronous_index_checks(False)
    assert torch.equal(weight, before), "renorm must not run when an index is bad"


@pytest.mark.skipif(_available_bytes() < 12 * 2**30, reason="needs 12 GiB of free memory")
def test_outputs_and_gradients_beyond_2_31_elements():
    """Offsets past 2^31 elements must not wrap: an output and a gradient of more than
    2^31 elements, checked at their last rows."""
    num_weights, dim = 2**21 + 3, 1024  # 2^31 + 3*1024 elements
    weight = torch.empty(num_weights, dim, dtype=torch.int8)
    weight[-3:] = torch.randint(-100, 100, (3, dim), dtype=torch.int8)
    idx = torch.full((2**21 + 1,), num_weights - 1, dtype=torch.int32)
    idx[-1] = num_weights - 2
    out = ee.embedding(idx, weight)  # int8 rows: a 2 GiB output
    assert out.numel() > 2**31
    assert torch.equal(out[-1], weight[-2]) and torch.equal(out[-2], weight[-1])
    del out
    grad_out = torch.randn(2, dim, dtype=torch.float16)
    grad = torch.ops.embedding_ext.embedding_dense_backward(
        grad_out, torch.tensor([num_weights - 1, 5]), num_weights, -1, False)
    assert grad.numel() > 2**31
    assert torch.equal(grad[-1], grad_out[0]) and torch.equal(grad[5], grad_out[1])
    assert not grad[-2].any() and not grad[-3].any()


def test_concurrent_calls_from_python_threads():
    def work(seed):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(3000, 96, generator=g).requires_grad_()  # 1.1 MiB: cached outputs
        idx = torch.randint(0, 3000, (4000,), generator=g)
        grad_out = torch.randn(4000, 96, generator=g)
        for _ in range(5):
            weight.grad = None
            out = ee.embedding(idx, weight, padding_idx=seed % 7, scale_grad_by_freq=True)
            out.backward(grad_out)
            if not torch.equal(out, weight.detach()[idx]):
                return False
            expected = reference.dense_backward(grad_out, idx, 3000, seed % 7, True)
            assert_close(weight.grad, expected, torch.float32)
        return True

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(8)))


def test_many_calls_leave_memory_flat():
    """A short version of bench/soak.py, tight enough to catch a leak of 1 KB per call:
    after 1,000 warm-up calls, RSS is sampled every 2,000 of 20,000 forward+backward calls
    and must grow by less than 512 bytes per call, both end to end and as a least-squares
    slope through the samples (a 1 KB/call leak grows it by ~20 MiB; the allocator's
    noise here is a few KiB in total)."""
    def rss():
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    warmup, calls, every, per_call = 1_000, 20_000, 2_000, 512
    emb = ee.Embedding(5000, 64, padding_idx=0, scale_grad_by_freq=True)
    idx = make_indices((32, 16), 5000, padding_idx=0)
    steps, samples = [], []
    for step in range(warmup + calls):
        emb.weight.grad = None
        emb(idx).sum().backward()
        done = step + 1 - warmup
        if done >= 0 and done % every == 0:
            steps.append(done)
            samples.append(rss())
    assert steps[-1] == calls and emb.weight.grad is not None
    x = torch.tensor(steps, dtype=torch.float64)
    y = torch.tensor(samples, dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    growth = samples[-1] - samples[0]
    trace = ", ".join(f"{(r - samples[0]) // 1024:+d}" for r in samples)
    assert growth < per_call * calls and slope < per_call, (
        f"RSS grew {growth / calls:.0f} B/call end to end, slope {slope:.0f} B/call "
        f"(limit {per_call}); KiB since warm-up every {every} calls: {trace}")


def test_runtime_controls_are_functions():
    """Every runtime setting can be changed from Python (the environment variables only set
    the initial values)."""
    before = ee.synchronous_index_checks()
    try:
        ee.set_synchronous_index_checks(True)
        assert ee.synchronous_index_checks() is True
        ee.set_synchronous_index_checks(False)
        assert ee.synchronous_index_checks() is False
    finally:
        ee.set_synchronous_index_checks(before)
    weight = make_weight(5000, 64)  # 1.2 MiB outputs: cached
    idx = make_indices((5000,), 5000)
    try:
        ee.set_cpu_output_cache_limit(64)
        ee.embedding(idx, weight)  # freed at once: back into the cache
        assert ee.cpu_output_cache_bytes() > 0
        ee.set_cpu_output_cache_limit(0)
        assert ee.cpu_output_cache_bytes() == 0
        ee.embedding(idx, weight)
        assert ee.cpu_output_cache_bytes() == 0
        with pytest.raises(ValueError, match="'megabytes' must be >= 0, got -1"):
            ee.set_cpu_output_cache_limit(-1)
    finally:
        ee.set_cpu_output_cache_limit(int(os.environ.get("EMBEDDING_EXT_CPU_CACHE_MB", 1024)))
    ee.embedding(idx, weight)
    ee.release_cpu_output_cache()
    assert ee.cpu_output_cache_bytes() == 0


def test_sparse_padding_idx_beyond_int32_ids():
    """padding_idx is compared with the ids as int64: with int32 ids and a padding_idx past
    2^32, no id is padding (a truncated comparison once sized the output too small)."""
    g = torch.randn(4, 3)
    idx = torch.tensor([5, 1, 5, 0], dtype=torch.int32)
    rows, values = torch.ops.embedding_ext.embedding_sparse_backward(g, idx, 2**33, 2**32 + 5, False)
    assert rows.tolist() == [[5, 1, 5, 0]] and torch.equal(values, g)
