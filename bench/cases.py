"""Benchmark cases, named after what users run, and the presets that group them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Operations, each timed for ours and PyTorch's equivalent.
FORWARD = "forward"
DENSE = "dense_backward"
DENSE_PAD_FREQ = "dense_backward+pad+freq"
SPARSE = "sparse_backward"
FWD_BWD = "forward+backward"
MAX_NORM = "max_norm_forward"
ALL_OPS = (FORWARD, DENSE, DENSE_PAD_FREQ, SPARSE, FWD_BWD, MAX_NORM)
# GPU-only extras: the cost of synchronous bad-index checks, and the deterministic backward
# (both sides under torch.use_deterministic_algorithms(True)).
FORWARD_SYNC = "forward+sync_index_checks"
DENSE_DET = "dense_backward_deterministic"
GPU_OPS = ALL_OPS + (FORWARD_SYNC, DENSE_DET)
# Pooled lookups (ee.embedding_bag against F.embedding_bag, and FBGEMM's own table-batched
# kernels where fbgemm_gpu is installed): forward, and forward + backward with dense or sparse
# weight gradients.
BAG_FORWARD = "bag_forward"
BAG_FWD_BWD = "bag_forward+backward"
BAG_FWD_BWD_SPARSE = "bag_forward+backward_sparse"
BAG_OPS = (BAG_FORWARD, BAG_FWD_BWD, BAG_FWD_BWD_SPARSE)


@dataclass(frozen=True)
class Case:
    name: str                 # what users run, e.g. "gpt2-vocab"
    num_embeddings: int
    dim: int
    lookups: int
    dtype: torch.dtype
    index_dtype: torch.dtype = torch.int64
    distribution: str = "uniform"  # uniform | zipf1.05 | zipf1.2 | hot
    ops: tuple = field(default=ALL_OPS)
    layout: str = "rows"  # rows: contiguous; columns: stride(1) != 1 (a transposed table)
    # Pooled lookups only: ids per bag (lookups / bag_size bags), the mode, padding_idx = the
    # first id, and per_sample_weights (sum mode).
    bag_size: int = 0
    mode: str = "sum"
    padding: bool = False
    weighted: bool = False

    @property
    def label(self) -> str:
        d = str(self.dtype).removeprefix("torch.")
        i = str(self.index_dtype).removeprefix("torch.")
        layout = "" if self.layout == "rows" else f" {self.layout}"
        bag = ""
        if self.bag_size:
            bag = (f" {self.mode} L={self.bag_size}" + (" pad" if self.padding else "")
                   + (" psw" if self.weighted else ""))
        return (f"{self.name} V={self.num_embeddings} D={self.dim} N={self.lookups} {d} {i} "
                f"{self.distribution}{layout}{bag}")


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
I32, I64 = torch.int32, torch.int64
LM_OPS = (FORWARD, DENSE, DENSE_PAD_FREQ, FWD_BWD, DENSE_DET)

# Sized for a 2-core CPU: the whole preset runs in about 3 minutes.
QUICK = [
    # Per-call overhead: a lookup so small that the time is Python, dispatch and autograd.
    Case("tiny", 100, 16, 8, F32, ops=(FORWARD, FWD_BWD)),
    Case("gpt2-vocab", 50257, 768, 4096, F32),
    Case("gpt2-vocab", 50257, 768, 4096, BF16, ops=(FORWARD, DENSE, FWD_BWD)),
    Case("llama2-vocab", 32000, 4096, 2048, F16, I32, ops=(FORWARD, DENSE)),
    Case("gemma-vocab", 256000, 768, 2048, BF16, ops=(FORWARD, DENSE)),
    Case("rec-table", 1_000_000, 64, 65536, F32, I32, "zipf1.05"),
    Case("rec-table", 1_000_000, 128, 262144, BF16, I64, "zipf1.2", ops=(FORWARD, DENSE, SPARSE)),
    Case("rec-table", 1_000_000, 64, 65536, F32, I64, "hot", ops=(FORWARD, DENSE_PAD_FREQ, SPARSE)),
    Case("rec-small-rows", 100_000, 16, 262144, F32, I64, "uniform", ops=(FORWARD, DENSE)),
]

# For an H100/H200: full-size tables.
GPU = [
    Case("tiny", 100, 16, 8, F32, ops=(FORWARD, FWD_BWD)),
    Case("gpt2-vocab", 50257, 768, 16384, F32, ops=GPU_OPS),
    Case("gpt2-vocab", 50257, 768, 16384, BF16),
    Case("llama2-vocab", 32000, 4096, 16384, BF16, I64, ops=LM_OPS + (FORWARD_SYNC,)),
    Case("llama3-vocab", 128256, 4096, 16384, BF16, I64, ops=LM_OPS),
    Case("gemma-vocab", 256000, 2048, 16384, BF16, I32, ops=LM_OPS),
    Case("llama2-vocab", 32000, 4096, 16384, F16, I32, "zipf1.05", ops=LM_OPS),
    Case("rec-table", 1_000_000, 128, 524288, F32, I64, "uniform", ops=GPU_OPS),
    Case("rec-table", 1_000_000, 128, 524288, F32, I64, "zipf1.05", ops=GPU_OPS),
    Case("rec-table", 1_000_000, 128, 524288, F32, I64, "zipf1.2"),
    Case("rec-table", 1_000_000, 128, 524288, F32, I64, "hot", ops=ALL_OPS + (DENSE_DET,)),
    Case("rec-table", 10_000_000, 64, 524288, F16, I32, "zipf1.05"),
    Case("rec-table", 10_000_000, 256, 65536, BF16, I64, "uniform", ops=(FORWARD, DENSE, SPARSE)),
    Case("rec-small-rows", 1_000_000, 16, 524288, F32, I32, "uniform",
         ops=(FORWARD, DENSE, SPARSE, FORWARD_SYNC)),
    # Speed risks to measure: a column-major table (our forward copies it to
    # rows first; PyTorch gathers in place), renorm over a 10M-row table (a V-sized claim
    # array zero-filled per call), and the deterministic backward's hot row (one row group
    # sums half the lookups).
    Case("rec-table", 1_000_000, 128, 524288, F32, I64, "uniform", ops=(FORWARD,),
         layout="columns"),
    Case("rec-table", 10_000_000, 64, 65536, F32, I64, "uniform", ops=(MAX_NORM,)),
    # Pooled lookups: bags of 32 over a 1M-row table, every mode.
    Case("rec-bags", 1_000_000, 128, 524288, F32, bag_size=32, mode="sum", ops=BAG_OPS),
    Case("rec-bags", 1_000_000, 128, 524288, F32, bag_size=32, mode="mean", padding=True,
         distribution="zipf1.05", ops=BAG_OPS),
    Case("rec-bags", 1_000_000, 128, 524288, F32, bag_size=32, mode="sum", weighted=True,
         ops=(BAG_FORWARD, BAG_FWD_BWD)),
    Case("rec-bags", 1_000_000, 128, 524288, F32, bag_size=32, mode="max",
         ops=(BAG_FORWARD, BAG_FWD_BWD)),
    Case("rec-bags", 1_000_000, 128, 524288, BF16, I32, bag_size=32, mode="sum",
         ops=(BAG_FORWARD, BAG_FWD_BWD)),
]

# Pooled lookups on a 2-core CPU (about 4 minutes at 1 and 2 threads): a recommender's shape
# (V=1e6, D=64, 65,536 ids in bags of 32) in every mode, then wider rows, the other dtypes and
# a smaller table (where the dense gradient's V x D zero-fill matters less).
def _bags(dim: int, dtype: torch.dtype, mode: str, ops: tuple = BAG_OPS, name: str = "rec-bags",
          num_embeddings: int = 1_000_000, **options) -> Case:
    return Case(name, num_embeddings, dim, 65536, dtype, bag_size=32, mode=mode, ops=ops,
                **options)


FWD = (BAG_FORWARD,)
BAG = [
    _bags(64, F32, "sum"),
    _bags(64, F32, "mean"),
    _bags(64, F32, "sum", weighted=True, ops=(BAG_FORWARD, BAG_FWD_BWD)),
    _bags(64, F32, "mean", padding=True),
    _bags(64, F32, "max", ops=(BAG_FORWARD, BAG_FWD_BWD)),
    _bags(64, F16, "sum", FWD, index_dtype=I32),
    _bags(64, BF16, "sum", FWD),
    _bags(64, torch.float64, "sum", FWD),
    _bags(128, F32, "sum", distribution="zipf1.05"),
    _bags(256, F32, "mean", FWD),
    _bags(64, F32, "sum", name="rec-bags-small", num_embeddings=100_000, padding=True),
]

# The main job (`make bench`, bench/main.py): one or two representative cases per op family,
# sized so that the whole job, set-up included, fits in a few minutes on a 2-core CPU.
MAIN = [
    Case("tiny", 100, 16, 8, F32, ops=(FORWARD, FWD_BWD)),
    Case("gpt2-vocab", 50257, 768, 4096, F32, ops=(FORWARD, DENSE, FWD_BWD)),
    Case("rec-table", 1_000_000, 64, 65536, F32, I32, "zipf1.05",
         ops=(FORWARD, DENSE, SPARSE, MAX_NORM)),
    Case("rec-table", 1_000_000, 128, 65536, F16, I64, "zipf1.05", ops=(FORWARD,)),
    _bags(64, F32, "sum", (BAG_FORWARD, BAG_FWD_BWD_SPARSE)),
    _bags(64, F32, "mean", FWD, padding=True),
]

PRESETS = {"quick": QUICK, "gpu": GPU, "bag": BAG, "main": MAIN}


def make_indices(case: Case, device, generator: torch.Generator) -> torch.Tensor:
    """Lookup ids for a case. Zipf: row popularity ~ 1/rank^s over the whole table, ranks
    scattered over random rows; hot: half the lookups hit one row."""
    n, v = case.lookups, case.num_embeddings
    if case.distribution == "uniform":
        idx = torch.randint(0, v, (n,), generator=generator)
    elif case.distribution.startswith("zipf"):
        s = float(case.distribution.removeprefix("zipf"))
        cdf = torch.cumsum(torch.arange(1, v + 1, dtype=torch.float64).pow(-s), 0)
        ranks = torch.searchsorted(cdf, torch.rand(n, generator=generator, dtype=torch.float64) * cdf[-1])
        idx = torch.randperm(v, generator=generator)[ranks.clamp_max(v - 1)]
    elif case.distribution == "hot":
        idx = torch.randint(0, v, (n,), generator=generator)
        idx[torch.rand(n, generator=generator) < 0.5] = 7
    else:
        raise ValueError(f"unknown distribution {case.distribution!r}")
    return idx.to(device=device, dtype=case.index_dtype)
