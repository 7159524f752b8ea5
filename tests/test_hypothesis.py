"""Randomised differential testing against nn.Embedding and the float64 reference.

Profiles: "ci" (default, quick) and "long" (5,000 examples per test), chosen with
EMBEDDING_EXT_HYPOTHESIS_PROFILE=long, e.g.
    EMBEDDING_EXT_HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_hypothesis.py
"""
import math
import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embedding_ext as ee
from embedding_ext import reference
from conftest import TOL

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("EMBEDDING_EXT_HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def lookups(draw):
    num_weights = draw(st.integers(1, 40))
    dim = draw(st.integers(0, 20))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    n = math.prod(shape)
    # Duplicate-heavy: ids drawn from a small pool of rows.
    pool = draw(st.lists(st.integers(0, num_weights - 1), min_size=1, max_size=4))
    ids = draw(st.lists(st.sampled_from(pool) | st.integers(0, num_weights - 1),
                        min_size=n, max_size=n))
    padding_idx = draw(st.none() | st.integers(-num_weights, num_weights - 1))
    if padding_idx is not None and n and draw(st.booleans()):  # padding-heavy
        pad = padding_idx % num_weights
        ids = [pad if i % 2 else v for i, v in enumerate(ids)]
    return dict(
        num_weights=num_weights, dim=dim,
        ids=torch.tensor(ids, dtype=draw(st.sampled_from([torch.int32, torch.int64]))).reshape(shape),
        dtype=draw(st.sampled_from(DTYPES)), padding_idx=padding_idx,
        scale_grad_by_freq=draw(st.booleans()), sparse=draw(st.booleans()),
        max_norm=draw(st.none() | st.floats(0.1, 5.0)),
        norm_type=draw(st.sampled_from([1.0, 2.0, math.inf, 0.5, 3.0])),
        transpose=draw(st.booleans()))


@given(lookups())
def test_random_lookups_match_reference(case):
    torch.manual_seed(0)
    dtype, ids = case["dtype"], case["ids"]
    if case["transpose"] and ids.dim() >= 2:
        ids = ids.transpose(0, 1)  # non-contiguous ids
    weight = (torch.randn(case["num_weights"], case["dim"], dtype=torch.float64) * 2).to(dtype)
    options = {k: case[k] for k in ("padding_idx", "max_norm", "norm_type",
                                     "scale_grad_by_freq", "sparse")}
    w_ours = weight.clone().requires_grad_()
    expected_weight = (reference.renorm(weight, ids, case["max_norm"], case["norm_type"])
                       if case["max_norm"] is not None else weight.double())
    out = ee.embedding(ids, w_ours, **options)
    torch.testing.assert_close(w_ours.detach().double(), expected_weight, **TOL[dtype])
    assert out.shape == (*ids.shape, case["dim"]) and out.dtype == dtype
    assert torch.equal(out, w_ours.detach()[ids.long()])
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    out.backward(grad_out)
    pad = None if case["padding_idx"] is None else case["padding_idx"] % case["num_weights"]
    expected_grad = reference.dense_backward(grad_out, ids, case["num_weights"], pad,
                                             case["scale_grad_by_freq"])
    grad = w_ours.grad.double().to_dense() if case["sparse"] else w_ours.grad
    torch.testing.assert_close(grad.double(), expected_grad, **TOL[dtype])
    # Side by side with nn.Embedding where PyTorch follows the same contract.
    # PyTorch refuses sparse + scale_grad_by_freq, and its sparse backward with a padding_idx
    # raises IndexError on 0-dim ids (a PyTorch bug; ours handles both, checked above).
    pytorch_fails = case["sparse"] and (case["scale_grad_by_freq"]
                                        or (ids.dim() == 0 and pad is not None))
    if dtype in (torch.float32, torch.float64) and case["max_norm"] is None and not pytorch_fails:
        w_ref = weight.clone().requires_grad_()
        F.embedding(ids, w_ref, **options).backward(grad_out)
        ref_grad = w_ref.grad.to_dense() if case["sparse"] else w_ref.grad
        torch.testing.assert_close(grad.to(dtype) if case["sparse"] else grad, ref_grad, **TOL[dtype])
