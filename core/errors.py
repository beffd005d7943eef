"""One exception hierarchy for the whole kernel and its plugins.

Every message says what was wrong, with which value, and what to do about it.
"""

from __future__ import annotations


class ImagezooError(Exception):
    """Base class of every error imagezoo raises on purpose."""


class InputError(ImagezooError, ValueError):
    """A user-supplied argument has a value that is not allowed."""


class ConfigError(ImagezooError, ValueError):
    """A registry entry, run config or plugin declaration is invalid."""


class UnknownNameError(ImagezooError, KeyError):
    """A name (sampler, memory strategy, family, ...) is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(UnknownNameError):
    """A model ID is not in the registry."""


class PluginError(ImagezooError):
    """A plugin failed to load or registered something invalid (e.g. a duplicate name)."""


class WeightsError(ImagezooError):
    """A checkpoint is missing, corrupt, incomplete, or does not match the architecture."""


class NumericalError(ImagezooError, FloatingPointError):
    """Non-finite values appeared during sampling."""
