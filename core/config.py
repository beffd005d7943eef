"""User-facing configuration objects: where a component's weights come from, and how to run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagezoo.errors import InputError

if TYPE_CHECKING:  # torch is heavy; the plugin manager and CLI listing must stay quick to import
    import torch

MODELS_DIR_ENV = "IMAGEZOO_MODELS_DIR"
DEFAULT_MODELS_DIR = "./models"


def default_models_dir() -> str:
    """The download/cache folder: `$IMAGEZOO_MODELS_DIR`, else `./models` (the seed's default)."""
    return os.environ.get(MODELS_DIR_ENV, DEFAULT_MODELS_DIR)


@dataclass
class ModelConfig:
    """Where one component's weights come from (the seed's `ModelConfig`).

    Give either `path` (one file, a list of shard files, or a folder) or `model_id` with `origin_file_pattern`
    (a glob inside the model repo, e.g. `"transformer/diffusion_pytorch_model*.safetensors"`, or a folder
    like `"tokenizer/"`).

    Args:
        path: Local file, list of shard files, or folder.
        model_id: Model repo ID, e.g. `"Qwen/Qwen-Image"`.
        origin_file_pattern: Glob of the files to use inside the repo.
        local_model_path: Folder downloads go to (`<local_model_path>/<model_id>/...`); default
            `$IMAGEZOO_MODELS_DIR` or `./models`.
        skip_download: Use files already in `local_model_path` only; never touch the network.
        offload_device: Device the weights are stored on between uses (e.g. `"cpu"`), see memory strategies.
        offload_dtype: Storage dtype for the weights between uses (e.g. `torch.float8_e4m3fn`).
        source: Download source: `"modelscope"` (default) or `"huggingface"`.
    """

    path: str | Path | list[str | Path] | None = None
    model_id: str | None = None
    origin_file_pattern: str | None = None
    local_model_path: str | Path | None = None
    skip_download: bool = False
    offload_device: str | torch.device | None = None
    offload_dtype: torch.dtype | None = None
    source: str = "modelscope"

    def __post_init__(self) -> None:
        if self.path is None and self.model_id is None:
            raise InputError(
                "ModelConfig needs either path=... or model_id=... (with origin_file_pattern); got neither."
            )
        if self.path is not None and self.model_id is not None:
            raise InputError(
                f"ModelConfig got both path={self.path!r} and model_id={self.model_id!r}; give only one of them."
            )
        if self.source not in ("modelscope", "huggingface"):
            raise InputError(f"ModelConfig.source={self.source!r} is not allowed; use 'modelscope' or 'huggingface'.")
        if self.local_model_path is None:
            self.local_model_path = default_models_dir()

    def describe(self) -> str:
        """A short human-readable description for messages."""
        if self.path is not None:
            return f"path={self.path!r}"
        return f"model_id={self.model_id!r}, origin_file_pattern={self.origin_file_pattern!r}"
