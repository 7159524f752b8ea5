"""ee.EmbeddingBagCollection next to TorchRec's: built from it with the same weights, called
with its KeyedJaggedTensor, returning its KeyedTensor, the same outputs and gradients.
Skipped where torchrec (and the FBGEMM CPU kernels it runs on) is not installed."""
from __future__ import annotations

import warnings

import pytest
import torch

import embedding_ext as ee

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torchrec = pytest.importorskip("torchrec")
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


def torchrec_collection(weighted=False):
    tables = [EmbeddingBagConfig(num_embeddings=30, embedding_dim=16, name="users",
                                 feature_names=["user", "last_user"], pooling=PoolingType.SUM),
              EmbeddingBagConfig(num_embeddings=12, embedding_dim=8, name="products",
                                 feature_names=["item"],
                                 pooling=PoolingType.SUM if weighted else PoolingType.MEAN),
              EmbeddingBagConfig(num_embeddings=5, embedding_dim=4, name="cats",
                                 feature_names=["cat"], pooling=PoolingType.SUM)]
    torch.manual_seed(0)
    return EmbeddingBagCollection(tables=tables, is_weighted=weighted,
                                  device=torch.device("cpu"))


ROWS = {"user": 30, "last_user": 30, "item": 12, "cat": 5, "extra": 3}


def kjt(seed, keys=("item", "cat", "user", "last_user", "extra"), batch=6, weighted=False,
        rows=ROWS):
    """Keys in an order other than the collection's, an extra key, duplicates, empty bags,
    ids at each table's end."""
    gen = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for key in keys:
        n = torch.randint(0, 4, (batch,), generator=gen)
        n[0] = max(int(n[0]), 1)
        ids = torch.randint(0, min(rows[key], 4), (int(n.sum()),), generator=gen)
        ids[0] = rows[key] - 1
        values.append(ids)
        lengths.append(n)
    values = torch.cat(values)
    weights = torch.rand(values.shape[0], generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=list(keys), values=values,
                                               lengths=torch.cat(lengths), weights=weights)


@pytest.mark.parametrize("weighted", [False, True])
def test_same_outputs_and_gradients_as_torchrec(weighted):
    theirs = torchrec_collection(weighted)
    ours = ee.EmbeddingBagCollection.from_torchrec(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.feature_names == ["user", "last_user", "item", "cat"]
    for seed in range(3):
        features = kjt(seed, weighted=weighted)
        out, ref = ours(features), theirs(features)
        assert isinstance(out, KeyedTensor) and out.keys() == ref.keys()
        assert out.length_per_key() == ref.length_per_key()
        torch.testing.assert_close(out.values(), ref.values(), atol=1e-6, rtol=1e-5)
        for key, value in ref.to_dict().items():
            torch.testing.assert_close(out.to_dict()[key], value, atol=1e-6, rtol=1e-5)
        grad = torch.randn(ref.values().shape)
        for module in (ours, theirs):
            module.zero_grad()
        out.values().backward(grad)
        ref.values().backward(grad)
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_checkpoints_move_both_ways_and_a_fused_copy_trains():
    theirs = torchrec_collection()
    ours = ee.EmbeddingBagCollection.from_torchrec(theirs)
    opt = ee.fuse_optimizer(ours, torch.optim.SGD, lr=0.5)
    ref_opt = torch.optim.SGD(theirs.parameters(), lr=0.5)
    for seed in range(3):
        features = kjt(seed)
        ours(features).values().square().sum().backward()
        opt.step()
        ref_opt.zero_grad()
        theirs(features).values().square().sum().backward()
        ref_opt.step()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=1e-5)
    fresh = torchrec_collection()
    fresh.load_state_dict(ours.state_dict())
    features = kjt(7)
    torch.testing.assert_close(fresh(features).values(), ours(features).values())


def test_a_missing_feature_or_variable_batch_is_a_clear_error():
    ours = ee.EmbeddingBagCollection.from_torchrec(torchrec_collection())
    with pytest.raises(ValueError, match=r"lacks the feature\(s\) \['cat'\]"):
        ours(kjt(0, keys=("item", "user", "last_user")))
    with pytest.raises(TypeError, match="'offsets' is required"):
        ours(torch.tensor([1, 2]))


def test_torchrec_dlrm_trains_alike_with_our_collection():
    """TorchRec's own DLRM model, with our collection in place of its own: the same losses
    and tables over several SGD steps (dense MLPs and tables alike)."""
    from torchrec.models.dlrm import DLRM

    tables = [EmbeddingBagConfig(num_embeddings=n, embedding_dim=8, name=f"t{i}",
                                 feature_names=[f"f{i}"]) for i, n in enumerate((20, 7, 50))]
    torch.manual_seed(3)
    theirs = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables),
                  dense_in_features=5, dense_arch_layer_sizes=[16, 8],
                  over_arch_layer_sizes=[8, 1])
    ours = DLRM(embedding_bag_collection=ee.EmbeddingBagCollection.from_torchrec(
        theirs.sparse_arch.embedding_bag_collection), dense_in_features=5,
        dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
    ours.load_state_dict(theirs.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    gen = torch.Generator().manual_seed(4)
    for step in range(5):
        dense = torch.randn(6, 5, generator=gen)
        features = kjt(step, keys=("f2", "f0", "f1"), rows={"f0": 20, "f1": 7, "f2": 50})
        labels = torch.randint(0, 2, (6,), generator=gen).float()
        losses = []
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            logits = model(dense_features=dense, sparse_features=features).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], msg=f"step {step}")
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=1e-5,
                                   msg=key)
