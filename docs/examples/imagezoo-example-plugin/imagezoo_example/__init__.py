"""An example imagezoo plugin.

It registers:
- a sampler, `example_linear`: flow-matching Euler on plain linear sigmas (no resolution shift);
- a memory strategy, `example_channels_last`: keeps the VAE in channels-last layout (removable);
- a model entry, `example/tiny-linear`: the embedded tiny Qwen-Image, with this sampler and 4 steps by default.

Keep this module cheap to import: heavy imports (torch) happen inside the factories.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import imagezoo


class LinearEuler:
    """Euler on sigmas `linspace(1, 0, N + 1)`; image-to-image starts at `strength`."""

    def sigmas(self, num_steps: int, image_seq_len: int, strength: float = 1.0) -> Any:
        import torch

        if num_steps < 1:
            raise imagezoo.InputError(f"num_inference_steps={num_steps!r} must be at least 1.")
        return torch.linspace(strength, 0.0, num_steps + 1, dtype=torch.float32)

    def step(self, latents: Any, velocity: Any, sigma: float, sigma_next: float) -> Any:
        return latents.float() + (sigma_next - sigma) * velocity.float()


class ChannelsLastVAE:
    """Converts the VAE's 4-D conv weights to channels-last memory format, and back on removal."""

    name = "example_channels_last"

    def __init__(self, **options: Any) -> None:
        self._formats: dict[str, Any] = {}

    def apply(self, pipeline: Any) -> None:
        import torch

        for name, param in pipeline.components.modules["vae"].named_parameters():
            if param.dim() == 4:
                self._formats[name] = param.data
                param.data = param.data.contiguous(memory_format=torch.channels_last)

    def remove(self, pipeline: Any) -> None:
        params = dict(pipeline.components.modules["vae"].named_parameters())
        for name, original in self._formats.items():
            params[name].data = original
        self._formats.clear()


@imagezoo.hookimpl
def register_samplers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("example_linear", lambda **options: LinearEuler())


@imagezoo.hookimpl
def register_memory_strategies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register("example_channels_last", ChannelsLastVAE)


@imagezoo.hookimpl
def register_models(register: Callable[..., None]) -> None:
    tiny = "imagezoo/tiny-qwen-image"
    register(
        {
            "id": "example/tiny-linear",
            "aliases": ["tiny-linear"],
            "family": "qwen_image",
            "description": "The embedded tiny model with the example plugin's linear sampler.",
            "components": {
                "dit": {"model_id": tiny, "pattern": "transformer/diffusion_pytorch_model*.safetensors"},
                "text_encoder": {"model_id": tiny, "pattern": "text_encoder/model*.safetensors"},
                "vae": {"model_id": tiny, "pattern": "vae/diffusion_pytorch_model.safetensors"},
                "tokenizer": {"model_id": tiny, "pattern": "tokenizer/"},
            },
            "defaults": {
                "num_inference_steps": 4,
                "cfg_scale": 1.0,
                "height": 64,
                "width": 64,
                "sampler": "example_linear",
            },
        }
    )
