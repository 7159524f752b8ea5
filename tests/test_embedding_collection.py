"""ee.EmbeddingCollection: unpooled lookups of many features in many tables (dims may
differ), against a float64 reference, TorchRec's collection and the bad-input rules."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import embedding_ext as ee

from conftest import DEVICES, INDEX_DTYPES, TOL


def make_ec(dims=(4, 4, 4), rows=(9, 5, 30), padding=(None, 2, None), sparse=False,
            dtype=torch.float32):
    tables = [ee.EmbeddingConfig(v, d, [f"f{t}a", f"f{t}b"] if t == 0 else [f"f{t}"],
                                 name=f"table_{t}", padding_idx=pad)
              for t, (v, d, pad) in enumerate(zip(rows, dims, padding))]
    return ee.EmbeddingCollection(tables, sparse=sparse, dtype=dtype)


def make_batch(ec, batch, seed=0, index_dtype=torch.int64, empty_feature=None):
    """Feature-major ids (duplicates, each table's last row, padding rows) and offsets."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {f: ec.embeddings[t].num_embeddings
             for f, t in zip(ec.feature_names, ec._feature_tables)}
    values, lengths = [], []
    for feature in ec.feature_names:
        for b in range(batch):
            n = 0 if feature == empty_feature else int(torch.randint(0, 5, (1,), generator=gen))
            ids = torch.randint(0, min(sizes[feature], 4), (n,), generator=gen)
            if n and b == 0:
                ids[0] = sizes[feature] - 1
            values.append(ids)
            lengths.append(n)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return torch.cat(values).to(index_dtype), offsets.to(index_dtype)


def reference(ec, values, offsets):
    """Each feature's rows from a float64 copy of its table (differentiable)."""
    ref_w = {n: m.weight.detach().double().requires_grad_() for n, m in ec.embeddings.items()}
    batch = (offsets.shape[0] - 1) // len(ec.feature_names)
    off = offsets.long()
    rows = {}
    for f, (feature, table) in enumerate(zip(ec.feature_names, ec._feature_tables)):
        rows[feature] = ref_w[table][values[int(off[f * batch]):int(off[(f + 1) * batch])].long()]
    return rows, ref_w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dims", [(4, 4, 4), (3, 16, 7)])
def test_rows_and_gradients_vs_float64_reference(device, index_dtype, sparse, dims):
    ec = make_ec(dims=dims, sparse=sparse).to(device)
    values, offsets = make_batch(ec, 5, index_dtype=index_dtype, empty_feature="f1")
    values, offsets = values.to(device), offsets.to(device)
    out = ec(values, offsets)
    rows = out if isinstance(out, dict) else ec.split(out, offsets)
    if len(set(dims)) == 1:
        assert out.shape == (values.shape[0], dims[0])
    assert list(rows) == ec.feature_names
    ref, ref_w = reference(ec, values.cpu(), offsets.cpu())
    loss, ref_loss = 0, 0
    for feature in ec.feature_names:
        torch.testing.assert_close(rows[feature].cpu().double(), ref[feature], **TOL[torch.float32])
        g = torch.randn(ref[feature].shape, dtype=torch.float64)
        loss = loss + (rows[feature] * g.to(device).float()).sum()
        ref_loss = ref_loss + (ref[feature] * g).sum()
    loss.backward()
    ref_loss.backward()
    for name, module in ec.embeddings.items():
        grad = module.weight.grad
        assert grad.is_sparse == sparse
        expected = ref_w[name].grad if ref_w[name].grad is not None else torch.zeros_like(ref_w[name])
        if module.padding_idx is not None:
            expected[module.padding_idx] = 0
        torch.testing.assert_close(grad.cpu().to_dense().double(), expected, **TOL[torch.float32])


def test_bad_ids_and_offsets_name_what_is_wrong_and_change_nothing():
    ec = make_ec()
    values, offsets = make_batch(ec, 3)
    before = copy.deepcopy(ec.state_dict())
    bad = values.clone()
    start = int(offsets[2 * 3])  # feature f1's first id: past table_1's 5 rows
    assert start < int(offsets[3 * 3])
    bad[start] = 9
    with pytest.raises(IndexError, match=rf"feature 'f1' \(table 'table_1'\), position {start}"):
        ec(bad, offsets)
    with pytest.raises(RuntimeError, match="never decrease"):
        ec(values, offsets.flip(0))
    with pytest.raises(RuntimeError, match="end at len"):
        ec(values[:-1], offsets)
    with pytest.raises(ValueError, match="features \\* B \\+ 1"):
        ec(values, offsets[:-1])
    with pytest.raises(TypeError, match="'offsets' is required"):
        ec(values)
    for key, value in ec.state_dict().items():
        assert torch.equal(value, before[key])


def test_config_rules_and_torchrec_methods():
    ec = make_ec()
    assert ec.feature_names == ["f0a", "f0b", "f1", "f2"]
    assert ec.embedding_dim() == 4 and not ec.need_indices()
    assert list(ec.state_dict()) == [f"embeddings.table_{t}.weight" for t in range(3)]
    with pytest.raises(ValueError, match="several dims"):
        make_ec(dims=(4, 8, 4)).embedding_dim()
    with pytest.raises(ValueError, match="feature 'a' is listed by two tables"):
        ee.EmbeddingCollection([ee.EmbeddingConfig(3, 2, ["a"], name="x"),
                                ee.EmbeddingConfig(3, 2, ["a"], name="y")])
    with pytest.raises(ValueError, match="cannot be a key"):
        ee.EmbeddingCollection([ee.EmbeddingConfig(3, 2, ["a"], name="items")])
    with pytest.raises(TypeError, match="list of names"):
        ee.EmbeddingConfig(3, 2, "a")


def test_same_rows_and_gradients_as_torchrec():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("torchrec")
        from torchrec.modules.embedding_configs import EmbeddingConfig
        from torchrec.modules.embedding_modules import EmbeddingCollection
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    tables = [EmbeddingConfig(num_embeddings=20, embedding_dim=8, name="words",
                              feature_names=["title", "body"]),
              EmbeddingConfig(num_embeddings=6, embedding_dim=8, name="tags",
                              feature_names=["tag"])]
    torch.manual_seed(0)
    theirs = EmbeddingCollection(tables=tables, device=torch.device("cpu"))
    ours = ee.EmbeddingCollection.from_torchrec(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["tag", "title", "body"], values=torch.tensor([5, 1, 19, 3, 3, 0, 7, 2]),
        lengths=torch.tensor([1, 0, 2, 1, 3, 1]))
    out, ref = ours(kjt), theirs(kjt)
    assert list(out) == ["title", "body", "tag"]
    for key, jt in ref.items():
        torch.testing.assert_close(out[key].values(), jt.values())
        assert torch.equal(out[key].lengths(), jt.lengths())
    sum(jt.values().square().sum() for jt in out.values()).backward()
    sum(jt.values().square().sum() for jt in ref.values()).backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
