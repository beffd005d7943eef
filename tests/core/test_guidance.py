"""CFG combination: the rescale must equal the official per-packed-token norm computation."""

from __future__ import annotations

import torch

from imagezoo.guidance import guide


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def test_rescaled_cfg_equals_official_packed_formula():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 16, 6, 8), torch.randn(2, 16, 6, 8)
    scale = 4.0
    ours = guide(cond, uncond, scale, rescale=True, patch_size=2)
    # diffusers QwenImagePipeline: comb * ||cond|| / ||comb|| with norms over the packed channel dim
    comb = _pack(uncond) + scale * (_pack(cond) - _pack(uncond))
    expected = comb * (torch.norm(_pack(cond), dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.max(torch.abs(_pack(ours) - expected)).item() <= 1e-5  # float32 rounding of reordered sums


def test_plain_cfg_and_scale_one():
    cond, uncond = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    assert torch.allclose(guide(cond, uncond, 3.0, rescale=False), uncond + 3.0 * (cond - uncond))
    assert torch.allclose(guide(cond, uncond, 1.0, rescale=True), cond, atol=1e-6)


def test_zero_velocity_tokens_stay_finite():
    zeros = torch.zeros(1, 4, 4, 4)
    assert torch.equal(guide(zeros, zeros, 4.0, rescale=True), zeros)
