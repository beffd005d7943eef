"""Classifier-free guidance: plain, and the official Qwen-Image per-token norm rescale."""

from __future__ import annotations

import torch


def patch_norm(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """L2 norm of each `patch_size`² patch over all channels (a packed token's channels), broadcast back to `x`."""
    batch, channels, height, width = x.shape
    patches = x.reshape(batch, channels, height // patch_size, patch_size, width // patch_size, patch_size)
    norms = torch.linalg.vector_norm(patches, dim=(1, 3, 5), keepdim=True)
    return norms.expand_as(patches).reshape(x.shape)


def guide(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, *, rescale: bool = True, patch_size: int = 2
) -> torch.Tensor:
    """Combine conditional and unconditional velocities.

    `uncond + scale * (cond - uncond)`; with `rescale` (the official pipeline) each token of the result is
    rescaled to the norm of the conditional prediction, which keeps high scales from over-saturating.
    """
    combined = uncond + scale * (cond - uncond)
    if not rescale:
        return combined
    combined_norm = patch_norm(combined, patch_size)
    # A token whose guided velocity is exactly zero has nothing to rescale (the official formula gives 0/0 = NaN).
    ratio = torch.where(combined_norm > 0, patch_norm(cond, patch_size) / combined_norm, 1.0)
    return combined * ratio
