"""imagezoo: a plugin-based model zoo for text-to-image diffusion.

Quick start::

    import imagezoo
    pipe = imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32)
    image = pipe("a red bicycle", seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagezoo.config import ModelConfig
from imagezoo.errors import (
    ConfigError,
    ImagezooError,
    InputError,
    ModelNotFoundError,
    NumericalError,
    PluginError,
    UnknownNameError,
    WeightsError,
)
from imagezoo.hookspecs import hookimpl
from imagezoo.registry import ModelEntry

if TYPE_CHECKING:
    import torch

    from imagezoo.pipeline import Pipeline

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "ImagezooError",
    "InputError",
    "ModelConfig",
    "ModelEntry",
    "ModelNotFoundError",
    "NumericalError",
    "Pipeline",
    "PluginError",
    "UnknownNameError",
    "WeightsError",
    "hookimpl",
    "list_models",
    "load",
]


def list_models() -> list[ModelEntry]:
    """Every registered model entry (built-in table and plugins)."""
    from imagezoo.plugin_manager import get_kernel

    return [registered.value for registered in get_kernel().models]


def load(
    model_id: str,
    *,
    device: str = "cpu",
    torch_dtype: torch.dtype | None = None,
    memory: Sequence[str] = (),
    local_model_path: str | Path | None = None,
    skip_download: bool = False,
    gpus: int | None = None,
    parallel: str = "auto",
    build_on_host: bool | None = None,
    **memory_options: Any,
) -> Pipeline:
    """Load a registered model by ID or alias (no file patterns needed).

    Args:
        model_id: e.g. `"Qwen/Qwen-Image"`, `"qwen-image"`, `"tiny"`.
        device: Compute device.
        torch_dtype: Compute dtype (default bfloat16).
        memory: Names of memory strategies to apply, in order.
        local_model_path: Download/cache folder.
        skip_download: Use local files only.
        gpus: Run each generation on this many processes, one per GPU (`imagezoo.parallel`): under torchrun /
            accelerate launch the launcher's ranks, otherwise workers this call spawns. None: one process.
        parallel: How several GPUs share a generation: "auto", "sp" (sequence) or "cfg" (docs/parallel.md).
        build_on_host: Load the weights in host memory (for memory strategies applied later); default: when
            `memory` names a placement strategy (offload, stream, disk).
        **memory_options: Passed to `Pipeline.enable_memory` (e.g. `vram_limit=12`).
    """
    import torch

    from imagezoo.pipeline import Pipeline

    options: dict[str, Any] = {}
    if gpus is not None:
        from imagezoo.parallel import ParallelPipeline

        builder, options = ParallelPipeline, {"gpus": gpus, "parallel": parallel}
    else:
        builder = Pipeline
    if build_on_host is None and memory:
        from imagezoo.memory import places_weights
        from imagezoo.plugin_manager import get_kernel

        build_on_host = places_weights(memory, get_kernel().memory_strategies)
    if build_on_host:
        options["build_device"] = "cpu"
    pipe = builder.from_registry(
        model_id,
        device=device,
        torch_dtype=torch_dtype or torch.bfloat16,
        local_model_path=local_model_path,
        skip_download=skip_download,
        **options,
    )
    if memory:
        pipe.enable_memory(list(memory), **memory_options)
    return pipe


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from imagezoo.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'imagezoo' has no attribute {name!r}")
