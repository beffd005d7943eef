"""Encode once, train on the cache: text embeddings and/or latents of every dataset row, in memory or on disk.

With a cache the text encoder (and, for latents, the VAE) runs once per row before training and then leaves the GPU,
so training holds only the denoiser. A disk cache (`--cache_dir`) is shared by the processes of a multi-GPU run
(each encodes its share of rows), survives restarts, and is reused when the rows, sizes and models are unchanged
(file names carry a hash of them).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from imagezoo.training.checkpoint import atomic_save_safetensors
from imagezoo.training.dataset import ImageDataset, Row

logger = logging.getLogger(__name__)


def row_key(row: Row, size: tuple[int, int], model_key: str, parts: Sequence[str], max_length: int) -> str:
    """A hash naming one row's cache entry: prompt, files, training size, models and what is cached."""
    text = "|".join([row.prompt, str(row.files), str(size), model_key, ",".join(parts), str(max_length)])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class EncodedCache:
    """Per-row cached tensors (`latents` (C, h, w) float32, `text_embeds` (L, D), `text_mask` (L,) bool)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.memory: dict[int, dict[str, torch.Tensor]] = {}
        self.files: dict[int, Path] = {}

    def path_for(self, row: int, key: str) -> Path:
        """Disk location of a row's entry."""
        assert self.folder is not None
        return self.folder / f"{row:07d}-{key}.safetensors"

    def put(self, row: int, tensors: dict[str, torch.Tensor], key: str) -> None:
        """Store a row's tensors (atomically on disk when there is a folder)."""
        if self.folder is None:
            self.memory[row] = {k: v.detach().cpu() for k, v in tensors.items()}
        else:
            path = self.path_for(row, key)
            atomic_save_safetensors(tensors, path)
            self.files[row] = path

    def get(self, row: int) -> dict[str, torch.Tensor]:
        """A row's tensors."""
        if row in self.memory:
            return self.memory[row]
        tensors = load_file(str(self.files[row]))
        if "text_mask" in tensors:
            tensors["text_mask"] = tensors["text_mask"].bool()
        return tensors


def build_cache(
    dataset: ImageDataset,
    cache: EncodedCache,
    *,
    encode_text: Callable[[str, tuple[int, int]], tuple[torch.Tensor, torch.Tensor]] | None,
    encode_image: Callable[[torch.Tensor], torch.Tensor] | None,
    image_loader: ImageDataset | None,
    model_key: str,
    max_length: int,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[Any], Any] = lambda x: x,
) -> None:
    """Fill `cache` for every row of `dataset`.

    In memory, every process encodes every row. On disk, process `rank` encodes rows `rank::world` that are not
    cached yet, then all processes wait at `barrier` and index the folder.

    Args:
        dataset: Rows and their training sizes.
        cache: Where to store.
        encode_text: prompt, (width, height) -> (embeds (L, D), mask (L,)); None to skip text.
        encode_image: (1, 3, H, W) image -> (1, C, h, w) latents; None to skip latents.
        image_loader: A dataset that loads images (the training dataset may not, when latents are cached).
        model_key: Identifies the models (so a cache made with other weights is not reused).
        max_length: Token cap (part of the cache key).
    """
    parts = [name for name, fn in (("text", encode_text), ("latents", encode_image)) if fn is not None]
    rows = range(len(dataset.rows))
    keys = {r: row_key(dataset.rows[r], dataset.sizes[r], model_key, parts, max_length) for r in rows}
    mine = [r for r in rows if cache.folder is None or r % world == rank]
    if cache.folder is not None:
        cache.folder.mkdir(parents=True, exist_ok=True)
        mine = [r for r in mine if not cache.path_for(r, keys[r]).is_file()]
        reused = len([r for r in rows if r % world == rank]) - len(mine)
        if reused:
            logger.info("Reusing %d cached row(s) in %s.", reused, cache.folder)
    with torch.no_grad():
        for r in progress(mine):
            tensors: dict[str, torch.Tensor] = {}
            if encode_text is not None:
                embeds, mask = encode_text(dataset.rows[r].prompt, dataset.sizes[r])
                tensors["text_embeds"], tensors["text_mask"] = embeds, mask.to(torch.uint8)
            if encode_image is not None:
                assert image_loader is not None
                image = image_loader[r]["image"][None]
                tensors["latents"] = encode_image(image)[0].float()
            if cache.folder is None:
                tensors["text_mask"] = tensors["text_mask"].bool() if "text_mask" in tensors else None
                cache.put(r, {k: v for k, v in tensors.items() if v is not None}, keys[r])
            else:
                cache.put(r, tensors, keys[r])
    barrier()
    if cache.folder is not None:
        for r in rows:
            path = cache.path_for(r, keys[r])
            if not path.is_file():
                raise FileNotFoundError(f"Cache entry {path} is missing after encoding; is --cache_dir shared?")
            cache.files[r] = path


class CachedDataset(torch.utils.data.Dataset):
    """A training dataset whose samples also carry cached latents and/or text embeddings."""

    def __init__(self, base: ImageDataset, cache: EncodedCache) -> None:
        self.base = base
        self.cache = cache

    def __len__(self) -> int:
        return len(self.base)

    def size_of(self, index: int) -> tuple[int, int]:
        """See `ImageDataset.size_of`."""
        return self.base.size_of(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.base[index]
        sample.update(self.cache.get(sample["row"]))
        return sample
