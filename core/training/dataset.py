"""Training data: a folder of images plus metadata (CSV or JSON), checked in full before training starts.

Metadata rows name an image (and, through `data_file_keys`, other files such as EliGen masks) and a prompt. Every row
is checked up front — columns present, files present with an allowed suffix, images decodable — so a bad row stops
the run before any GPU time is spent, with an error naming the row and the file (or, with `skip_bad_rows`, is
skipped and counted).

Resolution: a fixed `height`×`width` (resize to cover, center crop), or dynamic: each image keeps its aspect ratio,
scaled down to at most `max_pixels` and cropped to multiples of 16. With batches of more than one image, dynamic
resolution snaps each image to the nearest of a set of aspect-ratio buckets of about `max_pixels` pixels, so the images
of a batch have one size and stack.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from imagezoo.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
METADATA_NAMES = ("metadata.csv", "metadata.json", "metadata.jsonl")
SIZE_MULTIPLE = 16
_BUCKET_STEP = 64
_MAX_ASPECT = 4.0


@dataclass
class Row:
    """One checked metadata row.

    Attributes:
        number: How the user finds the row: the CSV line number (header = line 1) or the JSON list index.
        prompt: The caption.
        files: File key -> resolved path (or list of paths, for JSON list values).
        extras: Extra-input key -> value as given in the metadata (file keys hold the resolved paths).
        size: (width, height) of the main image.
    """

    number: int
    prompt: str
    files: dict[str, Path | list[Path]]
    extras: dict[str, Any]
    size: tuple[int, int]


@dataclass
class BadRow:
    """A row that failed the checks, and why."""

    number: int
    reason: str


@dataclass
class DatasetReport:
    """What the up-front check found."""

    rows: list[Row]
    skipped: list[BadRow] = field(default_factory=list)


def find_metadata(base: Path, metadata_path: str | Path | None) -> Path:
    """The metadata file: the given path (relative paths are tried as given, then inside the base), or `metadata.*`."""
    if metadata_path:
        path = Path(metadata_path)
        if not path.is_file() and (base / path).is_file():
            path = base / path
        if not path.is_file():
            raise InputError(
                f"--dataset_metadata_path {str(metadata_path)!r} does not exist (also tried under {base})."
            )
        return path
    for name in METADATA_NAMES:
        if (base / name).is_file():
            return base / name
    raise InputError(
        f"No metadata file in {base}: add one of {', '.join(METADATA_NAMES)} (columns image,prompt) or pass "
        "--dataset_metadata_path."
    )


def read_metadata(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a CSV (`image,prompt` header), JSON list or JSON-lines file, each with its user-visible number."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Cannot read metadata file {path}: {exc}") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise InputError(f"Metadata file {path} is empty; it needs a header line such as 'image,prompt'.")
        # Line numbers as a spreadsheet shows them: the header is line 1.
        return [(number, dict(row)) for number, row in enumerate(reader, start=2)]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"Metadata file {path}, line {number}: not valid JSON ({exc}).") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"Metadata file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise InputError(f"Metadata file {path} must hold a JSON list of rows, got {type(data).__name__}.")
        return list(enumerate(data))
    raise InputError(f"Metadata file {path} has suffix {suffix!r}; use .csv, .json or .jsonl.")


def _row_label(path: Path, number: int) -> str:
    kind = "line" if path.suffix.lower() in (".csv", ".jsonl") else "row"
    return f"{path.name} {kind} {number}"


def _check_image(path: Path) -> tuple[int, int]:
    """Decode the image fully (a truncated file fails only when decoded); return (width, height)."""
    with Image.open(path) as image:
        image.load()
        return image.size


def _resolve_file(base: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column {key!r} is empty or not a file name ({value!r})")
    path = base / value.strip()
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"file {str(path)!r} ({key}) has suffix {path.suffix!r}; allowed: {', '.join(IMAGE_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} ({key}) does not exist")
    return path


def _check_row(
    base: Path, number: int, raw: Any, file_keys: Sequence[str], extra_inputs: Sequence[str]
) -> tuple[Row | None, str | None]:
    """Validate one row's structure and files (without decoding); returns (row, None) or (None, reason)."""
    if not isinstance(raw, dict):
        return None, f"row is a {type(raw).__name__}, not a mapping of columns"
    try:
        prompt = raw.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"column 'prompt' is missing or not text ({prompt!r})")
        files: dict[str, Path | list[Path]] = {}
        for key in file_keys:
            if key not in raw or raw[key] in (None, ""):
                raise ValueError(f"column {key!r} (a --data_file_keys entry) is missing")
            value = raw[key]
            if isinstance(value, list):
                files[key] = [_resolve_file(base, item, key) for item in value]
            else:
                files[key] = _resolve_file(base, value, key)
        extras = {}
        for key in extra_inputs:
            if key not in raw:
                raise ValueError(f"column {key!r} (an --extra_inputs entry) is missing")
            extras[key] = files.get(key, raw[key])
    except ValueError as exc:
        return None, str(exc)
    return Row(number=number, prompt=prompt, files=files, extras=extras, size=(0, 0)), None


def load_rows(
    base_path: str | Path,
    metadata_path: str | Path | None = None,
    *,
    file_keys: Sequence[str] = ("image",),
    extra_inputs: Sequence[str] = (),
    skip_bad_rows: bool = False,
    num_threads: int = 8,
) -> DatasetReport:
    """Read and check every metadata row, decoding every image once.

    Args:
        base_path: Dataset root; file names in the metadata are relative to it.
        metadata_path: Metadata file (default: `metadata.csv|json|jsonl` in the root).
        file_keys: Columns holding file paths; the first one (normally `image`) is the training image.
        extra_inputs: Columns passed to the model as extra inputs.
        skip_bad_rows: Skip (and count) bad rows instead of raising.
        num_threads: Threads decoding images (PIL releases the GIL while decoding).

    Raises:
        InputError: The folder or metadata is missing, a row is bad (naming the row and file), or no row is left.
    """
    base = Path(base_path)
    if not base.is_dir():
        raise InputError(f"--dataset_base_path {str(base_path)!r} is not a folder.")
    if not file_keys:
        raise InputError("--data_file_keys is empty; it must name at least the image column.")
    meta = find_metadata(base, metadata_path)
    raw_rows = read_metadata(meta)
    if not raw_rows:
        raise InputError(f"Metadata file {meta} has no rows.")

    checked: list[tuple[int, Row | None, str | None]] = []
    for number, raw in raw_rows:
        row, reason = _check_row(base, number, raw, file_keys, extra_inputs)
        checked.append((number, row, reason))

    def decode(entry: tuple[int, Row | None, str | None]) -> tuple[int, Row | None, str | None]:
        number, row, _ = entry
        if row is None:
            return entry
        for key, value in row.files.items():
            for path in value if isinstance(value, list) else [value]:
                try:
                    size = _check_image(path)
                except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
                    return number, None, f"file {str(path)!r} ({key}) is not a readable image: {exc}"
                if path == row.files[file_keys[0]]:
                    row.size = size
        return number, row, None

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        decoded = list(pool.map(decode, checked))

    rows, skipped = [], []
    for number, row, reason in decoded:
        if row is not None:
            rows.append(row)
            continue
        label = _row_label(meta, number)
        if not skip_bad_rows:
            raise InputError(f"Bad dataset row ({label}): {reason}. Fix or remove the row, or pass --skip_bad_rows.")
        skipped.append(BadRow(number, reason or ""))
        logger.warning("Skipping %s: %s", label, reason)
    if skipped:
        logger.warning("Skipped %d of %d rows of %s (--skip_bad_rows).", len(skipped), len(raw_rows), meta)
    if not rows:
        raise InputError(f"No usable rows in {meta} ({len(skipped)} skipped as bad).")
    return DatasetReport(rows=rows, skipped=skipped)


# ------------------------------------------------------------------------------------------------ resolution


def dynamic_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) for dynamic resolution: scaled down to at most `max_pixels`, sides floored to multiples of 16."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(SIZE_MULTIPLE, int(width * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    h = max(SIZE_MULTIPLE, int(height * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    return w, h


def aspect_buckets(max_pixels: int) -> list[tuple[int, int]]:
    """(width, height) buckets of at most `max_pixels` pixels, aspect ratios from 1:4 to 4:1, sides multiples of 16."""
    buckets = set()
    side = SIZE_MULTIPLE
    while side * side <= max_pixels * _MAX_ASPECT:
        other = max_pixels // side // SIZE_MULTIPLE * SIZE_MULTIPLE
        if other >= SIZE_MULTIPLE and 1 / _MAX_ASPECT <= side / other <= _MAX_ASPECT:
            buckets.add((side, other))
            buckets.add((other, side))
        side += _BUCKET_STEP if side >= _BUCKET_STEP else SIZE_MULTIPLE
    if not buckets:
        side = max(SIZE_MULTIPLE, int(math.sqrt(max_pixels)) // SIZE_MULTIPLE * SIZE_MULTIPLE)
        buckets.add((side, side))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to the image's; ties go to the larger bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_and_crop(
    image: Image.Image, width: int, height: int, resample: int = Image.Resampling.LANCZOS
) -> Image.Image:
    """Scale `image` to cover `width`×`height` (keeping its aspect ratio), then center-crop to exactly that size."""
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------ dataset


class ImageDataset(torch.utils.data.Dataset):
    """Checked rows as training samples, indexed by *virtual* index (row = index % rows, for `dataset_repeat`).

    A sample is a dict: `index` (virtual), `row` (row position), `size` (width, height), `prompt`, `image` (3, H, W)
    in [-1, 1] unless `load_images` is False, and `extras` (extra inputs; file-valued ones as PIL images resized and
    cropped like the image).
    """

    def __init__(
        self,
        rows: Sequence[Row],
        *,
        height: int | None = None,
        width: int | None = None,
        max_pixels: int = 1024 * 1024,
        repeat: int = 1,
        bucketed: bool = False,
        image_key: str = "image",
        load_images: bool = True,
    ) -> None:
        if repeat < 1:
            raise InputError(f"dataset_repeat={repeat} must be at least 1.")
        self.rows = list(rows)
        self.repeat = repeat
        self.image_key = image_key
        self.load_images = load_images
        if height is not None and width is not None:
            self.sizes = [(width, height)] * len(self.rows)
        elif bucketed:
            buckets = aspect_buckets(max_pixels)
            self.sizes = [nearest_bucket(*row.size, buckets) for row in self.rows]
        else:
            self.sizes = [dynamic_size(*row.size, max_pixels) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def row_of(self, index: int) -> int:
        """Row position of a virtual index."""
        return index % len(self.rows)

    def size_of(self, index: int) -> tuple[int, int]:
        """(width, height) the sample at `index` is trained at."""
        return self.sizes[self.row_of(index)]

    def _open(self, path: Path, width: int, height: int, mode: str) -> Image.Image:
        with Image.open(path) as image:
            image = image.convert(mode)
            return resize_and_crop(image, width, height)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row_index = self.row_of(index)
        row = self.rows[row_index]
        width, height = self.sizes[row_index]
        sample: dict[str, Any] = {"index": index, "row": row_index, "size": (width, height), "prompt": row.prompt}
        if self.load_images:
            main = row.files[self.image_key]
            if isinstance(main, list):
                raise InputError(f"Row {row.number}: the image column {self.image_key!r} must name one file.")
            sample["image"] = image_to_tensor(self._open(main, width, height, "RGB"))
        extras = {}
        for key, value in row.extras.items():
            if key in row.files:
                paths = value if isinstance(value, list) else [value]
                loaded = [self._open(p, width, height, "RGB") for p in paths]
                extras[key] = loaded if isinstance(value, list) else loaded[0]
            else:
                extras[key] = value
        sample["extras"] = extras
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch of one size; prompts and extras stay lists; cached text embeddings are right-padded with a mask."""
    sizes = {s["size"] for s in samples}
    if len(sizes) != 1:
        raise InputError(f"A batch mixes image sizes {sorted(sizes)}; the batch sampler must group by size.")
    batch: dict[str, Any] = {
        "index": torch.tensor([s["index"] for s in samples]),
        "row": torch.tensor([s["row"] for s in samples]),
        "size": samples[0]["size"],
        "prompt": [s["prompt"] for s in samples],
        "extras": {k: [s["extras"][k] for s in samples] for k in samples[0].get("extras", {})},
    }
    for key in ("image", "latents"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    if "text_embeds" in samples[0]:
        length = max(s["text_embeds"].shape[0] for s in samples)
        dim = samples[0]["text_embeds"].shape[1]
        embeds = samples[0]["text_embeds"].new_zeros(len(samples), length, dim)
        mask = torch.zeros(len(samples), length, dtype=torch.bool)
        for i, s in enumerate(samples):
            n = s["text_embeds"].shape[0]
            embeds[i, :n] = s["text_embeds"]
            mask[i, :n] = s.get("text_mask", True)
        batch["text_embeds"], batch["text_mask"] = embeds, mask
    return batch


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Deterministic batches of same-size samples, sharded over processes, resumable mid-epoch.

    Each epoch draws one permutation (seeded by `seed` and the epoch), walks it, and closes a batch whenever
    `batch_size` samples of one size have gathered (left-over partial batches follow, in order of first appearance).
    Batch j of that global list goes to process j % `num_replicas`; the list is cut to a multiple of `num_replicas`
    so every process runs the same number of steps. With one size, process p's k-th batch is exactly the p-th
    slice of the single-process batch of `batch_size * num_replicas` samples, so multi-process training sees the
    same samples as one process with the combined batch.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        num_replicas: int = 1,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be at least 1.")
        if not 0 <= rank < num_replicas:
            raise InputError(f"rank={rank} must be in [0, num_replicas={num_replicas}).")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (changes the permutation) and the first of this process's batches to yield."""
        self.epoch = epoch
        self.start = start

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of `epoch`, before sharding."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        open_batches: dict[tuple[int, int], list[int]] = {}
        batches: list[list[int]] = []
        for index in order:
            size = self.dataset.size_of(index)
            current = open_batches.setdefault(size, [])
            current.append(index)
            if len(current) == self.batch_size:
                batches.append(current)
                open_batches[size] = []
        batches.extend(b for b in open_batches.values() if b)
        usable = len(batches) // self.num_replicas * self.num_replicas
        if usable < len(batches) and epoch == 0 and self.rank == 0:
            logger.info(
                "Dropping %d batch(es) per epoch so each of the %d processes gets the same number.",
                len(batches) - usable,
                self.num_replicas,
            )
        return batches[:usable]

    def __len__(self) -> int:
        return len(self.global_batches(self.epoch)) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.global_batches(self.epoch)[self.rank :: self.num_replicas]
        yield from mine[self.start :]
