"""The private PyTorch API embedding_ext relies on, in one place.

tests/test_torch_private.py checks it, so a torch release that removes or changes it fails
loudly there.
"""
from __future__ import annotations

import functools

import torch
from torch._ops import OpOverload


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
