"""Builds Qwen-Image pipelines: detects which checkpoint is which component and assembles them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from imagezoo.errors import ImagezooError
from imagezoo.interfaces import Components, TextConditioning
from imagezoo.plugins.qwen_image.dit import QwenImageDiT, build_dit, is_dit_checkpoint
from imagezoo.plugins.qwen_image.text_encoder import build_text_encoder, is_text_encoder_checkpoint
from imagezoo.plugins.qwen_image.tokenizer import load_tokenizer
from imagezoo.plugins.qwen_image.vae import build_vae, is_vae_checkpoint
from imagezoo.state_dict import compare_shapes
from imagezoo.weights import find_config_json, load_safetensors

logger = logging.getLogger(__name__)

FAMILY_NAME = "qwen_image"
COMPONENT_NAMES = ("dit", "text_encoder", "vae", "tokenizer")


class QwenDenoiser:
    """Adapts the DiT module to the kernel's `Denoiser` protocol (spatial latents + `TextConditioning`)."""

    def __init__(self, dit: QwenImageDiT) -> None:
        self.dit = dit
        self.patch_size = dit.patch_size

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        extras = text.extras or {}
        # The mask goes in as is, all-true or not: the DiT reads it on the host once per mask tensor, not per step.
        return self.dit(
            latents,
            sigma,
            text.embeds.to(latents.dtype),
            text.mask,
            text_positions=extras.get("text_positions"),
            attention_mask=extras.get("attention_mask"),
        )

    def sampling(self, sigmas: Sequence[float]) -> AbstractContextManager[None]:
        """The DiT's per-loop preparation for these step sigmas (`QwenImageDiT.sampling`)."""
        return self.dit.sampling(sigmas)

    def enable_sequence_parallel(self, sequence: Any) -> Any:
        """Split each DiT forward's image tokens over `sequence` (an `imagezoo.parallel.SequenceGroup`; Ulysses,
        see `parallel.py`); returns the undo function. Used by `imagezoo.parallel.ParallelPipeline`."""
        from imagezoo.plugins.qwen_image.parallel import enable_sequence_parallel

        return enable_sequence_parallel(self.dit, sequence)


class QwenImageFamily:
    """The `qwen_image` model family: MMDiT + Qwen2.5-VL text encoder + causal 3D-conv VAE."""

    component_names = COMPONENT_NAMES
    default_model_id = "Qwen/Qwen-Image"

    def detect_component(self, keys: Sequence[str]) -> str | None:
        """Which component a checkpoint is, from its tensor names."""
        for name, check in (
            ("dit", is_dit_checkpoint),
            ("vae", is_vae_checkpoint),
            ("text_encoder", is_text_encoder_checkpoint),
        ):
            if check(keys):
                return name
        return None

    def build(self, files: dict[str, list[Any]], *, dtype: torch.dtype, device: torch.device | str) -> Components:
        """Load every component's weights onto `device` in `dtype`, one component at a time."""
        tokenizer = load_tokenizer(Path(files["tokenizer"][0]))
        dit = build_dit(load_safetensors(files["dit"]), find_config_json(files["dit"]), dtype=dtype, device=device)
        text_encoder = build_text_encoder(
            load_safetensors(files["text_encoder"]),
            find_config_json(files["text_encoder"]),
            tokenizer,
            dtype=dtype,
            device=device,
        )
        vae = build_vae(load_safetensors(files["vae"]), find_config_json(files["vae"]), dtype=dtype, device=device)
        modules = {"dit": dit, "text_encoder": text_encoder.model, "vae": vae}
        for module in modules.values():
            module.eval().requires_grad_(False)
        return Components(text_encoder=text_encoder, denoiser=QwenDenoiser(dit), vae=vae, modules=modules)

    def describe_checkpoint(
        self, component: str, shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Key format, inferred architecture and key differences of a checkpoint, from its header shapes only."""
        report: dict[str, Any] = {"format": _key_format(component, shapes)}
        try:
            module, renamed, params = _expected_module(component, shapes, config)
        except ImagezooError as exc:
            return {**report, "matches_architecture": False, "architecture_error": str(exc)}
        expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        missing, unexpected, mismatched = compare_shapes(expected, renamed)
        report.update(
            architecture=f"{type(params).__name__}({', '.join(f'{k}={v}' for k, v in vars(params).items())})",
            matches_architecture=not (missing or unexpected or mismatched),
            missing_keys=missing,
            unexpected_keys=unexpected,
            shape_mismatches=mismatched,
        )
        return report


def _key_format(component: str, shapes: dict[str, tuple[int, ...]]) -> str:
    if component != "text_encoder":
        return "diffusers"
    if any(name.startswith("model.language_model.") for name in shapes):
        return "transformers (newer layout: model.language_model.*)"
    return "transformers (published layout: model.layers.*)"


def _meta_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def _expected_module(component: str, shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None) -> Any:
    """The component built on the meta device with the sizes the checkpoint implies, and the renamed shapes."""
    from imagezoo.plugins.qwen_image.dit import DiTParams
    from imagezoo.plugins.qwen_image.text_encoder import TextEncoderParams, normalize_text_encoder_keys
    from imagezoo.plugins.qwen_image.vae import QwenImageVAE, VAEParams

    if component == "text_encoder":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        renamed = {k: tuple(v.shape) for k, v in normalize_text_encoder_keys(_meta_tensors(shapes)).items()}
        params = TextEncoderParams.from_config(config) if config else TextEncoderParams.from_shapes(renamed)
        with torch.device("meta"):
            return Qwen2_5_VLTextModel(params.text_config()), renamed, params
    params_class, module_class = {"dit": (DiTParams, QwenImageDiT), "vae": (VAEParams, QwenImageVAE)}[component]
    params = params_class.from_config(config) if config else params_class.from_shapes(shapes)
    with torch.device("meta"):
        return module_class(params), dict(shapes), params
