"""Many tables in one call: ee.EmbeddingBagCollection against a per-table loop of
F.embedding_bag, a per-table loop of ee.embedding_bag, FBGEMM's CPU TBE and TorchRec's own
(unsharded) EmbeddingBagCollection (each when importable).

    python -m bench.collection --threads 1 --rounds 15 [--cap 200000] [--json out.json]

Cases: "criteo" (26 tables of Criteo's cardinalities capped to --cap rows, D=64, B=2048, one
id per feature), "dlrm" (8 tables, dims 16/64/128, 1-30 ids per bag, B=512) and "wide" (100
tables of 10,000 rows, dims 32..256, 1-50 ids per bag, B=512). Ops: forward,
forward+backward with dense gradients, forward+backward with sparse gradients (FBGEMM: its
fused exact-SGD step, its only CPU training path with sparse updates), and the fused training
steps (ours: ee.fuse_optimizer on the collection; FBGEMM: its fused exact SGD and exact
row-wise Adagrad TBE; the loop: sparse gradients then torch.optim.SGD), all at lr 0 so every
round does the same work. Every column is checked against ours before timing; times are
medians of alternating rounds (one call per column per round), in ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import embedding_ext as ee

from .bags import _fbgemm

# The 26 categorical features of Criteo's Kaggle display-advertising data (rows per table).
CRITEO_ROWS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593,
               3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
OPS = ("forward", "fwd+bwd dense", "fwd+bwd sparse", "fused SGD step",
       "fused row-wise Adagrad step")


def make_case(name: str, cap: int, seed: int = 0):
    """(label, tables [(rows, dim, pooling)], batch, lengths per feature) of a case."""
    gen = torch.Generator().manual_seed(seed)
    if name == "criteo":
        tables = [(min(r, cap), 64, "sum") for r in CRITEO_ROWS]
        batch = 2048
        lengths = [torch.ones(batch, dtype=torch.long) for _ in tables]
        label = f"criteo 26 tables (rows<={cap}) D=64 B=2048 1 id"
    elif name == "dlrm":
        dims = [16, 64, 128, 16, 64, 128, 64, 16]
        tables = [(min(100_000, cap), d, "sum") for d in dims]
        batch = 512
        lengths = [torch.randint(1, 31, (batch,), generator=gen) for _ in tables]
        label = f"dlrm 8 tables (rows<={min(100_000, cap)}) D=16/64/128 B=512 1-30 ids"
    elif name == "wide":
        # Many tables of mixed widths (multiples of 8, so FBGEMM's CPU TBE takes them too).
        dims = (torch.randint(4, 33, (100,), generator=gen) * 8).tolist()
        tables = [(min(10_000, cap), d, "sum") for d in dims]
        batch = 512
        lengths = [torch.randint(1, 51, (batch,), generator=gen) for _ in tables]
        label = f"wide 100 tables (rows<={min(10_000, cap)}) D=32..256 B=512 1-50 ids"
    else:
        raise ValueError(f"unknown case {name!r}")
    values = torch.cat([torch.randint(0, r, (int(n.sum()),), generator=gen)
                        for (r, _, _), n in zip(tables, lengths)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(lengths).cumsum(0)])
    return label, tables, batch, values, offsets


def build_columns(tables, batch, values, offsets, device="cpu"):
    """{column: {op: callable returning (output, [weight gradients])}}."""
    configs = [ee.EmbeddingBagConfig(r, d, [f"f{t}"], name=f"t{t}", pooling=p)
               for t, (r, d, p) in enumerate(tables)]
    dense = ee.EmbeddingBagCollection(configs, device=device)
    sparse = ee.EmbeddingBagCollection(configs, device=device, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    weights = [dense.embedding_bags[f"t{t}"].weight for t in range(len(tables))]
    sparse_weights = [sparse.embedding_bags[f"t{t}"].weight for t in range(len(tables))]
    grad = torch.randn(batch, sum(d for _, d, _ in tables), device=device)
    # Per-table slices for the loops: local offsets, as a caller of the loop would keep them.
    parts = []
    for t in range(len(tables)):
        s, e = int(offsets[t * batch]), int(offsets[(t + 1) * batch])
        parts.append((values[s:e], offsets[t * batch:(t + 1) * batch] - s))

    def run(fn, ws, backward):
        for w in ws:
            w.grad = None
        out = fn()
        if backward:
            out.backward(grad)
        return out, [w.grad for w in ws]

    def f_loop(ws, sp):
        return lambda: torch.cat([F.embedding_bag(v, w, o, mode="sum", sparse=sp)
                                  for (v, o), w in zip(parts, ws)], 1)

    def ee_loop(ws, sp):
        return lambda: torch.cat([ee.embedding_bag(v, w, o, mode="sum", sparse=sp)
                                  for (v, o), w in zip(parts, ws)], 1)

    # The fused training steps at lr 0 (FBGEMM's too): every round does the same work on the
    # same tables. The loop's step is what a user would otherwise write: sparse gradients,
    # then torch.optim.SGD (torch has no row-wise Adagrad).
    fused = {}
    # The collection's fused update has no CUDA kernel yet: CPU only.
    for op, rule in () if device != "cpu" else (
            ("fused SGD step", torch.optim.SGD),
            ("fused row-wise Adagrad step", ee.optim.RowWiseAdagrad)):
        model = ee.EmbeddingBagCollection(configs)
        model.load_state_dict(dense.state_dict())
        fused[op] = (model, ee.fuse_optimizer(model, rule, lr=0.0))
    loop_sgd = torch.optim.SGD(sparse_weights, lr=0.0)

    def fused_step(op):
        model, opt = fused[op]
        out = model(values, offsets)
        out.backward(grad)
        opt.step()
        return out, None

    def loop_step():
        out, _ = run(f_loop(sparse_weights, True), sparse_weights, True)
        loop_sgd.step()
        return out, None

    cols = {
        "ours": {"forward": lambda: run(lambda: dense(values, offsets), weights, False),
                 "fused SGD step": lambda: fused_step("fused SGD step"),
                 "fused row-wise Adagrad step": lambda: fused_step("fused row-wise Adagrad step"),
                 "fwd+bwd dense": lambda: run(lambda: dense(values, offsets), weights, True),
                 "fwd+bwd sparse": lambda: run(lambda: sparse(values, offsets), sparse_weights,
                                               True)},
        "F.embedding_bag loop": {
            "forward": lambda: run(f_loop(weights, False), weights, False),
            "fwd+bwd dense": lambda: run(f_loop(weights, False), weights, True),
            "fwd+bwd sparse": lambda: run(f_loop(sparse_weights, True), sparse_weights, True),
            "fused SGD step": loop_step},
        "ee.embedding_bag loop": {
            "forward": lambda: run(ee_loop(weights, False), weights, False),
            "fwd+bwd dense": lambda: run(ee_loop(weights, False), weights, True),
            "fwd+bwd sparse": lambda: run(ee_loop(sparse_weights, True), sparse_weights, True)},
    }
    if device != "cpu":  # the CPU peers' columns
        for op in ("fused SGD step", "fused row-wise Adagrad step"):
            cols["ours"].pop(op)
        return cols
    fb = _fbgemm()
    if fb is not None and all(d % 4 == 0 for _, d, _ in tables):
        cols["FBGEMM TBE"] = _fbgemm_columns(fb, tables, weights, values, offsets, grad)
    torchrec_col = _torchrec_column(dense, batch, values, offsets, grad)
    if torchrec_col is not None:
        cols["TorchRec EBC"] = torchrec_col
    return cols


def _torchrec_column(ours, batch, values, offsets, grad):
    """TorchRec's unsharded EmbeddingBagCollection (a Python loop over nn.EmbeddingBag with
    dense gradients) holding our weights, called as its users call it, with a
    KeyedJaggedTensor; None where torchrec does not import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
            from torchrec.modules.embedding_modules import EmbeddingBagCollection
            from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    except Exception:  # noqa: BLE001 - any import failure means "no column"
        return None
    configs = [EmbeddingBagConfig(num_embeddings=c.num_embeddings, embedding_dim=c.embedding_dim,
                                  name=c.name, feature_names=c.feature_names,
                                  pooling=PoolingType.SUM)
               for c in ours.embedding_bag_configs()]
    theirs = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    theirs.load_state_dict(ours.state_dict())
    kjt = KeyedJaggedTensor.from_offsets_sync(keys=list(ours.feature_names), values=values,
                                              offsets=offsets, stride=batch)
    params = list(theirs.parameters())

    def step(backward):
        for p in params:
            p.grad = None
        out = theirs(kjt).values()
        if backward:
            out.backward(grad)
        return out, [p.grad for p in params] if backward else None

    return {"forward": lambda: step(False), "fwd+bwd dense": lambda: step(True)}


def _fbgemm_columns(fb, tables, weights, values, offsets, grad):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = fb["Dense"]([(r, d) for r, d, _ in tables], pooling_mode=fb["PoolingMode"].SUM,
                            use_cpu=True)
        with torch.no_grad():
            dense.weights.copy_(torch.cat([w.detach().reshape(-1) for w in weights]))
        # The training TBE updates its tables in the backward (exact SGD); lr 0 keeps the
        # tables fixed so every round does the same work on the same data.
        split = fb["Split"]([(r, d, fb["EmbeddingLocation"].HOST, fb["ComputeDevice"].CPU)
                             for r, d, _ in tables], pooling_mode=fb["PoolingMode"].SUM,
                            optimizer=fb["EmbOptimType"].EXACT_SGD, learning_rate=0.0)
        for dst, w in zip(split.split_embedding_weights(), weights):
            dst.copy_(w.detach())
        rowwise = fb["Split"]([(r, d, fb["EmbeddingLocation"].HOST, fb["ComputeDevice"].CPU)
                               for r, d, _ in tables], pooling_mode=fb["PoolingMode"].SUM,
                              optimizer=fb["EmbOptimType"].EXACT_ROWWISE_ADAGRAD,
                              learning_rate=0.0)
        for dst, w in zip(rowwise.split_embedding_weights(), weights):
            dst.copy_(w.detach())

    def dense_step(backward):
        dense.weights.grad = None
        out = dense(values, offsets)
        if backward:
            out.backward(grad)
        grads = None
        if backward:
            flat, grads, at = dense.weights.grad, [], 0
            for r, d, _ in tables:
                grads.append(flat[at:at + r * d].view(r, d))
                at += r * d
        return out, grads

    def fused_step(module):
        out = module(values, offsets)
        out.backward(grad)
        return out, None

    return {"forward": lambda: dense_step(False), "fwd+bwd dense": lambda: dense_step(True),
            "fwd+bwd sparse": lambda: fused_step(split),
            "fused SGD step": lambda: fused_step(split),
            "fused row-wise Adagrad step": lambda: fused_step(rowwise)}


def verify(cols, op):
    """Every column's output (and weight gradients, where it gives them) equal to ours."""
    out, grads = cols["ours"][op]()
    for name, col in cols.items():
        if op not in col:
            continue
        other, other_grads = col[op]()
        torch.testing.assert_close(other, out, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{name} {op}: output differs: {m}")
        if grads and other_grads:
            for g, h in zip(grads, other_grads):
                if g is None or h is None:
                    continue
                torch.testing.assert_close(h.to_dense() if h.is_sparse else h,
                                           g.to_dense() if g.is_sparse else g, atol=1e-4,
                                           rtol=1e-4,
                                           msg=lambda m: f"{name} {op}: gradient differs: {m}")


def time_case(name: str, cap: int, rounds: int, ops=OPS, device="cpu") -> list[dict]:
    label, tables, batch, values, offsets = make_case(name, cap)
    # What the forward must move: every id's row, the ids and offsets, the output.
    itemsize = 4
    moved = sum(int(offsets[(t + 1) * batch] - offsets[t * batch]) * d * itemsize
                for t, (_, d, _) in enumerate(tables))
    moved += values.numel() * 8 + offsets.numel() * 8 + batch * sum(d for _, d, _ in tables) * 4
    values, offsets = values.to(device), offsets.to(device)
    cols = build_columns(tables, batch, values, offsets, device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    rows = []
    for op in ops:
        verify(cols, op)
        here = {c: col for c, col in cols.items() if op in col}
        for col in here.values():  # warm-up
            col[op]()
        times = {c: [] for c in here}
        for _ in range(rounds):
            for c, col in here.items():
                sync()
                start = time.perf_counter()
                col[op]()
                sync()
                times[c].append(time.perf_counter() - start)
        medians = {c: statistics.median(t) * 1e3 for c, t in times.items()}
        rows.append(dict(case=name, label=label, op=op, ms=medians, bytes=moved))
    return rows


def collection_rows(threads: int = 1, rounds: int = 9, cap: int = 200_000) -> list[dict]:
    """The summary rows of the main benchmark job, ms per call: the forward of both cases and
    the fused steps of the Criteo case; torch_ms is the F.embedding_bag loop (None where the
    loop has no such step), peer_ms FBGEMM's TBE (None where not importable)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = []
        for name, ops in (("criteo", ("forward", "fused SGD step", "fused row-wise Adagrad step")),
                          ("dlrm", ("forward",))):
            for row in time_case(name, cap, rounds, ops=ops):
                out.append(dict(family="collection", case=f"{row['label']} {row['op']}",
                                ours_ms=row["ms"]["ours"],
                                torch_ms=row["ms"].get("F.embedding_bag loop"),
                                peer_ms=row["ms"].get("FBGEMM TBE")))
        return out
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cap", type=int, default=200_000, help="most rows of a table")
    parser.add_argument("--cases", default="criteo,dlrm,wide")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: ours and the "
                        "loops; the fused steps and the CPU peers are left out)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if args.device != "cpu" else f"{args.threads} thread(s), CPU"
    print(f"torch {torch.__version__}, {where}, median of {args.rounds} alternating rounds, "
          "ms per call")
    all_rows = []
    for name in args.cases.split(","):
        rows = time_case(name, args.cap, args.rounds,
                         OPS if args.device == "cpu" else OPS[:3], args.device)
        all_rows += rows
        print(f"\n{rows[0]['label']}")
        cols = list(rows[0]["ms"])
        print(f"{'op':28s}" + "".join(f"{c:>24s}" for c in cols) + "   loop/ours  FBGEMM/ours")
        for row in rows:
            ms = row["ms"]
            peer = ms.get("FBGEMM TBE")
            ratio = f"{peer / ms['ours']:11.2f}" if peer else "          -"
            loop = ms.get("F.embedding_bag loop")
            loop_ratio = f"{loop / ms['ours']:9.2f}" if loop else "        -"
            print(f"{row['op']:28s}" + "".join(f"{ms[c]:24.3f}" if c in ms else f"{'-':>24s}"
                                               for c in cols) + f"   {loop_ratio}  {ratio}")
        print(f"ours, forward: {rows[0]['bytes'] / rows[0]['ms']['ours'] / 1e6:.1f} GB/s of the "
              f"{rows[0]['bytes'] / 1e6:.1f} MB it must move")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
