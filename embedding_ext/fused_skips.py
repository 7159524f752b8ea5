"""A fused optimizer's step count on CUDA, where an update that meets a bad id is skipped by
the kernel (every row left as it was, the id reported later) without a host
synchronisation: the count advances when the update is launched and is taken back once the
skip is known. Whether it was skipped is copied to pinned memory behind the update, and read
at the next update, at ``step()`` if the GPU is already past it, and by ``state_dict()``:
no call waits for the GPU, except a ``state_dict()`` right after the update."""
from __future__ import annotations

import weakref

import torch
from torch import Tensor


class SkippedUpdates:
    """The last launched CUDA update's "skipped" flag for ``optimizer`` (a fused one: one
    weight), until it is settled."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)  # no cycle: dropping it unfuses at once
        self._flag: Tensor | None = None  # pinned: whether the update met a bad id
        self._event = None  # recorded after the flag's copy

    def launched(self, indices: Tensor, weight: Tensor) -> None:
        """After an update of ``weight`` (local) on ``indices`` (its rows) that counted a
        step: on CUDA the kernel skips every row when one of them is out of range
        (padding_idx is always in range); elsewhere the op raised instead."""
        if not weight.is_cuda:
            return
        bad = ((indices < 0) | (indices >= weight.shape[0])).any()
        if self._flag is None:
            self._flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._flag.copy_(bad, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def settle(self, wait: bool = True) -> None:
        """Takes back the count of a skipped update; ``wait=False``: only if the GPU is past
        it already."""
        if self._event is None or not (wait or self._event.query()):
            return
        self._event.synchronize()
        optimizer = self._optimizer()
        state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
        if bool(self._flag) and "step" in state:
            state["step"] -= 1
        self._event = None

    def forget(self) -> None:
        """The state was replaced (load_state_dict): nothing to take back."""
        self._event = None
