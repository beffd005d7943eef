"""Assigning a checkpoint's tensors to a module built on the meta device, with named errors."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from imagezoo.errors import WeightsError

_MAX_KEYS_SHOWN = 20


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return shown + (f", ... ({more} more)" if more > 0 else "")


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys, and `"key: checkpoint (..) vs model (..)"` shape mismatches, each sorted."""
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(actual[k])} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(actual))
        if tuple(actual[k]) != tuple(expected[k])
    ]
    return missing, unexpected, wrong_shape


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise `WeightsError` naming every missing, unexpected or wrongly shaped key.

    Args:
        module: The module the tensors are meant for (may live on the meta device).
        state_dict: Checkpoint tensors, already renamed to the module's key names.
        what: Human-readable name of the component and source, used in the message.
    """
    missing, unexpected, wrong_shape = compare_shapes(
        {k: tuple(v.shape) for k, v in module.state_dict().items()}, {k: tuple(v.shape) for k, v in state_dict.items()}
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_preview(wrong_shape)}")
    if problems:
        raise WeightsError(
            f"{what}: checkpoint does not match the architecture; "
            + "; ".join(problems)
            + ". Check that the files belong to this component and model size."
        )


def assign_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    what: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Check, then assign checkpoint tensors to `module` in place (no copy of random init).

    Floating-point tensors are cast to `dtype` when given; all tensors are moved to `device` when given.
    """
    check_state_dict(module, state_dict, what=what)
    converted = {}
    for key, tensor in state_dict.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
        converted[key] = tensor
    module.load_state_dict(converted, strict=True, assign=True)
    return module
