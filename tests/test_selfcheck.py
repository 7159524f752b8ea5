"""`python -m embedding_ext`: the facts it prints, and that its checks fail on wrong ops."""
import io
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import embedding_ext as ee
from embedding_ext import selfcheck


def test_module_runs_and_passes_outside_the_source_tree(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-m", "embedding_ext"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"embedding_ext {ee.__version__}" in run.stdout
    assert f"torch {torch.__version__}" in run.stdout
    assert re.search(r"^cpu: (\d+)/\1 checks match torch.nn.Embedding", run.stdout, re.M)
    assert run.stdout.rstrip().endswith("self-check: all ops match PyTorch")


class _DoubledGradient(torch.autograd.Function):
    @staticmethod
    def forward(weight, ids):
        return F.embedding(ids, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.num_weights = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        g = torch.zeros(ctx.num_weights, grad.shape[-1], dtype=grad.dtype, device=grad.device)
        return 2 * g.index_add_(0, ids.flatten(), grad.reshape(-1, grad.shape[-1])), None


def _off_by_a_bit(ids, weight, **options):
    return F.embedding(ids, weight, **options) + 1e-3


def _doubled_gradient(ids, weight, **options):
    return _DoubledGradient.apply(weight, ids)


def _vague_errors(ids, weight, **options):
    if ids.max() >= weight.shape[0]:
        raise IndexError("index out of range")
    return F.embedding(ids, weight, **options)


@pytest.mark.parametrize("broken, must_fail", [
    (_off_by_a_bit, ["lookup (int64 ids)", "lookup (int32 ids)", "max_norm renorm",
                     "bfloat16 lookup and gradient"]),
    (_doubled_gradient, ["dense gradient", "sparse gradient", "dense gradient, padding_idx, "
                         "scale_grad_by_freq", "double backward"]),
    (_vague_errors, ["out-of-range id: IndexError with its message"]),
], ids=["wrong-values", "wrong-gradient", "vague-error"])
def test_checks_fail_on_a_wrong_lookup(broken, must_fail):
    results = {name: ok for name, ok, _ in selfcheck.check_device("cpu", broken)}
    for name in must_fail:
        assert results[name] is False, f"{name} passed a broken lookup"
    out = io.StringIO()
    assert selfcheck.main([], out, fn=broken) == 1
    assert "MISMATCH" in out.getvalue() and "FAILED" in out.getvalue()
