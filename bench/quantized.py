"""The quantized-table benchmark (the `quant` preset): our quantized bags and lookups against
PyTorch's quantized ops and against our own fp32 ops, on one table, each row verified first.

    python -m bench.quantized                      # CPU, 1 thread, V=1e6, D=128, 65,536 ids
    python -m bench.quantized --device cuda --out DIR

Rows (bags of 32, sum): int8 ours vs PyTorch's embedding_bag_byte_rowwise_offsets and vs our
fp32 bag; int4 ours vs embedding_bag_4bit_rowwise_offsets; fp8 ours vs our fp32 bag; the
unpooled int8 lookup vs our fp32 lookup, in bytes read per second. Times are medians of
alternating rounds (torch.utils.benchmark, warmed up, CUDA-synchronised). The tables: ours
from quantize_rows (huge pages on the CPU), PyTorch's from its prepack op (same bytes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

import embedding_ext as ee
from embedding_ext import ops, quantized_ops as qops

_PT = {"int8": (torch.ops.quantized.embedding_bag_byte_prepack,
                torch.ops.quantized.embedding_bag_byte_rowwise_offsets),
       "int4": (torch.ops.quantized.embedding_bag_4bit_prepack,
                torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)}


def _median_ms(fn, device: str, min_run_time: float) -> float:
    fn()  # warm up (and first-touch the output cache)
    if device == "cuda":
        torch.cuda.synchronize()
    timer = benchmark.Timer("fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _check(name: str, ours: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    if not torch.allclose(ours.float().cpu(), expected.float().cpu(), rtol=1e-5, atol=atol):
        err = (ours.float().cpu() - expected.float().cpu()).abs().max().item()
        raise RuntimeError(f"bench.quantized: {name}: our result differs (max error {err})")


def measure(device: str = "cpu", num_rows: int = 1_000_000, dim: int = 128, ids: int = 65_536,
            bag: int = 32, rounds: int = 3, min_run_time: float = 0.2,
            formats: tuple = ("int8", "int4", "fp8"), lookup: bool = True,
            vs_fp32: bool = True, same_table: bool = True) -> list[dict]:
    """One row per comparison: ours_ms, the peer's ms and name, speed-up, bytes/s."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(num_rows, dim, generator=gen)
    idx = torch.randint(0, num_rows, (ids,), generator=gen).to(device)
    offsets = torch.arange(0, ids, bag, device=device)
    csr = torch.arange(0, ids + 1, bag, device=device)
    weight_dev = weight.to(device)
    contenders: dict[str, tuple] = {}  # name -> (fn, peer name)
    memory = {"fp32": weight.numel() * 4}
    fp32_bag = lambda: ee.embedding_bag(idx, weight_dev, offsets, mode="sum")  # noqa: E731
    fp32_lookup = lambda: ops.embedding_forward(weight_dev, idx)  # noqa: E731
    for fmt in formats:
        packed = qops.quantize_rows(weight, fmt).to(device)
        memory[fmt] = packed.numel()
        ours = (lambda p=packed, f=fmt: qops.quantized_embedding_bag_forward(
            p, f, idx, csr, 0, None, -1, torch.float32))
        table = qops.quantized_embedding_forward(packed, fmt, torch.arange(num_rows, device=device),
                                                 torch.float32)
        _check(f"{fmt} bag", ours(), ee.embedding_bag(idx, table, offsets, mode="sum"), 1e-3)
        if fmt in _PT:
            prepack, pt_bag = _PT[fmt]
            pt_packed = prepack(weight).to(device)
            pt = (lambda p=pt_packed, op=pt_bag: op(p, idx, offsets, mode=0))
            try:
                expected = pt()
            except (NotImplementedError, RuntimeError) as err:  # no kernel for this device
                print(f"bench.quantized: PyTorch's {fmt} bag does not run on {device}: "
                      f"{str(err).splitlines()[0]}", file=sys.stderr)
                continue
            _check(f"{fmt} bag vs PyTorch", ours(), expected, 1e-3)
            contenders[f"{fmt} bag sum"] = (ours, pt, f"PyTorch {pt_bag.__name__.split('.')[-1]}")
            if same_table:  # both on PyTorch's prepacked tensor (no huge pages for ours)
                on_pt = (lambda p=pt_packed, f=fmt: qops.quantized_embedding_bag_forward(
                    p, f, idx, csr, 0, None, -1, torch.float32))
                contenders[f"{fmt} bag sum, PyTorch's table"] = (
                    on_pt, pt, f"PyTorch {pt_bag.__name__.split('.')[-1]}")
        if fmt != "int4" and vs_fp32:
            contenders[f"{fmt} bag sum vs fp32"] = (ours, fp32_bag, "our fp32 bag")
        if lookup and fmt == "int8":
            mine = (lambda p=packed: qops.quantized_embedding_forward(p, "int8", idx, torch.float32))
            _check("int8 lookup", mine(), table[idx], 0)
            contenders["int8 lookup"] = (mine, fp32_lookup, "our fp32 lookup")
    times: dict[str, list] = {}
    for _ in range(rounds):  # alternate: every contender once per round
        for name, (ours, peer, _) in contenders.items():
            times.setdefault(name, []).append((_median_ms(ours, device, min_run_time),
                                               _median_ms(peer, device, min_run_time)))
    rows = []
    for name, (_, _, peer_name) in contenders.items():
        ours_ms = statistics.median(t[0] for t in times[name])
        peer_ms = statistics.median(t[1] for t in times[name])
        fmt = name.split()[0]
        row_bytes = memory[fmt] // num_rows
        rows.append({"case": name, "ours_ms": ours_ms, "peer": peer_name, "peer_ms": peer_ms,
                     "speedup": peer_ms / ours_ms,
                     "ours_GBps": ids * row_bytes / ours_ms / 1e6,
                     "peer_GBps": ids * (row_bytes if "PyTorch" in peer_name else dim * 4)
                     / peer_ms / 1e6})
    rows.append({"case": "table memory", "bytes": memory,
                 "formula": "int8: V*(D+8), int4: V*(D/2+4), fp8: V*(D+4), fp32: V*D*4"})
    return rows


def report(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| case | ours ms | peer | peer ms | speed-up | ours GB/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "ours_ms" in r:
            lines.append(f"| {r['case']} | {r['ours_ms']:.3f} | {r['peer']} | {r['peer_ms']:.3f}"
                         f" | {r['speedup']:.2f}x | {r['ours_GBps']:.1f} |")
    memory = rows[-1]["bytes"]
    lines += ["", "Table memory: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in memory.items())
              + f" ({rows[-1]['formula']}).",
              "GB/s: rows read (ids x row bytes of the table read) per second. Speed-up = peer "
              "ms / ours ms; medians of alternating rounds."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-rows", type=int, default=1_000_000,
                        help="V (smaller: a quick check of the driver)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    rows = measure(device, num_rows=args.num_rows, rounds=args.rounds)
    where = (torch.cuda.get_device_name() if device == "cuda"
             else f"CPU, {args.threads} thread{'s' * (args.threads > 1)}")
    title = (f"quant preset on {where}, torch {torch.__version__}: V={args.num_rows:.3g}, D=128, "
             "65,536 ids in bags of 32")
    text = report(rows, title)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"quant-{device}.md").write_text(text + "\n")
    (args.out / f"quant-{device}.json").write_text(json.dumps({"title": title, "rows": rows},
                                                              indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
