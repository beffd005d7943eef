"""The model registry: schema of `registry.yaml` entries, merged with entries that plugins register."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagezoo.errors import ConfigError
from imagezoo.names import NameTable, Registered

BUILTIN_TABLE = "imagezoo (registry.yaml)"


class ComponentSource(BaseModel):
    """Where one component's files are in a model repo."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="Glob of the files inside the repo, or a folder ending in '/'.")
    model_id: str | None = Field(default=None, description="Repo holding the files; default: the entry's own ID.")


class Defaults(BaseModel):
    """Per-model generation defaults, used whenever the caller leaves an argument out."""

    model_config = ConfigDict(extra="forbid")

    num_inference_steps: int = Field(default=30, gt=0)
    cfg_scale: float = Field(default=1.0, ge=0.0)
    negative_prompt: str = ""
    height: int = Field(default=1328, gt=0)
    width: int = Field(default=1328, gt=0)
    sampler: str = "flow_match_euler"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    cfg_rescale: bool = True
    max_sequence_length: int = Field(default=512, gt=0, le=1024)


class ModelEntry(BaseModel):
    """One model ID: which family builds it, where its files are, and its defaults."""

    model_config = ConfigDict(extra="forbid")

    id: str
    aliases: list[str] = Field(default_factory=list)
    family: str
    description: str = ""
    components: dict[str, ComponentSource]
    adapters: list[ComponentSource] = Field(default_factory=list)
    defaults: Defaults = Field(default_factory=Defaults)

    def names(self) -> list[str]:
        """The ID and every alias."""
        return [self.id, *self.aliases]

    def component_model_id(self, component: str) -> str:
        """The repo a component's files come from."""
        return self.components[component].model_id or self.id


def parse_entry(data: ModelEntry | Mapping[str, Any], origin: str) -> ModelEntry:
    """Validate one entry, turning pydantic's error into a `ConfigError` that names the origin."""
    if isinstance(data, ModelEntry):
        return data
    try:
        return ModelEntry.model_validate(dict(data))
    except ValidationError as exc:
        name = data.get("id", "<no id>") if isinstance(data, Mapping) else repr(data)
        raise ConfigError(f"Invalid registry entry {name!r} from {origin}: {exc}") from None


def load_builtin_table() -> list[ModelEntry]:
    """Read the registry.yaml shipped with the package."""
    text = resources.files("imagezoo").joinpath("registry.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    unknown = set(data) - {"models"}
    if unknown:
        raise ConfigError(f"registry.yaml has unknown top-level key(s) {sorted(unknown)}; only 'models' is allowed.")
    return [parse_entry(item, "registry.yaml") for item in data.get("models", [])]


class ModelRegistry:
    """Model entries by ID or alias, case-insensitive; each remembers which plugin gave it."""

    def __init__(self) -> None:
        self._names: NameTable[ModelEntry] = NameTable("model ID")
        self._entries: list[Registered[ModelEntry]] = []

    def add(self, entry: ModelEntry | Mapping[str, Any], plugin: str) -> ModelEntry:
        """Add an entry; an ID or alias already taken is an error naming both plugins."""
        entry = parse_entry(entry, f"plugin {plugin!r}")
        for name in entry.names():
            self._names.add(name, entry, plugin)
        self._entries.append(Registered(entry.id, entry, plugin))
        return entry

    def extend(self, entries: Iterable[ModelEntry], plugin: str) -> None:
        """Add several entries from one source."""
        for entry in entries:
            self.add(entry, plugin)

    def get(self, name: str) -> ModelEntry:
        """The entry for an ID or alias; `ModelNotFoundError` with a suggestion on a miss."""
        return self._names.get(name).value

    def provenance(self, name: str) -> str:
        """Which plugin registered the entry."""
        return self._names.get(name).plugin

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[Registered[ModelEntry]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
