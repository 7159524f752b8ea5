"""ee.fuse_optimizer on an EmbeddingBagCollection: every table's update inside the backward,
against the torch optimizer on an unfused collection (sparse gradients) and, for the rule
torch lacks, against fused single tables."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

import embedding_ext as ee
from embedding_ext.fused import fused_optimizer_of

RULES = [(torch.optim.SGD, dict(lr=0.3)), (torch.optim.Adagrad, dict(lr=0.2)),
         (torch.optim.SparseAdam, dict(lr=0.05)), (ee.optim.RowWiseAdagrad, dict(lr=0.2))]


def configs(max_table=False):
    return [ee.EmbeddingBagConfig(40, 16, ["user", "last_user"], name="users"),
            ee.EmbeddingBagConfig(25, 8, ["item"], name="products", pooling="mean", padding_idx=2),
            ee.EmbeddingBagConfig(9, 5, ["cat"], name="cats",
                                  pooling="max" if max_table else "sum")]


def batch(seed, features=4, bags=5):
    """Feature-major ids with duplicates, empty bags, table ends and the padding id."""
    gen = torch.Generator().manual_seed(seed)
    rows = [40, 40, 25, 9]
    values, lengths = [], []
    for f in range(features):
        for b in range(bags):
            n = int(torch.randint(0, 5, (1,), generator=gen))
            ids = torch.randint(0, min(rows[f], 6), (n,), generator=gen)  # duplicates
            if n and b == 1:
                ids[-1] = rows[f] - 1
            values.append(ids)
            lengths.append(n)
    values = torch.cat(values)
    values[values.numel() // 2] = 2 if values.numel() else 0
    return values, torch.tensor([0] + lengths).cumsum(0)


def reference_step(cls, kwargs):
    """A step function of the unfused equivalent: torch's optimizer on sparse gradients, or
    (row-wise Adagrad) each table fused on its own and looked up feature by feature."""
    ref = ee.EmbeddingBagCollection(configs(), sparse=True)
    if cls is not ee.optim.RowWiseAdagrad:
        opt = cls(ref.parameters(), **kwargs)

        def step(values, offsets, psw=None):
            opt.zero_grad()
            out = ref(values, offsets, psw)
            out.square().sum().backward()
            opt.step()
            return out
        return ref, step, opt
    tables = [ref.embedding_bags[n] for n in ref._table_names]
    opts = [ee.fuse_optimizer(t, cls, **kwargs) for t in tables]

    def step(values, offsets, psw=None):
        bags = (offsets.numel() - 1) // 4
        outs = []
        # One lookup per table (a fused table takes one per step): the shared table's two
        # features as one run of 2B bags, split after.
        for t, (f0, f1) in enumerate([(0, 2), (2, 3), (3, 4)]):
            s, e = int(offsets[f0 * bags]), int(offsets[f1 * bags])
            out = tables[t](values[s:e], offsets[f0 * bags:f1 * bags] - s,
                            per_sample_weights=None if psw is None else psw[s:e])
            outs += list(out.split(bags))
        out = torch.cat(outs, 1)
        out.square().sum().backward()
        for o in opts:
            o.step()
        return out
    return ref, step, opts


@pytest.mark.parametrize("cls,kwargs", RULES, ids=[c.__name__ for c, _ in RULES])
def test_fused_collection_trains_as_the_unfused_one(cls, kwargs):
    ebc = ee.EmbeddingBagCollection(configs())
    ref, ref_step, _ = reference_step(cls, kwargs)
    ref.load_state_dict(ebc.state_dict())
    padding_row = ebc.embedding_bags["products"].weight[2].clone()
    opt = ee.fuse_optimizer(ebc, cls, **kwargs)
    for seed in range(4):
        values, offsets = batch(seed)
        out = ebc(values, offsets)
        out.square().sum().backward()
        opt.step()
        torch.testing.assert_close(out, ref_step(values, offsets))
    # fp32: a row's gradient terms are summed in another order than torch's coalesce
    # (1.4e-6 apart for seed 1445107443 after 4 steps).
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ebc.state_dict()[key], value, atol=5e-6, rtol=1e-5)
    assert torch.equal(ebc.embedding_bags["products"].weight[2], padding_row)
    assert all(w.grad is None for w in ebc.parameters())


@pytest.mark.parametrize("cls,kwargs", RULES[:3], ids=[c.__name__ for c, _ in RULES[:3]])
def test_state_dict_moves_between_fused_and_torch(cls, kwargs):
    ebc = ee.EmbeddingBagCollection(configs())
    ref, ref_step, ref_opt = reference_step(cls, kwargs)
    ref.load_state_dict(ebc.state_dict())
    opt = ee.fuse_optimizer(ebc, cls, **kwargs)
    values, offsets = batch(0)
    ebc(values, offsets).square().sum().backward()
    opt.step()
    ref_step(values, offsets)
    saved = opt.state_dict()
    theirs = ref_opt.state_dict()
    assert saved["param_groups"] == theirs["param_groups"]
    assert saved["state"].keys() == theirs["state"].keys()
    # Torch's state into the fused optimizer (and back through a pickle round trip): the
    # next steps agree.
    opt.load_state_dict(pickle.loads(pickle.dumps(theirs)))
    ref_opt.load_state_dict(saved)
    for seed in (1, 2):
        values, offsets = batch(seed)
        ebc(values, offsets).square().sum().backward()
        opt.step()
        ref_step(values, offsets)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ebc.state_dict()[key], value, atol=5e-6, rtol=1e-5)


def test_param_group_lr_reaches_every_table():
    ebc = ee.EmbeddingBagCollection(configs())
    opt = ee.fuse_optimizer(ebc, torch.optim.SGD, lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)  # lr 0 from the start
    before = copy.deepcopy(ebc.state_dict())
    values, offsets = batch(3)
    ebc(values, offsets).sum().backward()
    opt.step()
    scheduler.step()
    for key, value in before.items():
        assert torch.equal(ebc.state_dict()[key], value)


def test_per_sample_weights_get_their_gradient():
    ebc = ee.EmbeddingBagCollection([ee.EmbeddingBagConfig(30, 8, ["a", "b"], name="t")])
    ref = ee.EmbeddingBagCollection([ee.EmbeddingBagConfig(30, 8, ["a", "b"], name="t")])
    ref.load_state_dict(ebc.state_dict())
    opt = ee.fuse_optimizer(ebc, torch.optim.SGD, lr=0.1)
    values = torch.tensor([1, 2, 2, 29, 0, 5, 5, 7])
    offsets = torch.tensor([0, 2, 4, 4, 8])
    psw = torch.rand(8, requires_grad=True)
    ref_psw = psw.detach().clone().requires_grad_()
    ebc(values, offsets, psw).square().sum().backward()
    opt.step()
    ref(values, offsets, ref_psw).square().sum().backward()
    torch.testing.assert_close(psw.grad, ref_psw.grad)


def test_refusals_leave_nothing_fused_or_changed():
    ebc = ee.EmbeddingBagCollection(configs(max_table=True))
    with pytest.raises(NotImplementedError, match="'cats'.*max"):
        ee.fuse_optimizer(ebc, torch.optim.SGD, lr=0.1)
    assert all(fused_optimizer_of(t) is None for t in ebc.embedding_bags.values())
    with pytest.raises(ValueError, match="momentum"):
        ee.fuse_optimizer(ee.EmbeddingBagCollection(configs()), torch.optim.SGD, lr=0.1,
                          momentum=0.9)

    ebc = ee.EmbeddingBagCollection(configs())
    opt = ee.fuse_optimizer(ebc, torch.optim.Adagrad, lr=0.1)
    before = copy.deepcopy((ebc.state_dict(), opt.state_dict()))
    values, offsets = batch(0)
    bad = values.clone()
    bad[-1] = 9  # past the 9-row table of the last feature
    with pytest.raises(IndexError, match="'cat'.*'cats'"):
        ebc(bad, offsets)
    for key, value in before[0].items():
        assert torch.equal(ebc.state_dict()[key], value)
    assert all(int(s["step"]) == 0 for s in opt.state_dict()["state"].values())

    # Two backwards before step(): refused before any table changes.
    ebc(values, offsets).sum().backward()
    after_one = copy.deepcopy(ebc.state_dict())
    with pytest.raises(RuntimeError, match="second backward"):
        ebc(values, offsets).sum().backward()
    for key, value in after_one.items():
        assert torch.equal(ebc.state_dict()[key], value)
    with pytest.raises(RuntimeError, match="already has a fused optimizer"):
        ee.fuse_optimizer(ebc, torch.optim.SGD, lr=0.1)


def test_a_table_name_nn_moduledict_refuses_is_a_clear_error():
    for name in ("items", "a.b"):
        with pytest.raises(ValueError, match="cannot be a key"):
            ee.EmbeddingBagCollection([ee.EmbeddingBagConfig(4, 2, ["f"], name=name)])


def test_copies_are_not_fused_and_no_grad_is_plain():
    ebc = ee.EmbeddingBagCollection(configs())
    opt = ee.fuse_optimizer(ebc, torch.optim.SGD, lr=0.1)
    values, offsets = batch(1)
    for twin in (copy.deepcopy(ebc), pickle.loads(pickle.dumps(ebc))):
        twin(values, offsets).sum().backward()  # ordinary gradients, no update
        assert all(w.grad is not None for w in twin.parameters())
    with torch.no_grad():
        torch.testing.assert_close(ebc(values, offsets), copy.deepcopy(ebc)(values, offsets))
    del opt  # dropping the optimizer unfuses
    ebc(values, offsets).sum().backward()
    assert all(w.grad is not None for w in ebc.parameters())


def _op_args(ebc, values, offsets, rule=1):
    weights = [ebc.embedding_bags[n].weight.detach() for n in ebc._table_names]
    grad = torch.randn((offsets.numel() - 1) // len(ebc.feature_names),
                       sum(w.shape[1] for w in [weights[0], weights[0], weights[1], weights[2]]))
    state1 = [torch.full_like(w, 0.1) for w in weights]
    return (weights, grad, values, offsets, list(ebc._feature_table), list(ebc._modes),
            list(ebc._padding), None, rule, state1, [], 0.1, 1e-10, 0.0, 0.0, 0.0,
            [1] * len(weights))


def test_the_step_op_checks_every_id_before_writing_and_bumps_versions():
    ebc = ee.EmbeddingBagCollection(configs())
    values, offsets = batch(5)
    args = _op_args(ebc, values, offsets)
    weights, state1 = args[0], args[9]
    before = [w.clone() for w in weights]
    versions = [w._version for w in weights + state1]
    bad = values.clone()
    bad[-1] = 9  # past the last feature's 9-row table
    op = torch.ops.embedding_ext.embedding_bag_collection_fused_update_
    with pytest.raises(IndexError, match="9"):
        op(*args[:2], bad, *args[3:])
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    assert [w._version for w in weights + state1] == versions
    with pytest.raises(RuntimeError, match="state1"):
        op(*args[:9], state1[:2], *args[10:])
    op(*args)
    assert all(not torch.equal(w, b) for w, b in zip(weights, before))
    assert all(t._version > v for t, v in zip(weights + state1, versions))
    torch.library.opcheck(op, _op_args(ebc, values, offsets),
                          test_utils=("test_schema", "test_faketensor"))
