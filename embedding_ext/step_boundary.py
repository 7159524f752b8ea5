"""Where a fused optimizer's step meets a traced backward.

A fused lookup's backward is the optimizer step: Python bookkeeping with side effects (the
step count read and advanced, lazy state, the once-per-step check) around one in-place op.
Compiled autograd traces a Python Function's backward with Dynamo; traced, that bookkeeping
broke the graph at several places of its own (reading the step count, the data-dependent
size of a padded bag's gradient) and would have been specialised into the graph. So while
Dynamo traces it, the whole backward runs eagerly: one graph break, named for what it is."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

STEP_RUNS_EAGERLY = ("a fused optimizer's step runs eagerly inside a compiled backward (it "
                     "updates the optimizer's Python state: step count, lazy state, the "
                     "once-per-step check)")


@torch.compiler.disable(reason=STEP_RUNS_EAGERLY)
def _run_eagerly(backward: Callable[..., Any], ctx: Any, *grads: Any) -> Any:
    return backward(ctx, *grads)


def fused_step_backward(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a fused Function's ``backward(ctx, *grads)``: run as is in eager autograd (one
    flag read), run eagerly as a whole when Dynamo traces it (compiled autograd)."""

    @functools.wraps(backward)
    def run(ctx: Any, *grads: Any) -> Any:
        if torch.compiler.is_compiling():
            return _run_eagerly(backward, ctx, *grads)
        return backward(ctx, *grads)

    return run
