"""Built-in plugin for the Qwen-Image family (and the embedded tiny test model).

Stays cheap to import: model code (torch, transformers) loads only when a pipeline is built.
`from imagezoo.plugins.qwen_image import QwenImagePipeline, ModelConfig` mirrors the seed's import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagezoo.config import ModelConfig
from imagezoo.hookspecs import hookimpl

TINY_MODEL_ID = "imagezoo/tiny-qwen-image"
TINY_ENTRY = {
    "id": TINY_MODEL_ID,
    "aliases": ["tiny", "tiny-qwen-image"],
    "family": "qwen_image",
    "description": "Tiny random-weight Qwen-Image in the official layout, generated locally on first use (offline).",
    "components": {
        "dit": {"pattern": "transformer/diffusion_pytorch_model*.safetensors"},
        "text_encoder": {"pattern": "text_encoder/model*.safetensors"},
        "vae": {"pattern": "vae/diffusion_pytorch_model.safetensors"},
        "tokenizer": {"pattern": "tokenizer/"},
    },
    "defaults": {"num_inference_steps": 8, "cfg_scale": 4.0, "height": 128, "width": 128},
}

__all__ = ["TINY_MODEL_ID", "ModelConfig", "QwenImagePipeline"]


class _LazyFamily:
    """Registered family object; the real builder (and torch) is imported on first use of any method."""

    component_names = ("dit", "text_encoder", "vae", "tokenizer")
    default_model_id = "Qwen/Qwen-Image"

    def __getattr__(self, name: str) -> Any:
        from imagezoo.plugins.qwen_image.family import QwenImageFamily

        return getattr(QwenImageFamily(), name)

    def training_adapter(self, components: Any) -> Any:
        """How the family-agnostic trainer trains this family (an `imagezoo.training.TrainingAdapter`)."""
        from imagezoo.plugins.qwen_image.training import QwenTrainingAdapter

        return QwenTrainingAdapter(components)


@hookimpl
def register_components(register: Callable[[str, Any], None]) -> None:
    """The qwen_image family builder."""
    register("qwen_image", _LazyFamily())


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    """The embedded tiny model (the official entries live in registry.yaml)."""
    register(TINY_ENTRY)


@hookimpl
def resolve_weights(config: ModelConfig) -> list[Path] | None:
    """Generate the tiny model's checkpoint on first use; pass on every other model ID."""
    if (config.model_id or "").lower() != TINY_MODEL_ID:
        return None
    from imagezoo.plugins.qwen_image.tiny import ensure_tiny_checkpoint
    from imagezoo.weights import find_complete_local_files

    ensure_tiny_checkpoint(Path(config.local_model_path) / TINY_MODEL_ID)
    return find_complete_local_files(config)


def __getattr__(name: str) -> Any:
    if name == "QwenImagePipeline":
        from imagezoo.plugins.qwen_image.pipeline import QwenImagePipeline

        return QwenImagePipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
