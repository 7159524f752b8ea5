"""The fused training step (issue 14): forward + backward-with-update of ``ee.fuse_optimizer``
against ``nn.Embedding(sparse=True)`` + the same torch optimizer, and FBGEMM's CPU TBE fused
step (SGD, row-wise Adagrad; bags of one id) where installed. Every row is verified first:
two steps from the same weights on the same ids must agree with PyTorch (and FBGEMM) before
anything is timed. Then alternating rounds, medians.

    python -m bench.fused_step [--threads 1] [--rounds 5] [--out bench/results]
"""
from __future__ import annotations

import argparse
import datetime
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


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


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


def run(threads: int, rounds: int, out: Path | None) -> str:
    torch.set_num_threads(threads)
    fb = _fbgemm()
    gen = torch.Generator().manual_seed(0)
    lines = [f"### fused_step on {platform.processor() or platform.machine()}, {threads} "
             f"thread(s), torch {torch.__version__}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| V x D | optimizer | ours ms | torch sparse + optimizer ms | speed-up | "
             "FBGEMM ms | vs FBGEMM | extra MiB (ours) |", "|---|---|---|---|---|---|---|---|"]
    for num_rows, dim in CASES:
        base = torch.randn(num_rows, dim, generator=gen)
        batches = [(torch.randint(0, num_rows, (IDS,), generator=gen),
                    torch.randn(IDS, dim, generator=gen)) for _ in range(2)]
        for name, cls, kwargs, fbgemm_rule in OPTIMIZERS:
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
                results["ours"].append(_median_ms(lambda: ours_step(ids, grad), 3))
                results["torch"].append(_median_ms(lambda: torch_step(ids, grad), 3))
                if peer is not None:
                    results["fbgemm"].append(_median_ms(lambda: peer(ids, grad), 3))
            t_ours, t_torch = statistics.median(results["ours"]), statistics.median(results["torch"])
            # Extra memory of our step: the sort's O(ids) arrays and the output (ids x D).
            extra_mib = (IDS * (8 * 4) + IDS * dim * 4) / 2**20
            fb_cells = "- | -"
            if results["fbgemm"]:
                t_fb = statistics.median(results["fbgemm"])
                fb_cells = f"{t_fb:.2f} | {t_fb / t_ours:.2f}x"
            line = (f"| {num_rows} x {dim} | {name} | {t_ours:.2f} | {t_torch:.2f} | "
                    f"{t_torch / t_ours:.2f}x | {fb_cells} | {extra_mib:.0f} |")
            print(line, flush=True)
            lines.append(line)
            del ours, fused, plain, reference, peer
    lines += ["", f"Command: `python -m bench.fused_step --threads {threads} --rounds {rounds}`",
              "Each row verified first (two steps from the same weights agree with PyTorch, "
              "and FBGEMM, to 1e-4). Extra MiB: an estimate of our step's O(ids) buffers (the "
              "forward's output and the sort), never O(V x D)."]
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"fused-step-cpu-{threads}t.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    print(run(args.threads, args.rounds, args.out))


if __name__ == "__main__":
    main()
