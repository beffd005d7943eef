"""The seed's `QwenImagePipeline`: the kernel pipeline bound to the `qwen_image` family."""

from __future__ import annotations

from imagezoo.pipeline import Pipeline


class QwenImagePipeline(Pipeline):
    """Qwen-Image text-to-image pipeline (`QwenImagePipeline.from_pretrained(...)`, then `pipe(prompt, ...)`)."""

    family_name = "qwen_image"
