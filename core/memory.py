"""Family-agnostic helpers for memory strategies: weight slots, block discovery, budgets, combination rules.

Memory strategies (see `docs/memory.md`) are hooks on modules: they swap what a parameter's `.data` points to (a
host copy, an FP8 copy, a placeholder) and put the real tensor back around a module's forward. They never edit model
code. This module holds what every strategy needs and what the kernel checks before applying any:

- `Slot`: one parameter or buffer of one module, read and written without breaking `nn.Parameter` identity.
- `find_blocks` / `high_precision_names`: what a component declares strategies may touch (`memory_blocks`,
  `memory_high_precision` class attributes), with fallbacks for modules that declare nothing (transformers models).
- `pinned_host_buffer` / `release_pinned_host_buffer`: exact-size page-locked host memory for weights that are
  copied to the GPU while it computes.
- `check_combination`: strategies apply in a declared order (storage dtype first, then placement) and at most one
  of each kind per component; anything else is an `InputError` naming the clash.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagezoo.errors import InputError

logger = logging.getLogger(__name__)

GIB = 1024**3
STAGE_DTYPE = 10
"""Stage of strategies that change how weights are stored (e.g. FP8): they apply first, innermost around forward."""
STAGE_PLACEMENT = 20
"""Stage of strategies that change where weights live (offload, streaming, disk): they apply last, outermost."""
STAGE_NAMES = {STAGE_DTYPE: "storage dtype", STAGE_PLACEMENT: "placement"}
# Pairs of strategy names that make no sense on the same component, with why (shown in the error).
INCOMPATIBLE: dict[frozenset[str], str] = {
    frozenset({"fp8", "disk"}): (
        "disk streaming re-reads the original weights from the safetensors files at every use, so there is no "
        "stored copy for fp8 to shrink; use fp8 with 'offload' or 'stream' instead"
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# Weight slots


@dataclass(eq=False)
class Slot:
    """One tensor attribute (parameter or buffer) of one module.

    Parameters are updated through `.data` so the `nn.Parameter` object (which optimizers, LoRA managers and user code
    may hold) stays the same; buffers are replaced in the module's buffer dict.
    """

    module: nn.Module
    name: str
    is_param: bool

    def get(self) -> torch.Tensor:
        """The tensor currently stored (a parameter's data, or the buffer)."""
        if self.is_param:
            return self.module._parameters[self.name].data
        return self.module._buffers[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        """Point the slot at `tensor` (same shape; device and dtype may differ)."""
        if self.is_param:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


def module_slots(module: nn.Module, skip: Iterable[nn.Module] = ()) -> list[tuple[str, Slot]]:
    """(qualified name, slot) of every parameter and buffer under `module`, not descending into `skip` modules.

    A tensor shared by two modules (tied weights) is listed once, under its first name.
    """
    skipped = {id(m) for m in skip}
    seen: set[int] = set()
    out: list[tuple[str, Slot]] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        if id(mod) in skipped:
            return
        for kind, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, tensor in table.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                out.append((f"{prefix}{name}", Slot(mod, name, kind)))
        for child_name, child in mod._modules.items():
            if child is not None:
                visit(f"{prefix}{child_name}.", child)

    visit("", module)
    return out


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the tensor's elements."""
    return tensor.numel() * tensor.element_size()


FLAT_ALIGN = 256
"""Byte alignment of each tensor packed into a flat uint8 buffer (any dtype view of an aligned offset is valid)."""


def aligned_nbytes(nbytes: int) -> int:
    """`nbytes` rounded up to `FLAT_ALIGN`: the room a tensor takes in a flat buffer."""
    return (nbytes + FLAT_ALIGN - 1) // FLAT_ALIGN * FLAT_ALIGN


def flat_view(flat: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The tensor packed at byte `offset` of the flat uint8 buffer `flat`, as a view (no copy)."""
    return flat[offset : offset + nbytes].view(dtype).view(tuple(shape))


# --------------------------------------------------------------------------------------------------------------------
# Pinned host buffers

# Data pointers of the buffers page-locked by `pinned_host_buffer` through cudaHostRegister (they need unregistering).
_REGISTERED: set[int] = set()


def pinned_host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat uint8 host buffer of exactly `nbytes`, page-locked when `pin` (so copies to a CUDA device are async).

    Pinned through `cudaHostRegister` on an ordinary allocation: `pin_memory=True` goes through PyTorch's caching host
    allocator, which rounds every block up to a power of two (a 0.68 GB DiT block takes 1 GB of RAM). If registering
    fails, the buffer comes from that allocator instead, with a warning. Give it back with
    `release_pinned_host_buffer`.

    Args:
        nbytes: Size in bytes.
        pin: Page-lock the buffer; ignored where CUDA is not available (nothing could use the pinning).

    Raises:
        InputError: `nbytes` is negative.
    """
    if nbytes < 0:
        raise InputError(f"nbytes={nbytes!r} must be >= 0.")
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    # cudaHostRegister refuses empty ranges; an empty buffer is never copied from anyway.
    if not pin or nbytes == 0 or not torch.cuda.is_available():
        return buffer
    error = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
    if int(getattr(error, "value", error)) == 0:
        _REGISTERED.add(buffer.data_ptr())
        return buffer
    logger.warning("cudaHostRegister of %d bytes failed (%s); using PyTorch's pinned allocator instead.", nbytes, error)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def release_pinned_host_buffer(buffer: torch.Tensor) -> None:
    """Unregister a buffer `pinned_host_buffer` page-locked (a no-op for any other tensor).

    Call once no copy from it is in flight (synchronize the device first); drop the tensor afterwards, which frees it.
    """
    ptr = buffer.data_ptr()
    if ptr in _REGISTERED:
        _REGISTERED.discard(ptr)
        torch.cuda.cudart().cudaHostUnregister(ptr)


# --------------------------------------------------------------------------------------------------------------------
# What components declare


def find_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of a component that may be streamed one at a time, with their qualified names.

    Order of precedence: the module's `memory_blocks` attribute (names of `nn.ModuleList`s; an empty tuple means "no
    blocks, move the component whole"); transformers' `_no_split_modules` class names; else the `nn.ModuleList` with
    the most parameters whose children all share one class.
    """
    declared = getattr(module, "memory_blocks", None)
    if declared is not None:
        blocks = []
        for attr in declared:
            container = module.get_submodule(attr)
            blocks.extend((f"{attr}.{name}", child) for name, child in container.named_children())
        return blocks
    no_split = set(getattr(module, "_no_split_modules", None) or ())
    if no_split:
        found: list[tuple[str, nn.Module]] = []
        inside: set[int] = set()
        for name, sub in module.named_modules():
            if sub is module or id(sub) in inside:
                continue
            if type(sub).__name__ in no_split:
                found.append((name, sub))
                inside.update(id(m) for m in sub.modules())
        if found:
            return found
    best: list[tuple[str, nn.Module]] = []
    best_params = 0
    for name, sub in module.named_modules():
        children = list(sub.named_children()) if isinstance(sub, nn.ModuleList) else []
        if len(children) < 2 or len({type(c) for _, c in children}) != 1:
            continue
        params = sum(p.numel() for p in sub.parameters())
        if params > best_params:
            best, best_params = [(f"{name}.{n}" if name else n, c) for n, c in children], params
    return best


def high_precision_names(module: nn.Module) -> tuple[str, ...]:
    """Qualified names of submodules a storage-dtype strategy must leave alone (the `memory_high_precision`
    declaration; empty when the component declares nothing)."""
    return tuple(getattr(module, "memory_high_precision", ()) or ())


def is_under(name: str, prefixes: Sequence[str]) -> bool:
    """Whether the qualified module name `name` is one of `prefixes` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# --------------------------------------------------------------------------------------------------------------------
# Budgets and measurements


def free_vram_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device as the driver reports it (other processes included), None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def gib_to_bytes(value: float, what: str) -> int:
    """A non-negative size in GiB (the seed's "GB") as bytes; anything else is an `InputError` naming `what`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise InputError(f"{what}={value!r} must be a number of GB >= 0.")
    return int(value * GIB)


def rss_bytes() -> int:
    """Resident set size of this process (Linux `/proc/self/statm`; 0 where that does not exist)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# --------------------------------------------------------------------------------------------------------------------
# Options and combinations


def accepted_options(factory: Callable[..., Any]) -> set[str] | None:
    """Option names a strategy factory takes: its `option_names` attribute, else its signature; None = any."""
    names = getattr(factory, "option_names", None)
    if names is not None:
        return set(names)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def stage_of(strategy: Any) -> int:
    """A strategy's stage; third-party strategies that declare none count as placement (applied last)."""
    return int(getattr(strategy, "stage", STAGE_PLACEMENT))


def places_weights(names: Sequence[str], table: Any) -> bool:
    """Whether any of the named strategies (looked up in the kernel's memory-strategy `table`) is a placement one.

    Placement strategies take the weights to the device themselves, so a pipeline that will get one is loaded on the
    host: a model larger than the GPU then never has to fit there first.
    """
    return any(stage_of(table.get(name).value) == STAGE_PLACEMENT for name in names)


def _targets(strategy: Any, pipeline: Any) -> set[str]:
    resolve = getattr(strategy, "targets", None)
    if resolve is None:
        return set(pipeline.components.modules)
    return set(resolve(pipeline))


def check_combination(pipeline: Any, applied: Sequence[Any], new: Sequence[Any]) -> None:
    """Raise `InputError` unless `new` strategies (already sorted by stage) can follow the `applied` ones.

    Rules: a name at most once; stages never go backwards (storage dtype before placement: FP8 must quantize the
    weights before a placement strategy packs them); per component at most one strategy of each stage; and the pairs
    in `INCOMPATIBLE` never on the same component.
    """
    everything = [*applied, *new]
    names = [s.name for s in everything]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(
            f"Memory strategy {', '.join(map(repr, repeated))} given twice (applied: {[s.name for s in applied]}, "
            f"requested: {[s.name for s in new]}); each applies once."
        )
    if applied and new:
        last = max(applied, key=stage_of)
        for strategy in new:
            if stage_of(strategy) < stage_of(last):
                raise InputError(
                    f"Memory strategy {strategy.name!r} ({STAGE_NAMES.get(stage_of(strategy), 'custom')}) cannot "
                    f"follow {last.name!r} ({STAGE_NAMES.get(stage_of(last), 'custom')}): storage-dtype strategies "
                    "(fp8) apply before placement ones (offload, stream, disk). Call disable_memory() first, or pass "
                    "all names in one enable_memory call (they are ordered for you)."
                )
    owners: dict[tuple[str, int], str] = {}
    by_component: dict[str, list[str]] = {}
    for strategy in everything:
        for component in sorted(_targets(strategy, pipeline)):
            key = (component, stage_of(strategy))
            if key in owners:
                raise InputError(
                    f"Memory strategies {owners[key]!r} and {strategy.name!r} both set the "
                    f"{STAGE_NAMES.get(key[1], 'custom')} of the {component}; use one of them per component "
                    "(their `components=` option splits them)."
                )
            owners[key] = strategy.name
            by_component.setdefault(component, []).append(strategy.name)
    for component, present in by_component.items():
        for pair, why in INCOMPATIBLE.items():
            if pair <= set(present):
                a, b = sorted(pair)
                raise InputError(f"Memory strategies {a!r} and {b!r} cannot both apply to the {component}: {why}.")
