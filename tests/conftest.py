"""Shared test matrix pieces: devices, dtypes, tolerances, index generators, seeding."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")]),
]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]

# Tolerances against the float64 reference: a few ulps of the dtype, scaled for sums.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

def cpu_isas() -> list[str]:
    """The instruction sets of the CPU loops with several copies (bag pooling, the fused
    update; csrc/cpu/isa.h) that this CPU runs, "portable" first."""
    from embedding_ext import _C
    isas = []
    try:
        for isa in ("portable", "avx2", "avx512"):
            try:
                _C._set_cpu_isa(isa)
            except RuntimeError:
                continue
            isas.append(isa)
    finally:
        _C._set_cpu_isa("auto")
    return isas


def each_cpu_isa(fn) -> dict:
    """{isa: fn()} with the CPU loops pinned to each instruction set in turn."""
    from embedding_ext import _C
    results = {}
    try:
        for isa in cpu_isas():
            _C._set_cpu_isa(isa)
            results[isa] = fn()
    finally:
        _C._set_cpu_isa("auto")
    return results


# Index shapes: 0-dim, empty, 1-D, odd 3-D, and a non-contiguous view.
SHAPES = ["scalar", "empty", "empty3d", "1d", "3d", "noncontig"]


def switched(get, put, value):
    """A fixture's body: ``put(value)`` for one test, then the previous ``get()`` back."""
    previous = get()
    put(value)
    yield
    put(previous)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for one test."""
    yield from switched(torch.are_deterministic_algorithms_enabled,
                        torch.use_deterministic_algorithms, True)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs on every run; the seed is printed so a failure can be replayed
    with EMBEDDING_EXT_TEST_SEED=<seed>."""
    seed = int(os.environ.get("EMBEDDING_EXT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"EMBEDDING_EXT_TEST_SEED={seed}")
    yield seed


def make_indices(shape: str | tuple, num_weights: int, device="cpu", dtype=torch.int64,
                 padding_idx: int | None = None) -> torch.Tensor:
    """Indices with heavy duplicates (half the positions hit 3 hot rows) and, when a padding
    index is given, padding at about a fifth of the positions."""
    if isinstance(shape, str):
        sizes = {"scalar": (), "empty": (0,), "empty3d": (2, 0, 3), "1d": (17,),
                 "3d": (2, 3, 5), "noncontig": (6, 4)}[shape]
    else:
        sizes = shape
    n = 1
    for s in sizes:
        n *= s
    idx = torch.randint(0, num_weights, (n,))
    if n and num_weights:
        hot = torch.randint(0, num_weights, (3,))
        use_hot = torch.rand(n) < 0.5
        idx = torch.where(use_hot, hot[torch.randint(0, 3, (n,))], idx)
        if padding_idx is not None:
            pad = padding_idx % num_weights
            idx = torch.where(torch.rand(n) < 0.2, torch.full_like(idx, pad), idx)
    idx = idx.reshape(sizes).to(device=device, dtype=dtype)
    if shape == "noncontig":
        idx = idx.t()
        assert not idx.is_contiguous()
    return idx


def make_weight(num_weights: int, dim: int, dtype=torch.float32, device="cpu",
                noncontig: bool = False) -> torch.Tensor:
    if noncontig:
        # Every other column of a wider table: stride(0) != dim, stride(1) == 2.
        return torch.randn(num_weights, 2 * dim, dtype=dtype, device=device)[:, ::2]
    return torch.randn(num_weights, dim, dtype=dtype, device=device)


def poison(numel: int, dtype: torch.dtype, device) -> None:
    """Allocate and free a NaN-filled block so that the next allocation of that size is
    likely to reuse it (always on the CUDA caching allocator): elements a kernel forgets
    to write then show up as NaN."""
    if numel > 0:
        fill = float("nan") if dtype.is_floating_point else -1
        del_me = torch.full((numel,), fill, dtype=dtype, device=device)
        del del_me


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def call_op(op, args, fake: bool):
    """op(*args); with fake=True on fake copies of the tensor arguments, so that the op's fake
    kernel (what torch.compile traces) runs instead of its kernel."""
    if not fake:
        return op(*args)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        return op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


class RecordOps(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

