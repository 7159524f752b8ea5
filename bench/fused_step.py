"""The fused training step: forward + backward-with-update of ``ee.fuse_optimizer``
against ``nn.Embedding(sparse=True)`` + the same torch optimizer, and FBGEMM's CPU TBE fused
step (SGD, row-wise Adagrad; bags of one id) where installed. Every row is verified first:
two steps from the same weights on the same ids must agree with PyTorch (and FBGEMM) before
anything is timed. Then alternating rounds, medians.

    python -m bench.fused_step [--device cpu|cuda] [--threads 1] [--rounds 5] [--filter 50000x768]
                               [--out bench/results]
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

import embedding_ext as ee

from .bags import _fbgemm

CASES = [(1_000_000, 64), (1_000_000, 128), (50_000, 768)]
IDS = 65_536
OPTIMIZERS = [("SGD", torch.optim.SGD, dict(lr=0.01), "EXACT_SGD"),
              ("Adagrad", torch.optim.Adagrad, dict(lr=0.01), None),
              ("RowWiseAdagrad", ee.optim.RowWiseAdagrad, dict(lr=0.01, eps=1e-8),
               "EXACT_ROWWISE_ADAGRAD"),
              ("SparseAdam", torch.optim.SparseAdam, dict(lr=0.01), None)]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device: str = "cpu") -> float:
    """Median of `repeats` single calls, ms (CUDA: synchronised around each)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_extra_mib(fn, device: str) -> float:
    """The step's peak memory above what was resident before it. CUDA: the caching
    allocator's peak above its allocation before. CPU: the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) above its resident set before, with our
    output cache emptied and malloc's free heap trimmed first (so that the step's own
    buffers are counted); NaN where Linux refuses the reset."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ee.release_cpu_output_cache()
    gc.collect()
    try:  # freed heap memory back to the OS, so that reusing it counts as new
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _fbgemm_step(fb, rule: str, weight: torch.Tensor, kwargs: dict):
    """FBGEMM's fused CPU step on a copy of ``weight`` (bags of one id, sum pooling)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = dict(eps=kwargs["eps"]) if "eps" in kwargs else {}
        tbe = fb["Split"]([(weight.shape[0], weight.shape[1], fb["EmbeddingLocation"].HOST,
                            fb["ComputeDevice"].CPU)], pooling_mode=fb["PoolingMode"].SUM,
                          optimizer=getattr(fb["EmbOptimType"], rule),
                          learning_rate=kwargs["lr"], **extra)
        tbe.split_embedding_weights()[0].copy_(weight)
    offsets = torch.arange(IDS + 1)

    def step(ids, grad):
        tbe(ids, offsets).backward(grad)
    return step, (lambda: tbe.split_embedding_weights()[0])


def _captured_ms(step, ids, grad, weight, rounds: int) -> float:
    """CUDA, SGD: the whole fused step (lookup, backward with the update, step()) captured
    once in a CUDA graph and replayed, ms per replay; first checked: one replay from some
    weights equals one eager step from the same weights. SGD only: it keeps no step count,
    which a replay could not advance (docs/fused-optimizers.md, CUDA graphs). NaN, with a
    warning, when the capture fails (the other columns stand)."""
    try:
        static_ids, static_grad = ids.clone(), grad.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            step(static_ids, static_grad)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static_ids, static_grad)
        before = weight.detach().clone()
        graph.replay()
        replayed = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(before)
        step(ids, grad)
        torch.testing.assert_close(replayed, weight.detach(), rtol=1e-5, atol=1e-6)
        return statistics.median(median_ms(graph.replay, 3, "cuda") for _ in range(rounds))
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"captured fused step: {type(err).__name__}: {err}")
        return float("nan")


def run(threads: int, rounds: int, out: Path | None, device: str = "cpu", cases=None,
        optimizers=None) -> tuple[str, list[dict]]:
    """Verifies, then times every (case, optimizer); returns the report and its rows."""
    torch.set_num_threads(threads)
    rows = []
    fb = _fbgemm() if device == "cpu" else None  # FBGEMM's CPU TBE: a CPU peer only
    gen = torch.Generator().manual_seed(0)
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"{platform.processor() or platform.machine()}, {threads} thread(s)")
    lines = [f"### fused_step on {where}, torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| V x D | optimizer | ours ms | torch sparse + optimizer ms | speed-up | "
             "FBGEMM ms | vs FBGEMM | peak extra MiB ours | peak extra MiB torch | table MiB | "
             "ours captured ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for num_rows, dim in cases or CASES:
        base = torch.randn(num_rows, dim, generator=gen).to(device)
        batches = [(torch.randint(0, num_rows, (IDS,), generator=gen).to(device),
                    torch.randn(IDS, dim, generator=gen).to(device)) for _ in range(2)]
        for name, cls, kwargs, fbgemm_rule in optimizers or OPTIMIZERS:
            ours = ee.Embedding(num_rows, dim, _weight=base.clone())
            fused = ee.fuse_optimizer(ours, cls, **kwargs)
            plain = torch.nn.Embedding(num_rows, dim, sparse=True, _weight=base.clone())
            reference = cls(plain.parameters(), **kwargs)

            def ours_step(ids, grad):
                ours(ids).backward(grad)
                fused.step()

            def torch_step(ids, grad):
                plain(ids).backward(grad)
                reference.step()
                reference.zero_grad()
            peer = None
            if fb is not None and fbgemm_rule is not None:
                try:
                    peer, peer_weight = _fbgemm_step(fb, fbgemm_rule, base, kwargs)
                except Exception as err:  # noqa: BLE001
                    warnings.warn(f"{name}: no FBGEMM column ({type(err).__name__}: {err})")
            for ids, grad in batches:  # verify before timing
                ours_step(ids, grad)
                torch_step(ids, grad)
                if peer is not None:
                    peer(ids, grad)
            torch.testing.assert_close(ours.weight, plain.weight, rtol=1e-4, atol=1e-5)
            if peer is not None:
                torch.testing.assert_close(peer_weight(), plain.weight.detach(), rtol=1e-4,
                                           atol=1e-5)
            ids, grad = batches[0]
            results = {"ours": [], "torch": [], "fbgemm": []}
            for _ in range(rounds):  # alternating rounds
                results["ours"].append(median_ms(lambda: ours_step(ids, grad), 3, device))
                results["torch"].append(median_ms(lambda: torch_step(ids, grad), 3, device))
                if peer is not None:
                    results["fbgemm"].append(median_ms(lambda: peer(ids, grad), 3))
            t_ours, t_torch = statistics.median(results["ours"]), statistics.median(results["torch"])
            # Measured: the step's peak allocation above the table and state already there.
            extra_ours = _peak_extra_mib(lambda: ours_step(ids, grad), device)
            extra_torch = _peak_extra_mib(lambda: torch_step(ids, grad), device)
            fb_cells = "- | -"
            t_fb = float("nan")
            if results["fbgemm"]:
                t_fb = statistics.median(results["fbgemm"])
                fb_cells = f"{t_fb:.2f} | {t_fb / t_ours:.2f}x"
            t_captured = float("nan")
            if device == "cuda" and cls is torch.optim.SGD:
                t_captured = _captured_ms(ours_step, ids, grad, ours.weight, rounds)
            rows.append({"case": f"{num_rows} x {dim}, {IDS} ids", "optimizer": name,
                         "ours_ms": t_ours, "torch_ms": t_torch, "peer_ms": t_fb,
                         "ours_captured_ms": t_captured})
            captured_cell = "-" if t_captured != t_captured else f"{t_captured:.3f}"
            line = (f"| {num_rows} x {dim} | {name} | {t_ours:.2f} | {t_torch:.2f} | "
                    f"{t_torch / t_ours:.2f}x | {fb_cells} | {extra_ours:.1f} | "
                    f"{extra_torch:.1f} | {num_rows * dim * 4 / 2**20:.0f} | {captured_cell} |")
            print(line, flush=True)
            lines.append(line)
            del ours, fused, plain, reference, peer
    lines += ["", f"Command: `python -m bench.fused_step --device {device} --threads {threads} "
              f"--rounds {rounds}`",
              "Each row verified first (two steps from the same weights agree with PyTorch, "
              "and FBGEMM, to 1e-4). Peak extra MiB: measured, the step's peak allocation "
              "above what was resident before it (weights and optimizer state made earlier; "
              "CUDA: the allocator's peak, CPU: the peak resident set, VmHWM, above VmRSS "
              "before, our output cache emptied and malloc_trim first); a step's O(ids x D) buffers "
              "against the table's V x D. Ours captured (CUDA, SGD): the same step captured in a "
              "CUDA graph and replayed, checked first against an eager step."]
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        name = f"fused-step-cpu-{threads}t.md" if device == "cpu" else "fused-step-cuda.md"
        (out / name).write_text(text)
    return text, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--filter", default="", help="only V x D cases whose 'VxD' contains this")
    args = parser.parse_args()
    if args.filter:
        CASES[:] = [c for c in CASES if args.filter in f"{c[0]}x{c[1]}"]
    print(run(args.threads, args.rounds, args.out, args.device)[0])


if __name__ == "__main__":
    main()
