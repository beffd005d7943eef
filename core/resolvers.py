"""The kernel's own `resolve_weights` implementations: the local cache first, the download last."""

from __future__ import annotations

from pathlib import Path

from imagezoo.config import ModelConfig
from imagezoo.hookspecs import hookimpl
from imagezoo.weights import download_model_files, find_complete_local_files


@hookimpl(tryfirst=True)
def resolve_weights(config: ModelConfig) -> list[Path] | None:
    """Files already present and complete under `local_model_path/model_id`."""
    return find_complete_local_files(config)


class Downloader:
    """Fetches what the cache and other resolvers could not provide (registered last)."""

    @hookimpl(trylast=True)
    def resolve_weights(self, config: ModelConfig) -> list[Path] | None:
        """Download from the configured source (modelscope by default)."""
        return download_model_files(config)
