"""Fixtures for the training tests: small image datasets and fresh tiny pipelines (training mutates its models)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (200, 40, 200), (30, 210, 210)]
PROMPTS = ["a red wave", "a green striped pattern on a hill", "blue", "a yellow sun over a very long sea of waves"]


def write_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), suffix: str = ".png") -> list[str]:
    """Smooth colored patterns (distinct per index); returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    names = []
    for i in range(count):
        color = COLORS[i % len(COLORS)]
        wave = 0.5 + 0.5 * np.sin((x + y * (i + 1)) / 8.0)
        array = np.stack([c * wave for c in color], axis=-1).clip(0, 255).astype("uint8")
        name = f"img{i}{suffix}"
        Image.fromarray(array).save(folder / name)
        names.append(name)
    return names


@pytest.fixture
def images() -> Callable[..., list[str]]:
    """`write_images(folder, count, size=(64, 64), suffix=".png")` as a fixture (test modules can't import conftest)."""
    return write_images


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """`make_dataset(count=4, size=(64, 64))` -> a folder with images and metadata.csv (image,prompt)."""

    def make(count: int = 4, size: tuple[int, int] = (64, 64), name: str = "data") -> Path:
        folder = tmp_path / name
        names = write_images(folder, count, size)
        lines = ["image,prompt"] + [f'{n},"{PROMPTS[i % len(PROMPTS)]}"' for i, n in enumerate(names)]
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
        return folder

    return make


@pytest.fixture
def fresh_tiny(models_dir: Path) -> Callable[[], object]:
    """A new tiny pipeline (float32, CPU) per call: training changes its modules, so never share one."""
    import imagezoo

    def load():
        return imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)

    return load


def with_dit(base, dit):
    """`base` (a tiny pipeline) with `dit` as its denoiser: same text encoder and VAE, float32 on the CPU."""
    from imagezoo.interfaces import Components
    from imagezoo.pipeline import Pipeline
    from imagezoo.plugins.qwen_image.family import QwenDenoiser

    parts = base.components
    components = Components(
        text_encoder=parts.text_encoder,
        denoiser=QwenDenoiser(dit),
        vae=parts.vae,
        modules={**parts.modules, "dit": dit},
    )
    return Pipeline(
        components, defaults=base.defaults, device="cpu", dtype=torch.float32, entry=base.entry, kernel=base.kernel
    )


@pytest.fixture(scope="session")
def tiny_with_dit() -> Callable[[object, torch.nn.Module], object]:
    """`tiny_with_dit(base, dit)`: see `with_dit`."""
    return with_dit


@pytest.fixture
def wide_tiny(fresh_tiny: Callable[[], object]) -> Callable[[int], object]:
    """The tiny pipeline with a 128-wide DiT (same text encoder and VAE), seeded.

    The embedded tiny DiT is 32 wide, narrower than its 64-channel patch tokens, so its output spans only half of
    the velocity's space and no training drives the loss far below half; a 128-wide one can overfit.
    """
    from imagezoo.plugins.qwen_image.dit import DiTParams, QwenImageDiT

    def load(seed: int = 0):
        base = fresh_tiny()
        torch.manual_seed(seed)
        params = DiTParams(num_layers=2, num_heads=2, head_dim=64, text_dim=32, axes_dims=(16, 24, 24))
        return with_dit(base, QwenImageDiT(params).eval().requires_grad_(False))

    return load


@pytest.fixture
def train_config() -> Callable[..., object]:
    """`train_config(data, out, **settings)`: a training config for the tiny model at 64x64 without progress bars."""
    from imagezoo.training import make_config

    def make(data: Path, out: Path, **settings: object) -> object:
        base = {
            "model": "tiny",
            "dataset_base_path": str(data),
            "height": 64,
            "width": 64,
            "output_path": str(out),
            "progress": False,
        }
        return make_config({**base, **settings})

    return make
