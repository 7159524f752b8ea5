"""CUDA-only behaviour: bad indices leave the context usable, CUDA graphs, streams."""
import pytest
import torch

import embedding_ext as ee
from embedding_ext import reference
from conftest import make_indices, make_weight

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


def test_bad_index_is_reported_later_without_sync_and_context_survives():
    weight = make_weight(10, 16, device="cuda")
    bad = torch.tensor([1, 2, 12, 3], device="cuda")
    out = ee.embedding(bad, weight)  # asynchronous: no error yet, no out-of-bounds access
    with pytest.raises(IndexError, match="index 12 at position 2 .* 10 rows"):
        ee.check_cuda_index_errors()
    assert not out[2].any(), "the bad position's row is zero-filled"
    ee.check_cuda_index_errors()  # the record was cleared
    good = make_indices((50,), 10, "cuda")
    assert torch.equal(ee.embedding(good, weight), weight[good])
    torch.cuda.synchronize()


def test_bad_index_raised_by_next_call():
    weight = make_weight(10, 4, device="cuda")
    ee.embedding(torch.tensor([-1], device="cuda"), weight)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="index -1 at position 0 .*earlier asynchronous"):
        ee.embedding(torch.tensor([0], device="cuda"), weight)
    ee.check_cuda_index_errors()


def test_synchronous_mode_raises_from_the_call():
    weight = make_weight(10, 4, device="cuda").requires_grad_()
    ee.set_synchronous_index_checks(True)
    try:
        with pytest.raises(IndexError, match="index 10 at position 0"):
            ee.embedding(torch.tensor([10, 1], device="cuda"), weight)
    finally:
        ee.set_synchronous_index_checks(False)
    ee.embedding(torch.tensor([1], device="cuda"), weight).sum().backward()


def test_cuda_graph_capture_and_replay():
    weight = make_weight(100, 64, device="cuda").requires_grad_()
    static_idx = make_indices((256,), 100, "cuda", padding_idx=0)
    static_grad = torch.randn(256, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph
        for _ in range(2):
            weight.grad = None
            ee.embedding(static_idx, weight, padding_idx=0, scale_grad_by_freq=True).backward(static_grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    weight.grad = None
    with torch.cuda.graph(graph):
        static_out = ee.embedding(static_idx, weight, padding_idx=0, scale_grad_by_freq=True)
        static_out.backward(static_grad)
    for _ in range(3):
        static_idx.copy_(make_indices((256,), 100, "cuda", padding_idx=0))
        static_grad.copy_(torch.randn(256, 64, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, weight.detach()[static_idx])
        expected = reference.dense_backward(static_grad, static_idx, 100, 0, True)
        torch.testing.assert_close(weight.grad.double(), expected, atol=1e-5, rtol=1e-5)


def test_runs_on_the_current_stream():
    weight = make_weight(1000, 256, device="cuda")
    idx = make_indices((4096,), 1000, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        out = ee.embedding(idx, weight)
        expected = weight[idx]
    side.synchronize()
    assert torch.equal(out, expected)


def test_other_device_index_guard():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    weight = make_weight(10, 4, device="cuda:1")
    idx = torch.tensor([1, 2], device="cuda:1")
    assert torch.equal(ee.embedding(idx, weight), weight[idx])


def test_large_table_int32_offsets():
    """Row offsets beyond 2^31 elements must use 64-bit arithmetic."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    weight = torch.empty(2**21 + 8, 1024, dtype=torch.float16, device="cuda")  # > 2^31 elements
    weight[-3:].normal_()
    idx = torch.tensor([2**21 + 7, 2**21 + 5], device="cuda", dtype=torch.int32)
    assert torch.equal(ee.embedding(idx, weight), weight[idx.long()])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_backward_reports_minus_one_without_padding(index_dtype):
    """-1, the usual "missing id" in recommender data, is a bad id when there is no padding:
    the sparse backward must report it and write every slot (the kernel once compared it
    with padding_idx = -1 first and left its slot uninitialised)."""
    g = torch.randn(4, 3, device="cuda")
    idx = torch.tensor([2, -1, 0, 2], device="cuda", dtype=index_dtype)
    ee.set_synchronous_index_checks(True)
    try:
        with pytest.raises(IndexError, match="index -1 at position 1"):
            torch.ops.embedding_ext.embedding_sparse_backward(g, idx, 5, -1, True)
    finally:
        ee.set_synchronous_index_checks(False)
    rows, values = torch.ops.embedding_ext.embedding_sparse_backward(
        g, idx.clamp_min(0), 5, -1, True)
    assert rows.tolist() == [[2, 0, 0, 2]]
    torch.testing.assert_close(values, g * torch.tensor([0.5, 0.5, 0.5, 0.5], device="cuda")[:, None])


def test_first_call_inside_capture_is_refused_clearly():
    """The first call on a device allocates its bad-index record, which cannot be captured:
    it refuses with a message that says what to do; after a warm-up, capture works."""
    import subprocess
    import sys
    code = """
import torch, embedding_ext as ee
w = torch.randn(10, 4, device="cuda"); idx = torch.tensor([1, 2], device="cuda")
g = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g):
        ee.embedding(idx, w)
except RuntimeError as e:
    assert "Make one embedding_ext call on this device before capturing" in str(e), e
else:
    raise SystemExit("the first call was captured")
ee.embedding(idx, w)  # warm-up
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    out = ee.embedding(idx, w)
g.replay(); torch.cuda.synchronize()
assert torch.equal(out, w[idx])
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_replays_report_bad_ids_again_after_a_raise():
    """Raising re-arms the device by bumping the record's generation in host memory (no
    CUDA call), so each replay of a captured graph that meets a bad id reports it."""
    weight = make_weight(10, 8, device="cuda")
    static_idx = torch.tensor([1, 2, 3], device="cuda")
    ee.embedding(static_idx, weight)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ee.embedding(static_idx, weight)
    for bad in (10, -3, 99):
        static_idx.copy_(torch.tensor([1, bad, 3], device="cuda"))
        graph.replay()
        with pytest.raises(IndexError, match=f"index {bad} at position 1"):
            ee.check_cuda_index_errors()
        assert not static_out[1].any()
    static_idx.copy_(torch.tensor([4, 5, 6], device="cuda"))
    graph.replay()
    ee.check_cuda_index_errors()
    assert torch.equal(static_out, weight[static_idx])
    # A record pending when a capture starts is raised by the captured call itself, with no
    # CUDA call that would break the capture; capturing again afterwards works.
    ee.embedding(torch.tensor([0, 42], device="cuda"), weight)
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match="index 42 at position 1"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ee.embedding(static_idx, weight)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ee.embedding(static_idx, weight)
    static_idx.copy_(torch.tensor([7, 70, 8], device="cuda"))
    graph.replay()
    with pytest.raises(IndexError, match="index 70 at position 1"):
        ee.check_cuda_index_errors()


def test_a_handled_batch_is_not_reported_twice():
    """A kernel queued before the host consumed a record (here the backward of the same bad
    batch, held back on a side stream) carries the old generation and does not report the
    batch again."""
    weight = make_weight(10, 8, device="cuda")
    idx = torch.tensor([1, 11], device="cuda")
    ee.embedding(torch.tensor([1], device="cuda"), weight)  # warm-up
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # so that both calls are launched before either runs
    out = ee.embedding(idx, weight)  # bad forward on the current stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # the backward stays queued while the host raises
        grad = torch.ops.embedding_ext.embedding_dense_backward(torch.ones_like(out), idx, 10, -1, False)
    torch.cuda.current_stream().synchronize()
    with pytest.raises(IndexError, match="index 11 at position 1"):
        ee.embedding(torch.tensor([2], device="cuda"), weight)  # the next call raises it
    side.synchronize()
    ee.check_cuda_index_errors()  # the backward's sighting of the same batch was not kept
    assert grad[1].eq(1).all() and not grad[2:].any()


def test_two_devices_failing_at_once_are_both_reported():
    """One record per device: bad ids on two devices in flight at once are both reported,
    and each device reports again afterwards."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    devices = ("cuda:0", "cuda:1")
    weights = {d: make_weight(10, 4, device=d) for d in devices}
    for d in devices:  # warm-up: both records set up, nothing pending
        ee.embedding(torch.tensor([1], device=d), weights[d])
        torch.cuda.synchronize(d)
    for d in devices:  # both bad calls are queued before either kernel runs
        with torch.cuda.device(d):
            torch.cuda._sleep(100_000_000)
            ee.embedding(torch.tensor([1, 20], device=d), weights[d])
    errors = []
    for _ in devices:
        with pytest.raises(IndexError, match="index 20 at position 1") as err:
            ee.check_cuda_index_errors()
        errors.append(str(err.value))
    ee.check_cuda_index_errors()  # both consumed
    assert len(errors) == 2
    for d in devices:
        with torch.cuda.device(d):
            ee.embedding(torch.tensor([-1], device=d), weights[d])
            with pytest.raises(IndexError, match="index -1"):
                ee.check_cuda_index_errors()


def test_python_function_sparse_gradient_never_carries_a_bad_id():
    """ee.EmbeddingFunction (what a lookup records under compiled autograd) makes its sparse
    gradient as the C++ node does: a bad id becomes a zero row 0, never the raw id."""
    weight = make_weight(10, 4, device="cuda").requires_grad_()
    ids = torch.tensor([1, 12, 3], device="cuda")
    out = ee.EmbeddingFunction.apply(weight, ids, -1, False, True)
    with pytest.raises(IndexError, match="index 12 at position 1"):
        ee.check_cuda_index_errors()  # the forward's report, before the backward's call
    out.sum().backward()
    try:
        ee.check_cuda_index_errors()  # the sparse backward's own report, if any
    except IndexError:
        pass
    grad = weight.grad.coalesce()
    assert int(grad.indices().max()) < 10
    assert torch.equal(grad.to_dense()[1], torch.ones(4, device="cuda"))
