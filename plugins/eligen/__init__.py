"""Built-in plugin for EliGen (entity-level control) on Qwen-Image.

Registers the EliGen models (the base Qwen-Image files plus one LoRA file each, loaded onto the DiT by the pipeline)
and an input extension for `eligen_entity_prompts`, `eligen_entity_masks` and `eligen_enable_on_negative`.
Stays cheap to import: torch and PIL load only when a generation uses entity inputs. See docs/eligen.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from imagezoo.hookspecs import hookimpl

_BASE = "Qwen/Qwen-Image"
_BASE_COMPONENTS = {
    "dit": {"model_id": _BASE, "pattern": "transformer/diffusion_pytorch_model*.safetensors"},
    "text_encoder": {"model_id": _BASE, "pattern": "text_encoder/model*.safetensors"},
    "vae": {"model_id": _BASE, "pattern": "vae/diffusion_pytorch_model.safetensors"},
    "tokenizer": {"model_id": _BASE, "pattern": "tokenizer/"},
}
# DiffSynth-Studio trained and published these LoRAs with its own sampler spacing and plain CFG; its examples run
# 30 steps (40 for the poster model at 1280x784) with cfg 4.
_DIFFSYNTH_DEFAULTS = {
    "num_inference_steps": 30,
    "cfg_scale": 4.0,
    "height": 1328,
    "width": 1328,
    "sampler": "flow_match_euler_diffsynth",
    "cfg_rescale": False,
}
ELIGEN_ENTRIES = [
    {
        "id": "DiffSynth-Studio/Qwen-Image-EliGen",
        "aliases": ["qwen-image-eligen", "eligen"],
        "family": "qwen_image",
        "description": "Qwen-Image with the EliGen entity-control LoRA (entity prompts + masks).",
        "components": _BASE_COMPONENTS,
        "adapters": [{"pattern": "model.safetensors"}],
        "defaults": {**_DIFFSYNTH_DEFAULTS, "height": 1024, "width": 1024},
    },
    {
        "id": "DiffSynth-Studio/Qwen-Image-EliGen-V2",
        "aliases": ["qwen-image-eligen-v2", "eligen-v2"],
        "family": "qwen_image",
        "description": "Qwen-Image with the EliGen V2 entity-control LoRA (entity prompts + masks).",
        "components": _BASE_COMPONENTS,
        "adapters": [{"pattern": "model.safetensors"}],
        "defaults": _DIFFSYNTH_DEFAULTS,
    },
    {
        "id": "DiffSynth-Studio/Qwen-Image-EliGen-Poster",
        "aliases": ["qwen-image-eligen-poster", "eligen-poster"],
        "family": "qwen_image",
        "description": "Qwen-Image with the EliGen poster-layout LoRA (entity prompts + masks, e-commerce posters).",
        "components": _BASE_COMPONENTS,
        "adapters": [{"pattern": "model.safetensors"}],
        "defaults": {**_DIFFSYNTH_DEFAULTS, "num_inference_steps": 40, "height": 784, "width": 1280},
    },
]

INPUTS = ("eligen_entity_prompts", "eligen_entity_masks", "eligen_enable_on_negative")
ALIASES = {
    "entity_prompts": "eligen_entity_prompts",
    "entity_masks": "eligen_entity_masks",
    "entity_enable_on_negative": "eligen_enable_on_negative",
}


class EliGenInputs:
    """The `InputExtension` for EliGen's pipeline inputs; the work is in `imagezoo.plugins.eligen.entities`."""

    inputs = INPUTS
    families = ("qwen_image",)
    aliases = ALIASES

    def condition(self, context: Any, inputs: dict[str, Any], cond: Any, uncond: Any) -> tuple[Any, Any]:
        """See `imagezoo.plugins.eligen.entities.condition`."""
        from imagezoo.plugins.eligen.entities import condition

        return condition(context, inputs, cond, uncond)


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    """EliGen, EliGen-V2 and EliGen-Poster: Qwen-Image plus an entity-control LoRA."""
    for entry in ELIGEN_ENTRIES:
        register(entry)


@hookimpl
def register_inputs(register: Callable[[str, Any], None]) -> None:
    """Entity prompts and masks for Qwen-Image pipelines."""
    register("eligen", EliGenInputs())
