"""Seconds per step and peak VRAM of LoRA training on the full-size Qwen-Image DiT, imagezoo vs DiffSynth-Studio.

Setting (the issue's): 1024×1024, batch 1, LoRA rank 32 on the 12 default targets, gradient checkpointing, AdamW,
random full-size weights (built on the meta device, allocated on the GPU, filled in place; speed and memory do not
depend on the values). Both trainers get the same precomputed inputs — text embeddings (64 tokens) and latents — so
a step is the DiT's forward + backward + optimizer update; the frozen text encoder and VAE run once, before training
(imagezoo's `--cache_text_embeddings --cache_latents`; DiffSynth's split "data_process" / "train" stages).

Cases:
- `imagezoo`: the real `Trainer` (its data loader, cache, accelerate, LoRA layers, AdamW with fp32 LoRA weights and
  gradient clipping), the DiT resident in bf16, blocks not compiled (`--no-compile`). Its cache folder is pre-filled
  with the random inputs.
- `imagezoo-stream-K` (or `imagezoo-streamK`): the same with the frozen weights of K evenly spaced blocks of the 60
  kept in pinned CPU memory, each block copied in (prefetched on a side stream while the blocks before it compute)
  when used (`--offload_frozen_blocks K`; K = 60 is the low-memory mode).
- `imagezoo-attn-NAME`, `imagezoo-compile`: with `--attention_backend NAME` (a DiT attention kernel; default `auto`)
  or `--compile` (regional `torch.compile` of the DiT blocks, LoRA hooks traced in; one extra warm-up step; the
  trainer's default on CUDA).
  Suffixes combine, e.g. `imagezoo-attn-flash-compile` or `imagezoo-compile-stream-12` (compiled blocks, 12 of
  them streamed).
- `diffsynth`: DiffSynth-Studio's own training pieces on the same DiT tensors: `DiffusionTrainingModule.
  switch_pipe_to_training_mode` (PEFT LoRA, its default dtype), `FlowMatchSFTLoss` on `model_fn_qwen_image` with
  gradient checkpointing, AdamW (weight decay 0.01), the step sequence of its `launch_training_task`.

Each case runs `--warmup` steps, then `--steps` timed ones (median and mean of per-step wall time, synchronized).
Peak VRAM is `torch.cuda.max_memory_allocated` over the case, weights included (reset before each case, with the DiT
placed as the case needs: resident cases start with it on the GPU, streaming cases start with it in CPU memory).

    python benchmarks/train.py                                   # CUDA, every case
    python benchmarks/train.py --cases imagezoo,diffsynth
    python benchmarks/train.py --smoke                           # CPU smoke check: 2 blocks, 128x128, fp32

Writes `benchmarks/results/train.json` (`train_smoke.json` with `--smoke`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.metadata
import json
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import types
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from report import versions, write_json
from safetensors.torch import save_file

from imagezoo.interfaces import Components
from imagezoo.pipeline import Pipeline
from imagezoo.plugin_manager import get_kernel
from imagezoo.plugins.qwen_image.dit import REAL_DIT, DiTParams, QwenImageDiT
from imagezoo.plugins.qwen_image.family import QwenDenoiser
from imagezoo.training import make_config
from imagezoo.training.cache import row_key
from imagezoo.training.config import DEFAULT_LORA_TARGETS
from imagezoo.training.dataset import ImageDataset, load_rows
from imagezoo.training.lora import remove_lora
from imagezoo.training.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3
TEXT_LEN = 64
logger = logging.getLogger("benchmarks.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 blocks, 128x128, fp32: checks the script runs")
    parser.add_argument(
        "--cases",
        default="imagezoo,imagezoo-compile,diffsynth,imagezoo-stream-12,imagezoo-compile-stream-12,"
        "imagezoo-compile-stream-60",
    )
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; smoke 128)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case")
    parser.add_argument("--stream-steps", type=int, default=2, help="timed steps of streaming cases (slow)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.size = args.size or (128 if args.smoke else 1024)
    args.out = args.out or RESULTS / ("train_smoke.json" if args.smoke else "train.json")
    return args


# ------------------------------------------------------------------------------------------------ models and data


def fill_random(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights N(0, 0.02), biases 0, norm scales 1, in place (deterministic per parameter order)."""
    generator = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def random_dit(params: DiTParams, device: torch.device, dtype: torch.dtype) -> QwenImageDiT:
    with torch.device("meta"):
        dit = QwenImageDiT(params)
    dit = dit.to_empty(device=device).to(dtype)
    fill_random(dit)
    return dit.eval().requires_grad_(False)


class _Placeholder(torch.nn.Module):
    """Stands in for the text encoder / VAE: with a complete cache the trainer never calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)


def make_pipeline(dit: QwenImageDiT, device: torch.device, dtype: torch.dtype) -> Pipeline:
    kernel = get_kernel()
    entry = kernel.models.get("Qwen/Qwen-Image")
    modules = {"dit": dit, "text_encoder": _Placeholder(), "vae": _Placeholder()}
    components = Components(text_encoder=None, denoiser=QwenDenoiser(dit), vae=None, modules=modules)  # type: ignore[arg-type]
    return Pipeline(components, defaults=entry.defaults, device=device, dtype=dtype, entry=entry, kernel=kernel)


def make_dataset(folder: Path, rows: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,prompt"]
    for i in range(rows):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f"{i}.png,training image {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def train_config(args: argparse.Namespace, work: Path, name: str, dtype: torch.dtype, **extra: Any) -> Any:
    return make_config(
        {
            "model": "Qwen/Qwen-Image",
            "dataset_base_path": str(work / "data"),
            "height": args.size,
            "width": args.size,
            "dataset_repeat": 1000,
            "lora_base_model": "dit",
            "lora_rank": args.rank,
            "lora_target_modules": DEFAULT_LORA_TARGETS,
            "use_gradient_checkpointing": True,
            "learning_rate": 1e-4,
            "cache_text_embeddings": True,
            "cache_latents": True,
            "cache_dir": str(work / "cache"),
            "output_path": str(work / name),
            "save_training_state": False,
            "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "progress": False,
            **extra,
        }
    )


def fill_cache(trainer: Trainer, config: Any, args: argparse.Namespace, text_dim: int, dtype: torch.dtype) -> None:
    """Pre-fill the trainer's disk cache with random inputs under the keys it will look up."""
    report = load_rows(config.dataset_base_path)
    dataset = ImageDataset(report.rows, height=config.height, width=config.width)
    folder = Path(config.cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    latent = args.size // 8
    generator = torch.Generator().manual_seed(1)
    for r, row in enumerate(dataset.rows):
        key = row_key(row, dataset.sizes[r], trainer._model_key(), ["text", "latents"], config.max_sequence_length)
        tensors = {
            "text_embeds": torch.randn(TEXT_LEN, text_dim, generator=generator).to(dtype),
            "text_mask": torch.ones(TEXT_LEN, dtype=torch.uint8),
            "latents": torch.randn(16, latent, latent, generator=generator),
        }
        save_file(tensors, str(folder / f"{r:07d}-{key}.safetensors"))


# ------------------------------------------------------------------------------------------------ measurement


class Clock:
    """Per-step wall times from synchronized marks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[float] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def summary(self, warmup: int) -> dict[str, float]:
        steps = np.diff(self.marks)[warmup:]
        return {"s_per_step": float(statistics.median(steps)), "s_per_step_mean": float(np.mean(steps))}


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def parse_case(case: str) -> dict[str, Any]:
    """`imagezoo[-stream-K|-streamK][-attn-NAME][-compile]` (any order) -> trainer options."""
    parts = case.split("-")
    options: dict[str, Any] = {"offload_frozen_blocks": 0, "attention_backend": None, "compile": False}
    i = 1
    while i < len(parts):
        if parts[i] == "stream":
            options["offload_frozen_blocks"] = int(parts[i + 1])
            i += 2
        elif parts[i].startswith("stream") and parts[i][len("stream") :].isdigit():
            options["offload_frozen_blocks"] = int(parts[i][len("stream") :])
            i += 1
        elif parts[i] == "attn":
            options["attention_backend"] = parts[i + 1]
            i += 2
        elif parts[i] == "compile":
            options["compile"] = True
            i += 1
        else:
            raise ValueError(f"unknown case {case!r}")
    return options


def run_imagezoo(
    args: argparse.Namespace, work: Path, dit: QwenImageDiT, device: torch.device, dtype: torch.dtype, name: str
) -> dict[str, Any]:
    options = parse_case(name)
    stream = min(options["offload_frozen_blocks"], dit.params.num_layers)
    options["offload_frozen_blocks"] = stream
    timed = args.steps if stream == 0 else args.stream_steps
    # Compiling happens in the first step(s): give compiled cases an extra warm-up step.
    warmup = args.warmup + (1 if options["compile"] else 0)
    config = train_config(args, work, name, dtype, max_steps=warmup + timed + 1, **options)
    pipe = make_pipeline(dit, device, dtype)
    clock = Clock(device)
    # A mark before each optimizer step: intervals between marks are whole steps (forward, backward, update, data).
    trainer = Trainer(config, pipeline=pipe, grad_callback=lambda step, module: clock.mark())
    fill_cache(trainer, config, args, dit.params.text_dim, dtype)
    reset_peak(device)
    start = time.perf_counter()
    try:
        result = trainer.run()
        row = {
            "impl": "imagezoo",
            "case": {
                **case_info(args, name, stream),
                "attention": options["attention_backend"] or "auto",
                "compile": options["compile"],
            },
            **clock.summary(warmup),
            "peak_vram_gib": peak_gib(device),
            "steps_timed": timed,
            "loss_finite": bool(np.isfinite(result.losses).all()),
            "wall_s": time.perf_counter() - start,
        }
        if trainer.streamer is not None:
            row["stream_stats"] = dict(trainer.streamer.stats)
    finally:
        # Leave the DiT as the next case expects it: plain blocks, every weight on the device, no LoRA.
        if trainer.streamer is not None:
            trainer.streamer.remove()
        remove_lora(dit)
        if options["compile"]:
            from imagezoo.plugins.qwen_image.speed import uncompile_blocks

            uncompile_blocks(dit)
        dit.set_attention_backend("auto")
    del trainer, pipe, result
    return row


def case_info(args: argparse.Namespace, name: str, stream: int = 0) -> dict[str, Any]:
    return {
        "name": name,
        "height": args.size,
        "width": args.size,
        "batch": 1,
        "lora_rank": args.rank,
        "gradient_checkpointing": True,
        "text_tokens": TEXT_LEN,
        "streamed_blocks": stream,
    }


def _stub_module(name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    # A spec, so code that probes installed modules (torch._dynamo does) treats it as a normal module.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def import_diffsynth() -> Any:
    """Import DiffSynth-Studio's Qwen-Image training pieces.

    Its package imports a few modules at load time that its DiT training step never uses (`modelscope` for downloads,
    `pandas` for CSV datasets, `ftfy` for another model's text cleaning); where one is not installed, an empty
    stand-in module takes its place. Nothing of the measured step comes from a stand-in.
    """
    stubbed = []
    for name, attrs in {"modelscope": {"snapshot_download": None}, "pandas": {}, "ftfy": {}}.items():
        try:
            __import__(name)
        except ImportError:
            _stub_module(name, **attrs)
            stubbed.append(name)
    from diffsynth.diffusion.loss import FlowMatchSFTLoss
    from diffsynth.diffusion.training_module import DiffusionTrainingModule
    from diffsynth.models.qwen_image_dit import QwenEmbedRope
    from diffsynth.models.qwen_image_dit import QwenImageDiT as DiffSynthDiT
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    return types.SimpleNamespace(
        loss=FlowMatchSFTLoss,
        training_module=DiffusionTrainingModule,
        rope=QwenEmbedRope,
        dit=DiffSynthDiT,
        pipeline=QwenImagePipeline,
        stubbed=stubbed,
    )


def run_diffsynth(
    args: argparse.Namespace, dit: QwenImageDiT, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    ds = import_diffsynth()
    with torch.device("meta"):
        model = ds.dit(num_layers=dit.params.num_layers)
    # Same tensors as ours (identical key names): no second copy of the weights.
    model.load_state_dict(dit.state_dict(), assign=True)
    model.pos_embed = ds.rope(theta=10000, axes_dim=list(dit.params.axes_dims), scale_rope=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"DiffSynth DiT still has meta tensors: {leftovers[:5]}")
    pipe = ds.pipeline(device=str(device), torch_dtype=dtype)
    pipe.dit = model
    holder = ds.training_module()
    holder.switch_pipe_to_training_mode(pipe, None, "dit", DEFAULT_LORA_TARGETS, args.rank)
    holder.pipe = pipe
    params = list(holder.trainable_modules())
    lora_dtype = str(params[0].dtype).removeprefix("torch.")
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer)
    generator = torch.Generator().manual_seed(1)
    latent = args.size // 8
    inputs = {
        "input_latents": torch.randn(1, 16, latent, latent, generator=generator).to(device, dtype),
        "prompt_emb": torch.randn(1, TEXT_LEN, dit.params.text_dim, generator=generator).to(device, dtype),
        "prompt_emb_mask": torch.ones(1, TEXT_LEN, dtype=torch.long, device=device),
        "height": args.size,
        "width": args.size,
        "use_gradient_checkpointing": True,
        "use_gradient_checkpointing_offload": False,
    }
    clock = Clock(device)
    losses = []
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.warmup + args.steps + 1):
        clock.mark()
        loss = ds.loss(pipe, **inputs)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    row = {
        "impl": "diffsynth",
        "case": {**case_info(args, "diffsynth"), "lora_dtype": lora_dtype, "stubbed_imports": ds.stubbed},
        **clock.summary(args.warmup),
        "peak_vram_gib": peak_gib(device),
        "steps_timed": args.steps,
        "loss_finite": bool(np.isfinite(losses).all()),
        "wall_s": time.perf_counter() - start,
    }
    del optimizer, scheduler, params, holder, pipe, model
    return row


# ------------------------------------------------------------------------------------------------ main


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'impl':<10} {'case':<26} {'s/step':>8} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['impl']:<10} {row['case']['name']:<26} {row['error'][:80]}")
            continue
        peak = "-" if row["peak_vram_gib"] is None else f"{row['peak_vram_gib']:.2f}"
        print(f"{row['impl']:<10} {row['case']['name']:<26} {row['s_per_step']:>8.3f} {peak:>9}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    params = DiTParams(num_layers=2) if args.smoke else REAL_DIT
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or '?'})"
    print(f"Qwen-Image DiT LoRA training ({params.num_layers} blocks, {args.size}x{args.size}) on {gpu}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="imagezoo-train-bench-"))
    make_dataset(work / "data")
    dit = random_dit(params, device, dtype)
    rows = []
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    # Resident cases first: streaming ones start from the DiT in CPU memory (as the trainer loads it for them) and
    # end with it back on the GPU, so this order moves it least.
    cases.sort(key=lambda c: parse_case(c)["offload_frozen_blocks"] if c.startswith("imagezoo") else 0)
    for case in cases:
        t0 = time.perf_counter()
        try:
            if case == "diffsynth":
                row = run_diffsynth(args, dit, device, dtype)
            elif case.startswith("imagezoo"):
                if parse_case(case)["offload_frozen_blocks"]:
                    dit.to("cpu")  # the low-memory mode starts from weights in CPU memory, as it would load them
                row = run_imagezoo(args, work, dit, device, dtype, case)
            else:
                raise ValueError(f"unknown case {case!r}")
        except Exception as exc:  # one failing case must not lose the others' figures
            traceback.print_exc()
            row = {"impl": case.split("-")[0], "case": {"name": case}, "error": f"{type(exc).__name__}: {exc}"[:500]}
            remove_lora(dit)
        row["case_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)
    result = {
        "name": "train",
        "gpu": gpu,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions("imagezoo", "accelerate", "diffsynth", "peft", "transformers"),
        "command": shlex.join(["python", *sys.argv]),
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
