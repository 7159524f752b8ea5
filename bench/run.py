"""The main job: check embedding_ext against PyTorch, then time both in the same run.

    python -m bench.run --preset quick            # sized for a 2-core CPU (about 3 minutes)
    python -m bench.run --preset gpu --device cuda --out DIR
    python -m bench.run --preset quant            # quantized tables (bench/quantized.py)

Results go to bench/out/ (ignored by git) unless --out names another folder;
`make bench-results` writes the committed ones in bench/results/ on purpose.

For every case and operation it first verifies our result (against F.embedding / PyTorch's
own ops, and against the float64 reference where PyTorch accumulates in low precision) and
aborts on a mismatch; then it times ours and PyTorch's with torch.utils.benchmark (warmed
up, CUDA-synchronised, median of many runs). Each row reports the bytes the operation must
move (formula printed below the table), GB/s, the share of the copy bandwidth measured in
the same run, the time against that bytes floor, and the speed-up over PyTorch. Results go
to a table on the terminal and CSV, JSON, Markdown and PNG files.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from tqdm import tqdm

import embedding_ext as ee
from embedding_ext import ops, reference

from .bags import PEER_NOTES, bag_bytes, fbgemm_version, prepare_bag
from .cases import (BAG_FORWARD, BAG_FWD_BWD, BAG_FWD_BWD_SPARSE, BAG_OPS, DENSE, DENSE_DET,
                    DENSE_PAD_FREQ, FORWARD, FORWARD_SYNC, FWD_BWD, MAX_NORM, PRESETS, SPARSE,
                    Case, make_indices)
from .report import format_table, has_peer, plot, summary

BYTES_FORMULAS = {
    FORWARD: "2*N*D*s + N*i   (read N rows, write N rows, read ids)",
    DENSE: "V*D*s + N*D*s + 2*U*D*s + N*i   (zero-fill the gradient, read grad_output, "
           "read-modify-write the U touched rows, read ids)",
    DENSE_PAD_FREQ: "same as dense_backward",
    SPARSE: "2*N*D*s + N*i + 8*N   (with padding_idx = the first id: read grad_output, write "
            "values, read ids, write int64 rows)",
    FWD_BWD: "forward + dense_backward",
    MAX_NORM: "forward + U*D*s   (read the U referenced rows for their norms)",
    FORWARD_SYNC: "same as forward (the extra cost is one stream synchronisation per call)",
    DENSE_DET: "same as dense_backward",
    BAG_FORWARD: "N*D*s + B*D*s + N*i (+ N*s with per_sample_weights)   (read N rows, write B "
                 "pooled rows, read ids)",
    BAG_FWD_BWD: "bag_forward + V*D*s + B*D*s + 2*U*D*s + N*i   (zero-fill the gradient, read "
                 "grad_output, read-modify-write the U touched rows, read ids)",
    BAG_FWD_BWD_SPARSE: "bag_forward + B*D*s + N*D*s + N*i + 8*N   (read grad_output, write "
                        "N gradient rows and their int64 row ids)",
}
# Norm-wise relative error allowed against the float64 reference.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


class Mismatch(RuntimeError):
    pass


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model


def median_seconds(fn, min_run_time: float) -> float:
    for _ in range(2):  # warm-up: allocator, caches, lazy initialisation
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})  # synchronises CUDA itself
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_medians(fns, min_run_time: float, rounds: int) -> list[float]:
    """Alternates the measurements in `rounds` rounds and takes the median of each, so that
    drift on a shared machine hits all alike."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, t in zip(fns, times):
            t.append(median_seconds(fn, min_run_time / rounds))
    return [statistics.median(t) for t in times]


def copy_bandwidth(device: str, min_run_time: float) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), min_run_time)
    return 2 * nbytes / t


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    return (actual - expected).norm().item() / (denom if denom > 0 else 1.0)


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, label: str):
    err = rel_error(actual, expected)
    if not err <= REL_TOL[dtype]:
        raise Mismatch(f"{label}: {name} differs, relative error {err:.3g} > {REL_TOL[dtype]:g}")


def op_bytes(op: str, case: Case, unique_rows: int) -> int:
    s = torch.empty((), dtype=case.dtype).element_size()
    i = torch.empty((), dtype=case.index_dtype).element_size()
    n, d, v = case.lookups, case.dim, case.num_embeddings
    forward = 2 * n * d * s + n * i
    dense = v * d * s + n * d * s + 2 * unique_rows * d * s + n * i
    return {FORWARD: forward, DENSE: dense, DENSE_PAD_FREQ: dense, FORWARD_SYNC: forward,
            DENSE_DET: dense,
            SPARSE: 2 * n * d * s + n * i + 8 * n, FWD_BWD: forward + dense,
            MAX_NORM: forward + unique_rows * d * s}[op]


def prepare(case: Case, op: str, device: str, gen: torch.Generator, device_gen: torch.Generator):
    """Verifies ours against PyTorch / the reference, then returns the (ours, theirs)
    callables, the distinct ids, and a peer's callable (pooled lookups: FBGEMM) or None."""
    if op in BAG_OPS:
        return prepare_bag(case, op, device, gen, device_gen, check, Mismatch)
    label = f"{case.label} {op}"
    v, d = case.num_embeddings, case.dim
    # Tables are drawn on the device itself: a 10M-row table is slow to draw on the host.
    weight = torch.randn(v, d, generator=device_gen, device=device, dtype=case.dtype)
    if case.layout == "columns":
        weight = weight.t().contiguous().t()  # same values, stride(1) = V
    idx = make_indices(case, device, gen)
    grad = torch.randn(case.lookups, d, generator=device_gen, device=device, dtype=case.dtype)
    pad, freq = (int(idx[0]), True) if op == DENSE_PAD_FREQ else (-1, False)
    if op == SPARSE:
        # Without padding both sides just wrap grad_output (no work); with it, rows are dropped.
        pad = int(idx[0])

    if op == FORWARD:
        ours, theirs = (lambda: ee.embedding(idx, weight)), (lambda: F.embedding(idx, weight))
        if not torch.equal(ours(), theirs()):
            raise Mismatch(f"{label}: forward output differs from F.embedding")
    elif op in (DENSE, DENSE_PAD_FREQ):
        ours = lambda: ops.embedding_dense_backward(grad, idx, v, pad, freq)  # noqa: E731
        theirs = lambda: torch.ops.aten.embedding_dense_backward(grad, idx, v, pad, freq)  # noqa: E731
        got = ours()
        check("dense gradient vs float64 reference", got,
              reference.dense_backward(grad, idx, v, None if pad < 0 else pad, freq), case.dtype, label)
        if case.dtype in (torch.float32, torch.float64):
            check("dense gradient vs PyTorch", got, theirs(), case.dtype, label)
        if pad >= 0 and got[pad].any():
            raise Mismatch(f"{label}: padding row has a gradient")
    elif op == FORWARD_SYNC:
        def ours():
            ee.set_synchronous_index_checks(True)
            try:
                return ee.embedding(idx, weight)
            finally:
                ee.set_synchronous_index_checks(False)
        theirs = lambda: F.embedding(idx, weight)  # noqa: E731
        if not torch.equal(ours(), theirs()):
            raise Mismatch(f"{label}: forward output differs from F.embedding")
    elif op == DENSE_DET:
        def deterministic(fn):
            def run():
                torch.use_deterministic_algorithms(True)
                try:
                    return fn()
                finally:
                    torch.use_deterministic_algorithms(False)
            return run
        ours = deterministic(lambda: ops.embedding_dense_backward(grad, idx, v, -1, False))
        theirs = deterministic(lambda: torch.ops.aten.embedding_dense_backward(grad, idx, v, -1, False))
        got = ours()
        check("deterministic dense gradient vs float64 reference", got,
              reference.dense_backward(grad, idx, v), case.dtype, label)
        if not torch.equal(got, ours()):
            raise Mismatch(f"{label}: deterministic backward differs between two runs")
    elif op == SPARSE:
        def ours():
            rows, values = ops.embedding_sparse_backward(grad, idx, v, pad, False)
            return torch.sparse_coo_tensor(rows, values, (v, d), is_coalesced=False,
                                           check_invariants=False)
        theirs = lambda: torch.ops.aten.embedding_sparse_backward(grad, idx, v, pad, False)  # noqa: E731
        got, want = ours(), theirs()
        if not (torch.equal(got._indices(), want._indices())
                and torch.equal(got._values(), want._values())):
            raise Mismatch(f"{label}: sparse gradient differs from PyTorch's")
    elif op == FWD_BWD:
        w_ours = weight.clone().requires_grad_()
        w_theirs = weight.clone().requires_grad_()

        def step(fn, w):
            def run():
                w.grad = None
                out = fn(idx, w)
                out.backward(grad)
                return out
            return run
        ours, theirs = step(ee.embedding, w_ours), step(F.embedding, w_theirs)
        out = ours()
        if not torch.equal(out, theirs()):
            raise Mismatch(f"{label}: forward output differs from F.embedding")
        check("gradient vs float64 reference", w_ours.grad,
              reference.dense_backward(grad, idx, v), case.dtype, label)
    elif op == MAX_NORM:
        w_ours, w_theirs = weight.clone(), weight.clone()
        expected = reference.renorm(weight, idx, 1.0, 2.0)
        ours = lambda: ee.embedding(idx, w_ours, max_norm=1.0)  # noqa: E731
        theirs = lambda: F.embedding(idx, w_theirs, max_norm=1.0)  # noqa: E731
        ours(), theirs()
        check("renormed weight vs float64 reference", w_ours, expected, case.dtype, label)
        check("renormed weight vs PyTorch", w_ours, w_theirs, case.dtype, label)
    else:
        raise ValueError(op)
    return ours, theirs, torch.unique(idx).numel(), None


def run(args) -> list[dict]:
    device = args.device
    cases = PRESETS[args.preset]
    if args.filter:
        cases = [c for c in cases if args.filter in c.label]
    tasks = [(c, op) for c in cases for op in c.ops if not args.ops or op in args.ops]
    threads = args.threads if device == "cpu" else [torch.get_num_threads()]
    gen = torch.Generator().manual_seed(args.seed)
    device_gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    default_threads = torch.get_num_threads()
    bandwidth = {}
    with tqdm(total=len(tasks) * len(threads), desc="bench", unit="row", file=sys.stderr) as bar:
        for t in threads:
            torch.set_num_threads(t)
            bandwidth[t] = copy_bandwidth(device, args.min_run_time)
            for case, op in tasks:
                bar.set_postfix_str(f"{case.name} {op} threads={t}")
                ours, theirs, unique_rows, peer = prepare(case, op, device, gen, device_gen)
                fns = (ours, theirs) if peer is None else (ours, theirs, peer)
                t_ours, t_theirs, *t_peer = interleaved_medians(fns, args.min_run_time, args.rounds)
                t_peer = t_peer[0] if t_peer else math.nan
                nbytes = (bag_bytes(op, case, unique_rows) if op in BAG_OPS
                          else op_bytes(op, case, unique_rows))
                floor = nbytes / bandwidth[t]
                rows.append({
                    "case": case.name, "V": case.num_embeddings, "D": case.dim,
                    "N": case.lookups, "dtype": str(case.dtype).removeprefix("torch."),
                    "index_dtype": str(case.index_dtype).removeprefix("torch."),
                    "distribution": case.distribution, "op": op, "threads": t,
                    "ours_ms": t_ours * 1e3, "torch_ms": t_theirs * 1e3,
                    "speedup": t_theirs / t_ours, "bytes": nbytes,
                    "ours_GBps": nbytes / t_ours / 1e9, "torch_GBps": nbytes / t_theirs / 1e9,
                    "copy_GBps": bandwidth[t] / 1e9,
                    "ours_pct_copy": 100 * nbytes / t_ours / bandwidth[t],
                    "ours_x_floor": t_ours / floor,
                    "bag": (f"{case.mode} L={case.bag_size}" + (" pad" if case.padding else "")
                            + (" psw" if case.weighted else "")) if case.bag_size else "",
                    "peer_ms": t_peer * 1e3, "vs_peer": t_peer / t_ours,
                })
                # One line per row as it is measured: a run cut short still shows these.
                tqdm.write(f"{case.label} {op} threads={t}: ours {t_ours * 1e3:.4f} ms, "
                           f"PyTorch {t_theirs * 1e3:.4f} ms, {t_theirs / t_ours:.2f}x"
                           + ("" if peer is None else
                              f", FBGEMM {t_peer * 1e3:.4f} ms, {t_peer / t_ours:.2f}x"),
                           file=sys.stderr)
                del ours, theirs, peer
                if device == "cuda":
                    torch.cuda.empty_cache()
                bar.update()
    torch.set_num_threads(default_threads)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quick",
                        help=f"comma-separated presets to run, of {', '.join(sorted(PRESETS))}; or "
                             "quant alone (bench.quantized: the quantized tables)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", default=None,
                        help="CPU thread counts to run, comma-separated (default: 1 and all)")
    parser.add_argument("--min-run-time", type=float, default=0.3,
                        help="seconds of timed runs per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of ours/PyTorch timing (median taken)")
    parser.add_argument("--filter", default="", help="only cases whose label contains this")
    parser.add_argument("--ops", default="", help="comma-separated operations to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/out",
                        help="folder for CSV/JSON/MD/PNG (default bench/out, ignored by git; "
                             "the committed results are in bench/results)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.threads = ([int(t) for t in args.threads.split(",")] if args.threads
                    else sorted({1, torch.get_num_threads()}))
    args.ops = [o for o in args.ops.split(",") if o]
    args.command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    presets = [p for p in args.preset.split(",") if p]
    if presets == ["quant"]:  # the quantized tables' preset has its own driver
        from . import quantized
        return quantized.main(["--device", args.device, "--out", str(args.out),
                               "--threads", str(args.threads[0]), "--rounds", str(args.rounds)])
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        parser.error(f"--preset: unknown preset(s) {unknown}; choose from {sorted(PRESETS)}")
    for preset in presets:
        args.preset = preset
        status = run_preset(args)
        if status:
            return status
    return 0


def run_preset(args) -> int:
    """One preset: verify, time, print the report and write its files."""
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        rows = run(args)
    except Mismatch as err:
        print(f"ABORTED: result check failed: {err}", file=sys.stderr)
        return 1
    if not rows:
        print(f"preset {args.preset}: no rows on {args.device} (filters or device)", file=sys.stderr)
        return 0
    name = device_name(args.device)
    meta = {
        "device": name, "device_kind": args.device,
        "threads": args.threads if args.device == "cpu" else None,
        "torch": torch.__version__, "embedding_ext": ee.build_info(),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "preset": args.preset,
        "command": args.command,
        "bytes_formulas": BYTES_FORMULAS, "fbgemm_gpu": fbgemm_version(),
        "notes": "s = element size, i = index size, U = distinct ids; x floor = time / "
                 "(bytes / copy bandwidth measured in this run)",
    }
    title = (f"{args.preset} preset on {name}"
             + (f", threads {','.join(map(str, args.threads))}" if args.device == "cpu" else "")
             + f", torch {torch.__version__}, {meta['date']}")
    table, summ = format_table(rows), summary(rows)
    ops_run = dict.fromkeys(r["op"] for r in rows)
    formulas = "\n".join(f"- {op}: {f}" for op, f in BYTES_FORMULAS.items() if op in ops_run)
    if has_peer(rows):
        formulas += (f"\n\nThird column: fbgemm_gpu {meta['fbgemm_gpu']}, on rows where it has "
                     "an equivalent (not padding_idx, max, fp64):\n\n"
                     + "\n".join(f"- {op}: {PEER_NOTES[op]}" for op in ops_run if op in PEER_NOTES))
    report = (f"### {title}\n\n{table}\n\nSpeed-up over PyTorch (median times):\n\n{summ}\n\n"
              f"Bytes moved per operation ({meta['notes']}):\n\n{formulas}\n\n"
              f"Command: `{meta['command']}`\n")
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.preset}-{args.device}"
    with open(f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(f"{stem}.md").write_text(report)
    plot(rows, Path(f"{stem}.png"), title)
    print(f"wrote {stem}.csv, .json, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
