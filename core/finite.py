"""Checking latents for NaN/inf at every step without stalling the GPU."""

from __future__ import annotations

from typing import Any

import torch


class FiniteWatch:
    """Watches each step's latents for non-finite values.

    On CPU the check is immediate. On CUDA, reading a device flag on the host would wait for every queued kernel and
    leave the GPU idle while the host enqueues the next step; so each step's flag is copied to pinned host memory
    asynchronously and read one step later, when the GPU has long computed it. A bad step is then reported one step
    late, with its own step information.
    """

    def __init__(self, device: torch.device) -> None:
        self._lagged = device.type == "cuda"
        self._pending: tuple[torch.Tensor, Any, Any] | None = None
        self._buffers = [torch.empty((), dtype=torch.bool, pin_memory=True) for _ in range(2)] if self._lagged else []
        self._turn = 0

    def push(self, latents: torch.Tensor, info: Any) -> Any | None:
        """Start checking `latents` (tagged `info`); returns the `info` of a step found non-finite, else None."""
        finite = torch.isfinite(latents).all()
        if not self._lagged:
            return None if bool(finite) else info
        flag = self._buffers[self._turn]
        self._turn ^= 1
        flag.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        bad = self.finish()
        self._pending = (flag, event, info)
        return bad

    def finish(self) -> Any | None:
        """Settle the check still in flight; returns its `info` if those latents were non-finite, else None."""
        if self._pending is None:
            return None
        flag, event, info = self._pending
        self._pending = None
        event.synchronize()
        return None if bool(flag) else info
