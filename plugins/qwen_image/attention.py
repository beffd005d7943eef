"""Joint [text, image] attention with a choice of kernels, exact on every path.

The DiT attends image and text queries to the concatenation of text and image keys. Three mask shapes occur:

- none (one prompt, or prompts of equal length): any dense kernel (cuDNN, flash, FA3) applies;
- key padding `(B, 1, 1, L + S)` (a CFG or prompt batch whose prompts differ in length): dense kernels take no mask,
  so either SDPA picks a masked kernel (cuDNN, memory-efficient) or the `varlen` path drops the padded keys;
- a full mask `(B, 1|H, Nq, L + S)` (EliGen regions): masked SDPA only.

The `varlen` path puts the keys in [image, text] order with each sample's real text keys first, so a sample's valid
keys are a prefix of its key row, and runs FlashAttention's variable-length kernel with per-sample key counts
(`seqused_k`). Softmax does not depend on key order, so the result equals the masked one up to float rounding, with
no host sync and static shapes (safe under `torch.compile`). Padded text queries, whose outputs no real token ever
reads, are computed like any other query.

Backend names: `auto` (the fastest known-good choice for the device and mask, see `resolve_backend`), `sdpa`
(PyTorch's own dispatcher), `cudnn`, `flash`, `efficient`, `math` (forced SDPA kernels), `varlen` and `fa3`
(FlashAttention 3 from the `flash_attn_interface` package, when importable).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from imagezoo.errors import InputError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "varlen", "fa3")
_SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# Measured on an H100 with torch 2.11, bf16, 24 heads x 128, 4-7k tokens (docs/speed.md): cuDNN's Hopper kernel is
# the fastest dense one (~550 TFLOP/s against ~300 for flash and ~160 for memory-efficient).
_AUTO_DENSE_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
_AUTO_MASKED_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# What `auto` runs for a key-padding mask in inference without FA3: "varlen" (flash with per-sample key counts) or
# "auto-sdpa" (SDPA with the boolean mask, cuDNN first). Measured for a CFG batch: 1.66 against 1.11 ms at 1024²,
# 3.50 against 5.10 ms at 1328²; both lose to running the samples apart (2 x 0.39 / 2 x 1.01 ms), which the DiT does
# for right-padded prompts in inference, so this choice only meets left padding.
AUTO_PADDING = "varlen"
_FA3_MODULE = "flash_attn_interface"


def check_backend(name: str) -> str:
    """Validate a backend name.

    Raises:
        InputError: The name is not one of `BACKENDS`.
    """
    if name not in BACKENDS:
        raise InputError(f"Unknown attention backend {name!r}; use one of {', '.join(BACKENDS)}.")
    return name


# Looked up once at import: a cached function would be re-traced (and warned about) inside compiled blocks.
_FA3_INSTALLED = importlib.util.find_spec(_FA3_MODULE) is not None


def fa3_available() -> bool:
    """Whether FlashAttention 3 (`flash_attn_interface`, Hopper only) can be imported."""
    return _FA3_INSTALLED


@functools.cache
def _fa3() -> Any:
    import flash_attn_interface  # type: ignore[import-not-found]

    return flash_attn_interface


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def resolve_backend(name: str, device: torch.device, mask_kind: str, dtype: torch.dtype) -> str:
    """The backend that will run for a requested name, device, mask kind ("none", "padding", "full") and dtype.

    `auto` picks, on CUDA with 16-bit inputs: FA3 when installed on Hopper, else prioritized SDPA (cuDNN first) for
    unmasked and fully masked attention, and `AUTO_PADDING` for key padding in inference. Elsewhere (CPU, float32)
    it is `sdpa`. A forced SDPA kernel that can't take the inputs falls back to the math kernel; `varlen`/`fa3`
    fall back to `sdpa` off CUDA, for full masks, and for key padding while gradients are recorded (per-sample key
    counts have no backward). A choice never changes results, only speed.
    """
    check_backend(name)
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if device.type != "cuda" or not half:
            return "sdpa"
        training = mask_kind == "padding" and torch.is_grad_enabled()
        if mask_kind != "full" and not training and fa3_available() and _is_hopper(device):
            return "fa3"
        return AUTO_PADDING if mask_kind == "padding" and not training else "auto-sdpa"
    if name in ("varlen", "fa3"):
        usable = device.type == "cuda" and half and mask_kind != "full"
        usable = usable and not (mask_kind == "padding" and torch.is_grad_enabled())
        if name == "fa3":
            usable = usable and fa3_available()
        if not usable:
            return "sdpa"
        if name == "varlen" and mask_kind == "none":
            return "flash"  # nothing to drop: the same flash kernel, dense
    return name


def mask_kind(mask: Tensor | None) -> str:
    """Classify a mask: "none", "padding" ((B, 1, 1, N) key padding) or "full" (any other boolean mask)."""
    if mask is None:
        return "none"
    return "padding" if mask.shape[1] == 1 and mask.shape[2] == 1 else "full"


def joint_attention(
    q: Tensor,
    k_txt: Tensor,
    k_img: Tensor,
    v_txt: Tensor,
    v_img: Tensor,
    mask: Tensor | None,
    backend: str = "auto",
) -> Tensor:
    """Attention of `q` over the keys/values [text, image].

    Args:
        q: (B, Nq, H, D) queries, in any token order.
        k_txt, v_txt: (B, L, H, D) text keys and values.
        k_img, v_img: (B, S, H, D) image keys and values.
        mask: None, a (B, 1, 1, L + S) key-padding mask, or a (B or 1, 1 or H, Nq, L + S) boolean mask over the
            [text, image] keys (True = attend).
        backend: One of `BACKENDS`.

    Returns:
        (B, Nq, H, D) attention output in `q`'s dtype.
    """
    kind = mask_kind(mask)
    chosen = resolve_backend(backend, q.device, kind, q.dtype)
    if chosen == "varlen" or (chosen == "fa3" and kind == "padding"):
        assert mask is not None  # kind == "padding"
        return _padded_varlen(q, k_txt, k_img, v_txt, v_img, mask, fa3=chosen == "fa3")
    return _attend(q, torch.cat([k_txt, k_img], dim=1), torch.cat([v_txt, v_img], dim=1), mask, chosen)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Unmasked attention of (B, Nq, H, D) `q` over already joined (B, Nk, H, D) keys `k` and values `v`.

    For callers that build the joint [text, image] keys themselves, so the per-stream parts can be freed first.
    """
    return _attend(q, k, v, None, resolve_backend(backend, q.device, mask_kind(None), q.dtype))


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, chosen: str) -> Tensor:
    if chosen == "fa3":
        out = _fa3().flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    return _sdpa(q, k, v, mask, chosen)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, chosen: str) -> Tensor:
    def run() -> Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    if chosen == "sdpa":
        return run()
    if chosen == "auto-sdpa":
        priority = _AUTO_DENSE_PRIORITY if mask is None else _AUTO_MASKED_PRIORITY
        with sdpa_kernel(priority, set_priority=True):
            return run()
    with sdpa_kernel([_SDPA_BACKENDS[chosen], SDPBackend.MATH], set_priority=True):
        return run()


def padded_key_order(mask: Tensor, n_txt: int) -> tuple[Tensor, Tensor]:
    """Text-key permutation putting each sample's real tokens first, and each sample's count of valid keys.

    Args:
        mask: (B, 1, 1, L + S) key-padding mask over [text, image].
        n_txt: L.

    Returns:
        `order` (B, L) int64 indices into the text keys (stable: real tokens keep their order) and `used`
        (B,) int32 = S + real text tokens, for keys laid out as [image, text[order]].
    """
    valid_txt = mask[:, 0, 0, :n_txt]
    # A stable sort of "is padding" keeps real tokens first, in order; right-padded text gives the identity.
    order = torch.sort((~valid_txt).to(torch.uint8), dim=1, stable=True).indices
    n_img = mask.shape[-1] - n_txt
    used = (valid_txt.sum(dim=1) + n_img).to(torch.int32)
    return order, used


def _padded_varlen(
    q: Tensor, k_txt: Tensor, k_img: Tensor, v_txt: Tensor, v_img: Tensor, mask: Tensor, *, fa3: bool
) -> Tensor:
    b, n_q, heads, dim = q.shape
    n_txt = k_txt.shape[1]
    order, used = padded_key_order(mask, n_txt)
    index = order[:, :, None, None].expand(-1, -1, heads, dim)
    k = torch.cat([k_img, torch.gather(k_txt, 1, index)], dim=1)
    v = torch.cat([v_img, torch.gather(v_txt, 1, index)], dim=1)
    n_k = k.shape[1]
    if q.device.type != "cuda":
        return _varlen_reference(q, k, v, used)
    steps = torch.arange(b + 1, device=q.device, dtype=torch.int32)
    cu_q, cu_k = steps * n_q, steps * n_k
    qf, kf, vf = q.reshape(b * n_q, heads, dim), k.reshape(b * n_k, heads, dim), v.reshape(b * n_k, heads, dim)
    if fa3:
        out = _fa3().flash_attn_varlen_func(qf, kf, vf, cu_q, cu_k, n_q, n_k, seqused_k=used)
        out = out[0] if isinstance(out, tuple) else out
    else:
        out = torch.ops.aten._flash_attention_forward(
            qf, kf, vf, cu_q, cu_k, n_q, n_k, 0.0, False, False, seqused_k=used
        )[0]
    return out.view(b, n_q, heads, dim)


def _varlen_reference(q: Tensor, k: Tensor, v: Tensor, used: Tensor) -> Tensor:
    """What the variable-length kernel computes, through SDPA with a prefix mask (CPU and tests)."""
    keep = torch.arange(k.shape[1], device=k.device)[None, :] < used[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None, None, :]
    )
    return out.transpose(1, 2)
