"""The training loop on `accelerate`: one process, DDP, or FSDP, with LoRA or full fine-tuning of any model family.

The family is reached only through its `TrainingAdapter` (encode text, encode images, call the denoiser, which
parameters never get a gradient); everything else — data, flow-matching objective, optimizer, accumulation,
checkpoints, resume, validation — is here and family-agnostic.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from imagezoo.config import ModelConfig
from imagezoo.errors import ConfigError, InputError
from imagezoo.interfaces import GenerationContext, TextConditioning
from imagezoo.pipeline import Pipeline
from imagezoo.plugin_manager import get_kernel
from imagezoo.run_config import DTYPES
from imagezoo.training.adapter import TrainingAdapter, training_adapter_for
from imagezoo.training.cache import CachedDataset, EncodedCache, build_cache
from imagezoo.training.checkpoint import (
    STATE_DIR,
    atomic_save_safetensors,
    publish_state,
    read_training_state,
    resolve_state_folder,
    set_rng_state,
    write_training_state,
)
from imagezoo.training.config import TrainConfig
from imagezoo.training.dataset import BucketBatchSampler, ImageDataset, collate, load_rows
from imagezoo.training.lora import export_lora, inject_lora, to_opensource
from imagezoo.training.offload import BlockStreamer
from imagezoo.training.schedule import FlowMatchObjective, lr_lambda, sample_generator

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run did."""

    global_step: int
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    state_folder: Path | None = None
    interrupted: bool = False
    skipped_rows: int = 0


class TrainingModule(nn.Module):
    """The modules one training step runs, and the step itself: its forward returns per-sample losses (B,).

    One module (not the denoiser alone) is what DDP/FSDP wrap, so a trained text encoder or VAE is synchronized too.
    Child names are the component names under `models`, e.g. `models.dit.transformer_blocks.0...`.
    """

    def __init__(
        self,
        adapter: TrainingAdapter,
        modules: dict[str, nn.Module],
        objective: FlowMatchObjective,
        *,
        trained: set[str],
        seed: int,
        max_length: int,
        pipeline: Pipeline | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.pipeline = pipeline
        self.models = nn.ModuleDict(modules)
        self.objective = objective
        self.trained = trained
        self.seed = seed
        self.max_length = max_length

    def _condition_extras(
        self, text: TextConditioning, extras: dict[str, list[Any]], size: tuple[int, int], prompts: list[str]
    ) -> TextConditioning:
        """Apply extra inputs (e.g. EliGen entities) through the pipeline's input extensions, as generation does."""
        if self.pipeline is None:
            raise ConfigError("Extra inputs need the pipeline's input extensions; build the trainer with a pipeline.")
        if len(prompts) != 1:
            raise ConfigError("Extra inputs (--extra_inputs) are conditioned per sample: use --batch_size 1.")
        inputs = {name: values[0] for name, values in extras.items()}
        width, height = size
        context = GenerationContext(
            pipeline=_TrainingView(self.pipeline),
            prompts=tuple(prompts),
            negative_prompts=("",),
            height=height,
            width=width,
            max_sequence_length=self.max_length,
            cfg=False,
        )
        for extension, grouped in self.pipeline.route_extra_inputs(inputs):
            text, _ = extension.condition(context, grouped, text, None)
        return text

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample weighted flow-matching losses of a collated batch (with `epoch` set)."""
        denoiser = self.models[self.adapter.denoiser_name]
        device = next(p for p in denoiser.parameters() if p.device.type != "meta").device
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            vae = dict(self.models).get("vae")
            latents = self.adapter.encode_images(vae, batch["image"], grad="vae" in self.trained).to(device)
        if "text_embeds" in batch:
            text = TextConditioning(batch["text_embeds"].to(device), batch["text_mask"].to(device))
        else:
            encoder = dict(self.models).get("text_encoder")
            text = self.adapter.text_inputs(
                encoder,
                batch["prompt"],
                size=tuple(batch["size"]),
                max_length=self.max_length,
                grad="text_encoder" in self.trained,
            )
            if batch.get("extras"):
                text = self._condition_extras(text, batch["extras"], tuple(batch["size"]), batch["prompt"])
        # Noise and timestep per sample from its own generator: identical for any process count or batch split.
        epoch = int(batch["epoch"])
        generators = [sample_generator(self.seed, epoch, int(i)) for i in batch["index"]]
        indices = torch.tensor([self.objective.draw(g) for g in generators])
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
        sigma = self.objective.sigmas[indices].to(device)
        noisy = self.objective.noisy(latents, noise, sigma)
        prediction = self.adapter.predict(denoiser, noisy, sigma, text)
        return self.objective.loss(prediction, latents, noise, indices)


class _TrainingView:
    """The pipeline as input extensions see it during training: the LoRA being trained counts as loaded.

    (Extensions such as EliGen warn when no LoRA is loaded, which is wrong while one is being trained.)
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self.loras = {"training": 1.0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)


# -------------------------------------------------------------------------------------------------------------- setup


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on accelerators, fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_training_pipeline(config: TrainConfig, device: torch.device | str, dtype: torch.dtype) -> Pipeline:
    """Load the models named by `--model` or the seed's `--model_paths` / `--model_id_with_origin_paths`."""
    if config.model:
        return Pipeline.from_registry(
            config.model,
            device=device,
            torch_dtype=dtype,
            local_model_path=config.local_model_path,
            skip_download=config.skip_download,
        )
    kernel = get_kernel()
    family = config.family
    if family is None:
        names = [registered.name for registered in kernel.families]
        if len(names) != 1:
            raise ConfigError(f"Several model families are installed ({', '.join(names)}); pass --family NAME.")
        family = names[0]
    configs: list[ModelConfig] = []
    local = {"local_model_path": config.local_model_path, "skip_download": config.skip_download}
    for entry in config.model_paths or []:
        configs.append(ModelConfig(path=entry))
    model_ids = []
    for item in (config.model_id_with_origin_paths or "").split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise InputError(
                f"--model_id_with_origin_paths entry {item!r} must be MODEL_ID:FILE_PATTERN, e.g. "
                "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors."
            )
        model_id, pattern = item.rsplit(":", 1)
        model_ids.append(model_id)
        configs.append(ModelConfig(model_id=model_id, origin_file_pattern=pattern, **local))
    if config.tokenizer_path:
        tokenizer = ModelConfig(path=config.tokenizer_path)
    elif model_ids:
        tokenizer = ModelConfig(model_id=model_ids[0], origin_file_pattern="tokenizer/", **local)
    else:
        tokenizer = _tokenizer_beside(config.model_paths or [])
    return Pipeline.from_pretrained(
        torch_dtype=dtype, device=device, model_configs=configs, tokenizer_config=tokenizer, family=family
    )


def _tokenizer_beside(model_paths: list[Any]) -> ModelConfig:
    """A `tokenizer/` folder next to the model files' folders (the official repo layout)."""
    for entry in model_paths:
        first = Path(entry[0] if isinstance(entry, list) else entry)
        for folder in (first.parent.parent / "tokenizer", first.parent / "tokenizer", first / "tokenizer"):
            if folder.is_dir():
                return ModelConfig(path=folder)
    raise InputError("No tokenizer found next to --model_paths; pass --tokenizer_path FOLDER.")


def _family_of(pipeline: Pipeline) -> tuple[str, Any]:
    kernel = pipeline.kernel
    name = pipeline.entry.family if pipeline.entry is not None else pipeline.family_name
    if name is None:
        names = [registered.name for registered in kernel.families]
        name = names[0]
    return name, kernel.families.get(name).value


def _move_except_streamed(module: nn.Module, device: torch.device, streamer: BlockStreamer | None) -> None:
    """`module.to(device)` that leaves the weights `streamer` (if any) keeps in host memory there."""

    def streamed(sub: nn.Module, name: str) -> bool:
        return streamer is not None and streamer.is_streamed(sub, name)

    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if param.device != device and not streamed(sub, name):
                param.data = param.data.to(device)
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.device != device and not streamed(sub, name):
                sub._buffers[name] = buf.to(device)


@contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM (cluster pre-emption) like Ctrl-C, so both save a resumable state."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Runs one training job described by a `TrainConfig`.

    Args:
        config: The settings.
        pipeline: Already-loaded models (tests, benchmarks); loaded from the config when None.
        accelerator: An `accelerate.Accelerator` to use (default: a new one from the config and the launch env).
        grad_callback: Called as `grad_callback(step, module)` once the gradients of optimizer step `step` (1-based)
            are complete (accumulated and synchronized across processes, not yet clipped), before the update;
            `module` is the unwrapped `TrainingModule`. Raising `KeyboardInterrupt` there stops training like Ctrl-C.

    Attributes:
        streamer: With `--offload_frozen_blocks`, the `BlockStreamer` of the DiT's blocks (set by `run`). It stays
            applied after the run, so the pipeline keeps working within the same GPU memory; its `remove()` puts
            the streamed weights back on the device.
    """

    streamer: BlockStreamer | None = None

    def __init__(
        self,
        config: TrainConfig,
        *,
        pipeline: Pipeline | None = None,
        accelerator: Any = None,
        grad_callback: Callable[[int, TrainingModule], None] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.config = config
        if accelerator is None:
            mixed = config.mixed_precision
            accelerator = Accelerator(
                mixed_precision=mixed if mixed is not None else self._default_mixed_precision(),
                device_placement=False,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
            )
        self.accelerator = accelerator
        self.device = accelerator.device
        self.dtype = getattr(torch, DTYPES[config.dtype]) if config.dtype else default_dtype(self.device)
        self.pipeline = pipeline
        self.grad_callback = grad_callback
        self.is_fsdp = accelerator.distributed_type.name == "FSDP"
        if config.find_unused_parameters and accelerator.is_main_process:
            logger.info(
                "--find_unused_parameters is accepted but not needed: parameters that never get a gradient are frozen."
            )

    def _default_mixed_precision(self) -> str:
        # Full fine-tuning keeps fp32 master weights: autocast gives bf16 matmuls on GPUs. LoRA computes in the
        # frozen model's dtype already.
        cuda = torch.cuda.is_available()
        return "bf16" if cuda and self.config.trainable_list else "no"

    # ------------------------------------------------------------------------------------------------ preparation
    def _prepare_modules(self, adapter: TrainingAdapter, modules: dict[str, nn.Module]) -> tuple[set[str], list[str]]:
        """Freeze everything, then unfreeze full-training components and inject LoRA; returns (trained, lora names)."""
        config = self.config
        for module in modules.values():
            module.requires_grad_(False)
        trained: set[str] = set()
        for name in config.trainable_list:
            if name not in modules:
                raise ConfigError(f"--trainable_models names {name!r}, which this model family does not have.")
            module = modules[name]
            unused = set(adapter.unused_parameters(name, module))
            for param_name, param in module.named_parameters():
                # fp32 master weights: Adam updates far below bf16's resolution would otherwise be lost. Unused ones
                # too, so each block has one dtype (FSDP flattens a block's parameters into one tensor).
                if param.dtype != torch.float32:
                    param.data = param.data.float()
                param.requires_grad_(param_name not in unused)
            trained.add(name)
        lora_names: list[str] = []
        if config.lora_base_model:
            base = config.lora_base_model
            if base not in modules:
                raise ConfigError(f"--lora_base_model {base!r} is not a component of this model family.")
            unused_modules = {n.rsplit(".", 1)[0] for n in adapter.unused_parameters(base, modules[base])}
            report = inject_lora(
                modules[base], config.lora_targets, config.lora_rank, config.alpha, exclude=unused_modules
            )
            lora_names = report.injected
            trained.add(base)
        return trained, lora_names

    def _check_fsdp(self) -> None:
        config = self.config
        if config.lora_base_model:
            raise ConfigError(
                "LoRA under FSDP is not supported (frozen bf16 weights and fp32 LoRA cannot share a shard); LoRA "
                "state is small: use DDP (accelerate_configs/ddp.yaml). FSDP is for --trainable_models."
            )
        if not (config.cache_text_embeddings and config.cache_latents):
            raise ConfigError(
                "FSDP training needs --cache_text_embeddings and --cache_latents, so only the trained denoiser is "
                "sharded (the frozen encoders run once, before training)."
            )
        if config.offload_frozen_blocks or config.validation_prompts or config.compile:
            raise ConfigError(
                "--offload_frozen_blocks, --validation_prompts and --compile are not available under FSDP."
            )

    def _check_extra_inputs(self, pipe: Pipeline) -> None:
        config = self.config
        accepted = pipe.accepted_extra_inputs()
        unknown = [name for name in config.extra_input_list if name not in accepted]
        if unknown:
            raise ConfigError(
                f"--extra_inputs {', '.join(unknown)} are not accepted by this model; installed input extensions "
                f"accept: {', '.join(sorted(accepted)) or 'none'}."
            )
        if config.cache_text_embeddings:
            raise ConfigError("--extra_inputs cannot be combined with --cache_text_embeddings (they shape the text).")
        if config.batch_size != 1:
            raise ConfigError(f"--extra_inputs apply per sample: use --batch_size 1, not {config.batch_size}.")

    def _model_key(self) -> str:
        c = self.config
        return json.dumps([c.model, c.model_paths, c.model_id_with_origin_paths, str(self.dtype)], default=str)

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        """Train; returns the step reached, the per-step losses, the checkpoints written, and the state folder."""
        config, accelerator = self.config, self.accelerator
        is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
        torch.manual_seed(config.seed)

        report = load_rows(
            config.dataset_base_path,
            config.dataset_metadata_path,
            file_keys=config.file_keys,
            extra_inputs=config.extra_input_list,
            skip_bad_rows=config.skip_bad_rows,
        )
        if is_main:
            logger.info(
                "Dataset: %d rows (%d skipped), repeat %d.",
                len(report.rows),
                len(report.skipped),
                config.dataset_repeat,
            )

        if self.is_fsdp:
            self._check_fsdp()
        streaming = config.offload_frozen_blocks != 0
        # Sharded runs load on the CPU: FSDP moves each process's shard to its GPU (a whole 20B model would not fit).
        load_device = torch.device("cpu") if streaming or self.is_fsdp else self.device
        pipe = self.pipeline or load_training_pipeline(config, load_device, self.dtype)
        self.pipeline = pipe
        family_name, family = _family_of(pipe)
        adapter = training_adapter_for(family, pipe.components, family_name)
        modules = dict(pipe.components.modules)
        if config.extra_input_list:
            self._check_extra_inputs(pipe)
        trained, lora_names = self._prepare_modules(adapter, modules)
        for name in trained:
            if config.use_gradient_checkpointing or config.use_gradient_checkpointing_offload:
                adapter.set_gradient_checkpointing(
                    name, modules[name], enabled=True, offload=config.use_gradient_checkpointing_offload
                )
            modules[name].train()

        bucketed = config.height is None and config.batch_size > 1
        dataset = ImageDataset(
            report.rows,
            height=config.height,
            width=config.width,
            max_pixels=config.max_pixels,
            repeat=config.dataset_repeat,
            bucketed=bucketed,
            image_key=config.file_keys[0],
            load_images=not config.cache_latents,
        )

        # ---- caches: encode once with the text encoder / VAE on the device, then move them off it
        validation_text = None
        if config.cache_text_embeddings or config.cache_latents:
            validation_text = self._build_caches(pipe, adapter, modules, dataset, rank, world)
            train_dataset: Any = CachedDataset(dataset, self._cache)
        else:
            train_dataset = dataset
        step_modules = {adapter.denoiser_name: modules[adapter.denoiser_name]}
        if not config.cache_text_embeddings:
            step_modules["text_encoder"] = modules["text_encoder"]
        if not config.cache_latents:
            step_modules["vae"] = modules["vae"]
        for name in trained:
            step_modules[name] = modules[name]

        if streaming:
            blocks = list(adapter.blocks(adapter.denoiser_name, modules[adapter.denoiser_name]))
            if not blocks:
                raise ConfigError(
                    f"--offload_frozen_blocks {config.offload_frozen_blocks}: the {adapter.denoiser_name} has no "
                    "blocks to stream (its family's training adapter lists none); leave the option out."
                )
            # Kept for the whole run and after it: validation images run the same streamed blocks.
            self.streamer = BlockStreamer(blocks, config.offload_frozen_blocks, self.device)
        if not self.is_fsdp:
            # Also for a pipeline handed in on another device: every step and validation input goes to self.device.
            for module in step_modules.values():
                _move_except_streamed(module, self.device, self.streamer)
        # After the move, so that `compile=None` sees the device the DiT runs on (a streamed DiT is loaded on the
        # CPU). Compiled FSDP units are untested: no compile there.
        adapter.configure_speed(
            adapter.denoiser_name,
            modules[adapter.denoiser_name],
            attention=config.attention_backend,
            compile=False if self.is_fsdp else config.compile,
        )

        objective = FlowMatchObjective.default()
        model = TrainingModule(
            adapter,
            step_modules,
            objective,
            trained=trained,
            seed=config.seed,
            max_length=config.max_sequence_length,
            pipeline=pipe,
        )
        if not self.is_fsdp:
            # DDP would broadcast (and check devices of) every parameter; frozen ones are identical on every rank.
            model._ddp_params_and_buffers_to_ignore = [
                *(n for n, p in model.named_parameters() if not p.requires_grad),
                *(n for n, _ in model.named_buffers()),
            ]
        model = accelerator.prepare(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("No trainable parameters: check --trainable_models / --lora_target_modules.")
        optimizer = torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
            # One fused kernel for all parameters on CUDA (the LoRA of the 20B DiT is 1,400 tensors).
            fused=self.device.type == "cuda" and not self.is_fsdp,
        )
        optimizer = accelerator.prepare(optimizer)

        sampler = BucketBatchSampler(train_dataset, config.batch_size, seed=config.seed, rank=rank, num_replicas=world)
        batches_per_epoch = len(sampler)
        if batches_per_epoch == 0:
            raise InputError(
                f"The dataset gives no batch per process ({len(train_dataset)} samples, batch size "
                f"{config.batch_size}, {world} processes); use more rows, --dataset_repeat or a smaller --batch_size."
            )
        accum = config.gradient_accumulation_steps
        steps_per_epoch = math.ceil(batches_per_epoch / accum)
        total_steps = steps_per_epoch * config.num_epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
            lr_lambda(config.lr_scheduler, config.lr_warmup_steps, total_steps),
        )

        unwrapped = accelerator.unwrap_model(model)
        global_step, start_epoch, start_batch = 0, 0, 0
        if config.resume_from:
            global_step, start_epoch, start_batch = self._resume(unwrapped, optimizer, scheduler, rank)
        if is_main:
            names = ", ".join(sorted(trained))
            count = sum(p.numel() for p in params)
            mode = f"LoRA rank {config.lora_rank} on {len(lora_names)} layers" if lora_names else "full"
            logger.info("Training %s (%s): %s trainable parameters, %d steps.", names, mode, f"{count:,}", total_steps)

        result = TrainResult(global_step=global_step, skipped_rows=len(report.skipped))
        loader_kwargs: dict[str, Any] = {
            "batch_sampler": sampler,
            "collate_fn": collate,
            "num_workers": config.dataset_num_workers,
            "pin_memory": self.device.type == "cuda",
        }
        bar = tqdm(
            total=total_steps,
            initial=global_step,
            disable=not (is_main and config.progress),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        position = (start_epoch, start_batch)
        last_saved = global_step
        self._validate(unwrapped, validation_text, global_step, initial=True)
        try:
            with _interrupt_on_sigterm():
                for epoch in range(start_epoch, config.num_epochs):
                    if global_step >= total_steps:
                        break
                    first = start_batch if epoch == start_epoch else 0
                    sampler.set_epoch(epoch, first)
                    loader = torch.utils.data.DataLoader(train_dataset, **loader_kwargs)
                    window_losses: list[torch.Tensor] = []
                    for offset, batch in enumerate(loader):
                        b = first + offset
                        window_start = b // accum * accum
                        window_len = min(accum, batches_per_epoch - window_start)
                        last_in_window = b == window_start + window_len - 1
                        batch["epoch"] = epoch
                        sync = accelerator.no_sync(model) if not last_in_window and world > 1 else _null()
                        with sync:
                            losses = model(batch)
                            loss = losses.mean() / window_len
                            accelerator.backward(loss)
                        window_losses.append(losses.detach().mean())
                        if not last_in_window:
                            continue
                        if self.grad_callback is not None:
                            self.grad_callback(global_step + 1, unwrapped)
                        if config.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        global_step += 1
                        position = (epoch, b + 1) if b + 1 < batches_per_epoch else (epoch + 1, 0)
                        step_loss = accelerator.reduce(torch.stack(window_losses).mean(), "mean").item()
                        window_losses = []
                        result.losses.append(step_loss)
                        bar.update(1)
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                        if config.save_steps and global_step % config.save_steps == 0:
                            self._save(
                                unwrapped,
                                model,
                                optimizer,
                                scheduler,
                                global_step,
                                position,
                                f"step-{global_step}",
                                result,
                            )
                            last_saved = global_step
                        if config.validation_steps and global_step % config.validation_steps == 0:
                            self._validate(unwrapped, validation_text, global_step)
                        if global_step >= total_steps:
                            break
                    if config.save_steps is None and global_step > last_saved:
                        self._save(
                            unwrapped, model, optimizer, scheduler, global_step, position, f"epoch-{epoch}", result
                        )
                        last_saved = global_step
                if config.save_steps and global_step > last_saved:
                    self._save(
                        unwrapped, model, optimizer, scheduler, global_step, position, f"step-{global_step}", result
                    )
                if config.validation_prompts and config.validation_steps is None:
                    self._validate(unwrapped, validation_text, global_step)
        except KeyboardInterrupt:
            bar.close()
            result.interrupted = True
            logger.warning("Interrupted at step %d; saving a resumable state.", global_step)
            result.state_folder = self._save_state(
                unwrapped, optimizer, scheduler, global_step, position, collective=False
            )
            if result.state_folder is not None:
                logger.warning("Resume with --resume_from %s", result.state_folder)
            result.global_step = global_step
            return result
        bar.close()
        result.global_step = global_step
        result.state_folder = self._last_state
        accelerator.wait_for_everyone()
        return result

    # ------------------------------------------------------------------------------------------------ caches
    def _build_caches(
        self,
        pipe: Pipeline,
        adapter: TrainingAdapter,
        modules: dict[str, nn.Module],
        dataset: ImageDataset,
        rank: int,
        world: int,
    ) -> dict[str, Any] | None:
        config, accelerator = self.config, self.accelerator
        folder = Path(config.cache_dir) if config.cache_dir else None
        self._cache = EncodedCache(folder)
        text_encoder, vae = modules["text_encoder"], modules["vae"]

        def encode_text(prompt: str, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            text = adapter.text_inputs(
                text_encoder, [prompt], size=size, max_length=config.max_sequence_length, grad=False
            )
            return text.embeds[0], text.mask[0]

        def encode_image(image: torch.Tensor) -> torch.Tensor:
            return adapter.encode_images(vae, image.to(self.device), grad=False)

        if config.cache_text_embeddings:
            text_encoder.to(self.device)
        if config.cache_latents:
            vae.to(self.device)
        loader = None
        if config.cache_latents:
            loader = ImageDataset(
                dataset.rows,
                height=config.height,
                width=config.width,
                max_pixels=config.max_pixels,
                bucketed=config.height is None and config.batch_size > 1,
                image_key=config.file_keys[0],
            )
            loader.sizes = dataset.sizes
        show = accelerator.is_main_process and config.progress
        build_cache(
            dataset,
            self._cache,
            encode_text=encode_text if config.cache_text_embeddings else None,
            encode_image=encode_image if config.cache_latents else None,
            image_loader=loader,
            model_key=self._model_key(),
            max_length=config.max_sequence_length,
            rank=rank,
            world=world,
            barrier=accelerator.wait_for_everyone,
            progress=lambda rows: tqdm(rows, desc="encode", disable=not show),
        )
        validation_text = None
        if config.validation_prompts and config.cache_text_embeddings:
            with torch.no_grad():
                validation_text = {
                    "cond": [
                        pipe.text_encoder.encode([p], config.max_sequence_length) for p in config.validation_prompts
                    ],
                    "uncond": pipe.text_encoder.encode([pipe.defaults.negative_prompt], config.max_sequence_length),
                }
            validation_text = _to_cpu(validation_text)
        # Free the device for the denoiser: the cached components are not needed again (validation decodes on demand).
        if config.cache_text_embeddings:
            text_encoder.to("cpu")
        if config.cache_latents:
            vae.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return validation_text

    # ------------------------------------------------------------------------------------------------ checkpoints
    _last_state: Path | None = None

    def _export_weights(self, unwrapped: TrainingModule, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained weights as saved for use: LoRA (format per flags) or the full trained components."""
        config = self.config
        out: dict[str, torch.Tensor] = {}
        if config.lora_base_model:
            base = config.lora_base_model
            out.update(export_lora(unwrapped.models[base], prefix=f"pipe.{base}."))
        if config.trainable_list:
            state = self.accelerator.get_state_dict(model) if self.is_fsdp else unwrapped.state_dict()
            for key, value in state.items():
                name = key.removeprefix("models.")
                if name.split(".", 1)[0] in config.trainable_list:
                    out[f"pipe.{name}"] = value
        prefix = config.remove_prefix_in_ckpt
        if prefix:
            out = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in out.items()}
        out = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in out.items()}
        if config.lora_base_model and config.align_to_opensource_format:
            out = to_opensource(out)
        return out

    def _save(
        self,
        unwrapped: TrainingModule,
        model: nn.Module,
        optimizer: Any,
        scheduler: Any,
        step: int,
        position: tuple[int, int],
        name: str,
        result: TrainResult,
    ) -> None:
        accelerator, config = self.accelerator, self.config
        weights = self._export_weights(unwrapped, model)
        if accelerator.is_main_process:
            metadata = {"format": "pt", "imagezoo_step": str(step)}
            if config.lora_base_model:
                metadata.update(
                    lora_rank=str(config.lora_rank),
                    lora_format="comfyui" if config.align_to_opensource_format else "diffsynth",
                )
            path = atomic_save_safetensors(weights, Path(config.output_path) / f"{name}.safetensors", metadata)
            result.checkpoints.append(path)
            logger.info("Saved %s (%d tensors).", path, len(weights))
        if config.save_training_state:
            self._last_state = self._save_state(unwrapped, optimizer, scheduler, step, position, collective=True)
        accelerator.wait_for_everyone()

    def _save_state(
        self,
        unwrapped: TrainingModule,
        optimizer: Any,
        scheduler: Any,
        step: int,
        position: tuple[int, int],
        *,
        collective: bool,
    ) -> Path | None:
        """Write the resumable state; with `collective=False` (interrupt) only the main process writes, no barriers."""
        accelerator, config = self.accelerator, self.config
        root = Path(config.output_path) / STATE_DIR
        final = root / f"step-{step}"
        trainer_state = {
            "global_step": step,
            "epoch": position[0],
            "batch": position[1],
            "scheduler": scheduler.state_dict(),
            "num_processes": accelerator.num_processes,
            "config": self.config.model_dump(mode="json"),
        }
        if self.is_fsdp and not collective:
            logger.warning("FSDP runs cannot save a state on interrupt (it needs every process); resume from the last.")
            return self._last_state
        if not accelerator.is_main_process and not collective:
            return None
        root.mkdir(parents=True, exist_ok=True)
        # A fixed temporary name all processes agree on; renamed into place once complete.
        tmp = root / f".tmp-step-{step}"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        if collective:
            accelerator.wait_for_everyone()
        if self.is_fsdp:
            # Sharded model/optimizer state: every process writes its own shard (torch.distributed.checkpoint).
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                write_training_state(tmp, params=None, optimizer_state=None, trainer_state=trainer_state, rank=0,
                                     is_main=True)  # fmt: skip
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                publish_state(tmp, final, config.keep_training_states)
            accelerator.wait_for_everyone()
            return final
        trainable = {n: p.detach() for n, p in unwrapped.named_parameters() if p.requires_grad}
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        write_training_state(
            tmp,
            params=trainable,
            optimizer_state=inner.state_dict() if accelerator.is_main_process else None,
            trainer_state=trainer_state,
            rank=accelerator.process_index,
            is_main=accelerator.is_main_process,
        )
        if collective:
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            publish_state(tmp, final, config.keep_training_states)
            logger.info("Saved training state %s.", final)
        return final

    def _resume(self, unwrapped: TrainingModule, optimizer: Any, scheduler: Any, rank: int) -> tuple[int, int, int]:
        config, accelerator = self.config, self.accelerator
        folder = resolve_state_folder(config.resume_from, config.output_path)
        if self.is_fsdp:
            accelerator.load_state(str(folder))
            trainer = read_training_state(folder, rank)["trainer"]
        else:
            state = read_training_state(folder, rank)
            trainer = state["trainer"]
            params = dict(unwrapped.named_parameters())
            saved = state.get("params", {})
            wanted = {n for n, p in params.items() if p.requires_grad}
            if set(saved) != wanted:
                missing, extra = sorted(wanted - set(saved)), sorted(set(saved) - wanted)
                raise InputError(
                    f"Training state {folder} does not match this run's trainable parameters (missing {missing[:5]}, "
                    f"unexpected {extra[:5]}); resume with the same --trainable_models / LoRA settings."
                )
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value.to(params[name].device))
            inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
            inner.load_state_dict(state["optimizer"])
            if "rng" in state:
                set_rng_state(*state["rng"])
        scheduler.load_state_dict(trainer["scheduler"])
        if trainer.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
            logger.warning(
                "Resuming a %s-process run with %d processes: the data order differs from an uninterrupted run.",
                trainer.get("num_processes"),
                accelerator.num_processes,
            )
        self._last_state = folder
        logger.info(
            "Resumed from %s at step %d (epoch %d, batch %d).",
            folder,
            trainer["global_step"],
            trainer["epoch"],
            trainer["batch"],
        )
        return int(trainer["global_step"]), int(trainer["epoch"]), int(trainer["batch"])

    # ------------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(
        self, unwrapped: TrainingModule, cached_text: dict[str, Any] | None, step: int, initial: bool = False
    ) -> list[Path]:
        config, accelerator = self.config, self.accelerator
        if not config.validation_prompts or (initial and not config.validation_steps):
            return []
        if not accelerator.is_main_process and not self.is_fsdp:
            return []
        pipe = self.pipeline
        assert pipe is not None
        height = config.validation_height or config.height or 512
        width = config.validation_width or config.width or 512
        was_training = {name: m.training for name, m in unwrapped.models.items()}
        for m in unwrapped.models.values():
            m.eval()
        vae_module = pipe.components.modules["vae"]
        vae_device = next(vae_module.parameters()).device
        if vae_device != self.device:
            vae_module.to(self.device)
        paths = []
        try:
            cfg = pipe.defaults.cfg_scale if config.validation_cfg_scale is None else config.validation_cfg_scale
            sampler = pipe.resolve_sampler(None)
            factor = pipe.vae.spatial_factor * pipe.denoiser.patch_size
            sigmas = sampler.sigmas(config.validation_num_inference_steps, (height // factor) * (width // factor))
            sigmas = sigmas.tolist()
            for index, prompt in enumerate(config.validation_prompts):
                if cached_text is not None:
                    cond = _text_to(cached_text["cond"][index], self.device)
                    uncond = _text_to(cached_text["uncond"], self.device) if cfg > 1 else None
                else:
                    cond = pipe.text_encoder.encode([prompt], config.max_sequence_length)
                    uncond = (
                        pipe.text_encoder.encode([pipe.defaults.negative_prompt], config.max_sequence_length)
                        if cfg > 1
                        else None
                    )
                latent_shape = (
                    1,
                    pipe.vae.latent_channels,
                    height // pipe.vae.spatial_factor,
                    width // pipe.vae.spatial_factor,
                )
                generator = torch.Generator("cpu").manual_seed(config.validation_seed)
                x = torch.randn(latent_shape, generator=generator).to(self.device)
                with accelerator.autocast():
                    for i in range(len(sigmas) - 1):
                        velocity = pipe.predict_velocity(
                            x, sigmas[i], cond, uncond, float(cfg), pipe.defaults.cfg_rescale
                        )
                        x = sampler.step(x, velocity, sigmas[i], sigmas[i + 1])
                    image = pipe.vae.decode(x.to(pipe.dtype))
                if accelerator.is_main_process:
                    from imagezoo.images import tensor_to_pil

                    path = Path(config.output_path) / "validation" / f"step-{step}-{index}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tensor_to_pil(image)[0].save(path)
                    paths.append(path)
        finally:
            if vae_device != self.device:
                vae_module.to(vae_device)
            for name, m in unwrapped.models.items():
                m.train(was_training[name])
        if paths:
            logger.info("Validation images: %s", ", ".join(str(p) for p in paths))
        return paths


@contextmanager
def _null() -> Iterator[None]:
    yield


def _to_cpu(value: Any) -> Any:
    if isinstance(value, TextConditioning):
        return TextConditioning(value.embeds.cpu(), value.mask.cpu(), value.extras)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _text_to(text: TextConditioning, device: torch.device) -> TextConditioning:
    return TextConditioning(text.embeds.to(device), text.mask.to(device), text.extras)


def train(config: TrainConfig, *, pipeline: Pipeline | None = None) -> TrainResult:
    """Run a training job (see `Trainer`)."""
    start = time.perf_counter()
    result = Trainer(config, pipeline=pipeline).run()
    logger.info("Training stopped at step %d after %.1f s.", result.global_step, time.perf_counter() - start)
    return result


__all__ = ["TrainResult", "Trainer", "TrainingModule", "load_training_pipeline", "train"]
