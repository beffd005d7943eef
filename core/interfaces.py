"""The contracts between the kernel and plugins, as `typing.Protocol`s.

Latents are always spatial tensors `(B, C, H/f, W/f)` in float32 between steps; components cast internally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class TextConditioning:
    """Encoded prompts: `embeds` (B, L, D) and `mask` (B, L) bool, True on real tokens.

    `extras` carries family-specific conditioning (e.g. EliGen entity segments) untouched by the kernel.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    extras: dict[str, Any] | None = None

    def select(self, index: int) -> TextConditioning:
        """Return the conditioning of one batch item, trimmed to its own length."""
        length = int(self.mask[index].sum())
        return TextConditioning(
            self.embeds[index : index + 1, :length], self.mask[index : index + 1, :length], self.extras
        )


@runtime_checkable
class TextEncoder(Protocol):
    """Turns prompts into conditioning for the denoiser."""

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> TextConditioning:
        """Encode a batch of prompts; padded positions are False in the mask."""
        ...


@runtime_checkable
class Denoiser(Protocol):
    """Predicts the flow-matching velocity for spatial latents at noise level sigma."""

    patch_size: int

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        """Return the velocity, same shape as `latents`."""
        ...

    # Optional: `sampling(sigmas: Sequence[float]) -> ContextManager`. When a denoiser has it, `Pipeline` runs its
    # denoising loop inside `denoiser.sampling(sigmas)` (the sigma of each step, in order), promising that the model
    # does not change until the loop ends, so the denoiser may prepare per-loop work (Qwen-Image: modulation tables,
    # CUDA graphs). Such a denoiser gets each step's sigma as a CPU tensor, and places it itself: reading a GPU value
    # on the host would wait for every queued kernel.


@runtime_checkable
class VAE(Protocol):
    """Maps images in [-1, 1] (B, 3, H, W) to normalized latents and back."""

    latent_channels: int
    spatial_factor: int

    def encode(
        self, images: torch.Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> torch.Tensor:
        """Return normalized latents (B, C, H/f, W/f)."""
        ...

    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> torch.Tensor:
        """Return images in [-1, 1] (B, 3, H, W)."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """A noise schedule plus an update rule."""

    def sigmas(self, num_steps: int, image_seq_len: int, strength: float = 1.0) -> torch.Tensor:
        """Return the float32 sigmas to run, high to low, the last one 0 (`num_steps + 1` of them at strength 1)."""
        ...

    def step(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """Advance `latents` from `sigma` to `sigma_next` (float32)."""
        ...


@runtime_checkable
class MemoryStrategy(Protocol):
    """A removable transformation of where and how a pipeline's weights live."""

    name: str

    def apply(self, pipeline: Any) -> None:
        """Install hooks / move weights; must be undoable by `remove`."""
        ...

    def remove(self, pipeline: Any) -> None:
        """Restore the pipeline to how it was before `apply`."""
        ...


ProgressBar = Callable[[Any], Any]


@dataclass
class Components:
    """What a model family builds: the three parts the kernel's loop needs, plus the raw modules by name.

    `modules` maps component names ("dit", "text_encoder", "vae") to their `torch.nn.Module`s, for memory
    strategies, LoRA and training. `offload` holds each component's `(offload_device, offload_dtype)` request.
    """

    text_encoder: TextEncoder
    denoiser: Denoiser
    vae: VAE
    modules: dict[str, torch.nn.Module]
    offload: dict[str, tuple[Any, Any]] | None = None


@runtime_checkable
class ModelFamily(Protocol):
    """Builds a pipeline's components from checkpoint files; registered with `register_components`."""

    component_names: tuple[str, ...]
    default_model_id: str

    def detect_component(self, keys: Sequence[str]) -> str | None:
        """Which component a checkpoint with these tensor names is, or None if it is none of this family's."""
        ...

    def build(self, files: dict[str, list[Any]], *, dtype: torch.dtype, device: torch.device | str) -> Components:
        """Build every component from `files` (component name -> files; the tokenizer gets its folder)."""
        ...

    def describe_checkpoint(
        self, component: str, shapes: dict[str, tuple[int, ...]], config: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Key format, inferred architecture, and `missing_keys` / `unexpected_keys` / `shape_mismatches` lists,
        plus `matches_architecture`, for a checkpoint of `component` (headers only)."""
        ...


@dataclass(frozen=True)
class GenerationContext:
    """What an `InputExtension` knows about the generation call it conditions.

    Attributes:
        pipeline: The calling pipeline (its `text_encoder`, `denoiser`, `vae`, `device`, `dtype`, LoRAs...).
        prompts: The batch's prompts.
        negative_prompts: One negative prompt per prompt.
        height, width: Output size in pixels.
        max_sequence_length: Prompt token cap for any extra text the extension encodes.
        cfg: Whether classifier-free guidance runs (an unconditional conditioning exists).
    """

    pipeline: Any
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    height: int
    width: int
    max_sequence_length: int
    cfg: bool


@runtime_checkable
class InputExtension(Protocol):
    """Extra keyword inputs of `pipe(...)` handled by a plugin (registered with `register_inputs`).

    The pipeline's own arguments are fixed; any other keyword goes to the extension that declares it in `inputs`
    (or under a generic name in `aliases`, which front-ends such as the CLI use), among the extensions whose
    `families` include the pipeline's model family (empty: every family). A keyword no extension declares is an
    `InputError` listing the accepted ones. Inputs left as None count as not given; an extension none of whose
    inputs were given is not called.

    Attributes:
        inputs: Keyword names it handles, e.g. `("eligen_entity_prompts", ...)`.
        families: Model families it works with; empty means all.
        aliases: Generic name -> one of `inputs` (e.g. `"entity_prompts"` -> `"eligen_entity_prompts"`).
    """

    inputs: tuple[str, ...]
    families: tuple[str, ...]
    aliases: dict[str, str]

    def condition(
        self,
        context: GenerationContext,
        inputs: dict[str, Any],
        cond: TextConditioning,
        uncond: TextConditioning | None,
    ) -> tuple[TextConditioning, TextConditioning | None]:
        """Return the conditionings to sample with, given the encoded prompts and the extension's inputs.

        `inputs` holds only the given (non-None) inputs, under their names in `inputs`. Family-specific results
        go into `TextConditioning.extras`, which the family's denoiser reads. Conditionings that carry extras are
        run as separate denoiser passes under CFG rather than batched, so cond and uncond may differ in layout.
        Raise `InputError` for invalid values.
        """
        ...
