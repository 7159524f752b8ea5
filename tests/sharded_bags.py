"""ee.embedding_bag on a weight distributed by hand (row-wise, column-wise, replicated) against
our unsharded bags, and the options it refuses sharded; run on every rank by test_sharded.py's
worker, mismatches appended to `failures`."""
import torch

import embedding_ext as ee
from sharding import DIM


# (placement dim, mode, options): ee.embedding_bag on a weight distributed by hand.
BAG_CASES = [
    (0, "sum", {}), (0, "sum", dict(padding_idx=-2, scale_grad_by_freq=True)),
    (0, "sum", dict(per_sample_weights=True, padding_idx=1)), (0, "mean", dict(padding_idx=1)),
    (0, "mean", dict(scale_grad_by_freq=True, include_last_offset=True)),
    (0, "sum", dict(max_norm=1.0)), (0, "sum", dict(two_d=True)),
    (1, "sum", dict(per_sample_weights=True, scale_grad_by_freq=True)),
    (1, "mean", dict(padding_idx=-2)), (1, "max", dict(padding_idx=1)),
    (1, "max", dict(include_last_offset=True)),
    # max_norm renorms the ids past the last offset too, as unsharded
    (0, "sum", dict(max_norm=1.0, include_last_offset=True)),
    # fp16/bf16 row-wise: partial sums rounded per rank before the all-reduce (documented:
    # within a few ulps, not equal)
    (0, "mean", dict(dtype=torch.bfloat16, padding_idx=1)),
    (1, "sum", dict(dtype=torch.bfloat16, per_sample_weights=True)),
    ("replicate", "sum", dict(max_norm=1.0, per_sample_weights=True)),
]


def bag_case(rank: int, mesh, V: int, case, failures: list, comms: dict):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    dim_sharded, mode, options = case
    options = dict(options)
    two_d = options.pop("two_d", False)
    dtype = options.pop("dtype", torch.float32)
    with_psw = options.pop("per_sample_weights", False)
    if "padding_idx" in options:
        options["padding_idx"] %= V
    placement = Replicate() if dim_sharded == "replicate" else Shard(dim_sharded)
    name = (f"bag {type(placement).__name__}({getattr(placement, 'dim', '')}) {mode} V={V} "
            f"{options} psw={with_psw} 2d={two_d} {dtype}")
    g = torch.Generator().manual_seed(V)
    weight = torch.randn(V, DIM, generator=g).to(dtype)
    ids = torch.randint(0, V, (18,), generator=g)
    ids[:4] = V - 1
    if "padding_idx" in options:
        ids[5:7] = options["padding_idx"]
    offsets = torch.tensor([0, 4, 4, 9, 15])  # an empty bag; with include_last_offset, ids
    if two_d:                                 # 15..17 join the last bag (9..17)
        ids, offsets = ids.reshape(3, 6), None
    psw = torch.randn(ids.shape, generator=g).to(dtype) if with_psw else None
    ref_w = weight.clone().requires_grad_()
    ref = ee.embedding_bag(ids, ref_w, offsets, mode=mode, per_sample_weights=psw, **options)
    grad_out = torch.randn(ref.shape, generator=g).to(dtype)
    (ref * grad_out).sum().backward()
    ours_w = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [placement]))
    out = ee.embedding_bag(ids, ours_w, offsets, mode=mode, per_sample_weights=psw, **options)
    full = out.full_tensor()
    (full * grad_out).sum().backward()
    comms[name] = [f"{type(p).__name__}({getattr(p, 'dim', '')})" for p in ours_w.grad.placements]
    checks = [("output", full, ref), ("weight grad", ours_w.grad.full_tensor(), ref_w.grad)]
    if "max_norm" in options:
        checks.append(("renormed weight", ours_w.full_tensor(), ref_w.detach()))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for what, a, b in checks:
        try:
            torch.testing.assert_close(a, b, **tol)
        except AssertionError as e:
            failures.append(f"rank {rank} {name} {what}: {e}")


def bag_refusals(mesh, failures: list):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1])
    row = distribute_tensor(torch.randn(10, DIM), mesh, [Shard(0)])
    col = distribute_tensor(torch.randn(10, DIM), mesh, [Shard(1)])
    psw = torch.ones(3, requires_grad=True)
    rep = distribute_tensor(torch.randn(10, DIM), mesh, [Replicate()])
    cases = [(row, dict(mode="max"), "mode='max'"), (col, dict(max_norm=1.0), "max_norm"),
             (row, dict(mode="sum", per_sample_weights=psw), "per_sample_weights"),
             (col, dict(mode="sum", per_sample_weights=psw), "per_sample_weights"),
             (row, dict(sparse=True, mode="sum"), "sparse=True"),
             (rep, dict(sparse=True, mode="sum"), "sparse=True")]
    for weight, kwargs, words in cases:
        try:
            ee.embedding_bag(ids, weight, offsets, **kwargs)
            failures.append(f"bags {kwargs}: no error")
        except NotImplementedError as e:
            if words not in str(e):
                failures.append(f"bags {kwargs}: the error does not name {words!r}: {e}")
    # Bad offsets: the same error on every rank, before any collective (each rank's kernel
    # sees only its compacted offsets), naming the entry as given.
    for bad, words in [([0, 5, 3], "offsets[2] = 3 < offsets[1] = 5"), ([1, 2], "offsets[0]"),
                       ([0, 4], "last offset (4) is past the 3 ids")]:
        try:
            ee.embedding_bag(ids, row, torch.tensor(bad), mode="sum", include_last_offset=True)
            failures.append(f"bags offsets {bad}: no error")
        except RuntimeError as e:  # as F.embedding_bag's
            if words not in str(e):
                failures.append(f"bags offsets {bad}: the error does not say {words!r}: {e}")
