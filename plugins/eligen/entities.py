"""EliGen entity control: entity prompts and masks -> text sequence, RoPE positions and joint-attention mask.

The text sequence is `[entity_1, ..., entity_n, global]`; every segment restarts at the text RoPE start position
`max(h//2, w//2)` (h, w in patches). In the joint attention over `[text, image]`:

- entity i's text and the image tokens inside mask i see each other; the global text and every image token do;
- a text segment never sees another segment; image tokens see all image tokens;
- padded text tokens are never attended to.

A patch is inside a mask if any of its latent pixels is, after resizing the mask to the latent size (nearest) and
calling a pixel white when its mean over RGB is above mid-grey (as DiffSynth-Studio does). The negative pass stays
plain unless `eligen_enable_on_negative`, in which case, as in DiffSynth-Studio, every entity segment holds the
negative prompt (same masks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagezoo.errors import InputError
from imagezoo.interfaces import GenerationContext, TextConditioning

logger = logging.getLogger(__name__)

_WHITE_THRESHOLD = 127.5


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError(f"{name} must be a list, got {type(value).__name__}: {value!r:.80}.")
    return list(value)


def load_entity_mask(mask: Any, index: int) -> Image.Image:
    """A mask as an RGB PIL image; accepts a PIL image or the path of an image file."""
    name = f"eligen_entity_masks[{index}]"
    if isinstance(mask, (str, Path)):
        try:
            with Image.open(mask) as opened:
                return opened.convert("RGB")
        except FileNotFoundError:
            raise InputError(f"{name}: mask file {str(mask)!r} does not exist.") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{name}: {str(mask)!r} is not an image file PIL can read ({exc}).") from None
    if not isinstance(mask, Image.Image):
        raise InputError(
            f"{name} must be a PIL image (white = the entity's region) or an image file path, "
            f"got {type(mask).__name__}."
        )
    return mask.convert("RGB")


def _white(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).mean(axis=2) > _WHITE_THRESHOLD


def entity_regions(
    masks: Sequence[Any], *, height: int, width: int, spatial_factor: int, patch_size: int
) -> torch.Tensor:
    """(n_entities, patches) bool: which image tokens (row-major patches) each entity's mask covers.

    Raises:
        InputError: A mask is not an image, has no white pixel, or its region vanishes at this output size.
    """
    latent_h, latent_w = height // spatial_factor, width // spatial_factor
    h, w = latent_h // patch_size, latent_w // patch_size
    regions = []
    for index, raw in enumerate(masks):
        image = load_entity_mask(raw, index)
        if not _white(image).any():
            raise InputError(
                f"eligen_entity_masks[{index}] is empty: no pixel is white (brighter than mid-grey); white marks the "
                "entity's region."
            )
        if image.size != (latent_w, latent_h):
            image = image.resize((latent_w, latent_h), Image.Resampling.NEAREST)
        latent = torch.from_numpy(_white(image))
        region = latent.view(h, patch_size, w, patch_size).any(dim=3).any(dim=1).reshape(-1)
        if not region.any():
            raise InputError(
                f"eligen_entity_masks[{index}]: the white region is too small to cover any "
                f"{patch_size * spatial_factor}px patch at {width}x{height}; enlarge it."
            )
        regions.append(region)
    return torch.stack(regions)


def build_attention_mask(slot_lengths: Sequence[int], text_mask: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """The EliGen joint-attention mask over `[text, image]` tokens (True = may attend).

    Args:
        slot_lengths: Token count of each text segment: one per entity, then the global prompt's.
        text_mask: (B, L) bool, True on real (not padding) tokens; L = sum(slot_lengths).
        regions: (n_entities, S) bool from `entity_regions`.

    Returns:
        (B, 1, L + S, L + S) bool.
    """
    batch, length = text_mask.shape
    n_entities, n_img = regions.shape
    if len(slot_lengths) != n_entities + 1 or sum(slot_lengths) != length:
        raise InputError(
            f"EliGen mask: {len(slot_lengths)} text segments of {list(slot_lengths)} tokens don't fit "
            f"{n_entities} entities + 1 global prompt over {length} text tokens."
        )
    device = text_mask.device
    slot_of = torch.repeat_interleave(
        torch.arange(len(slot_lengths), device=device), torch.tensor(list(slot_lengths), device=device)
    )
    sees_image = torch.cat([regions.to(device), regions.new_ones(1, n_img, device=device)])[slot_of]
    mask = torch.ones(batch, length + n_img, length + n_img, dtype=torch.bool, device=device)
    mask[:, :length, :length] = slot_of[:, None] == slot_of[None, :]
    mask[:, :length, length:] = sees_image
    mask[:, length:, :length] = sees_image.T
    mask[:, :, :length] &= text_mask.to(torch.bool)[:, None, :]
    return mask[:, None]


def text_positions(slot_lengths: Sequence[int], start: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) RoPE positions: each segment counts from `start` again."""
    return torch.cat([torch.arange(n, device=device) + start for n in slot_lengths])


def _with_entities(
    text: TextConditioning,
    segments: list[torch.Tensor],
    segment_masks: list[torch.Tensor],
    regions: torch.Tensor,
    start: int,
    device: torch.device,
) -> TextConditioning:
    """Prepend entity segments (each (B, n_i, D) with its (B, n_i) mask) to a global conditioning."""
    embeds = torch.cat([*(s.to(text.embeds.dtype) for s in segments), text.embeds], dim=1)
    mask = torch.cat([*segment_masks, text.mask], dim=1)
    slots = [s.shape[1] for s in segments] + [text.embeds.shape[1]]
    extras = dict(text.extras or {})
    extras["text_positions"] = text_positions(slots, start, device)
    extras["attention_mask"] = build_attention_mask(slots, mask.to(device), regions.to(device))
    return TextConditioning(embeds, mask, extras)


def condition(
    context: GenerationContext,
    inputs: dict[str, Any],
    cond: TextConditioning,
    uncond: TextConditioning | None,
) -> tuple[TextConditioning, TextConditioning | None]:
    """Add the EliGen entity segments and attention mask to the conditionings (the `InputExtension` method).

    Raises:
        InputError: Entity prompts without masks or the other way round, different counts, non-string prompts,
            masks that are not images or are empty, or a non-bool `eligen_enable_on_negative`.
    """
    prompts = _as_list(inputs.get("eligen_entity_prompts", []), "eligen_entity_prompts")
    masks = _as_list(inputs.get("eligen_entity_masks", []), "eligen_entity_masks")
    on_negative = inputs.get("eligen_enable_on_negative", False)
    if not isinstance(on_negative, bool):
        raise InputError(f"eligen_enable_on_negative must be True or False, got {on_negative!r}.")
    if len(prompts) != len(masks):
        raise InputError(
            f"eligen_entity_prompts has {len(prompts)} entries but eligen_entity_masks has {len(masks)}; "
            "give one mask per entity prompt."
        )
    if not prompts:
        return cond, uncond
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InputError(f"eligen_entity_prompts must be strings; entries {bad} are not (got {prompts!r:.120}).")

    pipeline = context.pipeline
    spatial, patch = pipeline.vae.spatial_factor, pipeline.denoiser.patch_size
    regions = entity_regions(
        masks, height=context.height, width=context.width, spatial_factor=spatial, patch_size=patch
    )
    if not getattr(pipeline, "loras", None):
        logger.warning(
            "EliGen entity inputs were given but no LoRA is loaded: entity control needs the EliGen LoRA "
            "(load the model 'DiffSynth-Studio/Qwen-Image-EliGen' or call pipe.load_lora(<EliGen model.safetensors>))."
        )

    encoded = pipeline.text_encoder.encode(prompts, context.max_sequence_length)
    device = pipeline.device
    h, w = context.height // (spatial * patch), context.width // (spatial * patch)
    start = max(h // 2, w // 2)
    batch = cond.embeds.shape[0]
    segments, segment_masks = [], []
    for index in range(len(prompts)):
        length = int(encoded.mask[index].sum())
        segment = encoded.embeds[index : index + 1, :length].to(cond.embeds.device)
        segments.append(segment.expand(batch, -1, -1))
        segment_masks.append(torch.ones(batch, length, dtype=torch.bool, device=cond.mask.device))
    cond = _with_entities(cond, segments, segment_masks, regions, start, device)
    if uncond is not None and on_negative:
        # DiffSynth's negative EliGen pass: the negative prompt in every entity slot, with the entities' masks.
        count = len(prompts)
        uncond = _with_entities(uncond, [uncond.embeds] * count, [uncond.mask] * count, regions, start, device)
    return cond, uncond
