"""Every extension point of imagezoo. Plugins implement these with `@imagezoo.hookimpl`.

Registration hooks receive a `register` callback (llm-style) instead of returning values, so one plugin can
register any number of things and the kernel can record which plugin gave each one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

from imagezoo.config import ModelConfig

PROJECT_NAME = "imagezoo"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Register registry entries: `register(entry)` with a `ModelEntry` or a dict of its fields."""


@hookspec
def register_components(register: Callable[[str, Any], None]) -> None:
    """Register model families: `register(name, family)` where family builds a pipeline's components."""


@hookspec
def register_samplers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register samplers: `register(name, factory)` where `factory(**options)` returns a `Sampler`."""


@hookspec
def register_memory_strategies(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register memory strategies: `register(name, factory)` where `factory(**options)` returns a `MemoryStrategy`."""


@hookspec
def register_inputs(register: Callable[[str, Any], None]) -> None:
    """Register extra generation inputs: `register(name, extension)` with an `InputExtension` (pipeline keywords)."""


@hookspec(firstresult=True)
def resolve_weights(config: ModelConfig) -> list[Path] | None:
    """Return the local files for a `model_id` config (local cache, generator, download...), or None to pass."""
