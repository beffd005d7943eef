"""Streaming frozen Linear weights from CPU memory during training (the low-memory LoRA mode).

A LoRA run never updates the base weights, and a frozen Linear needs its weight only to compute `y = x Wᵀ + b`
forward and `dx = dy W` backward — never `x` itself. So the weight can live in pinned CPU memory and be copied to
the GPU inside each of those two calls, and freed right after. GPU memory then holds the LoRA parameters, the
optimizer state, activations and one layer's weight at a time, instead of the whole model.

This is done per layer with a custom autograd function, so it composes with gradient checkpointing (a recomputed
forward simply copies again), activation offload and LoRA hooks, and needs no hook ordering between blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

STREAMED_ATTR = "_imagezoo_streamed"


class _StreamedLinear(torch.autograd.Function):
    """`F.linear` whose frozen weight and bias live on the CPU and are copied to `x`'s device per call."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Kept on ctx, not saved for backward: the CPU tensors are persistent, so nothing extra stays alive.
        ctx.weight = weight
        w = weight.to(x.device, non_blocking=True)
        b = bias.to(x.device, non_blocking=True) if bias is not None else None
        return F.linear(x, w.to(x.dtype), b.to(x.dtype) if b is not None else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        w = ctx.weight.to(grad.device, non_blocking=True).to(grad.dtype)
        return grad @ w, None, None


def _streamed_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _StreamedLinear.apply(x, module.weight, module.bias)


def stream_frozen_linears(blocks: Sequence[nn.Module], *, pin_memory: bool = True) -> int:
    """Move the frozen Linear weights of `blocks` to (pinned) CPU memory and stream them per call.

    Trainable parts (LoRA children, any Linear with a trainable weight) stay where they are. Call after LoRA
    injection; then move the rest of the model to the compute device leaving these weights alone (modules marked
    with the `STREAMED_ATTR` attribute).

    Args:
        blocks: Modules whose frozen Linears to stream (typically the denoiser's transformer blocks).
        pin_memory: Pin the CPU copies (needed for asynchronous, full-speed copies; only on CUDA machines).

    Returns:
        Bytes of weights moved off the device.
    """
    moved = 0
    for block in blocks:
        for module in block.modules():
            params = [p for p in (module.weight, module.bias) if p is not None] if isinstance(module, nn.Linear) else []
            # Trainable layers (full training, LoRA's own A/B) must stay on the device the optimizer updates them on.
            if not params or any(p.requires_grad for p in params) or hasattr(module, STREAMED_ATTR):
                continue
            for param in params:
                data = param.data.to("cpu")
                if pin_memory and torch.cuda.is_available():
                    data = data.pin_memory()
                moved += param.numel() * param.element_size()
                param.data = data
            module.forward = _streamed_forward.__get__(module)
            setattr(module, STREAMED_ATTR, True)
    logger.info("Streaming %.2f GiB of frozen weights from CPU memory.", moved / 1024**3)
    return moved
