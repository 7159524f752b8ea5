"""The optimizers, modules and steps shared by the ee.fuse_optimizer tests (test_fused_*.py):
each fused module is checked against an unfused twin trained by the same torch optimizer on
its sparse gradient."""
import torch

import embedding_ext as ee

CASES = [
    (torch.optim.SGD, dict(lr=0.3)),
    (torch.optim.Adagrad, dict(lr=0.2, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-9)),
    (torch.optim.SparseAdam, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-7)),
    (ee.optim.RowWiseAdagrad, dict(lr=0.2, eps=1e-8)),
]
IDS = ["SGD", "Adagrad", "SparseAdam", "RowWiseAdagrad"]
# fp32: a hot row sums up to 24 unit-sized gradient terms, in another order than torch's
# coalesce; their rounding alone reaches 24 * 2^-24 * 3 = 4e-6 (1.2e-6 seen for one seed).
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=5e-6)}


def batch(num_weights, n, padding_idx, dim, dtype):
    """(2, n // 2) ids with a hot row (and padding when given), and a gradient for them."""
    ids = torch.randint(0, num_weights, (n,))
    ids[::3] = 4  # a hot row: its duplicates are summed before one update
    if padding_idx is not None:
        ids[1::5] = padding_idx
    return ids.reshape(2, n // 2), torch.randn(2, n // 2, dim, dtype=dtype)


def pair(num_weights, dim, dtype, padding_idx, scale, max_norm=None):
    """An ee.Embedding to fuse and its unfused reference with the same initial weights."""
    fused = ee.Embedding(num_weights, dim, padding_idx=padding_idx, scale_grad_by_freq=scale,
                         max_norm=max_norm, dtype=dtype)
    # The unfused reference: nn.Embedding's sparse gradient (ours where PyTorch lacks the
    # option combination), the same initial weights.
    cls = ee.Embedding if scale else torch.nn.Embedding
    plain = cls(num_weights, dim, padding_idx=padding_idx, scale_grad_by_freq=scale,
                max_norm=max_norm, sparse=True, dtype=dtype)
    with torch.no_grad():
        plain.weight.copy_(fused.weight)
    return fused, plain


def step_both(fused, opt, plain, ref, inputs: tuple, grad_out):
    """One training step of the fused module and of its unfused reference on the same
    batch; the fused weight never gets a gradient."""
    fused(*inputs).backward(grad_out)
    assert fused.weight.grad is None
    opt.step()
    opt.zero_grad()
    plain(*inputs).backward(grad_out)
    ref.step()
    ref.zero_grad()


def assert_same_state(ours, theirs, as_double: bool = True, **tol):
    """Two optimizers hold the same state: the same parameters and entries, each value
    within tol (compared in float64 when as_double, else in their own dtypes, which must
    then agree)."""
    ours, theirs = ours.state_dict()["state"], theirs.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].keys() == theirs[k].keys()
        for name in ours[k]:
            a, b = torch.as_tensor(ours[k][name]), torch.as_tensor(theirs[k][name])
            if as_double:
                a, b = a.double(), b.double()
            torch.testing.assert_close(a, b, **tol)
