"""Training settings: every flag of the seed's `train.py` with the same meaning, plus imagezoo's own, from CLI or YAML.

Precedence: built-in defaults < `--config FILE` (YAML or JSON, keys are the flag names without `--`) < flags given on
the command line. Unknown keys in a config file are errors, as are values of the wrong type.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imagezoo.errors import ConfigError
from imagezoo.run_config import DTYPES, read_config_file

DEFAULT_LORA_TARGETS = ",".join(
    (
        "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out",
        "img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1",
    )
)
COMPONENTS = ("dit", "text_encoder", "vae")
LR_SCHEDULERS = ("constant", "linear", "cosine")
SEED_FLAGS = (
    "dataset_base_path",
    "dataset_metadata_path",
    "max_pixels",
    "height",
    "width",
    "data_file_keys",
    "dataset_repeat",
    "dataset_num_workers",
    "model_paths",
    "model_id_with_origin_paths",
    "tokenizer_path",
    "learning_rate",
    "num_epochs",
    "output_path",
    "remove_prefix_in_ckpt",
    "save_steps",
    "find_unused_parameters",
    "trainable_models",
    "lora_base_model",
    "lora_target_modules",
    "lora_rank",
    "extra_inputs",
    "use_gradient_checkpointing",
    "use_gradient_checkpointing_offload",
    "gradient_accumulation_steps",
    "align_to_opensource_format",
)
"""The flags of the seed's training script (SPEC §5), all accepted with the seed's meaning."""


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """A comma-separated string (or a list) as a list of stripped, non-empty names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]


class TrainConfig(BaseModel):
    """Settings of one training run. Field names are the CLI flag names (`--learning_rate` is `learning_rate`)."""

    model_config = ConfigDict(extra="forbid")

    # ---- dataset (seed)
    dataset_base_path: str
    dataset_metadata_path: str | None = None
    max_pixels: int = Field(default=1024 * 1024, gt=0)
    height: int | None = Field(default=None, gt=0)
    width: int | None = Field(default=None, gt=0)
    data_file_keys: str = "image"
    dataset_repeat: int = Field(default=1, ge=1)
    dataset_num_workers: int = Field(default=0, ge=0)
    # ---- models (seed)
    model_paths: str | list[Any] | None = None
    model_id_with_origin_paths: str | None = None
    tokenizer_path: str | None = None
    # ---- training (seed)
    learning_rate: float = Field(default=1e-4, gt=0)
    num_epochs: int = Field(default=1, ge=1)
    output_path: str = "./models/train"
    remove_prefix_in_ckpt: str | None = "pipe.dit."
    save_steps: int | None = Field(default=None, gt=0)
    find_unused_parameters: bool = False
    trainable_models: str | None = None
    lora_base_model: str | None = None
    lora_target_modules: str = DEFAULT_LORA_TARGETS
    lora_rank: int = Field(default=32, gt=0)
    extra_inputs: str | None = None
    use_gradient_checkpointing: bool = False
    use_gradient_checkpointing_offload: bool = False
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    align_to_opensource_format: bool = False
    # ---- imagezoo additions
    model: str | None = None
    family: str | None = None
    local_model_path: str | None = None
    skip_download: bool = False
    lora_alpha: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=1, ge=1)
    weight_decay: float = Field(default=0.01, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    max_steps: int | None = Field(default=None, gt=0)
    seed: int = 0
    dtype: str | None = None
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    max_sequence_length: int = Field(default=512, ge=1, le=1024)
    cache_text_embeddings: bool = False
    cache_latents: bool = False
    cache_dir: str | None = None
    offload_frozen_blocks: int = Field(default=0, ge=-1)
    attention_backend: str | None = None
    compile: bool | None = None
    resume_from: str | None = None
    save_training_state: bool = True
    keep_training_states: int = Field(default=1, ge=1)
    skip_bad_rows: bool = False
    validation_prompts: list[str] = Field(default_factory=list)
    validation_steps: int | None = Field(default=None, gt=0)
    validation_num_inference_steps: int = Field(default=20, gt=0)
    validation_cfg_scale: float | None = None
    validation_height: int | None = Field(default=None, gt=0)
    validation_width: int | None = Field(default=None, gt=0)
    validation_seed: int = 0
    progress: bool = True

    @field_validator("model_paths", mode="before")
    @classmethod
    def _parse_model_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"--model_paths must be JSON (a list of paths or lists of shard paths), got {value!r}: {exc}"
                ) from None
        if value is not None and not isinstance(value, list):
            raise ValueError(f"--model_paths must be a JSON list, got {type(value).__name__}")
        return value

    @field_validator("validation_prompts", mode="before")
    @classmethod
    def _prompts_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else (value or [])

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str | None) -> str | None:
        if value is not None and value not in DTYPES:
            raise ValueError(f"dtype={value!r} is not allowed; use one of {', '.join(DTYPES)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if (self.height is None) != (self.width is None):
            raise ValueError(
                f"give both --height and --width (fixed resolution) or neither (dynamic resolution up to "
                f"--max_pixels); got height={self.height}, width={self.width}"
            )
        for name in ("height", "width", "validation_height", "validation_width"):
            value = getattr(self, name)
            if value is not None and value % 16:
                raise ValueError(f"{name}={value} must be a multiple of 16")
        if self.max_pixels < 256:
            raise ValueError(f"max_pixels={self.max_pixels} is too small; at least one 16x16 patch is needed")
        for name in self.trainable_list + ([self.lora_base_model] if self.lora_base_model else []):
            if name not in COMPONENTS:
                raise ValueError(f"unknown model {name!r} in --trainable_models/--lora_base_model; use {COMPONENTS}")
        if not self.trainable_list and not self.lora_base_model:
            raise ValueError("nothing to train: give --trainable_models (full training) and/or --lora_base_model")
        if self.lora_base_model in self.trainable_list:
            raise ValueError(
                f"--lora_base_model {self.lora_base_model} is also in --trainable_models; train it fully or with "
                "LoRA, not both"
            )
        if self.lora_base_model and not split_list(self.lora_target_modules):
            raise ValueError("--lora_target_modules is empty; name at least one module suffix")
        if self.model is None and self.model_paths is None and self.model_id_with_origin_paths is None:
            raise ValueError("no model given: pass --model ID, --model_paths JSON or --model_id_with_origin_paths")
        if self.cache_text_embeddings and "text_encoder" in self.trainable_list:
            raise ValueError("--cache_text_embeddings cannot be used while training the text_encoder")
        if self.cache_latents and "vae" in self.trainable_list:
            raise ValueError("--cache_latents cannot be used while training the vae")
        if self.offload_frozen_blocks and self.lora_base_model != "dit":
            raise ValueError("--offload_frozen_blocks streams the frozen DiT weights; it needs --lora_base_model dit")
        if self.offload_frozen_blocks and not (
            self.use_gradient_checkpointing or self.use_gradient_checkpointing_offload
        ):
            raise ValueError(
                f"--offload_frozen_blocks {self.offload_frozen_blocks} needs --use_gradient_checkpointing (or "
                "--use_gradient_checkpointing_offload): without recomputation autograd keeps every block's weights "
                "until backward, so no block could leave the GPU"
            )
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def trainable_list(self) -> list[str]:
        """Components trained fully."""
        return split_list(self.trainable_models)

    @property
    def file_keys(self) -> list[str]:
        """Metadata columns holding file paths (images, masks), loaded as images."""
        return split_list(self.data_file_keys) or ["image"]

    @property
    def extra_input_list(self) -> list[str]:
        """Metadata columns passed to the model family as extra inputs."""
        return split_list(self.extra_inputs)

    @property
    def lora_targets(self) -> list[str]:
        """Module-name suffixes that get LoRA."""
        return split_list(self.lora_target_modules)

    @property
    def alpha(self) -> float:
        """LoRA alpha (default: the rank, so the scale alpha/rank is 1, as DiffSynth trains)."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)


# ---------------------------------------------------------------------------------------------------------- CLI


_SEED_HELP = {
    "dataset_base_path": "root folder of the dataset (images are relative to it)",
    "dataset_metadata_path": "metadata: .csv (image,prompt) or .json/.jsonl list (default: metadata.* in the base)",
    "max_pixels": "dynamic resolution: images above this many pixels are scaled down (default 1048576)",
    "height": "fixed training height (multiple of 16); leave height and width out for dynamic resolution",
    "width": "fixed training width (multiple of 16)",
    "data_file_keys": "comma-separated metadata keys that hold file paths (default: image)",
    "dataset_repeat": "times the dataset is repeated per epoch",
    "dataset_num_workers": "data-loader worker processes",
    "model_paths": "JSON list of model files (a list of shards per component)",
    "model_id_with_origin_paths": "comma-separated MODEL_ID:FILE_PATTERN, e.g. Qwen/Qwen-Image:vae/*.safetensors",
    "tokenizer_path": "tokenizer folder (default: the model's tokenizer/)",
    "learning_rate": "learning rate (default 1e-4; 1e-5 is usual for full fine-tuning)",
    "num_epochs": "epochs",
    "output_path": "folder for checkpoints",
    "remove_prefix_in_ckpt": "prefix removed from saved keys (default pipe.dit.)",
    "save_steps": "save every N optimizer steps (default: at the end of each epoch)",
    "find_unused_parameters": "accepted for compatibility; never needed (unused parameters are frozen)",
    "trainable_models": "comma-separated components trained fully: dit, text_encoder, vae",
    "lora_base_model": "component that gets LoRA (dit)",
    "lora_target_modules": "comma-separated module-name suffixes that get LoRA",
    "lora_rank": "LoRA rank (default 32)",
    "extra_inputs": "comma-separated metadata keys passed to the model (e.g. EliGen entity prompts and masks)",
    "use_gradient_checkpointing": "recompute activations in backward (less memory)",
    "use_gradient_checkpointing_offload": "with checkpointing, keep the saved activations in CPU memory",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "align_to_opensource_format": "save LoRA keys in the diffusers/ComfyUI format",
    # imagezoo's additions
    "model": "registry model ID or alias instead of --model_paths (e.g. Qwen/Qwen-Image)",
    "batch_size": "samples per process per micro-batch",
    "lr_scheduler": "constant, linear or cosine (after --lr_warmup_steps of linear warmup)",
    "max_grad_norm": "gradient clipping norm (0 disables)",
    "max_steps": "stop after this many optimizer steps",
    "cache_text_embeddings": "encode every prompt once before training; the text encoder leaves the GPU",
    "cache_latents": "encode every image once before training; the VAE leaves the GPU",
    "cache_dir": "keep the caches on disk (shared by processes, reused by later runs)",
    "offload_frozen_blocks": (
        "LoRA: keep the frozen weights of N evenly spaced DiT blocks (-1 = all) in pinned CPU memory, each block "
        "copied in (prefetched during the blocks before it) when used; needs --use_gradient_checkpointing; works "
        "with --compile"
    ),
    "attention_backend": "DiT attention kernel (auto, sdpa, cudnn, flash, ...; all exact)",
    "compile": "regional torch.compile of the DiT blocks (exact; default on CUDA GPUs; compiles in the first step)",
    "resume_from": "continue from an output_path's latest state (or a training_state/step-N folder)",
    "skip_bad_rows": "skip and count bad dataset rows instead of stopping",
}
_FLAGS = {
    "use_gradient_checkpointing",
    "use_gradient_checkpointing_offload",
    "find_unused_parameters",
    "align_to_opensource_format",
    "skip_download",
    "cache_text_embeddings",
    "cache_latents",
    "skip_bad_rows",
}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `train` argument parser (every seed flag plus imagezoo's); all defaults are None so a config file shows.

    Args:
        parser: Add the arguments to this parser (a CLI sub-parser) instead of a new one.
    """
    parser = parser or argparse.ArgumentParser(
        prog="python -m imagezoo.train", description="Train LoRA or full fine-tunes (launchable with accelerate)."
    )
    parser.add_argument("--config", help="YAML/JSON file with the same settings (keys = flag names); flags override")
    fields = TrainConfig.model_fields
    for name, field in fields.items():
        flag = f"--{name}"
        help_text = _SEED_HELP.get(name, field.description or "")
        if name in _FLAGS:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif name in ("save_training_state", "progress", "compile"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "validation_prompts":
            parser.add_argument(flag, nargs="+", default=None, help="prompts rendered every --validation_steps")
        else:
            parser.add_argument(flag, type=_ARG_TYPES.get(name, str), default=None, help=help_text)
    return parser


_ARG_TYPES: dict[str, Any] = {
    "max_pixels": int,
    "height": int,
    "width": int,
    "dataset_repeat": int,
    "dataset_num_workers": int,
    "learning_rate": float,
    "num_epochs": int,
    "save_steps": int,
    "lora_rank": int,
    "gradient_accumulation_steps": int,
    "lora_alpha": float,
    "batch_size": int,
    "weight_decay": float,
    "adam_beta1": float,
    "adam_beta2": float,
    "adam_epsilon": float,
    "lr_warmup_steps": int,
    "max_grad_norm": float,
    "max_steps": int,
    "seed": int,
    "max_sequence_length": int,
    "offload_frozen_blocks": int,
    "keep_training_states": int,
    "validation_steps": int,
    "validation_num_inference_steps": int,
    "validation_cfg_scale": float,
    "validation_height": int,
    "validation_width": int,
    "validation_seed": int,
}


def add_validate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `imagezoo validate`."""
    parser.add_argument("--model", default=None, help="registry model ID or alias (e.g. Qwen/Qwen-Image, tiny)")
    parser.add_argument("--model_paths", default=None, help="JSON list of model files, as for training")
    parser.add_argument("--model_id_with_origin_paths", default=None, help="MODEL_ID:PATTERN list, as for training")
    parser.add_argument("--tokenizer_path", default=None)
    parser.add_argument("--local_model_path", default=None)
    parser.add_argument("--skip_download", action="store_true", default=False)
    parser.add_argument("--lora", default=None, help="trained LoRA .safetensors")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--checkpoint", default=None, help="fully fine-tuned component .safetensors")
    parser.add_argument("--component", default="dit", help="component the LoRA/checkpoint belongs to (default dit)")
    parser.add_argument("--prompt", required=True, nargs="+", help="prompt(s) to generate")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--out", default="validate.png", help="image path (several prompts get -0, -1, ... suffixes)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--cfg_scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default bf16 on GPU, fp32 on CPU)")
    return parser


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    """Merge `--config FILE` with the flags given (flags win) and validate."""
    file = getattr(args, "config", None)
    data: dict[str, Any] = read_config_file(file) if file else {}
    for name in TrainConfig.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return make_config(data, source=file)


def make_config(data: dict[str, Any], source: str | Path | None = None) -> TrainConfig:
    """Validate settings into a `TrainConfig`, raising `ConfigError` that names each bad setting."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        where = f" in {source}" if source else ""
        raise ConfigError(f"Invalid training settings{where}: {problems}") from None


def parse_train_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse `python -m imagezoo.train` arguments into a validated `TrainConfig`."""
    return config_from_namespace(build_parser().parse_args(argv))
