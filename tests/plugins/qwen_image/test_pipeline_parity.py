"""End-to-end parity with diffusers' QwenImagePipeline on the tiny checkpoint (same files, same noise), float32."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageTransformer2DModel,
)
from diffusers import (
    QwenImagePipeline as ReferencePipeline,
)
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from imagezoo.plugins.qwen_image.dit import pack_latents

END_TO_END_TOLERANCE = 1e-4  # final latents, 4 steps with CFG 4 (issue acceptance)
BATCH_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_root):
    """diffusers' pipeline built from the very files imagezoo loads."""
    return ReferencePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_root / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(tiny_root / "vae", torch_dtype=torch.float32),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
            tiny_root / "text_encoder", torch_dtype=torch.float32
        ),
        tokenizer=AutoTokenizer.from_pretrained(tiny_root / "tokenizer"),
        transformer=QwenImageTransformer2DModel.from_pretrained(tiny_root / "transformer", torch_dtype=torch.float32),
    )


def _noise(batch: int, size: int = 128) -> torch.Tensor:
    return torch.randn(batch, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(7))


def _both(ours_pipe, reference, prompt, negative, cfg_scale, steps, output_type):
    """Run imagezoo and diffusers on the same prompt, noise and settings; returns (ours, theirs)."""
    noise = _noise(1)
    ours = ours_pipe(
        prompt,
        negative_prompt=negative or "",
        cfg_scale=cfg_scale,
        height=128,
        width=128,
        num_inference_steps=steps,
        latents=noise,
        output_type=output_type,
        progress_bar_cmd=lambda x: x,
    )
    theirs = reference(
        prompt=prompt,
        negative_prompt=negative,
        true_cfg_scale=cfg_scale,
        height=128,
        width=128,
        num_inference_steps=steps,
        latents=pack_latents(noise),
        output_type=output_type,
    ).images
    return (pack_latents(ours) if output_type == "latent" else ours), theirs


def test_end_to_end_latents_match_diffusers_with_cfg(tiny_pipe, reference):
    ours, theirs = _both(tiny_pipe, reference, "a red bicycle leaning on a blue wall", "blurry", 4.0, 4, "latent")
    error = torch.max(torch.abs(ours - theirs)).item()
    assert error <= END_TO_END_TOLERANCE, error


def test_end_to_end_without_cfg_matches_diffusers(tiny_pipe, reference):
    ours, theirs = _both(tiny_pipe, reference, "a cat", None, 1.0, 3, "latent")
    assert torch.max(torch.abs(ours - theirs)).item() <= END_TO_END_TOLERANCE


def test_decoded_image_matches_diffusers(tiny_pipe, reference):
    ours, theirs = _both(tiny_pipe, reference, "a cat", None, 1.0, 2, "np")
    assert ours.shape == theirs.shape == (1, 128, 128, 3)
    assert abs(ours - theirs).max() <= 1e-4


def test_batch_of_different_lengths_equals_each_alone(tiny_pipe):
    prompts = ["a cat", "a very long prompt about a lighthouse on a cliff at dusk, waves crashing, seagulls"]
    noise = _noise(2)
    common = dict(
        negative_prompt="low quality",
        cfg_scale=4.0,
        height=128,
        width=128,
        num_inference_steps=3,
        output_type="latent",
        progress_bar_cmd=lambda x: x,
    )
    batch = tiny_pipe(prompts, latents=noise, **common)
    for index, prompt in enumerate(prompts):
        alone = tiny_pipe(prompt, latents=noise[index : index + 1], **common)
        assert torch.max(torch.abs(batch[index : index + 1] - alone)).item() <= BATCH_TOLERANCE
