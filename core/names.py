"""Case-insensitive name tables with "did you mean" and provenance (which plugin registered what)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from imagezoo.errors import ModelNotFoundError, PluginError, UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Registered(Generic[T]):
    """A registered object and the plugin that registered it."""

    name: str
    value: T
    plugin: str


def suggestion(name: str, candidates: list[str]) -> str:
    """A " Did you mean ...?" suffix, or "" when nothing is close."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in candidates], n=3, cutoff=0.5)
    originals = [next(c for c in candidates if c.lower() == low) for low in close]
    return f" Did you mean {', '.join(repr(o) for o in originals)}?" if originals else ""


class NameTable(Generic[T]):
    """Objects by case-insensitive name; a second registration of a name is an error, never an overwrite."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Registered[T]] = {}

    def add(self, name: str, value: T, plugin: str) -> None:
        """Register `value` under `name` for `plugin`."""
        if not isinstance(name, str) or not name.strip():
            raise PluginError(f"Plugin {plugin!r} registered a {self.kind} with an invalid name {name!r}.")
        key = name.lower()
        if key in self._items:
            previous = self._items[key]
            raise PluginError(
                f"Duplicate {self.kind} {name!r}: registered by plugin {previous.plugin!r} and again by "
                f"{plugin!r}. Block one of them (IMAGEZOO_BLOCK_PLUGINS) or rename."
            )
        self._items[key] = Registered(name, value, plugin)

    def get(self, name: str) -> Registered[T]:
        """Look `name` up, raising `ModelNotFoundError` with the known names and a suggestion."""
        try:
            return self._items[name.lower()]
        except KeyError:
            known = self.names()
            error = ModelNotFoundError if self.kind == "model ID" else UnknownNameError
            raise error(
                f"Unknown {self.kind} {name!r}.{suggestion(name, known)} Available: {', '.join(known) or 'none'}."
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[Registered[T]]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        """Registered names as given, in registration order."""
        return [item.name for item in self._items.values()]
