"""The private PyTorch API embedding_ext relies on, in one place.

tests/test_torch_private.py checks it, so a torch release that removes or changes it fails
loudly there.
"""
from __future__ import annotations

import functools

import torch
from torch._dynamo import compiled_autograd
from torch._ops import OpOverload

# Compiled autograd's state: its module-level flag ``compiled_autograd_enabled`` (private,
# in torch since before 2.11) is True while its context (``compiled_autograd._enable``, or
# ``torch._dynamo.config.compiled_autograd`` inside a compiled function) is on. Read as
# ``compiled_autograd_state.compiled_autograd_enabled`` on every lookup: an attribute read,
# where a function call would cost a frame.
compiled_autograd_state = compiled_autograd


@functools.cache  # substitute_in_graph accepts one registration per callable
def direct_call(op: OpOverload):
    """The C++ callable behind ``op`` (``OpOverload._op``, private). Calling it skips the
    Python frame of ``OpOverload.__call__``, about 0.35 us, a tenth of a small lookup.
    Dynamo cannot trace it, so it is registered (public API) to trace as ``op`` itself."""
    raw = op._op

    @torch.compiler.substitute_in_graph(raw)
    def _as_op(*args, **kwargs):
        return op(*args, **kwargs)

    return raw
