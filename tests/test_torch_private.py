"""The private PyTorch API in embedding_ext/_torch_private.py still behaves as relied on.
If a torch release breaks this, fix _torch_private.py (the one place that uses it)."""
import torch

import embedding_ext as ee
from embedding_ext import _torch_private
from embedding_ext.functional import _embedding_direct
from conftest import make_indices, make_weight


def test_direct_call_is_the_op_without_its_python_frame():
    op = torch.ops.embedding_ext.embedding.default
    raw = _torch_private.direct_call(op)
    assert callable(raw) and not isinstance(raw, type(op))
    assert _embedding_direct is raw
    weight = make_weight(9, 4).requires_grad_()
    idx = make_indices((5,), 9, padding_idx=2)
    out = raw(weight, idx, 2, True, False)
    assert torch.equal(out, op(weight, idx, 2, True, False))
    # The same autograd kernel ran: a C++ node from csrc/autograd.cpp.
    assert out.grad_fn.name() == "embedding_ext::LookupBackward"
    assert ee.embedding(idx, weight, padding_idx=2).grad_fn.name() == "embedding_ext::LookupBackward"


def test_compiled_autograd_flag_is_on_inside_its_context_only():
    """The flag the lookup reads to record a Python Function under compiled autograd."""
    state = _torch_private.compiled_autograd_state
    assert state.compiled_autograd_enabled is False
    with state._enable(torch.compile(backend="eager")):
        assert state.compiled_autograd_enabled is True
        weight = make_weight(9, 4).requires_grad_()
        assert "EmbeddingFunction" in type(ee.embedding(make_indices((5,), 9), weight).grad_fn).__name__
    assert state.compiled_autograd_enabled is False
