"""The private PyTorch API embedding_ext relies on, in one place.

tests/test_torch_private.py checks it, so a torch release that removes or changes it fails
loudly there.
"""
from __future__ import annotations

from torch._ops import OpOverload


def direct_call(op: OpOverload):
    """The C++ callable behind ``op`` (``OpOverload._op``). Calling it skips the Python frame
    of ``OpOverload.__call__``, about 0.35 us, a tenth of a small lookup; Dynamo cannot
    trace it, so callers use ``op`` itself inside ``torch.compile``."""
    return op._op
