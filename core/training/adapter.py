"""What a model family provides so the family-agnostic trainer can train it: the `TrainingAdapter` protocol.

The trainer knows flow matching, data, optimizers and accelerate; it never knows a family's module layout. A family
exposes `training_adapter(components)` on its registered family object, returning an object with this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from imagezoo.errors import ConfigError
from imagezoo.interfaces import Components, TextConditioning


@runtime_checkable
class TrainingAdapter(Protocol):
    """How to encode, denoise and checkpoint one model family during training.

    Attributes:
        denoiser_name: Name (in `Components.modules`) of the module the diffusion loss trains through, e.g. "dit".
        default_lora_targets: LoRA targets used when none are given.
        block_class_names: Class names of the denoiser's repeated blocks (FSDP wraps each one separately).
    """

    denoiser_name: str
    default_lora_targets: tuple[str, ...]
    block_class_names: tuple[str, ...]

    def text_inputs(
        self,
        text_encoder: nn.Module | None,
        prompts: Sequence[str],
        *,
        size: tuple[int, int],
        max_length: int,
        grad: bool,
    ) -> TextConditioning:
        """Encode a batch of prompts for the denoiser (extra inputs such as EliGen entities are added afterwards by
        the pipeline's input extensions, as in generation).

        Args:
            text_encoder: The text encoder module to run (possibly wrapped for training), or None to use the
                components' own.
            prompts: One prompt per sample.
            size: (width, height) of the batch's images.
            max_length: Token cap per prompt.
            grad: Whether gradients must flow into the text encoder (it is being trained).
        """
        ...

    def encode_images(self, vae: nn.Module | None, images: torch.Tensor, *, grad: bool) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> float32 latents; `vae` as in `text_inputs`."""
        ...

    def predict(
        self, denoiser: nn.Module, latents: torch.Tensor, sigma: torch.Tensor, text: TextConditioning
    ) -> torch.Tensor:
        """The velocity for noisy latents at per-sample `sigma` (B,), calling `denoiser` (maybe wrapped)."""
        ...

    def unused_parameters(self, name: str, module: nn.Module) -> list[str]:
        """Parameter names of component `name` that never receive a gradient (frozen so DDP needs no search)."""
        ...

    def blocks(self, name: str, module: nn.Module) -> Sequence[nn.Module]:
        """The repeated blocks of component `name` (for streaming frozen weights); empty if it has none."""
        ...

    def set_gradient_checkpointing(self, name: str, module: nn.Module, *, enabled: bool, offload: bool) -> None:
        """Turn activation recomputation (and CPU offload of the saved activations) on or off for a component."""
        ...

    def configure_speed(self, name: str, module: nn.Module, *, attention: str | None, compile: bool | None) -> None:
        """Exact speed settings for training a component: an attention kernel name (None: the family's default) and
        regional `torch.compile` (None: the family decides for the device)."""
        ...


def training_adapter_for(family: Any, components: Components, family_name: str) -> TrainingAdapter:
    """The family's training adapter.

    Raises:
        ConfigError: The family does not support training.
    """
    make = getattr(family, "training_adapter", None)
    if make is None:
        raise ConfigError(
            f"Model family {family_name!r} does not support training: its family object has no training_adapter()."
        )
    adapter = make(components)
    if not isinstance(adapter, TrainingAdapter):
        raise ConfigError(f"Model family {family_name!r} returned a training adapter without the required methods.")
    return adapter
