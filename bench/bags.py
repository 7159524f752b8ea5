"""The pooled-lookup rows of the benchmark (the `bag` preset): verification and the callables
timed for ee.embedding_bag, F.embedding_bag and, where fbgemm_gpu is installed, FBGEMM's own
table-batched embedding kernels: what a recommender engineer would use instead of either
(`fbgemm-gpu-cpu==1.9.0` on the CPU; `make bench` installs it next to torch 2.14.1)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import embedding_ext as ee

from .cases import BAG_FORWARD, BAG_FWD_BWD, BAG_FWD_BWD_SPARSE, Case, make_indices

# What each peer callable does, for the report.
PEER_NOTES = {
    BAG_FORWARD: "FBGEMM: DenseTableBatchedEmbeddingBagsCodegen forward (one table)",
    BAG_FWD_BWD: "FBGEMM: DenseTableBatchedEmbeddingBagsCodegen forward + backward "
                 "(a dense V x D weight gradient, as ours and PyTorch's)",
    BAG_FWD_BWD_SPARSE: "FBGEMM: SplitTableBatchedEmbeddingBagsCodegen (host table) forward + "
                        "backward with its fused exact SGD (updates the touched rows in place: "
                        "more work than returning the sparse gradient, which it cannot do)",
}


def bag_bytes(op: str, case: Case, unique_rows: int) -> int:
    """The bytes a pooled lookup must move (BYTES_FORMULAS in run.py)."""
    s = torch.empty((), dtype=case.dtype).element_size()
    i = torch.empty((), dtype=case.index_dtype).element_size()
    n, d, v = case.lookups, case.dim, case.num_embeddings
    bags = n // case.bag_size
    forward = n * d * s + bags * d * s + n * i + (n * s if case.weighted else 0)
    if op == BAG_FORWARD:
        return forward
    if op == BAG_FWD_BWD:
        return forward + v * d * s + bags * d * s + 2 * unique_rows * d * s + n * i
    return forward + bags * d * s + n * d * s + n * i + 8 * n


def _fbgemm():
    """fbgemm_gpu's training modules, or None where it is not installed (or not importable
    next to this torch)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
                ComputeDevice, DenseTableBatchedEmbeddingBagsCodegen, EmbeddingLocation,
                SplitTableBatchedEmbeddingBagsCodegen)
    except Exception:  # noqa: BLE001 - any import failure means "no peer column"
        return None
    return dict(EmbOptimType=EmbOptimType, SparseType=SparseType, PoolingMode=PoolingMode,
                ComputeDevice=ComputeDevice, Dense=DenseTableBatchedEmbeddingBagsCodegen,
                EmbeddingLocation=EmbeddingLocation, Split=SplitTableBatchedEmbeddingBagsCodegen)


def fbgemm_version() -> str | None:
    try:
        import fbgemm_gpu
        return getattr(fbgemm_gpu, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


def _peer(case: Case, op: str, device: str, weight, ids, csr, psw, grad):
    """FBGEMM's callable for this row and what to check of it (the pooled output; for
    bag_forward+backward its dense weight gradient), or (None, None) where FBGEMM has no
    equivalent: padding_idx, max mode, fp64, CUDA (the CPU package only)."""
    fb = _fbgemm()
    precision = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}
    if (fb is None or device != "cpu" or case.padding or case.mode == "max"
            or case.dtype not in precision):
        return None, None
    pooling = fb["PoolingMode"].SUM if case.mode == "sum" else fb["PoolingMode"].MEAN
    sparse_type = getattr(fb["SparseType"], precision[case.dtype])
    ids, csr = ids.long(), csr.long()
    try:
        tbe = _make_tbe(fb, case, op, weight, pooling, sparse_type)
        if tbe is None:
            return None, None
        out = tbe(ids, csr, per_sample_weights=psw)
    except Exception as err:  # noqa: BLE001 - no bf16 CPU kernel in 1.9, an API change, ...
        warnings.warn(f"{case.label} {op}: no FBGEMM column ({type(err).__name__}: {err})")
        return None, None
    if op == BAG_FORWARD:
        return (lambda: tbe(ids, csr, per_sample_weights=psw)), out

    def step():
        if op == BAG_FWD_BWD:
            tbe.weights.grad = None
        tbe(ids, csr, per_sample_weights=psw).backward(grad)
    if op == BAG_FWD_BWD:  # the dense gradient, to be checked like ours before timing
        step()
        return step, tbe.weights.grad.view(case.num_embeddings, case.dim)
    return step, out


def _make_tbe(fb, case: Case, op: str, weight, pooling, sparse_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if op == BAG_FWD_BWD_SPARSE:
            if case.dtype != torch.float32:
                return None
            tbe = fb["Split"]([(case.num_embeddings, case.dim, fb["EmbeddingLocation"].HOST,
                                fb["ComputeDevice"].CPU)], pooling_mode=pooling,
                              optimizer=fb["EmbOptimType"].EXACT_SGD, learning_rate=1e-9)
            tbe.split_embedding_weights()[0].copy_(weight)
        else:
            tbe = fb["Dense"]([(case.num_embeddings, case.dim)], pooling_mode=pooling,
                              use_cpu=True, weights_precision=sparse_type,
                              output_dtype=sparse_type)
            with torch.no_grad():
                tbe.weights.copy_(weight.reshape(-1))
    return tbe


def pooled_reference(weight, ids, bag_size: int, mode: str, psw, pad):
    """The float64 pooled lookup for bags of one size (the benchmark's), vectorised: the
    same rules as embedding_ext.reference.bag_forward, which loops over bags in Python (too
    slow for 16,384 bags on a GPU)."""
    rows = weight.double()[ids.long()]
    keep = (ids != (-1 if pad is None else pad)).double()[:, None]
    if psw is not None:
        rows = rows * psw.double()[:, None]
    rows, keep = rows.view(-1, bag_size, rows.shape[1]), keep.view(-1, bag_size, 1)
    count = keep.sum(1)
    if mode == "max":
        pooled = rows.masked_fill(keep == 0, float("-inf")).amax(1)
        return torch.where(count > 0, pooled, torch.zeros_like(pooled))
    pooled = (rows * keep).sum(1)
    return pooled / count.clamp_min(1) if mode == "mean" else pooled


def prepare_bag(case: Case, op: str, device: str, gen: torch.Generator,
                device_gen: torch.Generator, check, mismatch):
    """Verifies ours (and the peer) against PyTorch and the float64 reference, then returns
    (ours, theirs, unique_rows, peer or None)."""
    label = f"{case.label} {op}"
    v, d, n = case.num_embeddings, case.dim, case.lookups
    weight = torch.randn(v, d, generator=device_gen, device=device, dtype=case.dtype)
    ids = make_indices(case, device, gen)
    pad = int(ids[0]) if case.padding else None
    if case.padding:
        ids[:: case.bag_size + 3] = pad  # padding in most bags, and the first id
    bags = n // case.bag_size
    csr = torch.arange(0, n + 1, case.bag_size, device=device, dtype=case.index_dtype)
    offsets = csr[:-1]
    psw = (torch.randn(n, generator=device_gen, device=device, dtype=case.dtype)
           if case.weighted else None)
    grad = torch.randn(bags, d, generator=device_gen, device=device, dtype=case.dtype)
    kwargs = dict(mode=case.mode, padding_idx=pad, per_sample_weights=psw)

    want = pooled_reference(weight, ids, case.bag_size, case.mode, psw, pad)
    got = ee.embedding_bag(ids, weight, offsets, **kwargs)
    check("pooled output vs float64 reference", got, want, case.dtype, label)
    if case.dtype in (torch.float32, torch.float64):
        check("pooled output vs PyTorch", got, F.embedding_bag(ids, weight, offsets, **kwargs),
              case.dtype, label)
    peer, peer_result = _peer(case, op, device, weight, ids, csr, psw, grad)
    if peer_result is not None and op != BAG_FWD_BWD:
        check("FBGEMM's pooled output vs float64 reference", peer_result, want, case.dtype, label)

    if op == BAG_FORWARD:
        return ((lambda: ee.embedding_bag(ids, weight, offsets, **kwargs)),
                (lambda: F.embedding_bag(ids, weight, offsets, **kwargs)),
                torch.unique(ids).numel(), peer)

    sparse = op == BAG_FWD_BWD_SPARSE
    w_ours, w_theirs = weight.clone().requires_grad_(), weight.clone().requires_grad_()

    def step(fn, w):
        def run():
            w.grad = None
            fn(ids, w, offsets, sparse=sparse, **kwargs).backward(grad)
        return run
    ours, theirs = step(ee.embedding_bag, w_ours), step(F.embedding_bag, w_theirs)
    ours(), theirs()
    mine, pytorch = w_ours.grad, w_theirs.grad
    if sparse:
        if not (mine.is_sparse and pytorch.is_sparse):
            raise mismatch(f"{label}: sparse=True did not give sparse gradients")
        mine, pytorch = mine.coalesce(), pytorch.coalesce()
        if not torch.equal(mine.indices(), pytorch.indices()):
            raise mismatch(f"{label}: sparse gradient rows differ from PyTorch's")
        mine, pytorch = mine.values(), pytorch.values()
    check("weight gradient vs PyTorch", mine, pytorch, case.dtype, label)
    if peer_result is not None and op == BAG_FWD_BWD:
        check("FBGEMM's weight gradient vs PyTorch", peer_result, w_theirs.grad, case.dtype, label)
    if pad is not None and not sparse and w_ours.grad[pad].any():
        raise mismatch(f"{label}: padding row has a gradient")
    return ours, theirs, torch.unique(ids).numel(), peer
