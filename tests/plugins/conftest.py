"""Fixtures shared by the plugin tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from imagezoo.plugins.qwen_image.dit import DiTParams, QwenImageDiT


def _seeded_dit(params: DiTParams) -> QwenImageDiT:
    """A small DiT with seeded weights of a useful scale (norm weights near 1, the rest near 0)."""
    torch.manual_seed(0)
    module = QwenImageDiT(params).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm = "norm" in name
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if norm else 0.1) + (1.0 if norm else 0.0))
    return module


@pytest.fixture(scope="session")
def seeded_dit() -> Callable[[DiTParams], QwenImageDiT]:
    """`seeded_dit(params)`: a fresh small DiT with seeded weights."""
    return _seeded_dit
