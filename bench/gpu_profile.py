"""Where the time goes in the GPU rows that lose or sit far from the copy bandwidth: each
target's ours and PyTorch's callables (the benchmark's own, verified first) under
torch.profiler, one table of kernels (self device time) and host operators (self CPU time)
per side, plus a wall-clock median over many calls (synchronised). For a prepared device
call (bench/notes/cuda-bags-fused.md); on the CPU it runs the same code on the tiny targets only.

    python -m bench.gpu_profile [--device cuda] [--out DIR] [--iters 20]
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

import embedding_ext as ee
from bench import cases
from bench.fused_step import median_ms, synchronize
from bench.run import prepare

# (label substring of a GPU-preset case, op): the rows that lose or run far from the floor
# in run 4 (bench/results/gpu-run4-h200-2026-11-27).
TARGETS = [
    ("llama2-vocab V=32000 D=4096 N=16384 float16 int32 zipf1.05", cases.DENSE),
    ("rec-table V=1000000 D=128 N=524288 float32 int64 hot", cases.DENSE),
    ("rec-bags V=1000000 D=128 N=524288 float32 int64 uniform sum L=32", cases.BAG_FWD_BWD_SPARSE),
    ("rec-bags V=1000000 D=128 N=524288 bfloat16 int32 uniform sum L=32", cases.BAG_FORWARD),
]
CPU_TARGETS = [("tiny V=100 D=16 N=8 float32 int64 uniform", cases.FWD_BWD)]
# The fused step (bench.fused_step's shape): 65,536 ids into a 1M x 64 table.
FUSED_ROWS, FUSED_DIM, FUSED_IDS = 1_000_000, 64, 65536


def profile_table(fn, device: str, iters: int) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(3):
        fn()
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        synchronize(device)
    averages = prof.key_averages()
    parts = []
    if device == "cuda":
        parts.append(averages.table(sort_by="self_device_time_total", row_limit=14,
                                    max_name_column_width=70))
    parts.append(averages.table(sort_by="self_cpu_time_total", row_limit=14,
                                max_name_column_width=70))
    return "\n".join(parts)


def fused_targets(device: str):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(FUSED_ROWS, FUSED_DIM, generator=gen).to(device)
    ids = torch.randint(0, FUSED_ROWS, (FUSED_IDS,), generator=gen).to(device)
    grad = torch.randn(FUSED_IDS, FUSED_DIM, generator=gen).to(device)
    for name, cls in (("SGD", torch.optim.SGD), ("Adagrad", torch.optim.Adagrad)):
        ours = ee.Embedding(FUSED_ROWS, FUSED_DIM, _weight=base.clone())
        fused = ee.fuse_optimizer(ours, cls, lr=0.01)
        plain = torch.nn.Embedding(FUSED_ROWS, FUSED_DIM, sparse=True, _weight=base.clone())
        reference = cls(plain.parameters(), lr=0.01)

        def ours_step(ours=ours, fused=fused):
            ours(ids).backward(grad)
            fused.step()

        def torch_step(plain=plain, reference=reference):
            plain(ids).backward(grad)
            reference.step()
            reference.zero_grad()
        ours_step(), torch_step()
        torch.testing.assert_close(ours.weight, plain.weight, rtol=1e-4, atol=1e-5)
        yield f"fused step {name} {FUSED_ROWS} x {FUSED_DIM}, {FUSED_IDS} ids", ours_step, torch_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = args.device
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (f"# gpu_profile on {where}, torch {torch.__version__}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    out = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        out = (args.out / f"profile-{device}.txt").open("w")

    def emit(text: str) -> None:
        print(text, flush=True)
        if out is not None:
            out.write(text + "\n")
            out.flush()
    emit(header)
    gen = torch.Generator().manual_seed(0)
    device_gen = torch.Generator(device=device).manual_seed(0)
    wanted = TARGETS if device == "cuda" else CPU_TARGETS
    targets = []
    for label, op in wanted:
        case = next((c for c in cases.GPU if c.label == label), None)
        if case is None:
            raise SystemExit(f"gpu_profile: no GPU-preset case {label!r}")
        targets.append((label, op, case))
    status = 0
    for label, op, case in targets:
        try:
            ours, theirs, _, _ = prepare(case, op, device, gen, device_gen)
        except Exception as err:  # noqa: BLE001 - report and go on to the next target
            emit(f"## {label} {op}: could not prepare ({type(err).__name__}: {err})")
            status = 1
            continue
        emit(_section(f"{label} {op}", ours, theirs, device, args.iters))
        del ours, theirs
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda":
        for title, ours, theirs in fused_targets(device):
            emit(_section(title, ours, theirs, device, args.iters))
    if out is not None:
        out.close()
    return status


def _section(title: str, ours, theirs, device: str, iters: int) -> str:
    t_ours, t_theirs = median_ms(ours, 50, device), median_ms(theirs, 50, device)
    return (f"## {title}\nwall median of 50 synchronised calls: ours {t_ours:.3f} ms, "
            f"PyTorch {t_theirs:.3f} ms ({t_theirs / t_ours:.2f}x)\n\n### ours ({iters} calls)\n"
            f"{profile_table(ours, device, iters)}\n### PyTorch ({iters} calls)\n"
            f"{profile_table(theirs, device, iters)}\n")


if __name__ == "__main__":
    sys.exit(main())
