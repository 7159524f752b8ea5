"""Long-run check: N forward+backward calls must leave memory flat.

    python -m bench.soak --calls 100000 [--device cuda]

Samples CPU RSS (and, on CUDA, torch.cuda.memory_allocated) after a warm-up and then every
10% of the run; fails (exit 1) if either grows by more than the given slack.
"""
import argparse
import os
import sys
import time

import torch

import embedding_ext as ee


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--slack-mib", type=float, default=32.0)
    args = p.parse_args(argv)
    dev = args.device
    torch.manual_seed(0)
    dense = ee.Embedding(20000, 64, padding_idx=0, scale_grad_by_freq=True).to(dev)
    sparse = ee.Embedding(20000, 64, sparse=True, max_norm=1.0).to(dev)
    opt = torch.optim.SGD(list(dense.parameters()) + list(sparse.parameters()), lr=1e-3)
    idx = torch.randint(0, 20000, (64, 8), device=dev)
    warmup = max(1, args.calls // 20)
    samples = []
    start = time.perf_counter()
    for step in range(args.calls):
        opt.zero_grad(set_to_none=True)
        (dense(idx).sum() + sparse(idx).sum()).backward()
        opt.step()
        if step + 1 >= warmup and (step + 1 - warmup) % max(1, (args.calls - warmup) // 10) == 0:
            if dev == "cuda":
                torch.cuda.synchronize()
            cuda = torch.cuda.memory_allocated() if dev == "cuda" else 0
            samples.append((step + 1, rss_bytes(), cuda))
    elapsed = time.perf_counter() - start
    print(f"{args.calls} forward+backward calls (dense + sparse tables) on {dev} in {elapsed:.1f} s")
    print("step, RSS MiB, CUDA allocated MiB")
    for step, rss, cuda in samples:
        print(f"{step}, {rss / 2**20:.1f}, {cuda / 2**20:.1f}")
    rss_growth = (samples[-1][1] - samples[0][1]) / 2**20
    cuda_growth = (samples[-1][2] - samples[0][2]) / 2**20
    print(f"growth after warm-up: RSS {rss_growth:+.1f} MiB, CUDA allocated {cuda_growth:+.1f} MiB "
          f"(slack {args.slack_mib} MiB)")
    ok = rss_growth <= args.slack_mib and cuda_growth <= args.slack_mib
    print("memory flat" if ok else "MEMORY GREW")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
