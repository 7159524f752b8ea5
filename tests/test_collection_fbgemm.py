"""ee.EmbeddingBagCollection next to FBGEMM's CPU table-batched kernels (TBE) holding the same
weights: the same pooled outputs, weight gradients and fused optimizer steps. Skipped where
fbgemm-gpu-cpu is not installed (or not importable next to this torch)."""
from __future__ import annotations

import warnings

import pytest
import torch

import embedding_ext as ee

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("fbgemm_gpu")
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, DenseTableBatchedEmbeddingBagsCodegen, EmbeddingLocation,
            SplitTableBatchedEmbeddingBagsCodegen)
    except Exception as exc:  # noqa: BLE001 - a wheel built against another torch
        pytest.skip(f"fbgemm_gpu does not import here: {exc}", allow_module_level=True)

# (rows, dim): FBGEMM's CPU TBE takes dims that are multiples of 4 only.
TABLES = [(40, 8), (7, 4), (300, 16), (25, 12)]
BATCH = 9


def batch(seed, weighted=False):
    """Feature-major jagged ids with duplicates, empty bags, an empty feature and ids at each
    table's last row."""
    gen = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for f, (rows, _) in enumerate(TABLES):
        n = torch.randint(0, 5, (BATCH,), generator=gen)
        if f == 1:
            n.zero_()  # a feature with no ids at all in this batch
        ids = torch.randint(0, min(rows, 6), (int(n.sum()),), generator=gen)
        if ids.numel():
            ids[0] = rows - 1
        values.append(ids)
        lengths.append(n)
    values = torch.cat(values)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(lengths).cumsum(0)])
    psw = torch.rand(values.shape[0], generator=gen) if weighted else None
    return values, offsets, psw


def ours_for(mode, weights):
    configs = [ee.EmbeddingBagConfig(r, d, [f"f{t}"], name=f"t{t}", pooling=mode)
               for t, (r, d) in enumerate(TABLES)]
    ebc = ee.EmbeddingBagCollection(configs)
    with torch.no_grad():
        for t, w in enumerate(weights):
            ebc.embedding_bags[f"t{t}"].weight.copy_(w)
    return ebc


def random_weights(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(r, d, generator=gen) for r, d in TABLES]


def quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


@pytest.mark.parametrize("mode,weighted", [("sum", False), ("mean", False), ("sum", True)])
def test_forward_and_dense_gradients_equal_fbgemm_tbe(mode, weighted):
    weights = random_weights(1)
    ours = ours_for(mode, weights)
    theirs = quiet(lambda: DenseTableBatchedEmbeddingBagsCodegen(
        TABLES, pooling_mode=PoolingMode.SUM if mode == "sum" else PoolingMode.MEAN,
        use_cpu=True))
    with torch.no_grad():
        theirs.weights.copy_(torch.cat([w.reshape(-1) for w in weights]))
    for seed in range(3):
        values, offsets, psw = batch(seed, weighted)
        out = ours(values, offsets, psw)
        ref = theirs(values, offsets, per_sample_weights=psw)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grad = torch.randn(out.shape)
        ours.zero_grad()
        theirs.weights.grad = None
        out.backward(grad)
        ref.backward(grad)
        at = 0
        for t, (r, d) in enumerate(TABLES):
            torch.testing.assert_close(ours.embedding_bags[f"t{t}"].weight.grad,
                                       theirs.weights.grad[at:at + r * d].view(r, d),
                                       atol=1e-5, rtol=1e-5, msg=lambda m: f"table {t}: {m}")
            at += r * d


@pytest.mark.parametrize("rule", ["sgd", "rowwise_adagrad"])
def test_fused_steps_equal_fbgemm_fused_tbe(rule):
    weights = random_weights(2)
    ours = ours_for("sum", weights)
    lr, eps = 0.3, 1e-6
    if rule == "sgd":
        opt = ee.fuse_optimizer(ours, torch.optim.SGD, lr=lr)
        kind, extra = EmbOptimType.EXACT_SGD, {}
    else:
        opt = ee.fuse_optimizer(ours, ee.optim.RowWiseAdagrad, lr=lr, eps=eps)
        kind, extra = EmbOptimType.EXACT_ROWWISE_ADAGRAD, {"eps": eps}
    theirs = quiet(lambda: SplitTableBatchedEmbeddingBagsCodegen(
        [(r, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for r, d in TABLES],
        pooling_mode=PoolingMode.SUM, optimizer=kind, learning_rate=lr, **extra))
    with torch.no_grad():
        for dst, w in zip(theirs.split_embedding_weights(), weights):
            dst.copy_(w)
    for seed in range(4):
        values, offsets, _ = batch(10 + seed)
        out = ours(values, offsets)
        ref = theirs(values, offsets)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grad = torch.randn(out.shape)
        out.backward(grad)  # the fused update runs inside the backward, as FBGEMM's
        opt.step()
        ref.backward(grad)
    for t, theirs_w in enumerate(theirs.split_embedding_weights()):
        torch.testing.assert_close(ours.embedding_bags[f"t{t}"].weight.detach(), theirs_w,
                                   atol=1e-5, rtol=1e-5, msg=lambda m: f"table {t}: {m}")
