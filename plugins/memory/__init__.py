"""Built-in memory strategies: `fp8`, `offload`, `stream`, `disk` (see `docs/memory.md`).

Cheap to import: each strategy's module (and torch) loads only when the strategy is created. Strategies are
hooks on modules, applied by `Pipeline.enable_memory([...])` or `Pipeline.enable_vram_management(...)` in a declared
order (storage dtype, then placement) and removed by `Pipeline.disable_memory()`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from imagezoo.hookspecs import hookimpl

_PLACEMENT_OPTIONS = frozenset(
    {"components", "vram_limit", "vram_buffer", "num_persistent_param_in_dit", "prefetch", "exclusive", "sources"}
)
_STAGE_DTYPE = 10  # imagezoo.memory.STAGE_DTYPE (importing it would import torch)
_STAGE_PLACEMENT = 20


class LazyStrategy:
    """A registered factory that imports its strategy class on first use; declares stage and options up front."""

    def __init__(self, module: str, cls: str, stage: int, option_names: frozenset[str], doc: str) -> None:
        self.module = module
        self.cls = cls
        self.stage = stage
        self.option_names = option_names
        self.__doc__ = doc

    def load(self) -> type:
        """The strategy class."""
        return getattr(importlib.import_module(self.module), self.cls)

    def __call__(self, **options: Any) -> Any:
        return self.load()(**options)


STRATEGIES = {
    "fp8": LazyStrategy(
        "imagezoo.plugins.memory.fp8",
        "FP8Storage",
        _STAGE_DTYPE,
        frozenset({"dtype", "granularity", "components", "keep_original"}),
        "Weights stored in FP8 with per-channel scales, computed in the pipeline dtype.",
    ),
    "offload": LazyStrategy(
        "imagezoo.plugins.memory.offload",
        "Offload",
        _STAGE_PLACEMENT,
        _PLACEMENT_OPTIONS,
        "Components live in host memory and take turns on the device.",
    ),
    "stream": LazyStrategy(
        "imagezoo.plugins.memory.stream",
        "Stream",
        _STAGE_PLACEMENT,
        _PLACEMENT_OPTIONS,
        "Blocks streamed from pinned host memory under a VRAM budget, with prefetch.",
    ),
    "disk": LazyStrategy(
        "imagezoo.plugins.memory.disk",
        "Disk",
        _STAGE_PLACEMENT,
        _PLACEMENT_OPTIONS,
        "Blocks read from the safetensors files when needed; host RAM stays flat.",
    ),
}


@hookimpl
def register_memory_strategies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """The built-in strategies."""
    for name, factory in STRATEGIES.items():
        register(name, factory)
