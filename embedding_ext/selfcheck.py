"""``python -m embedding_ext``: what was installed, and a few-second check of every op
against ``torch.nn.Embedding`` on every available device. Exit status 0 only if all match.

Each check runs one of our ops (through the public API, so the autograd path is the one
users get) on small duplicate- and padding-heavy ids and compares with PyTorch's own
embedding on a copy of the same weight: the lookup, the dense and sparse gradients (with
``padding_idx`` and ``scale_grad_by_freq``), the ``max_norm`` renorm, the double backward,
a bf16 lookup and gradient, the module, the pooled lookup (CPU) and the bad-index error
(its full message, numbers included).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import Tensor

import embedding_ext as ee

Lookup = Callable[..., Tensor]


def describe() -> list[str]:
    """The facts a bug report needs: versions, backends, architectures, devices."""
    info = ee.build_info()
    lines = [
        f"embedding_ext {ee.__version__} ({ee.__file__})",
        f"torch {torch.__version__} (built against {info['torch_version']}), "
        f"CUDA {torch.version.cuda or 'none'}",
        f"backends: {', '.join(info['backends'])}; CUDA architectures: "
        f"{info['cuda_arch_list'] or 'none'}; OpenMP: {info['openmp']}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("CUDA devices: none visible")
    return lines


def devices() -> list[str]:
    """CPU, and each visible CUDA device if the build has the CUDA kernels."""
    found = ["cpu"]
    if "cuda" in ee.build_info()["backends"] and torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found


def _ids(num_weights: int, device: str, dtype: torch.dtype = torch.int64) -> Tensor:
    """2-D ids: hot rows, every row at least once somewhere likely, padding row 1 included."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, num_weights, (6, 40), generator=g)
    ids[:, ::3] = 5
    ids[0, :7] = 1
    return ids.to(device=device, dtype=dtype)


def _grads(fn: Lookup, weight: Tensor, ids: Tensor, grad_out: Tensor, **options) -> Tensor:
    w = weight.detach().clone().requires_grad_()
    fn(ids, w, **options).backward(grad_out)
    assert w.grad is not None
    if w.grad.is_sparse != bool(options.get("sparse", False)):
        raise AssertionError(f"the gradient's layout is {w.grad.layout}")
    return w.grad.to_dense() if w.grad.is_sparse else w.grad


def _close(a: Tensor, b: Tensor, tol: float, atol: float | None = None) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(
        a.double(), b.double(), rtol=tol, atol=tol if atol is None else atol)


def check_device(device: str, fn: Lookup = ee.embedding) -> list[tuple[str, bool, str]]:
    """(check name, passed, detail) for every op on one device; ``fn`` is the lookup under
    test (ee.embedding; a test hands in a broken one to see the check fail)."""
    results: list[tuple[str, bool, str]] = []

    def record(name: str, check: Callable[[], bool | tuple[bool, str]]) -> None:
        try:
            outcome = check()
            ok, detail = outcome if isinstance(outcome, tuple) else (outcome, "")
        except Exception as err:  # a crash in one check is a failure, not the end of all
            ok, detail = False, f"{type(err).__name__}: {err}"
        results.append((name, bool(ok), detail))

    torch.manual_seed(0)
    weight = torch.randn(20, 12, device=device)
    grad_out = torch.randn(6, 40, 12, device=device)
    for id_dtype in (torch.int64, torch.int32):
        ids = _ids(20, device, id_dtype)
        record(f"lookup ({str(id_dtype)[6:]} ids)",
               lambda: torch.equal(fn(ids, weight), F.embedding(ids, weight)))
    ids = _ids(20, device)
    for options in ({}, {"padding_idx": 1, "scale_grad_by_freq": True}):
        label = ", padding_idx, scale_grad_by_freq" if options else ""
        record(f"dense gradient{label}", lambda: _close(
            _grads(fn, weight, ids, grad_out, **options),
            _grads(F.embedding, weight, ids, grad_out, **options), 1e-5))
        record(f"sparse gradient{label}", lambda: _close(
            _grads(fn, weight, ids, grad_out, sparse=True, **options),
            # PyTorch refuses scale_grad_by_freq with sparse gradients: its dense one is equal
            _grads(F.embedding, weight, ids, grad_out, **options), 1e-5))

    def renorm() -> bool:
        ours, theirs = weight.clone() * 3, weight.clone() * 3
        out = fn(ids, ours, max_norm=1.5, norm_type=2.0)
        expected = F.embedding(ids, theirs, max_norm=1.5, norm_type=2.0)
        return _close(out, expected, 1e-5) and _close(ours, theirs, 1e-5)
    record("max_norm renorm", renorm)

    def double_backward() -> bool:
        v = torch.randn_like(weight)
        counts = torch.bincount(ids.flatten(), minlength=20).to(weight.dtype)
        ok = True
        for freq in (False, True):
            grads = []
            for lookup in (fn, F.embedding):
                w = weight.detach().clone().requires_grad_()
                go = grad_out.detach().clone().requires_grad_()
                (gw,) = torch.autograd.grad(lookup(ids, w, padding_idx=1, scale_grad_by_freq=freq),
                                            w, go, create_graph=True)
                (ggo,) = torch.autograd.grad(gw, go, v)
                grads.append(ggo)
            ours, theirs = grads
            if freq:  # beyond PyTorch (docs/lookup.md): ours is the true adjoint, scaled by 1/count
                theirs = theirs / counts[ids].unsqueeze(-1)
            ok = ok and _close(ours, theirs, 1e-5)
        return ok
    record("double backward", double_backward)

    def low_precision() -> bool:
        w16 = weight.to(torch.bfloat16)
        g16 = grad_out.to(torch.bfloat16)
        lookup_ok = torch.equal(fn(ids, w16), F.embedding(ids, w16))
        # fp32 accumulation: compare with PyTorch's gradient computed in fp32, then rounded.
        ours = _grads(fn, w16, ids, g16, padding_idx=1)
        reference = _grads(F.embedding, w16.float(), ids, g16.float(), padding_idx=1)
        # Both are fp32 sums rounded once to bf16: at most one bf16 step (2**-7) apart.
        return lookup_ok and _close(ours, reference.to(torch.bfloat16), 2**-7, 1e-6)
    record("bfloat16 lookup and gradient", low_precision)

    def module() -> bool:
        ours = ee.Embedding(20, 12, padding_idx=1, device=device)
        theirs = torch.nn.Embedding(20, 12, padding_idx=1, device=device)
        theirs.load_state_dict(ours.state_dict())
        ours(ids).backward(grad_out)
        theirs(ids).backward(grad_out)
        return (torch.equal(ours(ids), theirs(ids))
                and _close(ours.weight.grad, theirs.weight.grad, 1e-5))
    if fn is ee.embedding:  # the module runs ee.embedding itself
        record("ee.Embedding module", module)

    def bags() -> bool:
        ok = True
        offsets = torch.tensor([0, 7, 7, 50], device=device)
        flat = ids.flatten()
        for mode in ("sum", "mean", "max"):
            psw = torch.randn(flat.shape, device=device) if mode == "sum" else None
            outs = []
            for lookup in (ee.embedding_bag, F.embedding_bag):
                w = weight.detach().clone().requires_grad_()
                out = lookup(flat, w, offsets, mode=mode, padding_idx=1, per_sample_weights=psw)
                out.backward(torch.ones_like(out))
                outs.append((out, w.grad))
            ok = ok and _close(outs[0][0], outs[1][0], 1e-5) and _close(outs[0][1], outs[1][1], 1e-5)
        return ok
    if fn is ee.embedding:
        record("bags: sum, mean, max (forward and gradient)", bags)

    def bad_index() -> tuple[bool, str]:
        bad = torch.tensor([0, 25, 3], device=device)
        try:
            fn(bad, weight)
            ee.check_cuda_index_errors()
        except IndexError as err:
            message = str(err)
            wanted = "index 25 at position 1"
            return (wanted in message and "valid indices are 0 <= index < 20" in message
                    and isinstance(err, RuntimeError),
                    "" if wanted in message else f"message: {message!r}")
        return False, "no IndexError for id 25 in a 20-row table"
    record("out-of-range id: IndexError with its message", bad_index)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return results


def main(argv: list[str] | None = None, out: TextIO = sys.stdout,
         fn: Lookup = ee.embedding) -> int:
    """Prints the facts and the checks; returns the exit status (0: everything matched)."""
    del argv  # no options yet
    for line in describe():
        print(line, file=out)
    failed = 0
    for device in devices():
        start = time.perf_counter()
        results = check_device(device, fn)
        bad = [r for r in results if not r[1]]
        failed += len(bad)
        took = time.perf_counter() - start
        print(f"{device}: {len(results) - len(bad)}/{len(results)} checks match "
              f"torch.nn.Embedding ({took:.1f} s)", file=out)
        for name, ok, detail in results:
            if not ok:
                print(f"  MISMATCH {name}" + (f": {detail}" if detail else ""), file=out)
    print("self-check: " + ("all ops match PyTorch" if failed == 0 else f"{failed} FAILED"),
          file=out)
    return 0 if failed == 0 else 1
