"""Drop-in use in real models: the swap helper, training parity with nn.Embedding on a
GPT-2-style language model (tied embeddings) and on a sparse recommender."""
import copy

import pytest
import torch

import embedding_ext as ee
from conftest import DEVICES

transformers = pytest.importorskip("transformers")

STEPS = 20


def test_replace_and_restore_keep_parameters_and_optimizer():
    class OwnBag(torch.nn.EmbeddingBag):  # a subclass with its own behaviour: left alone
        pass

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2),
                                torch.nn.EmbeddingBag(10, 4, mode="max", padding_idx=0),
                                OwnBag(10, 4))
    weight, bag_weight = model[0].weight, model[2].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keys = list(model.state_dict())
    ids, offsets = torch.tensor([1, 1, 3, 0, 2]), torch.tensor([0, 2])
    before = model[2](ids, offsets)
    assert ee.replace_embeddings(model) is model
    assert type(model[0]) is ee.Embedding and model[0].weight is weight
    assert type(model[2]) is ee.EmbeddingBag and model[2].weight is bag_weight
    assert model[2].mode == "max" and model[2].padding_idx == 0
    assert type(model[3]) is OwnBag
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model[2](ids, offsets), before)
    (model[0](torch.tensor([1, 1, 3])).sum() + model[2](ids, offsets).sum()).backward()
    opt.step()
    assert ee.restore_embeddings(model) is model
    assert type(model[0]) is torch.nn.Embedding and model[0].weight is weight
    assert type(model[2]) is torch.nn.EmbeddingBag and model[2].weight is bag_weight
    top = torch.nn.Embedding(3, 2)
    assert type(ee.replace_embeddings(top)) is ee.Embedding


def _gpt2(device):
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=48, n_layer=2,
                                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(device)


def _train(optimizers, loss_of, batches) -> list[float]:
    """One step of every optimizer on loss_of(batch) for each batch in turn; the losses."""
    losses = []
    for batch in batches:
        for opt in optimizers:
            opt.zero_grad()
        loss = loss_of(batch)
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
    return losses


def _train_lm(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return _train([opt], lambda ids: model(input_ids=ids, labels=ids).loss, batches)


@pytest.mark.parametrize("device", DEVICES)
def test_gpt2_training_parity(device):
    reference_model = _gpt2(device)
    ours = ee.replace_embeddings(copy.deepcopy(reference_model))
    wte = ours.transformer.wte
    assert type(wte) is ee.Embedding and type(ours.transformer.wpe) is ee.Embedding
    assert ours.lm_head.weight is wte.weight, "input/output embeddings must stay tied"
    # Two batches seen in turn: learnable (memorisation), so the loss must fall.
    fixed = [torch.randint(0, 512, (4, 32), device=device) for _ in range(2)]
    batches = [fixed[i % 2] for i in range(STEPS)]
    expected = _train_lm(reference_model, batches)
    got = _train_lm(ours, batches)
    print("gpt2 losses:", got, "\nlargest difference:", max(abs(a - b) for a, b in zip(got, expected)))
    assert got[-1] < got[0]  # it learned something
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)


class Recommender(torch.nn.Module):
    """Several sparse id tables feeding an MLP, DLRM-style."""

    def __init__(self, table_sizes=(1000, 300, 50), dim=16):
        super().__init__()
        self.tables = torch.nn.ModuleList(
            torch.nn.Embedding(n, dim, sparse=True, padding_idx=0 if i == 0 else None)
            for i, n in enumerate(table_sizes))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim * len(table_sizes), 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def forward(self, ids):  # ids: (batch, tables, bag)
        pooled = [table(ids[:, t]).mean(1) for t, table in enumerate(self.tables)]
        return self.mlp(torch.cat(pooled, -1)).squeeze(-1)


def _train_recommender(model, batches):
    sparse = torch.optim.SparseAdam([p for t in model.tables for p in t.parameters()], lr=1e-2)
    dense = torch.optim.Adam(model.mlp.parameters(), lr=1e-2)

    def loss_of(batch):
        ids, y = batch
        return torch.nn.functional.binary_cross_entropy_with_logits(model(ids), y)
    return _train([sparse, dense], loss_of, batches)


@pytest.mark.parametrize("device", DEVICES)
def test_recommender_training_parity(device):
    torch.manual_seed(0)
    reference_model = Recommender().to(device)
    ours = ee.replace_embeddings(copy.deepcopy(reference_model))
    assert all(type(t) is ee.Embedding for t in ours.tables)
    batches = []
    for _ in range(STEPS):
        ids = torch.stack([torch.randint(0, n, (64, 5)) for n in (1000, 300, 50)], 1)
        ids[:, 0, -1] = 0  # padding in the first table
        batches.append((ids.to(device), torch.randint(0, 2, (64,), device=device).float()))
    expected = _train_recommender(reference_model, batches)
    got = _train_recommender(ours, batches)
    print("recommender losses:", got, "\nlargest difference:",
          max(abs(a - b) for a, b in zip(got, expected)))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours.tables, reference_model.tables):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
