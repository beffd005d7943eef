"""Load a trained LoRA or full checkpoint into a pipeline and generate (the seed's validate_lora / validate_full)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from imagezoo.errors import InputError
from imagezoo.images import numbered_paths
from imagezoo.pipeline import Pipeline
from imagezoo.state_dict import check_state_dict
from imagezoo.weights import load_safetensors

logger = logging.getLogger(__name__)

_PREFIXES = ("pipe.{c}.", "{c}.", "models.{c}.")


def load_full_checkpoint(pipe: Pipeline, path: str | Path, component: str = "dit") -> None:
    """Replace a component's weights by a fully fine-tuned checkpoint (prefix `pipe.dit.` etc. tolerated).

    Raises:
        WeightsError: The checkpoint's keys do not match the component (naming them).
    """
    modules = pipe.components.modules
    if component not in modules:
        raise InputError(f"component={component!r} is not one of {', '.join(modules)}.")
    module = modules[component]
    state = load_safetensors([path])
    for template in _PREFIXES:
        prefix = template.format(c=component)
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            break
    check_state_dict(module, state, what=f"full checkpoint {path} for the {component}")
    reference = next(module.parameters())
    with torch.no_grad():
        module.load_state_dict({k: v.to(reference.device, reference.dtype) for k, v in state.items()}, strict=True)


def load_lora(pipe: Pipeline, path: str | Path, scale: float = 1.0, component: str = "dit") -> str:
    """Apply a LoRA file (any format `imagezoo.lora` reads, e.g. what training saved) to a component, unfused."""
    return pipe.load_lora(str(path), scale=scale, component=component)


def run_validate(args: argparse.Namespace) -> list[Path]:
    """Load the model and trained weights, generate one image per prompt, save them; returns the paths."""
    from imagezoo.run_config import DTYPES
    from imagezoo.training.config import make_config
    from imagezoo.training.trainer import load_training_pipeline

    if not args.lora and not args.checkpoint:
        raise InputError("Give --lora FILE or --checkpoint FILE (or both) to validate trained weights.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype and args.dtype not in DTYPES:
        raise InputError(f"--dtype {args.dtype!r} is not allowed; use one of {', '.join(DTYPES)}.")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    settings: dict[str, Any] = {
        "dataset_base_path": ".",
        "lora_base_model": "dit",
        "model": args.model,
        "model_paths": args.model_paths,
        "model_id_with_origin_paths": args.model_id_with_origin_paths,
        "tokenizer_path": args.tokenizer_path,
        "local_model_path": args.local_model_path,
        "skip_download": args.skip_download,
    }
    config = make_config({k: v for k, v in settings.items() if v is not None})
    pipe = load_training_pipeline(config, device, dtype)
    if args.checkpoint:
        load_full_checkpoint(pipe, args.checkpoint, args.component)
        logger.info("Loaded full checkpoint %s into the %s.", args.checkpoint, args.component)
    if args.lora:
        load_lora(pipe, args.lora, args.lora_scale, args.component)
        logger.info("Applied LoRA %s (scale %g) to the %s.", args.lora, args.lora_scale, args.component)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = list(args.prompt)
    paths = numbered_paths(out, len(prompts))
    for prompt, path in zip(prompts, paths, strict=True):
        image = pipe(
            prompt,
            negative_prompt=args.negative_prompt,
            cfg_scale=args.cfg_scale,
            height=args.height,
            width=args.width,
            num_inference_steps=args.num_inference_steps,
            seed=args.seed,
        )
        image.save(path)
        logger.info("Wrote %s (%dx%d).", path, image.width, image.height)
    return paths
