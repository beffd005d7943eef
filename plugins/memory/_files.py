"""Reading single tensors out of safetensors files with plain `pread`, for disk streaming and exact restores.

No `mmap` and no `safe_open`: memory-mapped pages count as the process's resident memory for as long as the map
lives, which is how a reader that keeps files open grows host RAM step after step. Here every read copies bytes into
a destination tensor (CPU) or through two small pinned staging buffers (CUDA), so host memory stays flat.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from imagezoo.errors import WeightsError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK_BYTES = 32 * 1024 * 1024
"""Size of each of the two pinned staging buffers a CUDA reader uses (the reader's whole host footprint)."""


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: file, absolute byte offset, length, dtype, shape."""

    path: Path
    key: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _header(path: Path) -> tuple[int, dict]:
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise WeightsError(f"Cannot read the safetensors header of {path}: {e}. Re-download the file.") from e
    header.pop("__metadata__", None)
    return 8 + length, header


class SafetensorsIndex:
    """Tensor name -> `TensorLocation` over a component's shard files (headers only, no data read)."""

    def __init__(self, files: Iterable[str | Path]) -> None:
        self.locations: dict[str, TensorLocation] = {}
        for path in files:
            path = Path(path)
            if path.is_dir():
                for child in sorted(path.glob("*.safetensors")):
                    self._add(child)
            elif path.suffix == ".safetensors":
                self._add(path)
        if not self.locations:
            raise WeightsError(f"No safetensors tensors found in {[str(f) for f in files]}.")

    def _add(self, path: Path) -> None:
        start, header = _header(path)
        for key, entry in header.items():
            dtype = DTYPES.get(entry["dtype"])
            if dtype is None:
                raise WeightsError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which cannot be streamed.")
            begin, end = entry["data_offsets"]
            self.locations[key] = TensorLocation(path, key, start + begin, end - begin, dtype, tuple(entry["shape"]))

    def locate(self, name: str, shape: Sequence[int]) -> TensorLocation | None:
        """The file tensor for module tensor `name`: same name, else the one key ending in `.name` (checkpoints that
        nest the module under a prefix, e.g. `model.layers.0...`); None if there is none. Shapes must match.

        Raises:
            WeightsError: Several keys end in `.name`, or the shapes differ.
        """
        location = self.locations.get(name)
        if location is None:
            matches = [loc for key, loc in self.locations.items() if key.endswith("." + name)]
            if len(matches) > 1:
                raise WeightsError(
                    f"Tensor {name!r} matches several checkpoint keys ({', '.join(m.key for m in matches[:4])}); "
                    "cannot tell which one to stream."
                )
            location = matches[0] if matches else None
        if location is not None and tuple(location.shape) != tuple(shape):
            raise WeightsError(
                f"Checkpoint tensor {location.key!r} in {location.path} has shape {location.shape}, the module's "
                f"{name!r} has {tuple(shape)}; these files are not this model's."
            )
        return location


class FileReader:
    """Reads tensors into place; one instance per device, safe to share between threads (a lock serializes reads).

    File descriptors stay open (a few per component) so every read is one `pread`; nothing is memory-mapped.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._staging: list[torch.Tensor] = []
        self._staged: list[torch.cuda.Event | None] = []

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _pread(self, path: Path, offset: int, out: memoryview) -> None:
        fd, done, total = self._fd(path), 0, len(out)
        while done < total:
            got = os.preadv(fd, [out[done:]], offset + done)
            if got <= 0:
                raise WeightsError(
                    f"{path} ended early at byte {offset + done}; the file is truncated. Re-download it."
                )
            done += got

    def _read_bytes(self, location: TensorLocation, dest: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        """Copy the tensor's raw bytes into the flat uint8 tensor `dest` (CPU directly, CUDA through staging)."""
        if dest.device.type == "cpu":
            self._pread(location.path, location.offset, memoryview(dest.numpy()).cast("B"))
            return
        if not self._staging:
            # Pinned staging, allocated once: the host cost of disk streaming is these two buffers.
            self._staging = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._staged = [None, None]
        stream = stream or torch.cuda.current_stream(dest.device)
        for index, start in enumerate(range(0, location.nbytes, CHUNK_BYTES)):
            k = index % 2
            length = min(CHUNK_BYTES, location.nbytes - start)
            if self._staged[k] is not None:
                self._staged[k].synchronize()  # the copy that last read this buffer must be done before overwriting
            buffer = self._staging[k][:length]
            self._pread(location.path, location.offset + start, memoryview(buffer.numpy()).cast("B"))
            with torch.cuda.stream(stream):
                dest[start : start + length].copy_(buffer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            self._staged[k] = event

    def read_into(self, location: TensorLocation, dest: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
        """Fill `dest` (contiguous, the module's dtype, on this reader's device or CPU) with the file tensor, cast."""
        with self._lock:
            if dest.dtype == location.dtype:
                self._read_bytes(location, dest.reshape(-1).view(torch.uint8), stream)
                return
            raw = torch.empty(location.nbytes, dtype=torch.uint8, device=dest.device)
            self._read_bytes(location, raw, stream)
            context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with context:
                dest.copy_(raw.view(location.dtype).view(dest.shape))

    def read(self, location: TensorLocation, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A new tensor with the file's values cast to `dtype` on `device` (synchronous)."""
        out = torch.empty(location.shape, dtype=dtype, device=device)
        self.read_into(location, out)
        if out.device.type == "cuda":
            torch.cuda.current_stream(out.device).synchronize()
        return out

    def read_prefix(self, location: TensorLocation, count: int) -> torch.Tensor:
        """The first `count` elements of the file tensor, flat, in the file's dtype, on CPU (for cheap checks)."""
        size = torch.empty((), dtype=location.dtype).element_size()
        count = min(count, location.nbytes // size)
        out = torch.empty(count * size, dtype=torch.uint8)
        with self._lock:
            self._pread(location.path, location.offset, memoryview(out.numpy()).cast("B"))
        return out.view(location.dtype)

    def close(self) -> None:
        """Close the files and drop the staging buffers."""
        with self._lock:
            for event in self._staged:
                if event is not None:
                    event.synchronize()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._staging, self._staged = [], []
