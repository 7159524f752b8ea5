"""Tensor-parallel embedding step: forward + backward of ``ee.Embedding`` against
``nn.Embedding`` under the same ``parallelize_module`` plan (RowwiseParallel to Replicate(),
ColwiseParallel to Shard(-1)), `world` ranks on gloo (CPU). Per rank it also records the
bytes of the weight's local shard and of its gradient, and the gradient's placement
(PyTorch's row-wise embedding gathers a V x D gradient on every rank; ours stays sharded).

Every row is verified first: each rank's output and the full weight gradient must match a
single-process nn.Embedding on the same ids. Then alternating rounds (ours, PyTorch) of a
fixed number of steps each, all ranks in lockstep (a barrier around each round: timers that
pick their own repeat counts would deadlock the collectives); rank 0's medians.

    python -m bench.sharded [--world 2] [--rounds 5] [--steps 10] [--out bench/results]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import embedding_ext as ee

CASES = [(100_000, 64, 16_384), (50_257, 768, 4_096)]  # (V, D, ids)
PLANS = ["row->replicate", "col->shard"]


def _plan(name: str):
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    return {"row->replicate": RowwiseParallel(input_layouts=Replicate()),
            "col->shard": ColwiseParallel()}[name]


def _bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.untyped_storage().nbytes()


def _placements(t) -> str:
    return ",".join(f"{type(p).__name__}({getattr(p, 'dim', '')})" for p in t.placements) \
        if hasattr(t, "placements") else "plain"


def _rank(rank: int, world: int, rounds: int, steps: int, store: str, result_path: str,
          cases: list, plans: list):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for V, D, n in cases:
        ids = torch.randint(0, V, (n // 512, 512), generator=torch.Generator().manual_seed(V))
        for plan in plans:
            torch.manual_seed(0)
            single = torch.nn.Embedding(V, D)
            models = {"ours": ee.Embedding(V, D), "PyTorch": torch.nn.Embedding(V, D)}
            for m in models.values():
                m.load_state_dict(single.state_dict())
                parallelize_module(m, mesh, _plan(plan))
            grad_full = torch.randn(*ids.shape, D, generator=torch.Generator().manual_seed(1))
            first, cols = ee.distributed.shard_rows(D, world, rank)
            grad = grad_full[..., first:first + cols] if plan == "col->shard" else grad_full
            # Verify: output and full gradient against one process.
            out_single = single(ids)
            (out_single * grad_full).sum().backward()
            expected = out_single[..., first:first + cols] if plan == "col->shard" else out_single
            memory = {}
            for name, m in models.items():
                out = m(ids)
                (out * grad).sum().backward()
                torch.testing.assert_close(torch.as_tensor(out), expected, rtol=1e-5, atol=1e-6)
                g = m.weight.grad
                full = g.full_tensor() if hasattr(g, "full_tensor") else g
                torch.testing.assert_close(full, single.weight.grad, rtol=1e-5, atol=1e-5)
                memory[name] = (_bytes(m.weight), _bytes(g), _placements(g))
                m.weight.grad = None

            def step(m):
                out = m(ids)
                (out * grad).sum().backward()
                m.weight.grad = None

            times = {name: [] for name in models}
            for _ in range(rounds):
                for name, m in models.items():
                    step(m)  # warm
                    dist.barrier()
                    start = time.perf_counter()
                    for _ in range(steps):
                        step(m)
                    dist.barrier()
                    times[name].append((time.perf_counter() - start) / steps * 1e3)
            rows.append(dict(V=V, D=D, ids=ids.numel(), plan=plan,
                             ours_ms=statistics.median(times["ours"]),
                             torch_ms=statistics.median(times["PyTorch"]),
                             ours_weight_bytes=memory["ours"][0], ours_grad_bytes=memory["ours"][1],
                             ours_grad=memory["ours"][2], torch_weight_bytes=memory["PyTorch"][0],
                             torch_grad_bytes=memory["PyTorch"][1], torch_grad=memory["PyTorch"][2],
                             full_table_bytes=V * D * 4))
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def report(rows: list, world: int, rounds: int, steps: int, command: str) -> str:
    mib = 2 ** 20
    lines = [f"### Tensor-parallel embedding step, {world} ranks on gloo (CPU, 1 thread each), "
             f"torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"{platform.processor() or platform.machine()}; medians of {rounds} rounds of "
             f"{steps} steps (forward + backward), rank 0; every row verified against one "
             "process's nn.Embedding first.", "",
             "| V | D | ids | plan | ours ms | PyTorch ms | speed-up | rank 0 weight MiB | "
             "ours grad MiB (placement) | PyTorch grad MiB (placement) | full table MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['V']} | {r['D']} | {r['ids']} | {r['plan']} | {r['ours_ms']:.2f} | "
            f"{r['torch_ms']:.2f} | {r['torch_ms'] / r['ours_ms']:.2f}x | "
            f"{r['ours_weight_bytes'] / mib:.1f} | {r['ours_grad_bytes'] / mib:.1f} ({r['ours_grad']}) | "
            f"{r['torch_grad_bytes'] / mib:.1f} ({r['torch_grad']}) | {r['full_table_bytes'] / mib:.1f} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def run(world: int, rounds: int, steps: int, cases=None, plans=None) -> list[dict]:
    """Verifies, then times every (case, plan) on `world` gloo ranks; rank 0's rows."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.json")
        mp.spawn(_rank, args=(world, rounds, steps, os.path.join(tmp, "store"), result,
                              cases or CASES, plans or PLANS), nprocs=world)
        return json.loads(Path(result).read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="folder for sharded-cpu.md/.json")
    args = parser.parse_args(argv)
    if not dist.is_available():
        print("bench.sharded: torch.distributed is not available; skipped")
        return 0
    rows = run(args.world, args.rounds, args.steps)
    command = "python -m bench.sharded " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v is not None)
    text = report(rows, args.world, args.rounds, args.steps, command)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sharded-cpu.md").write_text(text)
        (args.out / "sharded-cpu.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
