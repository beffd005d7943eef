"""The placement engine behind the `offload`, `stream` and `disk` strategies.

Each managed component (DiT, text encoder, VAE) is split into *units*: one per block the component declares
(`memory_blocks`, see `imagezoo.memory.find_blocks`) plus one "rest" unit for everything else. Every unit has a
*home* outside the compute device: a packed host buffer (pinned when the device is CUDA) or, for disk streaming, the
safetensors files. While a unit is not loaded, its parameters point at that home (host views, or zero-storage
placeholders for disk). Loading copies the whole unit into one device buffer and points the parameters at views of
it; unloading points them back (weights are read-only during inference, so nothing is ever copied back).

- A component is *activated* by a pre-forward hook on it (and on its direct children, for components that are used
  through methods such as `vae.decode`): its rest unit and resident blocks are loaded into buffers of their own, and
  other components are evicted first when the budget (or `exclusive` mode) says so.
- Blocks that do not fit the budget are *streamed* through two fixed device buffers per component, allocated once
  (the size of the largest streamed block): a block is loaded by its own pre-forward hook and stays until the
  prefetch of a later block takes its buffer, so a block that runs once per sample of a batch (block-major per-sample
  execution, see `memory_split_batches`) is loaded once. The next streamed block is prefetched on a worker thread and
  a side CUDA stream into the other buffer while the current block computes. After the component's forward its
  streamed blocks point back at their home (a prefetch for the next call may wait in a buffer).
- Components may declare `memory_split_batches(enabled) -> previous` (run batches sample by sample: the activations
  of one sample at a time), switched on while the strategy is applied, and `memory_activation_bytes(*args,
  **kwargs) -> int` (peak activation memory of a forward with these inputs): under a `vram_limit`, the blocks kept
  resident are re-planned to leave that much of the budget free.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from imagezoo.errors import InputError
from imagezoo.memory import (
    GIB,
    STAGE_PLACEMENT,
    Slot,
    aligned_nbytes,
    find_blocks,
    flat_view,
    free_vram_bytes,
    gib_to_bytes,
    module_slots,
    pinned_host_buffer,
    release_pinned_host_buffer,
    tensor_nbytes,
)
from imagezoo.plugins.memory._files import FileReader, SafetensorsIndex, TensorLocation

logger = logging.getLogger(__name__)

SOURCES = ("cpu", "disk")
UNDECLARED_ACTIVATION_BYTES = 2 * GIB
"""Under a `vram_limit`, the room kept for the activations of a component that declares no estimate when deciding
whether others must leave the device first (a tiled VAE decode of a 1328x1328 image peaks 1.4 GiB above its
weights, `benchmarks/vae_tiling.py`)."""
_CHECK_ELEMENTS = 64


@dataclass(eq=False)
class _Entry:
    """One tensor of a unit: where it sits in the unit's flat buffers and what the slot holds while unloaded."""

    name: str
    slot: Slot
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    original_device: torch.device
    offset: int = 0
    home: torch.Tensor | None = None
    file: TensorLocation | None = None


@dataclass(eq=False)
class _Unit:
    """A block (or a component's rest) moved as one buffer."""

    name: str
    entries: list[_Entry]
    module: nn.Module | None = None
    params: int = 0
    nbytes: int = 0
    host_nbytes: int = 0
    host: torch.Tensor | None = None
    streamed: bool = False
    flat: torch.Tensor | None = None
    pending: Future | None = None
    buffer: int | None = None
    """Index of the component's streaming buffer holding this block (loaded or being prefetched), if any."""


@dataclass(eq=False)
class _Component:
    name: str
    module: nn.Module
    source: str
    rest: _Unit
    blocks: list[_Unit]
    active: bool = False
    last_used: int = 0
    hooks: list[Any] = field(default_factory=list)
    upcoming: dict[int, _Unit | None] = field(default_factory=dict)
    """Per block (by id), the streamed block to prefetch while it computes."""
    buffers: list[torch.Tensor | None] = field(default_factory=lambda: [None, None])
    buffer_owner: list[_Unit | None] = field(default_factory=lambda: [None, None])
    buffer_free_at: list[Any] = field(default_factory=lambda: [None, None])
    """Per streaming buffer: a CUDA event the compute stream records when the block in it is detached."""
    buffer_used: list[int] = field(default_factory=lambda: [0, 0])
    activation_bytes: int = 0
    split_previous: bool | None = None

    @property
    def units(self) -> list[_Unit]:
        return [self.rest, *self.blocks]

    @property
    def buffer_nbytes(self) -> int:
        """Size of each streaming buffer: the largest streamed block (0 when none streams)."""
        return max((b.nbytes for b in self.blocks if b.streamed), default=0)

    @property
    def resident_bytes(self) -> int:
        """Device bytes while active: rest, resident blocks and the streaming buffers."""
        n_streamed = sum(b.streamed for b in self.blocks)
        streaming = min(2, n_streamed) * self.buffer_nbytes
        return self.rest.nbytes + sum(b.nbytes for b in self.blocks if not b.streamed) + streaming


def plan_resident(
    block_bytes: Sequence[int],
    rest_bytes: int,
    budget: int | None,
    *,
    block_params: Sequence[int] | None = None,
    max_params: int | None = None,
) -> list[bool]:
    """Which blocks stay on the device (True) and which are streamed (False) under a byte budget.

    Everything stays when it all fits. Otherwise the budget pays first for the rest unit and for the two streaming
    buffers, each the size of the largest streamed block (one computing, one being prefetched; one buffer when a
    single block streams); the blocks that still fit stay resident, spread evenly over the sequence so that transfers
    keep overlapping compute between them. `max_params` caps the parameters of resident blocks (the seed's
    `num_persistent_param_in_dit`).
    """
    n = len(block_bytes)
    params = list(block_params) if block_params is not None else [0] * n
    total = rest_bytes + sum(block_bytes)
    fits_bytes = budget is None or total <= budget
    fits_params = max_params is None or sum(params) <= max_params
    if n == 0 or (fits_bytes and fits_params):
        return [True] * n
    cap = math.inf if max_params is None else max_params
    for count in range(n - 1, 0, -1):
        chosen = {min(n - 1, int((i + 0.5) * n / count)) for i in range(count)}
        streamed = [block_bytes[i] for i in range(n) if i not in chosen]
        needed = rest_bytes + sum(block_bytes[i] for i in chosen) + min(2, len(streamed)) * max(streamed)
        if (budget is None or needed <= budget) and sum(params[i] for i in chosen) <= cap:
            return [i in chosen for i in range(n)]
    return [False] * n


class Placement:
    """Component offload and block streaming under a VRAM budget, from host memory or the checkpoint files.

    Not registered itself: `offload`, `stream` and `disk` are configurations of it (see their modules).

    Args:
        components: Components to manage (default: all of the pipeline's); the others stay where they are.
        vram_limit: GB of device memory the managed weights and the running component's activations (as it
            estimates them, `memory_activation_bytes`) may occupy; `0` means the least possible (only the rest units
            and two streaming buffers). None: see the subclass (activations are then not budgeted).
        vram_buffer: GB kept free below `vram_limit` as a margin (allocator slack, activations not estimated).
        num_persistent_param_in_dit: At most this many DiT block parameters stay resident (seed option).
        prefetch: Load the next streamed block on a worker thread (and side CUDA stream) during compute.
        exclusive: Only one component on the device at a time (component offload), whatever the budget.
        sources: Per-component home, `"cpu"` (host memory) or `"disk"` (the safetensors files); default `source`.
    """

    name = "placement"
    stage = STAGE_PLACEMENT
    source = "cpu"
    exclusive_default = False
    default_budget_is_free_vram = True
    option_names = frozenset(
        {"components", "vram_limit", "vram_buffer", "num_persistent_param_in_dit", "prefetch", "exclusive", "sources"}
    )

    def __init__(
        self,
        *,
        components: Sequence[str] | None = None,
        vram_limit: float | None = None,
        vram_buffer: float = 0.5,
        num_persistent_param_in_dit: int | None = None,
        prefetch: bool = True,
        exclusive: bool | None = None,
        sources: dict[str, str] | None = None,
    ) -> None:
        if vram_limit is not None:
            gib_to_bytes(vram_limit, "vram_limit")
        gib_to_bytes(vram_buffer, "vram_buffer")
        if num_persistent_param_in_dit is not None and (
            isinstance(num_persistent_param_in_dit, bool)
            or not isinstance(num_persistent_param_in_dit, int)
            or num_persistent_param_in_dit < 0
        ):
            raise InputError(f"num_persistent_param_in_dit={num_persistent_param_in_dit!r} must be an int >= 0.")
        for component, source in (sources or {}).items():
            if source not in SOURCES:
                raise InputError(f"sources[{component!r}]={source!r} is not allowed; use one of {SOURCES}.")
        self.components = None if components is None else list(components)
        self.vram_limit = vram_limit
        self.vram_buffer = vram_buffer
        self.num_persistent_param_in_dit = num_persistent_param_in_dit
        self.prefetch = prefetch
        self.exclusive = self.exclusive_default if exclusive is None else bool(exclusive)
        self.sources = dict(sources or {})
        self.budget: int | None = None
        self.stats: dict[str, int] = {"device_bytes": 0, "peak_device_bytes": 0, "streamed_loads": 0}
        self._components: dict[str, _Component] = {}
        self._device = torch.device("cpu")
        self._clock = itertools.count(1)
        self._executor: ThreadPoolExecutor | None = None
        self._side: torch.cuda.Stream | None = None
        self._reader: FileReader | None = None

    # ---------------------------------------------------------------------------------------------- set-up
    def targets(self, pipeline: Any) -> list[str]:
        """The component names this strategy manages on `pipeline`.

        Raises:
            InputError: A requested component does not exist.
        """
        available = list(pipeline.components.modules)
        wanted = available if self.components is None else self.components
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise InputError(
                f"Memory strategy {self.name!r}: unknown component(s) {unknown}; this pipeline has {available}."
            )
        return list(wanted)

    def _budget(self, pipeline: Any, managed_on_device: int) -> int | None:
        buffer = gib_to_bytes(self.vram_buffer, "vram_buffer")
        if self.vram_limit is not None:
            unmanaged = sum(
                tensor_nbytes(t)
                for name, module in pipeline.components.modules.items()
                if name not in self._components
                for t in [*module.parameters(), *module.buffers()]
                if t.device == self._device
            )
            return max(0, gib_to_bytes(self.vram_limit, "vram_limit") - buffer - unmanaged)
        if self.default_budget_is_free_vram:
            free = free_vram_bytes(self._device)
            if free is not None:
                return max(0, free + managed_on_device - buffer)
        return None

    def apply(self, pipeline: Any) -> None:
        """Move every managed component's weights to their home and install the hooks (all or nothing)."""
        try:
            self._apply(pipeline)
        except BaseException:
            self.remove(pipeline)  # undo the components packed before the failure
            raise

    def _apply(self, pipeline: Any) -> None:
        self._device = torch.device(pipeline.device)
        cuda = self._device.type == "cuda"
        targets = self.targets(pipeline)
        files = getattr(pipeline, "files", None) or {}
        managed_on_device = 0
        for name in targets:
            source = self.sources.get(name, self.source)
            module = pipeline.components.modules[name]
            index = None
            if source == "disk":
                if not files.get(name):
                    raise InputError(
                        f"Memory strategy {self.name!r} streams the {name} from its safetensors files, but this "
                        "pipeline does not know them (it was not loaded from files). Use 'stream' or 'offload'."
                    )
                index = SafetensorsIndex(files[name])
                if self._reader is None:
                    self._reader = FileReader(self._device)
            managed_on_device += sum(
                tensor_nbytes(t) for _, s in module_slots(module) if (t := s.get()).device == self._device
            )
            blocks = find_blocks(module)
            rest = _Unit(f"{name}", self._entries(module, skip=[b for _, b in blocks]))
            units = [
                _Unit(f"{name}.{bname}", self._entries(block, prefix=f"{bname}."), block) for bname, block in blocks
            ]
            self._components[name] = _Component(name, module, source, rest, units)
            for unit in [rest, *units]:
                self._pack(unit, index, pin=cuda)
        self.budget = self._budget(pipeline, managed_on_device)
        for comp in self._components.values():
            self._plan(comp, self.budget)
            self._hook(comp)
            switch = getattr(comp.module, "memory_split_batches", None)
            if callable(switch):
                # Offload and streaming are there to save memory: one sample's activations at a time, and every
                # streamed block loaded once for the whole batch (block-major order, see the component).
                comp.split_previous = bool(switch(True))
            logger.info(
                "%s: %s from %s, %.2f GiB on the device while active, %d of %d blocks streamed (budget %s).",
                self.name,
                comp.name,
                comp.source,
                comp.resident_bytes / GIB,
                sum(b.streamed for b in comp.blocks),
                len(comp.blocks),
                "none" if self.budget is None else f"{self.budget / GIB:.2f} GiB",
            )
        if cuda:
            self._side = torch.cuda.Stream(self._device)
            torch.cuda.empty_cache()  # return the memory of the weights just moved off the device

    def _plan(self, comp: _Component, budget: int | None) -> bool:
        """Choose which blocks of `comp` stay resident under `budget`; returns whether the choice changed.

        A block whose role changes is detached (it loads the new way at its next use); streaming buffers too small for
        the new streamed blocks are freed (they are allocated again on first use).
        """
        resident = plan_resident(
            [b.nbytes for b in comp.blocks],
            comp.rest.nbytes,
            budget,
            block_params=[b.params for b in comp.blocks],
            max_params=self.num_persistent_param_in_dit if comp.name == "dit" else None,
        )
        changed = False
        for block, keep in zip(comp.blocks, resident, strict=True):
            if block.streamed == keep:
                self._detach(comp, block)
                block.streamed = not keep
                changed = True
        size = comp.buffer_nbytes
        if any(buffer is not None and (size == 0 or buffer.numel() < size) for buffer in comp.buffers):
            self._free_buffers(comp)
        for position, unit in enumerate(comp.blocks):
            # The blocks after this one, then wrapping around to the first ones (the next call's start).
            order = comp.blocks[position + 1 :] + comp.blocks[: position + 1]
            comp.upcoming[id(unit)] = next((u for u in order if u.streamed), None)
        return changed

    def _entries(self, module: nn.Module, skip: Sequence[nn.Module] = (), prefix: str = "") -> list[_Entry]:
        entries = []
        for name, slot in module_slots(module, skip):
            tensor = slot.get()
            entries.append(
                _Entry(f"{prefix}{name}", slot, tensor.dtype, tuple(tensor.shape), tensor_nbytes(tensor), tensor.device)
            )
        return entries

    def _pack(self, unit: _Unit, index: SafetensorsIndex | None, *, pin: bool) -> None:
        """Give each tensor of `unit` its home: a view of one packed host buffer, or its place in the files."""
        file_entries, host_entries, locations = [], [], {}
        for entry in unit.entries:
            location = index.locate(entry.name, entry.shape) if index is not None else None
            if location is not None:
                self._check_same_as_file(unit, entry, location)
                locations[id(entry)] = location
                file_entries.append(entry)
            else:
                host_entries.append(entry)
        offset = 0
        for entry in [*host_entries, *file_entries]:
            entry.offset = offset
            offset += aligned_nbytes(entry.nbytes)
            if entry.slot.is_param:
                unit.params += entry.slot.get().numel()
        unit.nbytes = offset
        unit.host_nbytes = sum(aligned_nbytes(e.nbytes) for e in host_entries)
        unit.entries = [*host_entries, *file_entries]
        if unit.host_nbytes:
            unit.host = pinned_host_buffer(unit.host_nbytes, pin)
        for entry in host_entries:
            view = self._view(unit.host, entry)
            view.copy_(entry.slot.get())
            entry.home = view
            entry.slot.set(view)  # the original tensor is released here (device or host memory given back)
        for entry in file_entries:
            entry.file = locations[id(entry)]
            # Zero-storage placeholder with the right shape and dtype: code that inspects weights outside forward
            # still sees them, and nothing of the model stays in host memory.
            entry.home = torch.zeros((), dtype=entry.dtype).expand(entry.shape)
            entry.slot.set(entry.home)

    def _check_same_as_file(self, unit: _Unit, entry: _Entry, location: TensorLocation) -> None:
        """Refuse to stream from files that no longer match the weights in memory (fused LoRA, edited weights)."""
        assert self._reader is not None
        current = entry.slot.get().detach().reshape(-1)[:_CHECK_ELEMENTS].to("cpu")
        stored = self._reader.read_prefix(location, current.numel()).to(current.dtype)
        if not torch.equal(current, stored):
            raise InputError(
                f"Memory strategy {self.name!r} would re-read {unit.name.split('.')[0]}'s {entry.name} from "
                f"{location.path}, but the weights in memory differ from the file (a fused LoRA or edited weights?). "
                "Unfuse/undo the change first, or use 'stream' / 'offload', which keep the weights as they are."
            )

    @staticmethod
    def _view(flat: torch.Tensor, entry: _Entry) -> torch.Tensor:
        return flat_view(flat, entry.offset, entry.nbytes, entry.dtype, entry.shape)

    def _hook(self, comp: _Component) -> None:
        def activate_and_move(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            self._fit_activations(comp, args, kwargs)
            self._activate(comp)
            return tuple(self._to_device(a) for a in args), {k: self._to_device(v) for k, v in kwargs.items()}

        def activate(module: nn.Module, args: tuple) -> None:
            self._activate(comp)

        def drop_streamed(module: nn.Module, args: tuple, output: Any) -> None:
            self._drop_streamed(comp)

        # Prepended so placement runs before any storage-dtype hook on the same module (FP8 dequantizes after the
        # weights have arrived on the device).
        comp.hooks.append(comp.module.register_forward_pre_hook(activate_and_move, prepend=True, with_kwargs=True))
        comp.hooks.append(comp.module.register_forward_hook(drop_streamed, always_call=True))
        for child in comp.module.children():
            comp.hooks.append(child.register_forward_pre_hook(activate, prepend=True))
        for unit in comp.blocks:
            assert unit.module is not None
            comp.hooks.append(unit.module.register_forward_pre_hook(self._pre_block(comp, unit), prepend=True))

    def _fit_activations(self, comp: _Component, args: tuple, kwargs: dict) -> None:
        """Under a `vram_limit`, re-plan the resident blocks when the component's activation estimate changed."""
        estimate = getattr(comp.module, "memory_activation_bytes", None)
        if self.vram_limit is None or self.budget is None or not callable(estimate):
            return
        try:
            needed = max(0, int(estimate(*args, **kwargs)))
        except (TypeError, ValueError, IndexError, AttributeError) as error:
            # Inputs the forward will refuse with its own message; keep the current plan.
            logger.debug("%s: no activation estimate for the %s (%s).", self.name, comp.name, error)
            return
        if needed == comp.activation_bytes:
            return
        comp.activation_bytes = needed
        if not self._plan(comp, max(0, self.budget - needed)):
            return
        # Its footprint changed: let `_activate` check the other components against the budget again.
        comp.active = False
        logger.info(
            "%s: %s re-planned for %.2f GiB of activations: %d of %d blocks streamed, %.2f GiB of weights on the "
            "device while active (budget %.2f GiB).",
            self.name,
            comp.name,
            needed / GIB,
            sum(b.streamed for b in comp.blocks),
            len(comp.blocks),
            comp.resident_bytes / GIB,
            self.budget / GIB,
        )

    def _to_device(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.device != self._device and value.device.type != "meta":
            return value.to(self._device, non_blocking=True)
        return value

    # ---------------------------------------------------------------------------------------------- loading

    def _empty(self, nbytes: int) -> torch.Tensor:
        # Allocated on the compute stream, outside inference mode (the worker thread writes into it and is not in
        # inference mode). Reusing memory the compute stream freed is then safe in stream order; the side stream
        # waits for the compute stream before writing (see `_prefetch`).
        with torch.inference_mode(False):
            return torch.empty(nbytes, dtype=torch.uint8, device=self._device)

    def _count(self, nbytes: int) -> None:
        self.stats["device_bytes"] += nbytes
        self.stats["peak_device_bytes"] = max(self.stats["peak_device_bytes"], self.stats["device_bytes"])

    def _fill(self, unit: _Unit, flat: torch.Tensor, stream: torch.cuda.Stream | None) -> torch.Tensor:
        """Copy the whole unit into the device buffer `flat` (enqueued on `stream` on CUDA, done on CPU)."""
        if unit.host is not None:
            flat[: unit.host_nbytes].copy_(unit.host, non_blocking=True)
        for entry in unit.entries:
            if entry.file is not None:
                assert self._reader is not None
                self._reader.read_into(entry.file, self._view(flat, entry), stream)
        return flat

    def _fill_async(
        self, unit: _Unit, flat: torch.Tensor, free_at: torch.cuda.Event | None
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Worker thread: fill `flat` on the side stream once the compute stream is past `free_at`."""
        if self._side is None:
            return self._fill(unit, flat, None), None
        with torch.cuda.stream(self._side):
            if free_at is not None:
                self._side.wait_event(free_at)
            self._fill(unit, flat, self._side)
            done = torch.cuda.Event()
            done.record(self._side)
        return flat, done

    def _attach(self, unit: _Unit, flat: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        if event is not None:
            torch.cuda.current_stream(self._device).wait_event(event)
        unit.flat = flat
        for entry in unit.entries:
            entry.slot.set(self._view(flat, entry))
        if unit.buffer is None:  # a streaming buffer is counted once, when allocated
            self._count(unit.nbytes)

    def _detach(self, comp: _Component, unit: _Unit) -> None:
        if unit.pending is not None:
            # A prefetch that will not be used: its buffer must not be reused before the copy is done.
            _, done = unit.pending.result()
            unit.pending = None
            if done is not None:
                torch.cuda.current_stream(self._device).wait_event(done)
        if unit.flat is not None:
            for entry in unit.entries:
                assert entry.home is not None
                entry.slot.set(entry.home)
            unit.flat = None
            if unit.buffer is None:
                self.stats["device_bytes"] -= unit.nbytes  # its own buffer is freed here
        if unit.buffer is not None:
            # The compute stream has been given the block's last kernels: a copy into the buffer waits for them.
            comp.buffer_owner[unit.buffer] = None
            comp.buffer_free_at[unit.buffer] = self._compute_event()
            unit.buffer = None

    def _compute_event(self) -> torch.cuda.Event | None:
        if self._device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._device))
        return event

    def _take_buffer(self, comp: _Component, unit: _Unit, keep: _Unit | None) -> torch.Tensor:
        """A streaming buffer of `comp` for `unit` (a view of its size); the block in it is detached, never `keep`.

        Preference: a free buffer, then one not allocated yet, then the least recently filled one.
        """
        size = comp.buffer_nbytes
        free = [i for i in (0, 1) if comp.buffers[i] is not None and comp.buffer_owner[i] is None]
        unallocated = [i for i in (0, 1) if comp.buffers[i] is None]
        taken = [i for i in (0, 1) if comp.buffer_owner[i] is not None and comp.buffer_owner[i] is not keep]
        candidates = (
            sorted(free, key=lambda i: comp.buffer_used[i])
            or unallocated
            or sorted(taken, key=lambda i: comp.buffer_used[i])
        )
        if not candidates:
            raise RuntimeError(f"{self.name}: no streaming buffer of the {comp.name} free for {unit.name}.")
        index = candidates[0]
        owner = comp.buffer_owner[index]
        if owner is not None:
            self._detach(comp, owner)
        buffer = comp.buffers[index]
        if buffer is None:
            buffer = comp.buffers[index] = self._empty(size)
            self._count(size)
            # New memory may be what the compute stream freed while still reading it (stream-ordered reuse).
            comp.buffer_free_at[index] = self._compute_event()
        comp.buffer_owner[index] = unit
        comp.buffer_used[index] = next(self._clock)
        unit.buffer = index
        return buffer[: unit.nbytes]

    def _free_buffers(self, comp: _Component) -> None:
        for index in (0, 1):
            owner = comp.buffer_owner[index]
            if owner is not None:
                self._detach(comp, owner)
            buffer = comp.buffers[index]
            if buffer is not None:
                self.stats["device_bytes"] -= buffer.numel()
            comp.buffers[index] = comp.buffer_free_at[index] = None

    def _load_now(self, comp: _Component, unit: _Unit) -> None:
        if unit.flat is not None:
            return
        if unit.pending is not None:
            flat, event = unit.pending.result()
            unit.pending = None
            self._attach(unit, flat, event)
        elif unit.streamed:
            # Filled on the compute stream: ordered after the kernels of the block that had the buffer.
            self._attach(unit, self._fill(unit, self._take_buffer(comp, unit, keep=None), None))
        else:
            self._attach(unit, self._fill(unit, self._empty(unit.nbytes), None))
        if unit.streamed:
            self.stats["streamed_loads"] += 1

    def _activate(self, comp: _Component) -> None:
        comp.last_used = next(self._clock)
        if comp.active:
            return
        others = sorted((c for c in self._components.values() if c.active and c is not comp), key=lambda c: c.last_used)
        used = sum(c.resident_bytes for c in others)
        activations = comp.activation_bytes
        if not callable(getattr(comp.module, "memory_activation_bytes", None)) and self.vram_limit is not None:
            activations = UNDECLARED_ACTIVATION_BYTES
        needed = comp.resident_bytes + activations
        for other in others:
            if self.exclusive or (self.budget is not None and used + needed > self.budget):
                self._evict(other)
                used -= other.resident_bytes
        for unit in comp.units:
            if not unit.streamed:
                self._load_now(comp, unit)
        comp.active = True

    def _evict(self, comp: _Component) -> None:
        for unit in comp.units:
            self._detach(comp, unit)
        self._free_buffers(comp)
        comp.active = False

    def _drop_streamed(self, comp: _Component) -> None:
        """After the component's forward: its streamed blocks point at their home again. A prefetch for the next call
        may stay in its buffer (which stays allocated while the component is active anyway)."""
        for unit in comp.blocks:
            if unit.streamed and unit.flat is not None:
                self._detach(comp, unit)

    def _pre_block(self, comp: _Component, unit: _Unit) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            self._activate(comp)
            # A no-op for a block already loaded: the other samples of a batch run it from the same buffer.
            self._load_now(comp, unit)
            upcoming = comp.upcoming.get(id(unit))
            if upcoming is not None and upcoming is not unit:
                self._prefetch(comp, upcoming, current=unit)

        return hook

    def _prefetch(self, comp: _Component, unit: _Unit, current: _Unit) -> None:
        if unit.flat is not None or unit.pending is not None:
            return
        # At most one streamed block besides the one computing: drop the others (a finished block, or a stale
        # prefetch when blocks are called out of order).
        for other in comp.blocks:
            if (
                other.streamed
                and other is not current
                and other is not unit
                and (other.flat is not None or other.pending)
            ):
                self._detach(comp, other)
        if not self.prefetch:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagezoo-prefetch")
        flat = self._take_buffer(comp, unit, keep=current)
        assert unit.buffer is not None
        # The side stream writes only once the compute stream is past the last kernels of the buffer's previous block.
        unit.pending = self._executor.submit(self._fill_async, unit, flat, comp.buffer_free_at[unit.buffer])

    # ---------------------------------------------------------------------------------------------- tear-down
    def release(self) -> None:
        """Evict every managed component from the device (they reload on their next use)."""
        for comp in self._components.values():
            self._evict(comp)

    def remove(self, pipeline: Any) -> None:
        """Evict everything, remove the hooks and put every tensor back on its original device, values unchanged."""
        self.release()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for comp in self._components.values():
            for handle in comp.hooks:
                handle.remove()
            if comp.split_previous is not None:
                comp.module.memory_split_batches(comp.split_previous)
            for unit in comp.units:
                for entry in unit.entries:
                    if entry.home is None:
                        continue  # never moved (apply failed before reaching it)
                    if entry.file is not None:
                        assert self._reader is not None
                        entry.slot.set(self._reader.read(entry.file, entry.dtype, entry.original_device))
                    else:
                        entry.slot.set(entry.home.to(entry.original_device, copy=True))
                    entry.home = None
                if unit.host is not None:  # each unit's host buffer goes as soon as its tensors are restored
                    release_pinned_host_buffer(unit.host)
                    unit.host = None
        self._components.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            with contextlib.suppress(AttributeError):
                torch._C._host_emptyCache()  # hand the pinned host buffers back to the OS
