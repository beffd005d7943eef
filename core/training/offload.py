"""Streaming the frozen weights of some transformer blocks from host memory during LoRA training.

A LoRA run never updates the base weights, so a block's frozen parameters and buffers can live in (pinned) host
memory and be copied to the GPU only while the block is needed. `BlockStreamer` does this for an evenly spaced subset
of a model's blocks (`--offload_frozen_blocks N`):

- Each streamed block's frozen tensors are packed into one flat host buffer, so a load is one copy into one device
  buffer, and the tensors become views of it (`param.data = view`: the `nn.Parameter` objects stay the same).
- While block `i` computes, the next streamed block in the direction the blocks are being called (forward runs them
  in ascending order, the backward's recomputation in descending order) is copied on a side CUDA stream. Streamed
  blocks are evenly spaced, so that copy overlaps the compute of the resident blocks in between.
- A loaded block stays loaded until another streamed block needs the room: at most two are on the device, the one in
  use and the prefetched next one. It must not be unloaded when its forward returns: with non-reentrant gradient
  checkpointing, the recomputation in backward saves the frozen `Parameter` objects themselves, so their data must
  still be on the device when the block's backward runs, after its recomputed forward. For the same reason streaming
  needs gradient checkpointing: without it, autograd keeps every block's weights until backward.
- The hook is a subclass of each block's class whose `__call__` loads the block, then calls the original one, not a
  forward hook: `nn.Module.compile` compiles `_call_impl`, forward hooks included, so dynamo would trace a hook that
  moves weights. Every block of the list gets the same subclass, streamed or not, so the compiled graphs stay shared.

Where the compute device is the CPU (tests), loads copy into a fresh CPU buffer, synchronously: the same packing,
swapping and eviction run as on a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagezoo.errors import InputError
from imagezoo.memory import (
    GIB,
    Slot,
    aligned_nbytes,
    flat_view,
    module_slots,
    pinned_host_buffer,
    release_pinned_host_buffer,
    tensor_nbytes,
)

logger = logging.getLogger(__name__)

STATS = ("loads", "sync_loads", "prefetch_hits", "reuses", "max_loaded", "bytes_streamed")
_STREAMER_ATTR = "_imagezoo_block_streamer"
# Original block class -> its streaming subclass. Cached so that all blocks of one class share one subclass (dynamo
# guards on the module type: a subclass per block would compile a graph per block).
_SUBCLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def streamed_indices(n: int, count: int) -> list[int]:
    """Which of `n` blocks to stream for `count` (-1 or at least `n`: all), evenly spaced.

    Evenly spaced so that loading the next streamed block overlaps the compute of the resident blocks before it.

    Raises:
        InputError: `count` is not an int >= -1.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < -1:
        raise InputError(f"count={count!r} must be -1 (all blocks) or an int >= 0.")
    if count < 0 or count >= n:
        return list(range(n))
    return sorted({min(n - 1, int((i + 0.5) * n / count)) for i in range(count)})


def _streaming_class(cls: type[nn.Module]) -> type[nn.Module]:
    sub = _SUBCLASSES.get(cls)
    if sub is None:

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            streamer = self.__dict__.get(_STREAMER_ATTR)
            if streamer is not None:
                streamer.before(self)
            return super(sub, self).__call__(*args, **kwargs)

        # Same names, so reprs, error messages and class-name lookups (`_no_split_modules`) see the original class.
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
        sub.__qualname__ = cls.__qualname__
        _SUBCLASSES[cls] = sub
    return sub


@dataclass(eq=False)
class _Entry:
    """One frozen tensor of a streamed block: its place in the flat buffers and its view of the host buffer."""

    slot: Slot
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    home: torch.Tensor | None = None


@dataclass(eq=False)
class _Unit:
    """A streamed block. `flat` is its device buffer while loaded; the tensors point at it only once `attached`."""

    index: int
    entries: list[_Entry]
    nbytes: int
    host: torch.Tensor | None = None
    flat: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    attached: bool = False
    prefetched: bool = False


class BlockStreamer:
    """Keeps the frozen weights of some blocks in host memory and loads each block when it is called.

    Construct it after LoRA injection (trainable parameters are left where they are), then move the rest of the model
    to the device, leaving alone the tensors `is_streamed` names. Blocks may be compiled
    (`block.compile()`) before or after. Loading a block that is not on the device is always done before it runs, so
    results never depend on the prefetch guesses; a wrong guess costs one wasted copy.

    Calling the model that contains the blocks under `torch.compile` as a whole is not supported (dynamo would trace
    the loading); compile the blocks themselves.

    Args:
        blocks: The model's repeated blocks, in call order (e.g. a DiT's transformer blocks).
        count: How many to stream, evenly spaced (-1: all).
        device: The compute device. On CUDA the host copies are pinned and the next block is prefetched on a side
            stream.

    Attributes:
        indices: The streamed block indices.
        stats: `loads` (copies to the device), `sync_loads` (of those, blocks needed before any prefetch),
            `prefetch_hits` (blocks found prefetched), `reuses` (blocks still loaded from their previous use),
            `max_loaded` (most streamed blocks on the device at once), `bytes_streamed`.

    Raises:
        InputError: Bad `count`, or a block is already managed by another streamer.
    """

    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device | str) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.indices = streamed_indices(len(self.blocks), count)
        self.stats = dict.fromkeys(STATS, 0)
        self._position = {id(block): i for i, block in enumerate(self.blocks)}
        self._units: dict[int, _Unit] = {}
        self._streamed: set[tuple[int, str]] = set()  # (id(module), tensor name) of every streamed tensor
        self._classes: dict[int, type[nn.Module]] = {}
        self._last: int | None = None
        self._direction = 1
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            self._setup()
        except BaseException:
            self.remove()  # undo the blocks packed or swapped before the failure
            raise

    def _setup(self) -> None:
        busy = [i for i, block in enumerate(self.blocks) if _STREAMER_ATTR in block.__dict__]
        if busy:
            raise InputError(f"Blocks {busy} are already streamed by another BlockStreamer; remove() it first.")
        if len(self._position) != len(self.blocks):
            raise InputError("The same block appears twice in the list given to BlockStreamer.")
        for index in self.indices:
            self._pack(index, self.blocks[index])
        for i, block in enumerate(self.blocks):
            self._classes[i] = type(block)
            block.__dict__[_STREAMER_ATTR] = self
            block.__class__ = _streaming_class(type(block))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give back the device memory of weights that were on the device
        total = sum(unit.nbytes for unit in self._units.values())
        logger.info(
            "Streaming the frozen weights of %d of %d blocks (%.2f GiB) from %s host memory; blocks %s.",
            len(self.indices),
            len(self.blocks),
            total / GIB,
            "pinned" if self._side is not None else "CPU",
            self.indices,
        )

    def _pack(self, index: int, block: nn.Module) -> None:
        """Copy the block's frozen tensors into one host buffer and point them at views of it."""
        entries, offset = [], 0
        for _, slot in module_slots(block):
            # Trainable parameters (LoRA A/B) stay on the compute device, where the optimizer updates them. (Asked of
            # the Parameter: its `.data`, which the slot returns, never requires grad.)
            if slot.is_param and slot.module._parameters[slot.name].requires_grad:
                continue
            tensor = slot.get()
            nbytes = tensor_nbytes(tensor)
            entries.append(_Entry(slot, offset, nbytes, tensor.dtype, tensor.shape))
            offset += aligned_nbytes(nbytes)
        unit = self._units[index] = _Unit(index, entries, offset)
        unit.host = pinned_host_buffer(offset, self._side is not None)
        for entry in entries:
            home = self._view(unit.host, entry)
            home.copy_(entry.slot.get())
            entry.slot.set(home)  # the original tensor is freed here
            entry.home = home
            self._streamed.add((id(entry.slot.module), entry.slot.name))

    @staticmethod
    def _view(flat: torch.Tensor, entry: _Entry) -> torch.Tensor:
        return flat_view(flat, entry.offset, entry.nbytes, entry.dtype, entry.shape)

    # ---------------------------------------------------------------------------------------------- queries
    def is_streamed(self, module: nn.Module, name: str) -> bool:
        """Whether `module`'s own parameter or buffer `name` is one this streamer keeps in host memory."""
        return (id(module), name) in self._streamed

    @property
    def loaded(self) -> list[int]:
        """Indices of the streamed blocks now on the device (in use or prefetched)."""
        return sorted(i for i, unit in self._units.items() if unit.flat is not None)

    # ---------------------------------------------------------------------------------------------- per call
    def before(self, block: nn.Module) -> None:
        """Make `block` ready to run: load it if it is streamed, and start loading the block expected next."""
        index = self._position[id(block)]
        unit = self._units.get(index)
        if unit is None:
            return
        upcoming = self._next(index)
        self._last = index
        for other in self._units.values():
            if other is not unit and other.index != upcoming and other.flat is not None:
                self._unload(other)
        if unit.flat is None:
            self._load(unit, prefetch=False)
            self.stats["sync_loads"] += 1
        elif unit.prefetched:
            self.stats["prefetch_hits"] += 1
        elif unit.attached:
            self.stats["reuses"] += 1
        self._attach(unit)
        if upcoming is not None and self._units[upcoming].flat is None:
            self._load(self._units[upcoming], prefetch=True)

    def _next(self, index: int) -> int | None:
        """The streamed block expected after `index`, from the direction the blocks are being called in."""
        order = self.indices
        if self._last is not None and index != self._last:
            self._direction = 1 if index > self._last else -1
        elif index == order[-1]:
            self._direction = -1  # the last block again: backward's recomputation starts here
        elif index == order[0]:
            self._direction = 1  # the first block again: the next step's forward
        position = order.index(index)
        # At either end, the only guess left is the way back (forward's last block is backward's first).
        for step in (self._direction, -self._direction):
            if 0 <= position + step < len(order):
                return order[position + step]
        return None

    def _load(self, unit: _Unit, *, prefetch: bool) -> None:
        # Outside inference mode: a block loaded while generating validation images is used by training later.
        with torch.inference_mode(False):
            # Allocated on the compute stream, so reusing memory it freed is ordered after the work that freed it.
            flat = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
            if prefetch and self._side is not None:
                self._side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._side):
                    flat.copy_(unit.host, non_blocking=True)
                # Without this the allocator could hand the buffer out again, after an unused prefetch is dropped,
                # while the side stream still writes into it.
                flat.record_stream(self._side)
                unit.ready = torch.cuda.Event()
                unit.ready.record(self._side)
            else:
                flat.copy_(unit.host, non_blocking=True)
        unit.flat = flat
        unit.prefetched = prefetch
        self.stats["loads"] += 1
        self.stats["bytes_streamed"] += unit.nbytes
        self.stats["max_loaded"] = max(self.stats["max_loaded"], len(self.loaded))

    def _attach(self, unit: _Unit) -> None:
        if unit.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.ready)
            unit.ready = None
        if not unit.attached:
            assert unit.flat is not None
            with torch.inference_mode(False):
                for entry in unit.entries:
                    entry.slot.set(self._view(unit.flat, entry))
            unit.attached = True
        unit.prefetched = False

    def _unload(self, unit: _Unit) -> None:
        """Point the block's tensors back at the host; the device buffer is freed once nothing references it."""
        if unit.attached:
            for entry in unit.entries:
                assert entry.home is not None
                entry.slot.set(entry.home)
        unit.flat, unit.ready, unit.attached, unit.prefetched = None, None, False, False

    # ---------------------------------------------------------------------------------------------- tear-down
    def remove(self) -> None:
        """Put every streamed tensor on the compute device (values unchanged) and restore the blocks' classes."""
        for unit in self._units.values():
            self._unload(unit)
            for entry in unit.entries:
                if entry.home is not None:
                    entry.slot.set(entry.home.to(self.device, copy=True))
                    entry.home = None
        if self._side is not None:
            torch.cuda.synchronize(self.device)  # no copy may still read the host buffers released next
        for unit in self._units.values():
            if unit.host is not None:
                release_pinned_host_buffer(unit.host)
                unit.host = None
        self._units.clear()
        self._streamed.clear()
        for i, cls in self._classes.items():
            block = self.blocks[i]
            block.__class__ = cls
            block.__dict__.pop(_STREAMER_ATTR, None)
        self._classes.clear()
        self._last = None


__all__ = ["BlockStreamer", "streamed_indices"]
