"""Family-agnostic LoRA: the key formats people have, applied to any `nn.Module` by its module names.

A LoRA adds `scale * (alpha / rank) * up @ down` to the weight of each targeted `nn.Linear`. Files name the factors
in one of several conventions; all of them are read, detected from the keys, and can be written back:

| format      | factor keys (module `m`)                                   | alpha                    |
|-------------|------------------------------------------------------------|--------------------------|
| `peft`      | `m.lora_A.weight`, `m.lora_B.weight`                         | folded into `lora_B`     |
| `diffusers` | `transformer.m.lora_A.weight`, `transformer.m.lora_B.weight` | folded into `lora_B`     |
| `diffsynth` | `m.lora_A.default.weight`, `m.lora_B.default.weight`         | folded into `lora_B`     |
| `kohya`     | `lora_unet_<m, dots as _>.lora_down.weight` / `.lora_up.weight` | `.alpha` scalar       |
| `comfyui`   | `diffusion_model.m.lora_A.weight`, `diffusion_model.m.lora_B.weight` | folded into `lora_B` |

On reading, every format also accepts `lora_down`/`lora_up` factor names and per-module `.alpha` scalars (a module
without one has alpha = rank, i.e. no extra scaling); PEFT's `base_model.model.` prefix is removed. Kohya names
replace dots with underscores, so they are resolved against the real module names of the model (names that contain
underscores, such as `to_add_out`, come out right). Keys that fit no convention, and modules the model does not
have, are errors that name them: nothing is skipped silently.

Unfused LoRAs run as removable forward hooks (the model code is untouched); `fuse` writes the deltas into the
weights and keeps the original weights on the CPU so `unfuse` restores them bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from imagezoo.errors import InputError, WeightsError

logger = logging.getLogger(__name__)

FORMATS = ("peft", "diffusers", "diffsynth", "kohya", "comfyui")
"""Key formats `save`/`convert` can write (and detection reports)."""

_PREFIXES = {
    "peft": "",
    "diffusers": "transformer.",
    "diffsynth": "",
    "kohya": "lora_unet_",
    "comfyui": "diffusion_model.",
}
_PEFT_MODEL_PREFIX = "base_model.model."
# Longest first: ".lora_A.default.weight" must win over a shorter suffix that also matches.
_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
_FUSABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_SHOWN = 12

LoraSource = str | Path | Sequence[str | Path] | Mapping[str, torch.Tensor]


def _preview(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_SHOWN])
    return shown + (f", ... ({len(items) - _MAX_SHOWN} more)" if len(items) > _MAX_SHOWN else "")


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"LoRA format {fmt!r} is not known; use one of {', '.join(FORMATS)}.")
    return fmt


@dataclass
class LoraLayer:
    """The low-rank update of one linear module: `delta = (alpha / rank) * up @ down`.

    Attributes:
        down: (rank, in_features) — `lora_A` / `lora_down`.
        up: (out_features, rank) — `lora_B` / `lora_up`.
        alpha: The LoRA alpha; None means alpha = rank (no extra scaling).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        """The inner dimension of the factors."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """`alpha / rank` (1.0 when alpha is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The weight update `(alpha / rank) * up @ down`, computed in `dtype`."""
        device = device if device is not None else self.down.device
        up, down = self.up.to(device, dtype), self.down.to(device, dtype)
        return (up @ down) * self.scale


LoraLayers = dict[str, LoraLayer]
"""Module name (as in `named_modules()`) -> its LoRA update."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def detect_lora_format(keys: Iterable[str]) -> str:
    """The key format of a LoRA state dict (one of `FORMATS`), from its key names only.

    Raises:
        WeightsError: No key looks like a LoRA factor.
    """
    keys = list(keys)
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(".lora_A.default." in k or ".lora_B.default." in k for k in keys):
        return "diffsynth"
    factors = [k for k in keys if _split_suffix(k)[1] in ("down", "up")]
    if not factors:
        raise WeightsError(
            f"None of the {len(keys)} tensors looks like a LoRA factor (lora_A/lora_B or lora_down/lora_up); "
            f"first keys: {_preview(keys[:5])}. Is this a LoRA file?"
        )
    if any(k.startswith(_PREFIXES["diffusers"]) for k in factors):
        return "diffusers"
    return "peft"


def _split_suffix(key: str) -> tuple[str, str | None]:
    for suffix, kind in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return key, None


def _strip_prefix(fmt: str, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map each key to its module path without the format's prefix; keys lacking the prefix are returned apart."""
    prefix = _PREFIXES[fmt]
    if fmt == "peft" and names and all(k.startswith(_PEFT_MODEL_PREFIX) for k in names):
        prefix = _PEFT_MODEL_PREFIX
    stripped, foreign = {}, []
    for key in names:
        if key.startswith(prefix):
            stripped[key] = key[len(prefix) :]
        else:
            foreign.append(key)
    return stripped, foreign


def _kohya_lookup(module_names: Iterable[str]) -> tuple[dict[str, str], set[str]]:
    flat: dict[str, str] = {}
    ambiguous: set[str] = set()
    for name in module_names:
        key = name.replace(".", "_")
        if key in flat and flat[key] != name:
            ambiguous.add(key)
        flat[key] = name
    return flat, ambiguous


def parse_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    module_names: Iterable[str] | None = None,
    alpha: float | None = None,
    format: str | None = None,
) -> LoraLayers:
    """Read a LoRA state dict in any supported format into per-module factors.

    Args:
        state_dict: Tensors of a LoRA file.
        module_names: The model's module names (`named_modules()`); required for kohya files (to undo the dot ->
            underscore mangling), and when given every LoRA module must be one of them.
        alpha: Alpha for modules that carry no `.alpha` tensor (e.g. a PEFT adapter trained with `lora_alpha != r`,
            whose alpha lives in `adapter_config.json`); None means alpha = rank.
        format: The key format; detected from the keys when None.

    Raises:
        WeightsError: Unrecognized keys, a factor without its partner, inconsistent shapes, or module names the model
            does not have (each named).
        InputError: A kohya file without `module_names`, or an unknown `format`.
    """
    keys = list(state_dict)
    fmt = _check_format(format) if format is not None else detect_lora_format(keys)
    stripped, foreign = _strip_prefix(fmt, keys)
    if foreign:
        raise WeightsError(
            f"LoRA keys without the {fmt} prefix {_PREFIXES[fmt]!r} (mixed formats or another model part, e.g. a text "
            f"encoder LoRA): {_preview(foreign)}."
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, rest in stripped.items():
        module, kind = _split_suffix(rest)
        if kind is None or not module:
            unknown.append(key)
            continue
        parts.setdefault(module, {})[kind] = state_dict[key]
    if unknown:
        raise WeightsError(
            f"LoRA keys that are no LoRA factor or alpha (DoRA, LoKr, biases and full diffs are not supported): "
            f"{_preview(unknown)}."
        )

    names = set(module_names) if module_names is not None else None
    if fmt == "kohya":
        if names is None:
            raise InputError(
                "kohya LoRA keys replace '.' with '_', so the real module names can't be recovered from the file "
                "alone: pass module_names (the model's named_modules()), e.g. by loading it onto a pipeline, or give "
                "`imagezoo lora convert` a --base checkpoint."
            )
        flat, ambiguous = _kohya_lookup(names)
        renamed: dict[str, dict[str, torch.Tensor]] = {}
        unmatched = []
        for module, tensors in parts.items():
            if module in ambiguous:
                raise WeightsError(f"kohya LoRA module {module!r} matches more than one module name of the model.")
            if module not in flat:
                unmatched.append(f"lora_unet_{module}")
                continue
            renamed[flat[module]] = tensors
        if unmatched:
            raise WeightsError(
                f"{len(unmatched)} kohya LoRA module(s) match no module of the model: {_preview(unmatched)}."
            )
        parts = renamed
    elif names is not None:
        unmatched = sorted(_PREFIXES[fmt] + m for m in parts if m not in names)
        if unmatched:
            raise WeightsError(f"{len(unmatched)} LoRA module(s) match no module of the model: {_preview(unmatched)}.")

    layers: LoraLayers = {}
    for module in sorted(parts):
        tensors = parts[module]
        if "down" not in tensors or "up" not in tensors:
            have = "up" if "up" in tensors else "down" if "down" in tensors else "alpha"
            raise WeightsError(f"LoRA module {module!r} has only its {have} tensor; both factors are needed.")
        down, up = tensors["down"], tensors["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise WeightsError(
                f"LoRA module {module!r}: factors of shape down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                "a (rank, in) / (out, rank) pair (only linear-layer LoRAs are supported)."
            )
        value = alpha
        if "alpha" in tensors:
            if tensors["alpha"].numel() != 1:
                raise WeightsError(
                    f"LoRA module {module!r}: alpha must be a scalar, got {tuple(tensors['alpha'].shape)}."
                )
            value = float(tensors["alpha"].float().item())
        layers[module] = LoraLayer(down=down, up=up, alpha=value)
    return layers


def _peft_alpha(path: Path) -> float | None:
    """`lora_alpha` from a PEFT `adapter_config.json` (PEFT's `save_pretrained` folder layout), when there is one."""
    if path.is_dir():
        config_path = path / "adapter_config.json"
    elif path.name == "adapter_model.safetensors":
        config_path = path.parent / "adapter_config.json"
    else:
        return None
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{config_path} is not valid JSON: {exc}") from exc
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise WeightsError(f"{config_path} sets {flag}=true, which imagezoo's LoRA loader does not support.")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise WeightsError(f"{config_path} uses per-module alpha_pattern/rank_pattern, which is not supported.")
    value = config.get("lora_alpha")
    return float(value) if value is not None else None


def read_lora(source: LoraSource) -> tuple[dict[str, torch.Tensor], float | None]:
    """The tensors of a LoRA (safetensors file(s), a PEFT folder, or a state dict) and any alpha from its config."""
    if isinstance(source, Mapping):
        return dict(source), None
    from imagezoo.weights import files_from_path, load_safetensors

    paths = [source] if isinstance(source, (str, Path)) else list(source)
    if not paths:
        raise InputError("No LoRA file given.")
    files = files_from_path(paths if len(paths) > 1 else paths[0])
    alpha = _peft_alpha(Path(paths[0]))
    return load_safetensors(files), alpha


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def _folded_up(layer: LoraLayer) -> torch.Tensor:
    if layer.alpha is None or layer.alpha == layer.rank:
        return layer.up
    return (layer.up.float() * layer.scale).to(layer.up.dtype)


def lora_state_dict(layers: Mapping[str, LoraLayer], format: str = "peft") -> dict[str, torch.Tensor]:
    """Write per-module factors as a state dict in `format` (see the module docstring's table).

    Formats without an alpha tensor get `alpha / rank` folded into the up factor, so every loader of that format
    computes the same weights; kohya keeps alpha as a per-module scalar.
    """
    fmt = _check_format(format)
    prefix = _PREFIXES[fmt]
    out: dict[str, torch.Tensor] = {}
    for module, layer in layers.items():
        if fmt == "kohya":
            base = prefix + module.replace(".", "_")
            out[f"{base}.lora_down.weight"] = layer.down.contiguous()
            out[f"{base}.lora_up.weight"] = layer.up.contiguous()
            alpha = float(layer.rank if layer.alpha is None else layer.alpha)
            out[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            continue
        infix = ".default" if fmt == "diffsynth" else ""
        out[f"{prefix}{module}.lora_A{infix}.weight"] = layer.down.contiguous()
        out[f"{prefix}{module}.lora_B{infix}.weight"] = _folded_up(layer).contiguous()
    return out


def convert_lora_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    to: str,
    *,
    module_names: Iterable[str] | None = None,
    alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """Rewrite a LoRA state dict (any supported format, detected) into format `to`.

    Args:
        state_dict: The LoRA's tensors.
        to: One of `FORMATS`; e.g. "comfyui" for the keys other tools load (`--align_to_opensource_format`).
        module_names: The model's module names; needed only when the input is kohya.
        alpha: Alpha for modules without an `.alpha` tensor (default: alpha = rank).

    Returns:
        The converted state dict; the effective weight updates are unchanged.
    """
    return lora_state_dict(parse_lora_state_dict(state_dict, module_names=module_names, alpha=alpha), to)


def save_lora_file(layers: Mapping[str, LoraLayer], path: str | Path, format: str = "peft") -> Path:
    """Save factors as a safetensors file in `format`; the format is recorded in the file's metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"LoRA files are written as safetensors: {str(path)!r} must end in '.safetensors'.")
    tensors = {k: v.detach().to("cpu") for k, v in lora_state_dict(layers, format).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "imagezoo_lora_format": format})
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Applying to a module tree


@dataclass
class LoraAdapter:
    """One loaded LoRA: its factors (as read, on the CPU), its strength, and whether it is fused."""

    name: str
    layers: LoraLayers
    scale: float = 1.0
    fused: bool = False
    source_format: str | None = None


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"LoRA scale={scale!r} must be a finite number.")
    return float(scale)


class LoraManager:
    """The LoRAs applied to one module tree (e.g. a DiT), addressed by its `named_modules()` names.

    Several LoRAs can be loaded at once, each with its own scale; their updates add up. Unfused LoRAs are computed
    in a forward hook on each targeted `nn.Linear` (`output + sum(scale * alpha/rank * up(down(x)))`), so memory
    strategies that hook or move modules keep working. `fuse` writes the updates into the weights (faster, same
    result); the original weights are kept on the CPU so `unfuse` restores them exactly.

    Args:
        root: The module tree the LoRA keys name.
        device: Where the compute copies of the factors live (default: each targeted weight's device).
        dtype: Their dtype (default: each targeted weight's dtype when it is a compute dtype, else float32).
        what: Name of the tree, for messages.
    """

    def __init__(
        self,
        root: nn.Module,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        what: str = "model",
    ) -> None:
        self.root = root
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.what = what
        self.adapters: dict[str, LoraAdapter] = {}
        self._hooks: dict[str, RemovableHandle] = {}
        self._active: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self._compute: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._originals: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------- loading
    def linear_modules(self) -> dict[str, nn.Linear]:
        """The tree's linear modules by name: what LoRA keys may target."""
        return {name: m for name, m in self.root.named_modules() if isinstance(m, nn.Linear)}

    def load(
        self,
        source: LoraSource,
        scale: float = 1.0,
        name: str | None = None,
        *,
        alpha: float | None = None,
    ) -> str:
        """Load a LoRA (file, files, PEFT folder or state dict) in any supported format; returns its name.

        Raises:
            WeightsError: Keys that match no module of the tree, or shapes that don't fit it (nothing is applied).
            InputError: The name is taken, or the scale is not a number.
        """
        scale = _check_scale(scale)
        if name is None:
            first = source if isinstance(source, (str, Path)) else None
            if first is None and not isinstance(source, Mapping) and len(source) > 0:
                first = source[0]
            name = Path(first).stem if first is not None else f"lora_{len(self.adapters)}"
        if name in self.adapters:
            raise InputError(f"A LoRA named {name!r} is already loaded on the {self.what}; pass another name=.")
        tensors, file_alpha = read_lora(source)
        fmt = detect_lora_format(tensors)
        all_modules = dict(self.root.named_modules())
        try:
            layers = parse_lora_state_dict(
                tensors, module_names=all_modules, alpha=alpha if alpha is not None else file_alpha, format=fmt
            )
        except WeightsError as exc:
            raise WeightsError(f"LoRA {name!r} does not fit the {self.what}: {exc}") from None
        modules = self.linear_modules()
        not_linear = [f"{m} ({type(all_modules[m]).__name__})" for m in layers if m not in modules]
        if not_linear:
            raise WeightsError(
                f"LoRA {name!r} targets {self.what} modules that are not linear layers (only nn.Linear takes LoRAs "
                f"here): {_preview(not_linear)}."
            )
        wrong = [
            f"{m}: LoRA update {layer.up.shape[0]}x{layer.down.shape[1]} vs weight {tuple(modules[m].weight.shape)}"
            for m, layer in layers.items()
            if (layer.up.shape[0], layer.down.shape[1]) != tuple(modules[m].weight.shape)
        ]
        if wrong:
            raise WeightsError(f"LoRA {name!r} has shapes that don't fit the {self.what}: {_preview(wrong)}.")
        for module, layer in layers.items():
            weight = modules[module].weight
            dtype = self.dtype or (weight.dtype if weight.dtype in _FUSABLE_DTYPES else torch.float32)
            device = self.device or weight.device
            self._compute[(name, module)] = (layer.down.to(device, dtype), layer.up.to(device, dtype))
        self.adapters[name] = LoraAdapter(name, layers, scale, source_format=fmt)
        logger.info("Loaded LoRA %r (%s format, %d modules) onto the %s.", name, fmt, len(layers), self.what)
        self._refresh()
        return name

    def unload(self, name: str | None = None) -> None:
        """Remove one LoRA (or all when `name` is None); fused weights are recomputed or restored exactly."""
        names = [self._get(name).name] if name is not None else list(self.adapters)
        self._check_rewritable(m for n in names if self.adapters[n].fused for m in self.adapters[n].layers)
        for adapter_name in names:
            del self.adapters[adapter_name]
            for key in [k for k in self._compute if k[0] == adapter_name]:
                del self._compute[key]
        self._refresh()

    def set_scale(self, name: str, scale: float) -> None:
        """Change the strength of a loaded LoRA (fused weights are recomputed)."""
        adapter = self._get(name)
        scale = _check_scale(scale)
        if adapter.fused:
            self._check_rewritable(adapter.layers)
        adapter.scale = scale
        self._refresh()

    def _get(self, name: str) -> LoraAdapter:
        if name not in self.adapters:
            loaded = ", ".join(self.adapters) or "none"
            raise InputError(f"No LoRA named {name!r} on the {self.what}; loaded: {loaded}.")
        return self.adapters[name]

    # -------------------------------------------------------------- fusing
    def fuse(self) -> None:
        """Write every loaded LoRA into the weights (the forward hooks then skip them).

        Raises:
            InputError: A targeted weight is stored in a non-compute dtype (e.g. fp8), or its module's forward was
                replaced (e.g. by an FP8 compute path); nothing is fused then.
        """
        self._check_rewritable(m for a in self.adapters.values() if not a.fused for m in a.layers)
        for adapter in self.adapters.values():
            adapter.fused = True
        self._refresh()

    def unfuse(self) -> None:
        """Restore the original weights exactly; the LoRAs stay loaded and run as hooks again."""
        self._check_rewritable(self._originals)
        for adapter in self.adapters.values():
            adapter.fused = False
        self._refresh()

    def _check_rewritable(self, names: Iterable[str]) -> None:
        """Refuse, before changing anything, to rewrite weights that are not what the forward computes with."""
        modules = dict(self.root.named_modules())
        for name in sorted(set(names)):
            module = modules[name]
            if module.weight.dtype not in _FUSABLE_DTYPES:
                raise InputError(
                    f"Can't fuse or unfuse a LoRA in {self.what} module {name!r}: its weight is stored as "
                    f"{module.weight.dtype}. Fuse before enabling a low-precision storage strategy, or keep the LoRA "
                    "unfused."
                )
            if "forward" in vars(module):
                # An instance-level forward (e.g. an FP8 compute path) runs its own copy of the weight.
                raise InputError(
                    f"Can't fuse or unfuse a LoRA in {self.what} module {name!r}: its forward was replaced (e.g. by "
                    "an FP8 compute path with its own copy of the weight), so the change would not take effect. "
                    "Fuse before enabling it, or keep the LoRA unfused."
                )

    @property
    def fused(self) -> bool:
        """Whether any loaded LoRA is fused."""
        return any(a.fused for a in self.adapters.values())

    def _refresh(self) -> None:
        """Bring weights, compute lists and hooks in line with `self.adapters`."""
        modules = dict(self.root.named_modules())
        fused: dict[str, list[LoraAdapter]] = {}
        active: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for adapter in self.adapters.values():
            for module in adapter.layers:
                if adapter.fused:
                    fused.setdefault(module, []).append(adapter)
                else:
                    down, up = self._compute[(adapter.name, module)]
                    active.setdefault(module, []).append((down, up, adapter.scale * adapter.layers[module].scale))
        with torch.no_grad():
            for module in sorted(set(fused) | set(self._originals)):
                self._write_weight(module, modules[module], fused.get(module, []))
        self._active = active
        wanted = {module for adapter in self.adapters.values() for module in adapter.layers}
        for module in set(self._hooks) - wanted:
            self._hooks.pop(module).remove()
        for module in sorted(wanted - set(self._hooks)):
            self._hooks[module] = modules[module].register_forward_hook(self._make_hook(module))

    def _write_weight(self, name: str, module: nn.Module, adapters: list[LoraAdapter]) -> None:
        weight = module.weight
        if not adapters:
            weight.copy_(self._originals.pop(name).to(weight.device))
            return
        if name not in self._originals:
            self._originals[name] = weight.detach().to("cpu", copy=True)
        # Always from the original: the fused weight is the same whatever order LoRAs were fused or unloaded in.
        total = self._originals[name].to(weight.device, torch.float32, copy=True)
        for adapter in adapters:
            total += adapter.layers[name].delta(torch.float32, weight.device) * adapter.scale
        weight.copy_(total.to(weight.dtype))

    def _make_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            terms = self._active.get(name)
            if not terms:
                return None
            x = args[0]
            delta = None
            for down, up, coeff in terms:
                if down.dtype != x.dtype or down.device != x.device:
                    down, up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
                term = F.linear(F.linear(x, down), up) * coeff
                delta = term if delta is None else delta + term
            return output + delta.to(output.dtype)

        return hook

    # -------------------------------------------------------------- saving
    def combined_layers(self, name: str | None = None) -> LoraLayers:
        """The factors of one LoRA, or of all loaded LoRAs as a single LoRA with the same total effect.

        A single LoRA at scale 1 is returned as loaded (alpha kept), so saving it is lossless. Otherwise each
        LoRA's `scale * alpha / rank` is folded into its up factor and the factors are stacked along the rank,
        which sums the updates exactly.
        """
        adapters = [self._get(name)] if name is not None else list(self.adapters.values())
        if not adapters:
            raise InputError(f"No LoRA is loaded on the {self.what}; nothing to save.")
        if len(adapters) == 1:
            adapter = adapters[0]
            if adapter.scale == 1.0:
                return dict(adapter.layers)
            return {
                m: LoraLayer(layer.down, (layer.up.float() * adapter.scale).to(layer.up.dtype), layer.alpha)
                for m, layer in adapter.layers.items()
            }
        out: LoraLayers = {}
        for module in sorted({m for a in adapters for m in a.layers}):
            pairs = [(a.layers[module], a.scale) for a in adapters if module in a.layers]
            dtypes = {layer.down.dtype for layer, _ in pairs} | {layer.up.dtype for layer, _ in pairs}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            downs = [layer.down.to(dtype) for layer, _ in pairs]
            ups = [(layer.up.float() * (s * layer.scale)).to(dtype) for layer, s in pairs]
            out[module] = LoraLayer(torch.cat(downs, 0), torch.cat(ups, 1), None)
        return out

    def save(self, path: str | Path, format: str = "peft", name: str | None = None) -> Path:
        """Save one LoRA (or the sum of all loaded ones) as safetensors in `format`."""
        return save_lora_file(self.combined_layers(name), path, format)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline mixin


class LoraMixin:
    """LoRA methods for a pipeline; needs `components.modules` (name -> `nn.Module`), `device` and `dtype`.

    LoRAs target the component named by `lora_component` (default "dit", the denoiser) unless `component=` says
    otherwise.
    """

    lora_component: str = "dit"
    components: Any
    device: torch.device
    dtype: torch.dtype

    def _lora_managers(self) -> dict[str, LoraManager]:
        # Created lazily so a pipeline class need not call a mixin __init__.
        managers = self.__dict__.get("_lora_manager_table")
        if managers is None:
            managers = self.__dict__["_lora_manager_table"] = {}
        return managers

    def lora_manager(self, component: str | None = None) -> LoraManager:
        """The `LoraManager` of a component (created on first use)."""
        component = component or self.lora_component
        managers = self._lora_managers()
        if component not in managers:
            modules = self.components.modules
            if component not in modules:
                raise InputError(f"No component {component!r} to put a LoRA on; components: {', '.join(modules)}.")
            managers[component] = LoraManager(modules[component], device=self.device, dtype=self.dtype, what=component)
        return managers[component]

    def load_lora(
        self,
        lora: LoraSource,
        scale: float = 1.0,
        name: str | None = None,
        *,
        component: str | None = None,
        alpha: float | None = None,
    ) -> str:
        """Load a LoRA in any supported key format (detected) and apply it unfused; returns its name.

        Args:
            lora: A safetensors file, a list of them, a PEFT adapter folder, or a state dict.
            scale: Strength (the update is multiplied by it).
            name: Name to address it by (default: the file name without extension).
            component: Which component it targets (default `lora_component`).
            alpha: Alpha for modules whose file carries none (default: alpha = rank).
        """
        return self.lora_manager(component).load(lora, scale, name, alpha=alpha)

    def _check_weights_writable(self, action: str, managers: list[LoraManager] | None = None) -> None:
        """Fusing rewrites weights that placement/storage strategies may hold elsewhere (host buffers, fp8 copies,
        files); only unmanaged weights are safe to rewrite."""
        if managers is not None and not any(manager.fused for manager in managers):
            return
        applied = [strategy.name for strategy in getattr(self, "memory_strategies", [])]
        if applied:
            raise InputError(
                f"{action} rewrites weights that the memory strategies {applied} now manage: call "
                f"pipe.disable_memory(), then {action}, then enable the strategies again."
            )

    def unload_lora(self, name: str | None = None, *, component: str | None = None) -> None:
        """Remove a LoRA by name, or every LoRA (of every component) when `name` is None."""
        if name is None and component is None:
            self._check_weights_writable("unload_lora()", list(self._lora_managers().values()))
            for manager in self._lora_managers().values():
                manager.unload()
            return
        self._check_weights_writable("unload_lora()", [self.lora_manager(component)])
        self.lora_manager(component).unload(name)

    def set_lora_scale(self, name: str, scale: float, *, component: str | None = None) -> None:
        """Change a loaded LoRA's strength."""
        self._check_weights_writable("set_lora_scale()", [self.lora_manager(component)])
        self.lora_manager(component).set_scale(name, scale)

    def fuse_lora(self) -> None:
        """Fuse every loaded LoRA into its component's weights (originals kept on the CPU for `unfuse_lora`).

        Raises:
            InputError: Memory strategies are applied (fuse first, then enable them), or a weight is stored in a
                storage-only dtype.
        """
        self._check_weights_writable("fuse_lora()")
        for manager in self._lora_managers().values():
            manager.fuse()

    def unfuse_lora(self) -> None:
        """Restore the exact original weights; the LoRAs stay loaded, unfused."""
        self._check_weights_writable("unfuse_lora()", list(self._lora_managers().values()))
        for manager in self._lora_managers().values():
            manager.unfuse()

    def save_lora(
        self, path: str | Path, format: str = "peft", name: str | None = None, *, component: str | None = None
    ) -> Path:
        """Save a loaded LoRA (or all of a component's LoRAs combined) as safetensors in `format` (see FORMATS)."""
        return self.lora_manager(component).save(path, format, name)

    @property
    def loras(self) -> dict[str, float]:
        """Loaded LoRAs: name -> scale (names are prefixed with their component when it isn't the default)."""
        out = {}
        for component, manager in self._lora_managers().items():
            for adapter in manager.adapters.values():
                key = adapter.name if component == self.lora_component else f"{component}:{adapter.name}"
                out[key] = adapter.scale
        return out


def module_names_from_checkpoint(path: str | Path) -> list[str]:
    """Names of the modules a checkpoint's 2-D `*.weight` tensors belong to (headers only, no data read)."""
    from imagezoo.weights import files_from_path, read_shapes

    shapes = read_shapes(files_from_path(path))
    return sorted(k[: -len(".weight")] for k, shape in shapes.items() if k.endswith(".weight") and len(shape) == 2)


_SCALE_RE = re.compile(r"^(?P<path>.+):(?P<scale>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`"PATH"` or `"PATH:SCALE"` -> (path, scale); a colon not followed by a number is part of the path."""
    match = _SCALE_RE.match(spec)
    if match:
        return match.group("path"), float(match.group("scale"))
    return spec, 1.0
