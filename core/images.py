"""Conversions between PIL images, arrays and the [-1, 1] tensors VAEs use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagezoo.errors import InputError


def pil_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image resized to `width`×`height` as a (1, 3, H, W) float32 tensor in [-1, 1]."""
    if not isinstance(image, Image.Image):
        raise InputError(f"input_image must be a PIL.Image.Image, got {type(image).__name__}.")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] to (B, H, W, 3) uint8, rounding to nearest."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] to PIL RGB images."""
    return [Image.fromarray(array) for array in tensor_to_uint8(images)]


def tensor_to_float_array(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] to (B, H, W, 3) float32 in [0, 1] (diffusers' "np" output)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def numbered_paths(out: Path, count: int) -> list[Path]:
    """`out` for one image; `name-0.png`, `name-1.png`, ... beside it for several."""
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
