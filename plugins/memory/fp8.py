"""`fp8`: weights stored in FP8 with per-output-channel scales, computed in the pipeline's dtype.

Every `nn.Linear` / `nn.Conv*d` weight of the chosen components (except modules the component declares in
`memory_high_precision`) is replaced by `round(w / s)` in FP8 plus a float32 scale `s` per output channel (or one
per tensor), kept as a non-persistent buffer `weight_fp8_scale` so placement strategies move it with the weight. A
pre-forward hook on the layer puts `q * s` in the compute dtype in place for the forward; a post-forward hook puts
the FP8 tensor back. Memory: 1 byte per weight instead of 2 (bf16); speed: one extra elementwise pass per layer.

Scales matter: a plain downcast (`w.to(fp8)`, scale 1) clips large weights and flushes small ones to the FP8
subnormal grid, which shows up as grid artifacts once a LoRA delta is added in the compute dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagezoo.errors import InputError
from imagezoo.memory import STAGE_DTYPE, high_precision_names, is_under
from imagezoo.plugins.memory._files import FileReader, SafetensorsIndex

logger = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
GRANULARITIES = ("channel", "tensor")
QUANTIZED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
SCALE = "weight_fp8_scale"
_TINY = 1e-12


@dataclass(eq=False)
class _Layer:
    component: str
    name: str
    module: nn.Module
    original_device: torch.device
    original_dtype: torch.dtype
    backup: torch.Tensor | None
    hooks: tuple[Any, Any]


def quantize(weight: torch.Tensor, dtype: torch.dtype, granularity: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(q, scale)` with `q * scale ≈ weight`; scale is float32 (out,) / (1,), or None for non-FP8 storage dtypes."""
    if dtype not in FP8_DTYPES:
        return weight.to(dtype), None
    wide = weight.detach().float()
    if granularity == "channel":
        amax = wide.abs().reshape(wide.shape[0], -1).amax(dim=1)
    else:
        amax = wide.abs().amax().reshape(1)
    scale = (amax / torch.finfo(dtype).max).clamp(min=_TINY)
    shape = (-1,) + (1,) * (wide.dim() - 1)
    q = (wide / scale.view(shape)).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The compute-dtype weight for a forward."""
    if scale is None:
        return q.to(dtype)
    return q.to(dtype).mul_(scale.to(dtype).view((-1,) + (1,) * (q.dim() - 1)))


class FP8Storage:
    """Store weights in FP8 (or another storage dtype), compute in the pipeline's dtype.

    Args:
        dtype: `torch.float8_e4m3fn` (default) or `torch.float8_e5m2` (scaled); another float dtype is a plain cast
            (e.g. bf16 storage under an fp32 pipeline).
        granularity: `"channel"` (one scale per output channel, default) or `"tensor"` (one per weight).
        components: Components to quantize (default all).
        keep_original: Keep a host copy of the original weights so `remove` restores them exactly without the
            files. With False, `remove` re-reads them from the pipeline's safetensors files (exact as long as the
            files are the ones loaded); this saves host RAM the size of the quantized weights.
    """

    name = "fp8"
    stage = STAGE_DTYPE
    option_names = frozenset({"dtype", "granularity", "components", "keep_original"})

    def __init__(
        self,
        *,
        dtype: torch.dtype = torch.float8_e4m3fn,
        granularity: str = "channel",
        components: Sequence[str] | None = None,
        keep_original: bool = True,
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InputError(f"fp8 dtype={dtype!r} must be a floating torch dtype such as torch.float8_e4m3fn.")
        if granularity not in GRANULARITIES:
            raise InputError(f"fp8 granularity={granularity!r} is not allowed; use one of {GRANULARITIES}.")
        self.dtype = dtype
        self.granularity = granularity
        self.components = None if components is None else list(components)
        self.keep_original = keep_original
        self._layers: list[_Layer] = []
        self._compute_dtypes: dict[str, Any] = {}
        self._stash: dict[int, torch.Tensor] = {}

    def targets(self, pipeline: Any) -> list[str]:
        """The component names this strategy quantizes on `pipeline`."""
        available = list(pipeline.components.modules)
        wanted = available if self.components is None else self.components
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise InputError(f"Memory strategy 'fp8': unknown component(s) {unknown}; this pipeline has {available}.")
        return list(wanted)

    def apply(self, pipeline: Any) -> None:
        """Quantize the chosen layers and install the dequantizing hooks (all or nothing)."""
        try:
            self._apply(pipeline)
        except BaseException:
            self.remove(pipeline)
            raise

    def _apply(self, pipeline: Any) -> None:
        compute = pipeline.dtype
        if self.dtype == compute:
            logger.info("fp8: storage dtype %s equals the compute dtype; nothing to do.", self.dtype)
            return
        if not self.keep_original and not (getattr(pipeline, "files", None) or {}):
            logger.warning(
                "fp8 keep_original=False on a pipeline not loaded from files: remove() will not be able to restore "
                "the original weights (reload the pipeline instead)."
            )
        for component in self.targets(pipeline):
            module = pipeline.components.modules[component]
            keep = high_precision_names(module)
            for name, layer in module.named_modules():
                weight = getattr(layer, "weight", None)
                if not isinstance(layer, QUANTIZED_TYPES) or not isinstance(weight, nn.Parameter):
                    continue
                if is_under(name, keep) or not weight.is_floating_point() or weight.dim() < 2:
                    continue
                self._quantize(component, name, layer, compute)
            if hasattr(module, "compute_dtype"):
                # Components that read their dtype off a weight would otherwise compute in FP8.
                self._compute_dtypes[component] = module.compute_dtype
                module.compute_dtype = module.compute_dtype or compute
        logger.info("fp8: %d layers stored as %s (%s scales).", len(self._layers), self.dtype, self.granularity)

    def _quantize(self, component: str, name: str, layer: nn.Module, compute: torch.dtype) -> None:
        weight = layer.weight
        original = weight.data
        q, scale = quantize(original, self.dtype, self.granularity)
        backup = None
        if self.keep_original:
            backup = original if original.device.type == "cpu" else original.to("cpu")
        if scale is not None:
            layer.register_buffer(SCALE, scale, persistent=False)
        weight.data = q
        stash = self._stash

        def pre(module: nn.Module, args: tuple) -> None:
            param = module._parameters["weight"]
            stash[id(module)] = param.data
            param.data = dequantize(param.data, module._buffers.get(SCALE), compute)

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            stored = stash.pop(id(module), None)
            if stored is not None:
                module._parameters["weight"].data = stored

        hooks = (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post, always_call=True))
        self._layers.append(_Layer(component, name, layer, original.device, original.dtype, backup, hooks))

    def remove(self, pipeline: Any) -> None:
        """Put the original weights back (from the host copy, or the files) and drop scales and hooks.

        Raises:
            InputError: The originals were not kept and the pipeline has no files to re-read them from; nothing is
                changed then (the strategy stays applied).
        """
        files = getattr(pipeline, "files", None) or {}
        missing = sorted(
            {layer.component for layer in self._layers if layer.backup is None and not files.get(layer.component)}
        )
        if missing:
            raise InputError(
                f"fp8 cannot restore the original weights of the {', '.join(missing)}: they were not kept "
                "(keep_original=False) and the pipeline has no files to re-read them from. Reload the pipeline."
            )
        readers: dict[str, tuple[SafetensorsIndex, FileReader]] = {}
        try:
            for layer in self._layers:
                for handle in layer.hooks:
                    handle.remove()
                layer.module._buffers.pop(SCALE, None)
                weight = layer.module.weight
                if layer.backup is not None:
                    weight.data = layer.backup.to(layer.original_device)
                    continue
                if layer.component not in readers:
                    readers[layer.component] = (
                        SafetensorsIndex(files[layer.component]),
                        FileReader(layer.original_device),
                    )
                index, reader = readers[layer.component]
                location = index.locate(f"{layer.name}.weight", tuple(weight.shape))
                if location is None:
                    raise InputError(
                        f"fp8 cannot restore {layer.component}'s {layer.name}.weight: it is not in the files. "
                        "Reload the pipeline."
                    )
                weight.data = reader.read(location, layer.original_dtype, layer.original_device)
        finally:
            for _, reader in readers.values():
                reader.close()
        for component, value in self._compute_dtypes.items():
            pipeline.components.modules[component].compute_dtype = value
        self._layers.clear()
        self._compute_dtypes.clear()
