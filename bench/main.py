"""The main job (`make bench`): verify, then time one or two representative cases of every op
family against PyTorch (and FBGEMM's CPU kernels where they have the same operation) in one
run, and end with one summary table and a plot. Sized for a 2-core CPU: about two minutes.

    python -m bench.main [--device auto|cpu|cuda] [--out bench/out]

Every row is verified before it is timed (bench.run, bench.fused_step, bench.sharded: a
mismatch aborts the job). The full sweeps are `make bench-full` (bench.run's quick and bag
presets at 1 and 2 threads, every fused rule and table shape, both tensor-parallel plans).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

from . import collection, fused_step, quantized, run, sharded
from .report import finish_plot
from .cases import (BAG_FORWARD, BAG_FWD_BWD_SPARSE, DENSE, FORWARD, FWD_BWD, MAX_NORM, SPARSE)

FAMILIES = {
    FORWARD: "lookup forward",
    DENSE: "lookup dense gradient",
    SPARSE: "lookup sparse gradient",
    FWD_BWD: "lookup forward + backward",
    MAX_NORM: "lookup with max_norm",
    BAG_FORWARD: "bag forward",
    BAG_FWD_BWD_SPARSE: "bag forward + sparse gradient",
}
FUSED_CASES = [(1_000_000, 64)]
FUSED_RULES = [o for o in fused_step.OPTIMIZERS if o[0] in ("SGD", "RowWiseAdagrad")]
SHARDED_CASES, SHARDED_PLANS = [(100_000, 64, 16_384)], ["row->replicate"]


def _row(family: str, case: str, ours_ms: float, torch_ms: float | None,
         peer_ms: float | None) -> dict:
    torch_ms = math.nan if torch_ms is None else torch_ms  # no PyTorch / peer equivalent
    peer_ms = math.nan if peer_ms is None else peer_ms
    return {"family": family, "case": case, "ours_ms": ours_ms, "torch_ms": torch_ms,
            "speedup": torch_ms / ours_ms, "peer_ms": peer_ms, "vs_peer": peer_ms / ours_ms}


def summary_rows(device: str, threads: int, rounds: int) -> list[dict]:
    """Runs every op family's cases (each verified first) and returns one row per case."""
    args = argparse.Namespace(device=device, preset="main", filter="", ops=[], threads=[threads],
                              min_run_time=0.3, rounds=rounds, seed=0)
    rows = [_row(FAMILIES[r["op"]], f"{r['case']} {r['V']:.3g}x{r['D']} {r['dtype']} "
                 f"N={r['N']} {r['distribution']}" + (f" {r['bag']}" if r["bag"] else ""),
                 r["ours_ms"], r["torch_ms"], r["peer_ms"])
            for r in run.run(args)]
    _, fused = fused_step.run(threads, rounds + 2, None, device, FUSED_CASES, FUSED_RULES)
    rows += [_row(f"fused step: {r['optimizer']}", r["case"], r["ours_ms"], r["torch_ms"],
                  r["peer_ms"]) for r in fused]
    if device == "cpu":  # the table-batched collection has CPU kernels only so far
        rows += [_row("collection (many tables)", r["case"], r["ours_ms"], r["torch_ms"],
                      r["peer_ms"]) for r in collection.collection_rows(threads, rounds + 4)]
    # The quantized int8 bag against PyTorch's quantized op (bench.quantized: the full preset).
    for r in quantized.measure(device, rounds=rounds, min_run_time=0.1, formats=("int8",),
                               lookup=False, vs_fp32=False, same_table=False)[:-1]:
        rows.append(_row("quantized bag (int8)", "1e+06x128 N=65536 bags of 32 sum",
                         r["ours_ms"], r["peer_ms"], math.nan))
    if device == "cpu" and torch.distributed.is_available():
        for r in sharded.run(2, rounds, 5, SHARDED_CASES, SHARDED_PLANS):
            rows.append(_row("tensor-parallel step, 2 ranks", f"{r['V']}x{r['D']} {r['ids']} ids "
                             f"{r['plan']}", r["ours_ms"], r["torch_ms"], math.nan))
    return rows


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def table(rows: list[dict]) -> str:
    lines = ["| op family | case | ours ms | PyTorch ms | speed-up | FBGEMM ms | vs FBGEMM |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['case']} | {_ms(r['ours_ms'])} | {_ms(r['torch_ms'])} | "
              f"{_ratio(r['speedup'])} | {_ms(r['peer_ms'])} | {_ratio(r['vs_peer'])} |"
              for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
    y = list(range(len(rows)))
    ax.barh(y, [r["speedup"] for r in rows], height=0.6, label="over PyTorch")
    peer = [(i, r["vs_peer"]) for i, r in enumerate(rows) if not math.isnan(r["vs_peer"])]
    if peer:
        ax.scatter([v for _, v in peer], [i for i, _ in peer], marker="D", color="tab:green",
                   zorder=3, label="over FBGEMM")
    ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    finish_plot(fig, ax, [f"{r['family']}\n{r['case']}" for r in rows],
                "speed-up of embedding_ext (median times; > 1: ours is faster)", title, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of ours/PyTorch/FBGEMM timing (median taken)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"),
                        help="folder for main-<device>.md/.json/.png (default bench/out, "
                             "ignored by git)")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        rows = summary_rows(device, threads, args.rounds)
    except run.Mismatch as err:
        print(f"ABORTED: result check failed: {err}", file=sys.stderr)
        return 1
    command = "python -m bench.main " + " ".join(sys.argv[1:] if argv is None else argv)
    title = (f"embedding_ext main job on {run.device_name(device)}"
             + (f", {threads} threads" if device == "cpu" else "")
             + f", torch {torch.__version__}, {started:%Y-%m-%d %H:%M} UTC")
    fbgemm = run.fbgemm_version()
    report = (f"### {title}\n\n{table(rows)}\n\nMedian times; speed-up = PyTorch ms / ours ms, "
              "vs FBGEMM = FBGEMM ms / ours ms "
              + (f"(fbgemm_gpu {fbgemm}'s CPU table-batched kernels: a one-table TBE for bags, "
                 "its fused exact SGD / row-wise Adagrad step for the bag backward and the "
                 "fused steps, its many-table TBE for the collection; the collection's PyTorch "
                 "column is a per-table F.embedding_bag loop)" if fbgemm else "(FBGEMM not installed: no column)")
              + f". Every row verified against PyTorch before timing.\n\nCommand: `{command}`\n")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"main-{device}"
    Path(f"{stem}.md").write_text(report)
    Path(f"{stem}.json").write_text(json.dumps(
        {"meta": {"title": title, "command": command, "torch": torch.__version__,
                  "fbgemm_gpu": fbgemm, "threads": threads}, "rows": rows}, indent=1))
    plot(rows, Path(f"{stem}.png"), title)
    print(report)
    print(f"Plot: {stem}.png (also {stem}.md, {stem}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
