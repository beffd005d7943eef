"""Shared fixtures: the tiny random-weight Qwen-Image checkpoint, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagezoo.plugins.qwen_image import TINY_MODEL_ID
from imagezoo.plugins.qwen_image.tiny import ensure_tiny_checkpoint


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the tiny checkpoint in the official layout (`<dir>/imagezoo/tiny-qwen-image/...`)."""
    root = tmp_path_factory.mktemp("models")
    ensure_tiny_checkpoint(root / TINY_MODEL_ID)
    return root


@pytest.fixture(scope="session")
def tiny_root(models_dir: Path) -> Path:
    """The tiny checkpoint's repo folder."""
    return models_dir / TINY_MODEL_ID


@pytest.fixture(scope="session")
def tiny_pipe(models_dir: Path):
    """The tiny model loaded in float32 on CPU through the registry (shared: tests must not mutate it)."""
    import imagezoo

    return imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
