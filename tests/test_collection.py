"""ee.EmbeddingBagCollection: many tables in one op, against a float64 per-table reference
and a per-table loop of F.embedding_bag, forward and backward (dense and sparse)."""
from __future__ import annotations

import enum

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedding_ext as ee

from conftest import FLOAT_DTYPES, INDEX_DTYPES, TOL, each_cpu_isa, poison

MODES = ["sum", "mean", "max"]


def make_batch(ebc, batch, max_len=4, index_dtype=torch.int64, empty_feature=None, seed=0):
    """Random feature-major (values, offsets); every table's id V-1 appears when possible."""
    gen = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    sizes = {f: ebc.embedding_bags[n].weight.shape[0]
             for n, cfg in zip(ebc._table_names, ebc._configs) for f in cfg.feature_names}
    for feature in ebc.feature_names:
        for b in range(batch):
            n = int(torch.randint(0, max_len + 1, (1,), generator=gen))
            n = 0 if feature == empty_feature else n
            ids = torch.randint(0, sizes[feature], (n,), generator=gen)
            if n and b == 0:
                ids[0] = sizes[feature] - 1
            values.append(ids)
            lengths.append(n)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    values = torch.cat(values) if values else torch.zeros(0, dtype=torch.long)
    return values.to(index_dtype), offsets.to(index_dtype)


def reference(ebc, values, offsets, psw=None, dtype=torch.float64):
    """Pooled feature by feature and bag by bag from float64 copies of the tables (kept
    differentiable, so autograd gives the reference gradients)."""
    weights = {n: ebc.embedding_bags[n].weight for n in ebc._table_names}
    ref = {n: w.detach().to(dtype).requires_grad_() for n, w in weights.items()}
    features = len(ebc.feature_names)
    batch = (offsets.shape[0] - 1) // features
    off = offsets.long().tolist()
    cols = []
    f = 0
    for name, cfg in zip(ebc._table_names, ebc._configs):
        w = ref[name]
        for _ in cfg.feature_names:
            rows = []
            for b in range(batch):
                s, e = off[f * batch + b], off[f * batch + b + 1]
                ids = values[s:e].long()
                keep = ids != (cfg.padding_idx if cfg.padding_idx is not None else -1)
                picked = w[ids[keep]]
                if psw is not None:
                    picked = picked * psw[s:e][keep].to(dtype).unsqueeze(1)
                if picked.shape[0] == 0:
                    rows.append(w.new_zeros(w.shape[1]))
                elif cfg.pooling == "sum":
                    rows.append(picked.sum(0))
                elif cfg.pooling == "mean":
                    rows.append(picked.mean(0))
                else:
                    rows.append(picked.max(0).values)
            cols.append(torch.stack(rows) if rows else w.new_zeros(0, w.shape[1]))
            f += 1
    return torch.cat(cols, 1), ref


def ref_grad(ref_w, name):
    """The reference gradient of a table (zeros where no feature looked it up)."""
    w = ref_w[name]
    return w.grad if w.grad is not None else torch.zeros_like(w)


def make_ebc(dims=(3, 8, 5), rows=(7, 11, 2), pooling=("sum", "mean", "max"), shared=True,
             padding=(None, 3, None), dtype=torch.float32, sparse=False):
    tables = []
    for t, (v, d, p, pad) in enumerate(zip(rows, dims, pooling, padding)):
        names = [f"f{t}a", f"f{t}b"] if shared and t == 0 else [f"f{t}"]
        tables.append(ee.EmbeddingBagConfig(v, d, names, name=f"table_{t}", pooling=p,
                                            padding_idx=pad))
    return ee.EmbeddingBagCollection(tables, dtype=dtype, sparse=sparse)


def test_api_names_state_dict_and_split():
    ebc = make_ebc()
    assert ebc.feature_names == ["f0a", "f0b", "f1", "f2"]
    assert list(ebc.state_dict()) == [f"embedding_bags.table_{t}.weight" for t in range(3)]
    params = list(ebc.parameters())
    assert len(params) == 3 and len({p.data_ptr() for p in params}) == 3
    values, offsets = make_batch(ebc, 4)
    out = ebc(values, offsets)
    assert out.shape == (4, 3 + 3 + 8 + 5)
    parts = ebc.split(out)
    assert list(parts) == ebc.feature_names
    assert [p.shape for p in parts.values()] == [(4, 3), (4, 3), (4, 8), (4, 5)]
    assert ebc.embedding_bag_configs()[1].padding_idx == 3


def test_config_pooling_forms():
    class PoolingType(enum.Enum):  # TorchRec's enum, by name
        SUM = "SUM"
        MEAN = "MEAN"
        NONE = "NONE"

    assert ee.EmbeddingBagConfig(4, 2, ["a"], pooling=PoolingType.MEAN).pooling == "mean"
    assert ee.EmbeddingBagConfig(4, 2, ["a"], pooling="MAX").pooling == "max"
    assert ee.EmbeddingBagConfig(4, 2, ["a"], padding_idx=-1).padding_idx == 3
    with pytest.raises(ValueError, match="pooling"):
        ee.EmbeddingBagConfig(4, 2, ["a"], pooling=PoolingType.NONE)
    with pytest.raises(ValueError, match="feature_names"):
        ee.EmbeddingBagConfig(4, 2, [])
    with pytest.raises(ValueError, match="two tables"):
        ee.EmbeddingBagCollection([ee.EmbeddingBagConfig(4, 2, ["a"], name="x"),
                                   ee.EmbeddingBagConfig(4, 2, ["b"], name="x")])
    with pytest.raises(ValueError, match="feature 'a'"):
        ee.EmbeddingBagCollection([ee.EmbeddingBagConfig(4, 2, ["a"]),
                                   ee.EmbeddingBagConfig(4, 2, ["a"])])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("sparse", [False, True])
# The general loop, the register blocks (sum/mean, D a multiple of 16; max general), and
# register blocks for the first 16k columns then the general loop for the rest
@pytest.mark.parametrize("dims", [(3, 8, 5), (16, 64, 48), (24, 72, 40)])
def test_forward_backward_vs_float64_reference(dtype, index_dtype, sparse, dims):
    ebc = make_ebc(dtype=dtype, sparse=sparse, dims=dims)
    values, offsets = make_batch(ebc, 5, index_dtype=index_dtype, empty_feature="f2")
    values[int(offsets[2 * 5]):int(offsets[3 * 5]):2] = 3  # table_1's padding row, in f1
    out = ebc(values, offsets)
    ref, ref_w = reference(ebc, values, offsets)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    out.backward(grad)
    ref.backward(grad.double())
    for name in ebc._table_names:
        g = ebc.embedding_bags[name].weight.grad
        assert g.is_sparse == sparse and g.dtype == dtype
        # Duplicates of a sparse gradient summed in float64 (to_dense in bf16 rounds each sum)
        torch.testing.assert_close(g.double().to_dense(), ref_grad(ref_w, name), **TOL[dtype])


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_small_batches_empty_bags_and_padding(batch):
    ebc = make_ebc(pooling=("mean", "max", "sum"), padding=(0, 3, 1))
    values, offsets = make_batch(ebc, batch, max_len=3, empty_feature="f2")
    if values.numel():
        values[: values.numel() // 2] = 0  # many padding ids for table 0
    out = ebc(values, offsets)
    ref, ref_w = reference(ebc, values, offsets)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    out.sum().backward()
    if ref.requires_grad:  # B=0: nothing to differentiate in the reference
        ref.sum().backward()
    for name in ebc._table_names:
        torch.testing.assert_close(ebc.embedding_bags[name].weight.grad.double(),
                                   ref_grad(ref_w, name), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_instruction_set_gives_the_same_bits(dtype):
    ebc = make_ebc(dims=(5, 64, 33), rows=(9, 40, 7), padding=(None, 3, 1), dtype=dtype)
    values, offsets = make_batch(ebc, 16, max_len=20)
    psw_ebc = make_ebc(dims=(5, 64, 33), rows=(9, 40, 7), pooling=("sum",) * 3, dtype=dtype)
    psw = torch.rand(values.shape[0]).to(dtype)
    outs = each_cpu_isa(lambda: (ebc(values, offsets).detach(),
                                 psw_ebc(values, offsets, psw).detach()))
    first = next(iter(outs.values()))
    for out in outs.values():
        assert torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])
    torch.testing.assert_close(first[0].double(), reference(ebc, values, offsets)[0],
                               **TOL[dtype])


def test_matches_per_table_embedding_bag_loop():
    ebc = make_ebc(dims=(16, 64, 7), rows=(50, 100, 9), pooling=("sum", "mean", "max"),
                   padding=(None, None, 2))
    values, offsets = make_batch(ebc, 32, max_len=6)
    out = ebc(values, offsets)
    batch = 32

    def per_table(lookup):
        outs, f = [], 0
        for name, cfg in zip(ebc._table_names, ebc._configs):
            for _ in cfg.feature_names:
                s, e = int(offsets[f * batch]), int(offsets[(f + 1) * batch])
                outs.append(lookup(values[s:e], ebc.embedding_bags[name].weight,
                                   offsets[f * batch:(f + 1) * batch] - s,
                                   mode=cfg.pooling, padding_idx=cfg.padding_idx))
                f += 1
        return torch.cat(outs, 1)
    torch.testing.assert_close(out, per_table(F.embedding_bag), atol=1e-5, rtol=1e-5)
    # The same kernels as the single-table lookup: the same bits as a loop of ee.embedding_bag.
    assert torch.equal(out, per_table(ee.embedding_bag))


def test_per_sample_weights_forward_and_gradients():
    ebc = make_ebc(pooling=("sum", "sum", "sum"), padding=(None, 3, None), dtype=torch.float64)
    values, offsets = make_batch(ebc, 4)
    psw = torch.rand(values.shape[0], dtype=torch.float64, requires_grad=True)
    out = ebc(values, offsets, psw)
    psw_ref = psw.detach().clone().requires_grad_()
    ref, ref_w = reference(ebc, values, offsets, psw_ref)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(out.shape, dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(psw.grad, psw_ref.grad)
    for name in ebc._table_names:
        torch.testing.assert_close(ebc.embedding_bags[name].weight.grad, ref_grad(ref_w, name))
    with pytest.raises(RuntimeError, match="sum mode"):
        make_ebc()(values, offsets, psw.detach())


def test_sparse_gradient_trains_like_dense():
    dense, sparse = make_ebc(), make_ebc(sparse=True)
    sparse.load_state_dict(dense.state_dict())
    values, offsets = make_batch(dense, 6)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.1)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.1)
    for _ in range(3):
        for model, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            model(values, offsets).square().sum().backward()
            opt.step()
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(sparse.state_dict()[key], value)


@pytest.mark.parametrize("dims", [(3, 8, 5), (16, 64, 128), (24, 72, 40)])  # generic, blocks, both
def test_errors_name_the_argument_and_mutate_nothing(dims):
    ebc = make_ebc(dims=dims)
    values, offsets = make_batch(ebc, 3)
    with pytest.raises(ValueError, match="'offsets'.*features \\* B \\+ 1"):
        ebc(values, offsets[:-1])
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    bad = values.clone()
    f1_start = int(offsets[2 * 3])  # feature f1 (table_1, 11 rows) starts its bags here
    bad_pos = next(i for i in range(f1_start, int(offsets[3 * 3])))
    bad[bad_pos] = 11
    with pytest.raises(IndexError, match=rf"feature 'f1' \(table 'table_1'\).*id 11 at "
                                         rf"position {bad_pos}") as info:
        ebc(bad, offsets)
    assert isinstance(info.value, ee.EmbeddingIndexError)  # also a RuntimeError, as bags raise
    assert "Expected idx >= 0 && idx < num_embeddings" in str(info.value)
    broken = offsets.clone()
    broken[2] = broken[3] + 1
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ebc(values, broken)
    for k, v in ebc.state_dict().items():
        assert torch.equal(v, before[k])


def test_outputs_fully_written_over_poisoned_memory():
    ebc = make_ebc(pooling=("max", "mean", "sum"))
    values, offsets = make_batch(ebc, 64, empty_feature="f2")
    for _ in range(3):
        poison(64 * 19, torch.float32, "cpu")
        out = ebc(values, offsets)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), reference(ebc, values, offsets)[0],
                                   **TOL[torch.float32])


def _op_args(ebc, values, offsets):
    weights = [ebc.embedding_bags[n].weight.detach() for n in ebc._table_names]
    return weights, (values, offsets, list(ebc._feature_table), list(ebc._modes),
                     list(ebc._padding))


@pytest.mark.parametrize("pooling", [("sum", "mean", "max"), ("sum", "sum", "sum")])
def test_opcheck(pooling):
    ebc = make_ebc(pooling=pooling)
    values, offsets = make_batch(ebc, 3)
    weights, (v, o, ft, modes, pad) = _op_args(ebc, values, offsets)
    ops = torch.ops.embedding_ext
    torch.library.opcheck(ops.embedding_bag_collection_forward,
                          (weights, v, o, ft, modes, pad, None, 3))
    out, arg_max = ops.embedding_bag_collection_forward(weights, v, o, ft, modes, pad, None, 3)
    grad = torch.randn_like(out)
    rows, dims = [w.shape[0] for w in weights], [w.shape[1] for w in weights]
    args = (grad, v, o, arg_max, ft, modes, pad, None, rows, dims)
    torch.library.opcheck(ops.embedding_bag_collection_dense_backward, args)
    torch.library.opcheck(ops.embedding_bag_collection_sparse_backward, args)


def test_gradcheck_float64():
    ebc = make_ebc(rows=(4, 5, 3), dims=(2, 3, 2), padding=(None, 1, None), dtype=torch.float64)
    values, offsets = make_batch(ebc, 2, max_len=3)
    weights, (v, o, ft, modes, pad) = _op_args(ebc, values, offsets)
    weights = [w.clone().requires_grad_() for w in weights]
    layout = (tuple(ft), tuple(modes), tuple(pad), False)

    def fn(*ws):
        return ee.collection.EmbeddingBagCollectionFunction.apply(layout, v, o, None, 2, *ws)

    assert torch.autograd.gradcheck(fn, tuple(weights))
    psw = torch.rand(values.shape[0], dtype=torch.float64, requires_grad=True)
    sum_layout = (tuple(ft), (0, 0, 0), (-1, -1, -1), False)
    assert torch.autograd.gradcheck(
        lambda p, *ws: ee.collection.EmbeddingBagCollectionFunction.apply(
            sum_layout, v, o, p, 2, *ws), (psw, *weights))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 40), st.sampled_from(MODES),
                          st.integers(1, 2)), min_size=1, max_size=40),
       st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_hypothesis_tables_dims_modes(tables, batch, seed):
    configs = [ee.EmbeddingBagConfig(v, d, [f"t{t}_{k}" for k in range(n)], pooling=m)
               for t, (d, v, m, n) in enumerate(tables)]
    ebc = ee.EmbeddingBagCollection(configs)
    values, offsets = make_batch(ebc, batch, max_len=3, seed=seed)
    out = ebc(values, offsets)
    ref, ref_w = reference(ebc, values, offsets)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    grad = torch.randn(out.shape)
    out.backward(grad)
    if ref.requires_grad:
        ref.backward(grad.double())
    for name in ebc._table_names:
        torch.testing.assert_close(ebc.embedding_bags[name].weight.grad.double(),
                                   ref_grad(ref_w, name), **TOL[torch.float32])


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    ebc = make_ebc()
    values, offsets = make_batch(ebc, 4)
    eager = ebc(values, offsets)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in ebc.parameters()]
    ebc.zero_grad()
    compiled = torch.compile(ebc, fullgraph=True)(values, offsets)
    torch.testing.assert_close(compiled, eager)
    compiled.square().sum().backward()
    for p, g in zip(ebc.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)
