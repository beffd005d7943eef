"""The plugin manager: built-in plugins, the `imagezoo` entry-point group, an allow-list, blocking, tracing.

Environment:
    IMAGEZOO_LOAD_PLUGINS: comma-separated names of the installed (entry-point) plugins to load; unset loads all,
        empty loads none. Built-ins always load unless blocked.
    IMAGEZOO_BLOCK_PLUGINS: comma-separated plugin names never to load (built-ins included).
    IMAGEZOO_TRACE_PLUGINS: "1" logs every hook call at DEBUG level.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from imagezoo import hookspecs, resolvers
from imagezoo.config import ModelConfig
from imagezoo.errors import PluginError, WeightsError
from imagezoo.names import NameTable
from imagezoo.registry import BUILTIN_TABLE, ModelRegistry, load_builtin_table

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "imagezoo"
LOAD_ENV = "IMAGEZOO_LOAD_PLUGINS"
BLOCK_ENV = "IMAGEZOO_BLOCK_PLUGINS"
TRACE_ENV = "IMAGEZOO_TRACE_PLUGINS"
KERNEL_PLUGINS = ("imagezoo.resolvers", "imagezoo.downloader")
# Module names, imported by name like any third-party plugin: the kernel never imports plugin code directly.
BUILTIN_PLUGINS = (
    "imagezoo.plugins.qwen_image",
    "imagezoo.plugins.samplers",
    "imagezoo.plugins.eligen",
    "imagezoo.plugins.memory",
)


def _names_from_env(var: str) -> list[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


@dataclass(frozen=True)
class PluginInfo:
    """What `imagezoo plugins` shows for one loaded plugin."""

    name: str
    version: str | None
    hooks: tuple[str, ...]
    builtin: bool


class Kernel:
    """A loaded set of plugins and the tables they registered."""

    def __init__(self, block: list[str] | None = None, load: list[str] | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._versions: dict[str, str | None] = {}
        self._builtin: set[str] = set()
        blocked = set(block if block is not None else _names_from_env(BLOCK_ENV) or [])
        for name in blocked:
            self.pm.set_blocked(name)
        if os.environ.get(TRACE_ENV) == "1":
            self.pm.trace.root.setwriter(logger.debug)
            self.pm.enable_tracing()
        self._register(resolvers, KERNEL_PLUGINS[0], builtin=True)
        self._register(resolvers.Downloader(), KERNEL_PLUGINS[1], builtin=True)
        for module_name in BUILTIN_PLUGINS:
            if self.pm.is_blocked(module_name):
                continue
            self._register(importlib.import_module(module_name), module_name, builtin=True)
        self._load_entry_points(load if load is not None else _names_from_env(LOAD_ENV))
        self._models: ModelRegistry | None = None
        self._tables: dict[str, NameTable[Any]] = {}

    def _register(self, plugin: object, name: str, *, builtin: bool, version: str | None = None) -> None:
        if self.pm.is_blocked(name):
            return
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"Plugin {name!r} could not be registered: {exc}") from exc
        self._versions[name] = version
        if builtin:
            self._builtin.add(name)

    def _load_entry_points(self, allowed: list[str] | None) -> None:
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if allowed is not None and entry_point.name not in allowed:
                continue
            if self.pm.is_blocked(entry_point.name):
                continue
            try:
                plugin = entry_point.load()
            except Exception as exc:
                raise PluginError(
                    f"Plugin {entry_point.name!r} ({entry_point.value}) failed to import: {exc}. "
                    f"Fix or uninstall it, or block it with {BLOCK_ENV}={entry_point.name}."
                ) from exc
            version = entry_point.dist.version if entry_point.dist is not None else None
            self._register(plugin, entry_point.name, builtin=False, version=version)

    def _collect(self, hook_name: str, add: Callable[[str, tuple[Any, ...]], None]) -> None:
        """Call each implementation of a `register_*` hook with a callback that knows the plugin's name."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name

            def register(*args: Any, _plugin: str = plugin_name) -> None:
                add(_plugin, args)

            impl.function(register=register)

    @property
    def models(self) -> ModelRegistry:
        """All model entries: the built-in table plus every plugin's `register_models`."""
        if self._models is None:
            registry = ModelRegistry()
            registry.extend(load_builtin_table(), BUILTIN_TABLE)
            self._collect("register_models", lambda plugin, args: registry.add(args[0], plugin))
            self._models = registry
        return self._models

    def table(self, hook_name: str, kind: str) -> NameTable[Any]:
        """A name table filled by a `register_*(name, value)` hook."""
        if hook_name not in self._tables:
            table: NameTable[Any] = NameTable(kind)
            self._collect(hook_name, lambda plugin, args: table.add(args[0], args[1], plugin))
            self._tables[hook_name] = table
        return self._tables[hook_name]

    @property
    def families(self) -> NameTable[Any]:
        """Model families (component builders) by name."""
        return self.table("register_components", "model family")

    @property
    def samplers(self) -> NameTable[Any]:
        """Sampler factories by name."""
        return self.table("register_samplers", "sampler")

    @property
    def memory_strategies(self) -> NameTable[Any]:
        """Memory-strategy factories by name."""
        return self.table("register_memory_strategies", "memory strategy")

    @property
    def input_extensions(self) -> NameTable[Any]:
        """Extra-input handlers (`InputExtension`s) by name."""
        return self.table("register_inputs", "input extension")

    def resolve_weights(self, config: ModelConfig) -> list[Path]:
        """Local files for a `model_id` config, through the `resolve_weights` chain."""
        files = self.pm.hook.resolve_weights(config=config)
        if not files:
            raise WeightsError(f"No plugin could provide files for {config.describe()}.")
        return list(files)

    def plugins(self) -> list[PluginInfo]:
        """Loaded plugins with their versions and implemented hooks."""
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # pluggy lists blocked names with no plugin
                continue
            hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or []))
            infos.append(PluginInfo(name, self._versions.get(name), hooks, name in self._builtin))
        return infos


_kernel: Kernel | None = None


def get_kernel() -> Kernel:
    """The process-wide kernel, loaded on first use."""
    global _kernel
    if _kernel is None:
        _kernel = Kernel()
    return _kernel


def reset_kernel() -> None:
    """Forget the loaded plugins (tests, or after changing the environment variables)."""
    global _kernel
    _kernel = None
