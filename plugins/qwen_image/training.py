"""Qwen-Image's `TrainingAdapter`: how the family-agnostic trainer encodes, denoises and freezes this family."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from imagezoo.interfaces import Components, TextConditioning
from imagezoo.plugins.qwen_image.dit import QwenImageDiT

LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_out.0",
    "to_add_out",
    "img_mlp.net.2",
    "img_mod.1",
    "txt_mlp.net.2",
    "txt_mod.1",
)
# The DiT's last block skips its text branch (its text output feeds nothing): these never get a gradient.
_LAST_BLOCK_UNUSED = ("attn.add_q_proj.", "attn.norm_added_q.", "attn.to_add_out.", "txt_mlp.")


class _GradEnabled(nn.Module):
    """Runs the wrapped text model with autograd on, even inside the encoder's `torch.no_grad()` block.

    `QwenTextEncoder.encode` runs its model under `no_grad` (inference never needs gradients); to train the text
    encoder, this wrapper re-enables them for the model call only, and the encoder's padding/trimming after it is
    differentiable, so the tokenization and template logic are reused instead of copied.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs: Any) -> Any:
        with torch.enable_grad():
            return self.inner(**kwargs)


class QwenTrainingAdapter:
    """Trains Qwen-Image components: text via the Qwen2.5-VL encoder, latents via the VAE, velocity via the DiT."""

    denoiser_name = "dit"
    default_lora_targets = LORA_TARGETS
    block_class_names = ("QwenImageBlock",)

    def __init__(self, components: Components) -> None:
        self.components = components

    def text_inputs(
        self,
        text_encoder: nn.Module | None,
        prompts: Sequence[str],
        *,
        size: tuple[int, int],
        max_length: int,
        grad: bool,
    ) -> TextConditioning:
        """Encode prompts with the official template; see `TrainingAdapter.text_inputs`."""
        encoder = self.components.text_encoder
        if grad or (text_encoder is not None and text_encoder is not getattr(encoder, "model", None)):
            encoder = copy.copy(encoder)
            model = text_encoder if text_encoder is not None else self.components.text_encoder.model
            encoder.model = _GradEnabled(model) if grad else model
        return encoder.encode(list(prompts), max_length)

    def encode_images(self, vae: nn.Module | None, images: torch.Tensor, *, grad: bool) -> torch.Tensor:
        """Normalized VAE latents (posterior mean) in float32."""
        module = vae if vae is not None else self.components.vae
        images = images.to(next(module.parameters()).device)
        with torch.set_grad_enabled(grad):
            return module.encode(images).float()

    def predict(
        self, denoiser: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        """Call the DiT (maybe wrapped by DDP/FSDP) on spatial latents and per-sample sigma."""
        extras = text.extras or {}
        mask = None if bool(text.mask.all()) else text.mask
        return denoiser(
            latents,
            sigma,
            text.embeds,
            mask,
            text_positions=extras.get("text_positions"),
            attention_mask=extras.get("attention_mask"),
        )

    def unused_parameters(self, name: str, module: nn.Module) -> list[str]:
        """The last DiT block's text-branch parameters, and the VAE's decoder and temporal downsampling convs (an image
        is one frame): no gradient ever reaches them."""
        if name == "vae":
            # Training encodes images only; the decoder is used for validation images, never in the loss.
            return [
                n
                for n, _ in module.named_parameters()
                if n.startswith(("decoder.", "post_quant_conv.")) or ".time_conv." in n
            ]
        if name != "dit" or not isinstance(module, QwenImageDiT):
            return []
        prefix = f"transformer_blocks.{len(module.transformer_blocks) - 1}."
        return [
            param_name
            for param_name, _ in module.named_parameters()
            if param_name.startswith(prefix) and param_name[len(prefix) :].startswith(_LAST_BLOCK_UNUSED)
        ]

    def blocks(self, name: str, module: nn.Module) -> Sequence[nn.Module]:
        """The DiT's transformer blocks."""
        if name == "dit" and isinstance(module, QwenImageDiT):
            return list(module.transformer_blocks)
        return []

    def set_gradient_checkpointing(self, name: str, module: nn.Module, *, enabled: bool, offload: bool) -> None:
        """DiT: per-block recomputation; text encoder: transformers' own checkpointing; VAE: none (small)."""
        if name == "dit" and isinstance(module, QwenImageDiT):
            if enabled:
                module.enable_gradient_checkpointing(offload_to_cpu=offload)
            else:
                module.disable_gradient_checkpointing()
        elif name == "text_encoder" and enabled and hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def configure_speed(self, name: str, module: nn.Module, *, attention: str | None, compile: bool | None) -> None:
        """DiT only: its attention kernel (every choice computes the same function) and compiled blocks.

        `compile=None` compiles on CUDA GPUs with Triton: inductor fuses the elementwise work between the matmuls
        (modulation, q/k norm + RoPE, GELU, gated residuals) in forward and backward, measured 1.46x faster per
        LoRA step at 1024² on an H100 (docs/benchmarks.md), for about 100 s of compiling in the first step. Call
        after LoRA injection: compiled blocks trace the LoRA hooks into their graphs.
        """
        if name != "dit" or not isinstance(module, QwenImageDiT):
            return
        from imagezoo.plugins.qwen_image.speed import compile_available, compile_blocks

        if attention is not None:
            module.set_attention_backend(attention)
        device = next(module.parameters()).device
        if compile is None:
            compile = device.type == "cuda" and compile_available(device)
        if compile:
            compile_blocks(module)
