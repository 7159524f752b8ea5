"""A training step of TorchRec's own DLRM model (torchrec.models.dlrm.DLRM) with its sparse
part as TorchRec builds it, with our ee.EmbeddingBag swapped into TorchRec's collection
(ee.replace_embeddings), and with ee.EmbeddingBagCollection in its place (dense gradients,
sparse gradients, each + torch.optim.SGD, and the fused SGD step). Every variant starts from the same weights and
must give the same losses (checked over the first steps) before it is timed.

    python -m bench.dlrm --threads 1 --rounds 9 [--batch 512] [--cap 100000]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import embedding_ext as ee

from .collection import CRITEO_ROWS


def build(cap: int, dim: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchrec.models.dlrm import DLRM
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
    tables = [EmbeddingBagConfig(num_embeddings=min(r, cap), embedding_dim=dim, name=f"t{i}",
                                 feature_names=[f"f{i}"]) for i, r in enumerate(CRITEO_ROWS)]
    torch.manual_seed(0)
    base = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables),
                dense_in_features=13, dense_arch_layer_sizes=[512, 256, dim],
                over_arch_layer_sizes=[512, 256, 1])
    variants = {"TorchRec collection": base}
    swapped = copy.deepcopy(base)
    ee.replace_embeddings(swapped)
    variants["ee.replace_embeddings"] = swapped
    for name in ("ee collection", "ee collection, sparse=True", "ee collection, fused SGD"):
        model = copy.deepcopy(base)
        model.sparse_arch.embedding_bag_collection = ee.EmbeddingBagCollection.from_torchrec(
            base.sparse_arch.embedding_bag_collection, sparse="sparse" in name)
        variants[name] = model
    steps = {}
    for name, model in variants.items():
        if "fused" in name:
            fused = ee.fuse_optimizer(model.sparse_arch.embedding_bag_collection,
                                      torch.optim.SGD, lr=0.01)
            dense = torch.optim.SGD([p for n, p in model.named_parameters()
                                     if not n.startswith("sparse_arch.")], lr=0.01)
            steps[name] = (model, [fused, dense])
        else:
            steps[name] = (model, [torch.optim.SGD(model.parameters(), lr=0.01)])
    return steps


def batch_of(batch: int, cap: int, seed: int):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    gen = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, min(r, cap), (batch,), generator=gen)
                        for r in CRITEO_ROWS])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(CRITEO_ROWS))], values=values,
        lengths=torch.ones(len(CRITEO_ROWS) * batch, dtype=torch.long))
    return torch.randn(batch, 13, generator=gen), kjt, torch.randint(0, 2, (batch,), generator=gen).float()


def step(model, optimizers, dense, kjt, labels) -> float:
    for opt in optimizers:
        opt.zero_grad()
    logits = model(dense_features=dense, sparse_features=kjt).squeeze(1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--cap", type=int, default=100_000, help="most rows of a table")
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = build(args.cap, args.dim)
    losses = {name: [] for name in steps}
    for seed in range(3):  # every variant trains alike before any timing
        inputs = batch_of(args.batch, args.cap, seed)
        for name, (model, opts) in steps.items():
            losses[name].append(step(model, opts, *inputs))
    first = next(iter(losses.values()))
    for name, got in losses.items():
        if any(abs(a - b) > 1e-4 * max(1.0, abs(b)) for a, b in zip(got, first)):
            raise SystemExit(f"{name}: losses {got} differ from {first}")
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        inputs = batch_of(args.batch, args.cap, 100 + r)
        for name, (model, opts) in steps.items():
            start = time.perf_counter()
            step(model, opts, *inputs)
            times[name].append(time.perf_counter() - start)
    print(f"TorchRec DLRM, 26 Criteo tables (rows <= {args.cap}), D={args.dim}, B={args.batch}, "
          f"{args.threads} thread(s), torch {torch.__version__}: ms per training step "
          f"(median of {args.rounds} alternating rounds); losses equal over 3 steps")
    base = statistics.median(times["TorchRec collection"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:28s} {med * 1e3:9.1f} ms   {base / med:5.2f}x TorchRec's")


if __name__ == "__main__":
    main()
