"""Run configs: the same settings as the CLI flags, from YAML/JSON files (validated, unknown keys are errors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imagezoo.errors import ConfigError

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}


class LoraSpec(BaseModel):
    """One LoRA to load for a run: a file (any supported key format) and its strength."""

    model_config = ConfigDict(extra="forbid")

    path: str
    scale: float = 1.0
    name: str | None = None


def _lora_spec(value: Any) -> Any:
    # "PATH" or "PATH:SCALE" strings, as on the command line.
    if isinstance(value, str):
        from imagezoo.lora import parse_lora_spec

        path, scale = parse_lora_spec(value)
        return {"path": path, "scale": scale}
    return value


def lora_specs(values: list[Any]) -> list[LoraSpec]:
    """`LoraSpec`s from `"PATH[:SCALE]"` strings or dicts, with a `ConfigError` naming a bad one."""
    try:
        return [LoraSpec.model_validate(_lora_spec(value)) for value in values]
    except ValidationError as exc:
        raise ConfigError(f"Invalid LoRA setting: {exc}") from None


class GenerateConfig(BaseModel):
    """Settings of one `imagezoo generate` run; every field left out takes the model's registry default.

    `loras` are loaded onto the model before memory strategies are applied; `inputs` are extra keyword inputs of
    the pipeline, handled by plugins (e.g. `eligen_entity_prompts`, or the generic `entity_prompts`; mask images
    may be given as file paths).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"
    prompt: str | list[str] = ""
    negative_prompt: str | None = None
    out: str = "image.png"
    cfg_scale: float | None = None
    num_inference_steps: int | None = Field(default=None, gt=0)
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    rand_device: str = "cpu"
    device: str | None = None
    dtype: str | None = None
    tiled: bool = False
    tile_size: int = 128
    tile_stride: int = 64
    input_image: str | None = None
    denoising_strength: float = 1.0
    sampler: str | None = None
    memory: list[str] = Field(default_factory=list)
    memory_options: dict[str, Any] = Field(default_factory=dict)
    speed: str | None = None
    gpus: int | None = Field(default=None, gt=0)
    parallel: Literal["auto", "sp", "cfg"] = "auto"
    local_model_path: str | None = None
    skip_download: bool = False
    loras: list[LoraSpec] = Field(default_factory=list)
    fuse_loras: bool = False
    inputs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("loras", mode="before")
    @classmethod
    def _parse_lora_strings(cls, value: Any) -> Any:
        return [_lora_spec(item) for item in value] if isinstance(value, list) else value

    def torch_dtype_name(self) -> str | None:
        """The torch dtype attribute name for `dtype`, validated."""
        if self.dtype is None:
            return None
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not allowed; use one of {', '.join(DTYPES)}.")
        return DTYPES[self.dtype]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a dict, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"Config file {str(path)!r} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {str(path)!r} must hold a mapping of settings, got {type(data).__name__}.")
    return data


def generate_config(file: str | Path | None, overrides: dict[str, Any]) -> GenerateConfig:
    """File settings overridden by explicitly given CLI values."""
    data = read_config_file(file) if file else {}
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return GenerateConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"Invalid generate settings{f' in {file}' if file else ''}: {exc}") from None
