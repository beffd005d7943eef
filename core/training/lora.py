"""Trainable LoRA on `nn.Linear` modules, kept beside the frozen weight so every key name stays unchanged.

Each targeted Linear gets two children, `lora_A.default` (rank × in) and `lora_B.default` (out × rank), and a forward
hook adding `B(A(x)) · alpha/rank`. The module's own `weight`/`bias` keep their names and stay frozen in their dtype,
so a LoRA state dict has exactly DiffSynth's keys (`transformer_blocks.0.attn.to_q.lora_A.default.weight`) and the
base model's checkpoint keys never move. LoRA parameters are float32 (the optimizer updates full-precision values);
the low-rank product runs in the activation's dtype, cast from them each call, which costs rank-sized copies instead
of casting activations.

Saved files fold alpha/rank into `lora_B` (no alpha tensor), which is what DiffSynth files mean (alpha = rank).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagezoo.errors import InputError

logger = logging.getLogger(__name__)

ADAPTER = "default"
_SCALE_ATTR = "_imagezoo_lora_scale"
_HOOK_ATTR = "_imagezoo_lora_hook"


def _lora_forward_hook(module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    a = module.lora_A[ADAPTER].weight
    b = module.lora_B[ADAPTER].weight
    delta = F.linear(F.linear(x.to(output.dtype), a.to(output.dtype)), b.to(output.dtype))
    return output + delta * getattr(module, _SCALE_ATTR)


def matches(name: str, targets: Iterable[str]) -> bool:
    """Whether module `name` is one of `targets` (module-name suffixes at a dot boundary, as PEFT matches)."""
    return any(name == t or name.endswith("." + t) for t in targets)


@dataclass
class LoRAReport:
    """Which modules got LoRA and which targets were skipped."""

    injected: list[str]
    skipped: list[str]


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float | None = None,
    *,
    exclude: Iterable[str] = (),
    dtype: torch.dtype = torch.float32,
) -> LoRAReport:
    """Add trainable LoRA to every `nn.Linear` of `model` whose name ends with one of `targets`.

    Args:
        model: The (frozen) model.
        targets: Module-name suffixes, e.g. `["to_q", "to_out.0", "img_mod.1"]`.
        rank: LoRA rank.
        alpha: LoRA alpha (default: `rank`); the update is scaled by alpha/rank.
        exclude: Full module names never to touch (e.g. layers whose output is unused: they would get no gradient).
        dtype: Dtype of the LoRA parameters.

    Raises:
        InputError: A target matches no Linear, or the rank is not positive.
    """
    if rank < 1:
        raise InputError(f"lora_rank={rank} must be a positive integer.")
    alpha = float(rank if alpha is None else alpha)
    excluded = set(exclude)
    injected, skipped = [], []
    found = dict.fromkeys(targets, False)
    for name, module in model.named_modules():
        if not matches(name, targets) or not isinstance(module, nn.Linear):
            continue
        for target in targets:
            if name == target or name.endswith("." + target):
                found[target] = True
        if name in excluded:
            skipped.append(name)
            continue
        if hasattr(module, "lora_A"):
            raise InputError(f"Module {name!r} already has LoRA; inject once per model.")
        device = module.weight.device
        a = nn.Linear(module.in_features, rank, bias=False, device=device, dtype=dtype)
        b = nn.Linear(rank, module.out_features, bias=False, device=device, dtype=dtype)
        # PEFT's initialization: A Kaiming-uniform, B zero, so training starts from the base model exactly.
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        module.lora_A = nn.ModuleDict({ADAPTER: a})
        module.lora_B = nn.ModuleDict({ADAPTER: b})
        setattr(module, _SCALE_ATTR, alpha / rank)
        setattr(module, _HOOK_ATTR, module.register_forward_hook(_lora_forward_hook))
        injected.append(name)
    missing = [t for t, hit in found.items() if not hit]
    if missing:
        raise InputError(
            f"LoRA target module(s) {', '.join(missing)} match no Linear layer of the model; check "
            "--lora_target_modules (suffixes of module names such as to_q, to_out.0, img_mod.1)."
        )
    if skipped:
        logger.info("LoRA: skipped %d target layer(s) that never get a gradient: %s", len(skipped), ", ".join(skipped))
    return LoRAReport(injected=injected, skipped=skipped)


def remove_lora(model: nn.Module) -> None:
    """Undo `inject_lora` (drop LoRA children and hooks)."""
    for module in model.modules():
        if hasattr(module, _HOOK_ATTR):
            getattr(module, _HOOK_ATTR).remove()
            for attr in ("lora_A", "lora_B"):
                delattr(module, attr)
            delattr(module, _HOOK_ATTR)
            delattr(module, _SCALE_ATTR)


def lora_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Modules of `model` carrying LoRA, by name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, _HOOK_ATTR)}


def export_lora(model: nn.Module, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """LoRA weights of `model` in DiffSynth's format (`{prefix}{module}.lora_A.default.weight`), alpha/rank folded
    into `lora_B`.

    Args:
        model: A model with injected LoRA.
        prefix: Prepended to the keys (e.g. `"pipe.dit."`, then removed by `--remove_prefix_in_ckpt`, as DiffSynth).
    """
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{prefix}{name}.lora_A.{ADAPTER}.weight"] = module.lora_A[ADAPTER].weight.detach()
        out[f"{prefix}{name}.lora_B.{ADAPTER}.weight"] = module.lora_B[ADAPTER].weight.detach() * getattr(
            module, _SCALE_ATTR
        )
    return out


def to_opensource(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DiffSynth-format LoRA keys -> the ComfyUI/diffusers-loadable `diffusion_model.{module}.lora_{A,B}.weight`.

    Goes through the project's one definition of each format (`imagezoo.lora`), so what training writes is what
    loading reads.
    """
    from imagezoo.lora import convert_lora_state_dict

    return convert_lora_state_dict(dict(state_dict), to="comfyui")
