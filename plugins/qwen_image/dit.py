"""Qwen-Image diffusion transformer (MMDiT): 60 dual-stream blocks over joint [text, image] attention.

Submodule names equal the diffusers `QwenImageTransformer2DModel` state-dict keys, so the published checkpoint
assigns with no renaming. The model takes spatial latents and sigma in [0, 1]; packing, the 1000x timestep scale and
RoPE positions are internal. See REFERENCE.md ("DiT forward") for the maths.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from imagezoo.errors import ConfigError, InputError, WeightsError
from imagezoo.plugins.qwen_image.attention import check_backend, dense_attention, joint_attention
from imagezoo.plugins.qwen_image.fused import (
    is_plain_linear,
    joint_qk_norm_rope,
    linear_after,
    linear_gelu_tanh,
    modulate_norm,
    residual_modulate_norm,
)
from imagezoo.plugins.qwen_image.sampling import ForwardGraphs, ModulationTables, SamplingScope
from imagezoo.state_dict import assign_state_dict

_CLASS_NAME = "QwenImageTransformer2DModel"
_REAL_AXES = (16, 56, 56)
_REAL_HEAD_DIM = 128
_FP16_MAX = 65504.0
_TIME_CHANNELS = 256
_ROPE_CACHE_SIZE = 32
# Peak activation bytes of one forward per (token in a block at once x width x element size). Measured on an H100:
# about 1.0 GiB of activations on top of the weights for a CFG batch of 2 at 1328x1328 (2 x (6,889 image + ~20
# text) tokens, width 3,072, bf16, one batch): 12.7; rounded up for the allocator's rounding and other shapes.
_ACTIVATION_FACTOR = 14
# Tokens per MLP chunk in the low-activation mode: the hidden layer of 2,048 tokens is 48 MiB in bf16 at width 3,072,
# and GEMMs of 2,048 rows still run at full speed.
_MLP_CHUNK_TOKENS = 2048
# diffusers config switches that change the architecture (Edit-2511 / Layered variants); we don't implement them.
_UNSUPPORTED_FLAGS = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclass(frozen=True)
class DiTParams:
    """Sizes of a Qwen-Image DiT. Defaults are the published 20B model."""

    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int = 16
    patch_size: int = 2
    text_dim: int = 3584
    axes_dims: tuple[int, int, int] = _REAL_AXES
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        ints = ("num_layers", "num_heads", "head_dim", "in_channels", "out_channels", "patch_size", "text_dim")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"DiTParams.{name} must be a positive int, got {value!r}.")
        axes = tuple(self.axes_dims)
        if len(axes) != 3 or any(not isinstance(a, int) or a <= 0 or a % 2 for a in axes):
            raise ConfigError(f"DiTParams.axes_dims must be 3 positive even ints (frame, row, col), got {axes!r}.")
        if sum(axes) != self.head_dim:
            raise ConfigError(f"DiTParams.axes_dims {axes} must sum to head_dim={self.head_dim}.")
        if self.head_dim % 2:
            raise ConfigError(f"DiTParams.head_dim must be even for RoPE pairs, got {self.head_dim}.")
        if self.in_channels % (self.patch_size**2):
            raise ConfigError(
                f"DiTParams.in_channels={self.in_channels} must be latent channels x patch_size^2 "
                f"(patch_size={self.patch_size})."
            )
        object.__setattr__(self, "axes_dims", axes)  # a list from a JSON config would break hashing/equality

    @property
    def width(self) -> int:
        """Hidden size of both streams (heads x head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the spatial latents the model takes (in_channels / patch_size^2)."""
        return self.in_channels // self.patch_size**2

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiTParams:
        """Read a diffusers `transformer/config.json` dict; unknown keys are ignored.

        Raises:
            ConfigError: The config enables an architecture variant this model does not implement.
        """
        for flag in _UNSUPPORTED_FLAGS:
            if config.get(flag):
                raise ConfigError(
                    f"Qwen-Image DiT config has {flag}={config[flag]!r}; only the base architecture ({flag} false) "
                    "is supported. Use the base Qwen-Image transformer config."
                )
        d = cls()
        in_channels = int(config.get("in_channels", d.in_channels))
        # diffusers treats a missing/None out_channels as "same as in_channels".
        out_channels = config.get("out_channels", d.out_channels) or in_channels
        return cls(
            num_layers=int(config.get("num_layers", d.num_layers)),
            num_heads=int(config.get("num_attention_heads", d.num_heads)),
            head_dim=int(config.get("attention_head_dim", d.head_dim)),
            in_channels=in_channels,
            out_channels=int(out_channels),
            patch_size=int(config.get("patch_size", d.patch_size)),
            text_dim=int(config.get("joint_attention_dim", d.text_dim)),
            axes_dims=tuple(int(a) for a in config.get("axes_dims_rope", d.axes_dims)),
            rope_theta=float(config.get("rope_theta", d.rope_theta)),
            eps=float(config.get("eps", d.eps)),
        )

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> DiTParams:
        """Infer sizes from a checkpoint's tensor shapes (patch size is assumed to be 2: shapes can't tell).

        Raises:
            WeightsError: A tensor needed to infer a size is absent or inconsistent.
            ConfigError: The RoPE axes can't be derived from head_dim; a config.json is needed.
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise WeightsError(
                    f"Cannot infer Qwen-Image DiT sizes: checkpoint has no {key!r}. "
                    "Check that these files are a Qwen-Image transformer, or pass its config.json."
                )
            return tuple(shapes[key])

        width, in_channels = shape("img_in.weight")
        text_dim = shape("txt_in.weight")[1]
        head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
        if width % head_dim:
            raise WeightsError(f"Qwen-Image DiT: width {width} is not a multiple of the norm_q size {head_dim}.")
        block_ids = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
        patch_size = cls.patch_size
        out_rows = shape("proj_out.weight")[0]
        if out_rows % patch_size**2:
            raise WeightsError(f"Qwen-Image DiT: proj_out has {out_rows} rows, not a multiple of {patch_size**2}.")
        # The published model ties RoPE axes to head_dim as 16:56:56; only a whole, even split is trustworthy.
        scaled = [a * head_dim for a in _REAL_AXES]
        if any(s % _REAL_HEAD_DIM or (s // _REAL_HEAD_DIM) % 2 for s in scaled):
            raise ConfigError(
                f"Cannot infer RoPE axes for head_dim={head_dim} from tensor shapes ((16, 56, 56) x head_dim/128 is "
                "not a whole, even split); a config.json with axes_dims_rope is needed for this checkpoint."
            )
        return cls(
            num_layers=max(block_ids) + 1 if block_ids else 0,
            num_heads=width // head_dim,
            head_dim=head_dim,
            in_channels=in_channels,
            out_channels=out_rows // patch_size**2,
            patch_size=patch_size,
            text_dim=text_dim,
            axes_dims=tuple(s // _REAL_HEAD_DIM for s in scaled),
        )

    def to_config(self) -> dict[str, Any]:
        """diffusers-style config.json content; round-trips through `from_config`.

        diffusers hardcodes theta 10000 and eps 1e-6, so those are written only when they differ (diffusers then
        ignores them with a warning, and its model would not match).
        """
        config: dict[str, Any] = {
            "_class_name": _CLASS_NAME,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "joint_attention_dim": self.text_dim,
            "guidance_embeds": False,
            "axes_dims_rope": list(self.axes_dims),
        }
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("rope_theta", "eps"):
            if getattr(self, name) != defaults[name]:
                config[name] = getattr(self, name)
        return config


REAL_DIT = DiTParams()
TINY_DIT = DiTParams(num_layers=2, num_heads=2, head_dim=16, text_dim=32, axes_dims=(4, 6, 6))


# ----------------------------------------------------------------------------------------------------------------------
# Layout helpers


def pack_latents(latents: Tensor, patch_size: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C*p*p) tokens; token channel index is c*p*p + dy*p + dx."""
    if latents.ndim != 4:
        raise InputError(f"pack_latents expects (B, C, H, W) latents, got shape {tuple(latents.shape)}.")
    b, c, height, width = latents.shape
    p = patch_size
    if height % p or width % p:
        raise InputError(f"Latent size {height}x{width} must be divisible by the patch size {p}.")
    x = latents.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (height // p) * (width // p), c * p * p)


def unpack_latents(tokens: Tensor, height: int, width: int, patch_size: int = 2) -> Tensor:
    """Inverse of `pack_latents`; `height`/`width` are latent-pixel sizes."""
    p = patch_size
    if tokens.ndim != 3 or height % p or width % p or tokens.shape[1] != (height // p) * (width // p):
        raise InputError(
            f"unpack_latents: tokens {tuple(tokens.shape)} don't fit a {height}x{width} latent with patch size {p}."
        )
    b, _, ch = tokens.shape
    if ch % (p * p):
        raise InputError(f"unpack_latents: token width {ch} is not a multiple of patch_size^2 = {p * p}.")
    x = tokens.view(b, height // p, width // p, ch // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // (p * p), height, width)


# ----------------------------------------------------------------------------------------------------------------------
# Maths


def _timestep_sinusoid(sigma: Tensor) -> Tensor:
    """256-dim cos-first sinusoid of 1000*sigma, in float32.

    Kept in float32 whatever the compute dtype: rounding sigma to bf16 moves 1000*sigma by up to ~2.
    The operation order (sigma*freq, then *1000) follows diffusers so float32 results agree to the ulp.
    """
    half = _TIME_CHANNELS // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half
    angles = sigma.float()[:, None] * torch.exp(exponent)[None, :] * 1000.0
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _rope_angles(positions: Tensor, dim: int, theta: float) -> Tensor:
    """(N,) positions -> (N, dim/2) float32 rotation angles pos * theta^(-2k/dim)."""
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    return positions.float()[:, None] * inv_freq[None, :]


def _rope_freqs(frame: Tensor, row: Tensor, col: Tensor, axes: tuple[int, int, int], theta: float) -> Tensor:
    """Float32 (N, head_dim/2, 2) rotations [cos, sin] for tokens at (frame, row, col) positions.

    Real rather than complex so compiled blocks take plain float inputs (inductor does not fuse complex maths).
    """
    angles = torch.cat([_rope_angles(p, d, theta) for p, d in zip((frame, row, col), axes, strict=True)], dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def _apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of (B, N, H, D) `x` by (N, D/2, 2) [cos, sin] `freqs`, in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        # Real arithmetic, per channel: x*cos + swap(x)*(-sin, +sin) over each pair; the same products as the complex
        # multiply. Indexing only (flip, expand), no stack: inductor then makes q/k norm and rotation one persistent
        # kernel (5.9 -> 4.9 ms per 1024² forward on an H100) instead of a looped one with a stacked intermediate.
        n, half = freqs.shape[0], freqs.shape[1]
        cos = freqs[:, None, :, :1].expand(n, 1, half, 2).reshape(n, 1, 2 * half)
        sin = freqs[:, None, :, 1:].expand(n, 1, half, 2).reshape(n, 1, 2 * half)
        sign = (torch.arange(2 * half, device=x.device) % 2 * 2 - 1).to(torch.float32)  # -1 even, +1 odd channels
        swapped = pairs.flip(-1).flatten(-2)
        return (pairs.flatten(-2) * cos + swapped * (sin * sign)).to(x.dtype)
    # Eager: one complex multiply is 3 kernels where the real form takes 8.
    rotated = torch.view_as_complex(pairs) * torch.view_as_complex(freqs)[:, None, :]
    return torch.view_as_real(rotated).flatten(3).to(x.dtype)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # F.rms_norm is one fused kernel with fp32 accumulation; the weight takes the input's dtype so norms kept in
    # fp32 by a memory strategy don't promote the activations.
    return F.rms_norm(x, weight.shape, weight.to(x.dtype), eps)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm without affine, then x*(1+scale)+shift; `shift`/`scale` are (B, 1, D)."""
    if x.shape[0] == 1:
        # One sample: the modulation is a plain affine LayerNorm, one fused kernel instead of two passes.
        return F.layer_norm(x, x.shape[-1:], (1 + scale).reshape(-1), shift.reshape(-1), eps)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


def _residual(
    x: Tensor, update: Tensor | list[Tensor], gate: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """`x + gate * update`, and its `_modulate`; `update` may come in pieces along the batch."""
    x = torch.addcmul(x, gate, update if isinstance(update, Tensor) else torch.cat(update))
    return x, _modulate(x, shift, scale, eps)


def _sigma_on(sigma: Tensor, device: torch.device) -> Tensor:
    """`sigma` on `device`. From the CPU, a single value is written by a fill kernel rather than copied: a copy from
    pageable memory waits for the GPU's queued work, which would cost a sampling loop one stall per step."""
    if sigma.device == device or sigma.device.type != "cpu":
        return sigma.to(device)
    values = set(sigma.reshape(-1).tolist())
    if len(values) == 1:
        return torch.full(sigma.shape, values.pop(), dtype=sigma.dtype, device=device)
    return sigma.to(device)


def _version(tensor: Tensor) -> int | None:
    """The in-place version counter of `tensor`; None for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Modules (attribute names are the checkpoint's key names)


class _RMSNorm(nn.Module):
    """RMSNorm with a learned scale; `weight` is the only tensor, as in the checkpoint."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps)


class _TimestepEmbedder(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(_TIME_CHANNELS, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    """Container kept only so keys read `time_text_embed.timestep_embedder.*`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.timestep_embedder = _TimestepEmbedder(width)


class _OutNorm(nn.Module):
    """Final adaptive LayerNorm; its linear emits (scale, shift) — scale first, unlike the blocks."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(width, 2 * width)

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        scale, shift = self.linear(temb_act)[:, None, :].chunk(2, dim=-1)
        return _modulate(x, shift, scale, self.eps)


class _GeluProj(nn.Module):
    """Up-projection with tanh-GELU; `fused_gelu` (a speed option) puts the GELU in the GEMM epilogue."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.fused_gelu = False

    def forward(self, x: Tensor) -> Tensor:
        proj = self.proj
        if (
            self.fused_gelu
            and not torch.is_grad_enabled()
            and proj.bias is not None
            and proj.weight.dtype == x.dtype
            and is_plain_linear(proj)
        ):
            return linear_gelu_tanh(x, proj.weight, proj.bias)
        return F.gelu(proj(x), approximate="tanh")


class _MLP(nn.Module):
    """Feed-forward layer; with `chunk_tokens` set, tokens go through it that many at a time.

    Its 4x-wide hidden layer (projection and GELU output alive together) is a block's activation peak, so chunking
    the tokens lowers the peak of the whole forward (same per-token maths; low-activation mode, see
    `QwenImageDiT.split_batches`).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        # Index 1 is a parameterless slot (dropout upstream) so the output layer keeps the key `net.2`.
        self.net = nn.Sequential(_GeluProj(width, 4 * width), nn.Identity(), nn.Linear(4 * width, width))
        self.chunk_tokens: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        chunk = self.chunk_tokens
        # Weights stored in another dtype (FP8 storage) are dequantized per call: per chunk would cost a pass each.
        if chunk is None or x.shape[-2] <= chunk or self.net[2].weight.dtype != x.dtype:
            return self.net(x)
        out = x.new_empty((*x.shape[:-1], self.net[2].out_features))
        for start in range(0, x.shape[-2], chunk):
            out[..., start : start + chunk, :] = self.net(x[..., start : start + chunk, :])
        return out


def _modulation(width: int) -> nn.Sequential:
    # Keys are `*_mod.1.*`; the SiLU at index 0 is applied once per forward in QwenImageDiT, not per block.
    return nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))


class _JointAttention(nn.Module):
    """Joint attention over [text, image]: per-stream q/k/v and outputs, one attention call.

    `backend` names the attention kernel (see `attention.BACKENDS`); every choice computes the same function.
    `attention_fn` is a hook point: None calls `attention.joint_attention`; a callable with its signature replaces
    it (sequence parallelism in `parallel.py` installs one that exchanges tokens between processes around it).
    """

    def __init__(self, params: DiTParams) -> None:
        super().__init__()
        width, head_dim, eps = params.width, params.head_dim, params.eps
        self.head_dim = head_dim
        self.backend = "auto"
        self.attention_fn: Any = None
        self.low_activation = False
        self.fused_qk = False
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.add_q_proj = nn.Linear(width, width)
        self.add_k_proj = nn.Linear(width, width)
        self.add_v_proj = nn.Linear(width, width)
        self.norm_q = _RMSNorm(head_dim, eps)
        self.norm_k = _RMSNorm(head_dim, eps)
        self.norm_added_q = _RMSNorm(head_dim, eps)
        self.norm_added_k = _RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(width, width)])
        self.to_add_out = nn.Linear(width, width)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor | tuple[Tensor, ...],
        mask: Tensor | None,
        text_out: bool,
    ) -> tuple[Tensor | list[Tensor], Tensor | None]:
        """(image output, text output or None); a right-padded batch's image output comes per sample, as a list."""
        b, _, width = img.shape
        heads = (b, -1, width // self.head_dim, self.head_dim)

        def qk(x: Tensor, proj: nn.Linear, norm: _RMSNorm, freqs: Tensor) -> Tensor:
            return _apply_rope(norm(proj(x).view(heads)), freqs)

        if isinstance(txt_freqs, tuple):
            return self._attention_per_sample(img, txt, img_freqs, txt_freqs, text_out, heads)
        if mask is None and self.attention_fn is None and (self.low_activation or self.fused_qk):
            # Joint tensors built from temporaries: no per-stream copy stays alive through the attention kernel.
            def joint(txt_proj: nn.Linear, img_proj: nn.Linear, txt_norm: _RMSNorm, img_norm: _RMSNorm) -> Tensor:
                txt_heads, img_heads = txt_proj(txt).view(heads), img_proj(img).view(heads)
                return self._joint_qk(txt_heads, img_heads, txt_norm, img_norm, txt_freqs, img_freqs)

            if text_out:
                q = joint(self.add_q_proj, self.to_q, self.norm_added_q, self.norm_q)
            else:
                q = qk(img, self.to_q, self.norm_q, img_freqs)
            k = joint(self.add_k_proj, self.to_k, self.norm_added_k, self.norm_k)
            v = self._joint_v(self.add_v_proj(txt), img).view(heads)
            out = dense_attention(q, k, v, self.backend).reshape(b, -1, width)
        else:
            out = self._attention(img, txt, img_freqs, txt_freqs, mask, text_out, qk, heads).reshape(b, -1, width)
        if not text_out:
            return self.to_out[0](out), None
        n_txt = txt.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])

    def _joint_qk(
        self, txt: Tensor, img: Tensor, txt_norm: _RMSNorm, img_norm: _RMSNorm, txt_freqs: Tensor, img_freqs: Tensor
    ) -> Tensor:
        """[rope(norm(txt)), rope(norm(img))] along the tokens, from (B, L|S, H, D) projections.

        With `fused_qk` (a speed option), one op reads the projections and writes the joint tensor
        (`fused.joint_qk_norm_rope`: one kernel per stream on CUDA); otherwise per stream, then joined.
        """
        if self.fused_qk:
            return joint_qk_norm_rope(txt, img, txt_norm.weight, img_norm.weight, txt_freqs, img_freqs, img_norm.eps)
        return torch.cat([_apply_rope(txt_norm(txt), txt_freqs), _apply_rope(img_norm(img), img_freqs)], 1)

    def _joint_v(self, txt_v: Tensor, img: Tensor) -> Tensor:
        """Joint values [txt_v, to_v(img)] along the tokens, (B, L + S, width), from projected text values (B, L,
        width) and image tokens (B, S, width).

        With `fused_qk` (a speed option), `fused.linear_after` writes the image values into their place instead of
        joining the projections afterwards; a `to_v` with hooks or a replaced forward (LoRA, FP8) is called as usual.
        """
        if self.fused_qk and is_plain_linear(self.to_v) and self.to_v.bias is not None:
            return linear_after(txt_v, img, self.to_v.weight, self.to_v.bias)
        return torch.cat([txt_v, self.to_v(img)], 1)

    def _attention_per_sample(
        self,
        img: Tensor,
        txt: Tensor,
        img_freqs: Tensor,
        txt_freqs: tuple[Tensor, ...],
        text_out: bool,
        heads: tuple[int, ...],
    ) -> tuple[list[Tensor], Tensor | None]:
        """Prompts of different lengths: projections over the whole batch, dense attention per sample on its text.

        `txt` holds the samples' real text tokens packed, (T, 1, width); sample i's length is `txt_freqs[i].shape[0]`
        (a tensor size, so compiled blocks see it as a dynamic size rather than a constant). The text output comes
        packed the same way.
        """
        width = img.shape[-1]
        one = (1, -1, *heads[2:])
        img_q, img_k = (proj(img).view(heads) for proj in (self.to_q, self.to_k))
        n_all = txt.shape[0]
        txt_q = self.add_q_proj(txt).view(one) if text_out else None
        txt_k, txt_v = self.add_k_proj(txt).view(one), self.add_v_proj(txt).view(1, n_all, width)
        img_outs, txt_outs = [], []
        start = 0
        for i, freqs in enumerate(txt_freqs):
            n = freqs.shape[0]
            mine, sample = slice(start, start + n), slice(i, i + 1)
            start += n
            k = self._joint_qk(txt_k[:, mine], img_k[sample], self.norm_added_k, self.norm_k, freqs, img_freqs)
            v = self._joint_v(txt_v[:, mine], img[sample]).view(one)
            if txt_q is None:
                q = _apply_rope(self.norm_q(img_q[sample]), img_freqs)
                out = dense_attention(q, k, v, self.backend).reshape(1, -1, width)
                img_outs.append(self.to_out[0](out))
                continue
            q = self._joint_qk(txt_q[:, mine], img_q[sample], self.norm_added_q, self.norm_q, freqs, img_freqs)
            out = dense_attention(q, k, v, self.backend).reshape(1, -1, width)
            # Row slices of one sample's output are contiguous: the projection reads them in place.
            img_outs.append(self.to_out[0](out[:, n:]))
            txt_outs.append(out[:, :n])
        # The image outputs stay in pieces: the block's residual update reads them where they are. The text output
        # projection runs once on the packed rows: it is weight-bound at these row counts, so once costs half of twice.
        return img_outs, self.to_add_out(torch.cat(txt_outs, 1)).view(n_all, 1, width) if txt_outs else None

    def _attention(
        self,
        img: Tensor,
        txt: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        mask: Tensor | None,
        text_out: bool,
        qk: Any,
        heads: tuple[int, ...],
    ) -> Tensor:
        img_q = qk(img, self.to_q, self.norm_q, img_freqs)
        if text_out:
            q = torch.cat([qk(txt, self.add_q_proj, self.norm_added_q, txt_freqs), img_q], 1)
        else:
            # Text queries only feed the text output: without it, image queries attend to all keys on their own.
            q = img_q
            if mask is not None and mask.shape[2] > 1:
                mask = mask[:, :, txt.shape[1] :]
        return (self.attention_fn or joint_attention)(
            q,
            qk(txt, self.add_k_proj, self.norm_added_k, txt_freqs),
            qk(img, self.to_k, self.norm_k, img_freqs),
            self.add_v_proj(txt).view(heads),
            self.to_v(img).view(heads),
            mask,
            self.backend,
        )


class QwenImageBlock(nn.Module):
    """One dual-stream block: separate modulation/MLP weights per stream, shared joint attention."""

    def __init__(self, params: DiTParams) -> None:
        super().__init__()
        width = params.width
        self.eps = params.eps
        self.img_mod = _modulation(width)
        self.txt_mod = _modulation(width)
        self.attn = _JointAttention(params)
        self.img_mlp = _MLP(width)
        self.txt_mlp = _MLP(width)
        self.fused_norm = False

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor | tuple[Tensor, ...],
        mask: Tensor | None = None,
        text_out: bool = True,
        modulation: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Advance both streams; with `text_out=False` the text stream is returned unchanged (last block).

        Args:
            img: (B, S, width) image tokens.
            txt: (B, L, width) text tokens; or, with per-sample `txt_freqs`, the samples' real text tokens packed
                one after another, (T, 1, width) with T the sum of their lengths.
            temb_act: (B, width) SiLU of the timestep embedding.
            img_freqs: (S, head_dim/2, 2) float32 RoPE rotations [cos, sin] of the image tokens.
            txt_freqs: (L, head_dim/2, 2) float32 RoPE rotations [cos, sin] of the text tokens; or one tensor per
                sample of its real text tokens' rotations, for a batch of prompts of different lengths (`txt` then
                comes packed, and attention runs per sample on its own tokens, unmasked).
            mask: Boolean mask over the joint [text, image] keys, (B, 1, 1, L+S) key padding or
                (B, 1|heads, L+S, L+S) full, or None.
            text_out: Whether the text stream's output is needed (skips text queries, output projection and MLP).
            modulation: This block's (image, text) modulation outputs, (B or 1, 6 * width) each, when already
                computed (a sampling loop's tables, `sampling.py`); `temb_act` is then unused.
        """
        eps = self.eps
        img_mod, txt_mod = (self.img_mod[1](temb_act), self.txt_mod[1](temb_act)) if modulation is None else modulation
        if isinstance(txt_freqs, tuple) and txt_mod.shape[0] > 1:  # packed text: each token takes its sample's row
            txt_mod = torch.cat([txt_mod[i : i + 1].expand(f.shape[0], -1) for i, f in enumerate(txt_freqs)])
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod[:, None].chunk(6, -1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod[:, None].chunk(6, -1)

        # `fused_norm` (a speed option): the same maths as one-pass ops (`fused.py`), rounded once instead of per op.
        norm, residual_norm = (modulate_norm, residual_modulate_norm) if self.fused_norm else (_modulate, _residual)
        img_attn, txt_attn = self.attn(
            norm(img, i_shift1, i_scale1, eps),
            norm(txt, t_shift1, t_scale1, eps),
            img_freqs,
            txt_freqs,
            mask,
            text_out,
        )
        img, img_normed = residual_norm(img, img_attn, i_gate1, i_shift2, i_scale2, eps)
        del img_attn  # not alive through the MLP, whose hidden layer is the activation peak
        img = torch.addcmul(img, i_gate2, self.img_mlp(img_normed))
        if txt_attn is not None:
            txt, txt_normed = residual_norm(txt, txt_attn, t_gate1, t_shift2, t_scale2, eps)
            txt = torch.addcmul(txt, t_gate2, self.txt_mlp(txt_normed))
        if img.dtype == torch.float16:  # residual stream can exceed fp16 range on real weights
            img = img.clip(-_FP16_MAX, _FP16_MAX)
            if txt_attn is not None:
                txt = txt.clip(-_FP16_MAX, _FP16_MAX)
        return img, txt


class StepCache(Protocol):
    """Runs the block stack for one denoising step, possibly reusing work from earlier steps (see `speed.py`)."""

    def __call__(
        self,
        dit: QwenImageDiT,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        mask: Tensor | tuple[int, ...] | None,
        sigma: Tensor,
    ) -> Tensor:
        """Return the image stream after the last block (`mask` as `QwenImageDiT.run_blocks` takes it)."""
        ...


class QwenImageDiT(nn.Module):
    """The Qwen-Image transformer: spatial latents + sigma + text embeddings -> spatial velocity.

    Attributes:
        compute_dtype: Default None = the dtype of `img_in.weight`; lets memory strategies that store weights in a
            storage-only dtype (e.g. fp8) say which dtype activations should use.
        step_cache: None (every step runs every block), or a `StepCache` that may skip blocks on some steps (lossy;
            set by `speed.enable_step_cache`). Ignored while gradients are recorded.
        split_padded_batches: Whether a batch of right-padded prompts attends sample by sample on its real tokens
            with dense attention (same result) instead of as one masked batch, in inference. None (default): on CUDA
            with the "auto" attention backend, where it was measured faster (docs/speed.md).
        share_padded_linears: When a right-padded batch attends per sample (`split_padded_batches`), keep it whole
            for everything but the attention (default True: each weight read once per batch, one GEMM per
            projection); False runs each sample through the blocks alone. Same results up to float rounding.
        split_batches: Run every batch sample by sample, block by block, in inference: the transient activations of
            one sample at a time, padded text or not (default False; placement memory strategies turn it on). Same
            maths as the batched forward: results differ from it by float rounding only (products of another size).
        block_evaluations: Count of block forwards run so far (a plain counter; tests and benchmarks read it).
        modulation_tables: Inside `sampling`, compute every block's modulation for all the loop's sigmas at once
            (default True; `sampling.py`). Same maths; False computes it per forward.
        cuda_graph: Inside `sampling`, capture the forward into a CUDA graph and replay it (speed option
            `cuda_graph`, `sampling.py`); only where nothing in the forward needs the host (see `_graphable`).
        memory_blocks: (declaration for memory strategies) ModuleLists whose blocks may be streamed one by one.
        memory_high_precision: (declaration) Submodules storage-dtype strategies (fp8) leave in the compute dtype:
            the small input/output projections and the timestep MLP, where quantization error is least diluted.
        memory_split_batches: (declared method) Switch `split_batches`, returning the previous value: strategies that
            save memory run batches one sample at a time, every streamed block once for all samples.
        memory_activation_bytes: (declared method) Estimated peak activation bytes of a forward with the given
            arguments: a strategy under a VRAM limit keeps that much of its budget free of weights.
    """

    memory_blocks: tuple[str, ...] = ("transformer_blocks",)
    memory_high_precision: tuple[str, ...] = ("img_in", "txt_in", "time_text_embed", "norm_out", "proj_out")

    def __init__(self, params: DiTParams) -> None:
        super().__init__()
        self.params = params
        self.patch_size = params.patch_size
        self.compute_dtype: torch.dtype | None = None
        width = params.width
        self.time_text_embed = _TimeTextEmbed(width)
        self.txt_norm = _RMSNorm(params.text_dim, params.eps)
        self.img_in = nn.Linear(params.in_channels, width)
        self.txt_in = nn.Linear(params.text_dim, width)
        self.transformer_blocks = nn.ModuleList([QwenImageBlock(params) for _ in range(params.num_layers)])
        self.norm_out = _OutNorm(width, params.eps)
        self.proj_out = nn.Linear(width, params.patch_size**2 * params.out_channels)
        self._checkpointing = False
        self._offload_checkpoints = False
        self.step_cache: StepCache | None = None
        self.split_padded_batches: bool | None = None
        self.share_padded_linears = True
        self.split_batches = False
        self.block_evaluations = 0
        self.modulation_tables = True
        self.cuda_graph = False
        self._sampling: SamplingScope | None = None
        self._modulation_row: tuple[Tensor, torch.dtype] | None = None
        self._speed_state: Any = None
        # Plain dict, not buffers: a meta-built module must run after state-dict assignment with nothing to re-init.
        self._rope_cache: dict[tuple[Any, ...], Tensor] = {}
        self._mask_cache: tuple[Any, int | None, tuple[int, ...], bool] | None = None

    def memory_split_batches(self, enabled: bool) -> bool:
        """Set `split_batches` (declaration for memory strategies); returns the previous value, to restore."""
        previous, self.split_batches = self.split_batches, bool(enabled)
        return previous

    @property
    def split_batches(self) -> bool:
        return self._split_batches

    @split_batches.setter
    def split_batches(self, enabled: bool) -> None:
        # The same low-activation mode chunks the MLPs' tokens: their hidden layer is a block's activation peak.
        self._split_batches = bool(enabled)
        for module in self.modules():
            if isinstance(module, _MLP):
                module.chunk_tokens = _MLP_CHUNK_TOKENS if enabled else None
            elif isinstance(module, _JointAttention):
                module.low_activation = bool(enabled)

    def memory_activation_bytes(
        self,
        latents: Tensor,
        sigma: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        text_positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> int:
        """Estimated peak activation memory in bytes of one `forward` with these arguments (declaration for memory
        strategies: only shapes are read, nothing is computed or synchronized).

        Proportional to the tokens that go through a block at once: one sample's when the batch runs sample by sample
        (`split_batches` in inference), else the whole batch's. A right-padded batch that only `split_padded_batches`
        splits is counted whole (an over-estimate); left-padded text, which `split_batches` does not split, is
        counted per sample (an under-estimate; the pipelines pad on the right).
        """
        b, _, height, width = latents.shape
        tokens = text.shape[1] + (height // self.patch_size) * (width // self.patch_size)
        split = self.split_batches and b > 1 and attention_mask is None and not torch.is_grad_enabled()
        if not split:
            tokens *= b
        return int(_ACTIVATION_FACTOR * tokens * self.params.width * self._dtype().itemsize)

    def enable_gradient_checkpointing(self, offload_to_cpu: bool = False) -> None:
        """Recompute each block in backward; with `offload_to_cpu` the saved block inputs live in CPU memory."""
        self._checkpointing = True
        self._offload_checkpoints = offload_to_cpu

    def disable_gradient_checkpointing(self) -> None:
        """Store all activations again (the default)."""
        self._checkpointing = False
        self._offload_checkpoints = False

    @property
    def attention_backend(self) -> str:
        """The attention kernel choice of the blocks (see `attention.BACKENDS`; default "auto")."""
        return self.transformer_blocks[0].attn.backend if len(self.transformer_blocks) else "auto"

    def set_attention_backend(self, name: str) -> None:
        """Choose the attention kernel for every block; all choices compute the same function.

        Raises:
            InputError: `name` is not one of `attention.BACKENDS`.
        """
        check_backend(name)
        for block in self.transformer_blocks:
            block.attn.backend = name

    def enable_speed(self, profile: str = "auto", **options: Any) -> Any:
        """Apply a speed profile ("auto", "off", "exact", "fp8", "cache", "fastest"); see `speed.py`.

        Returns:
            The applied `speed.SpeedState` (its `describe()` gives a plain summary).
        """
        from imagezoo.plugins.qwen_image.speed import enable_speed

        return enable_speed(self, profile, **options)

    def disable_speed(self) -> None:
        """Undo `enable_speed`."""
        from imagezoo.plugins.qwen_image.speed import disable_speed

        disable_speed(self)

    def _dtype(self) -> torch.dtype:
        return self.compute_dtype or self.img_in.weight.dtype

    def _cached(self, key: tuple[Any, ...], make: Any) -> Tensor:
        value = self._rope_cache.get(key)
        if value is None:
            if len(self._rope_cache) >= _ROPE_CACHE_SIZE:  # many resolutions: don't grow without bound
                self._rope_cache.clear()
            # Cached tensors made under inference_mode could never be saved for backward by a later training step.
            with torch.inference_mode(False):
                value = self._rope_cache[key] = make()
        return value

    def _image_freqs(self, h: int, w: int, device: torch.device) -> Tensor:
        def make() -> Tensor:
            # Generated image is frame 0; rows/cols are centered: -(n - n//2) .. n//2 - 1.
            rows = torch.arange(h, device=device) - (h - h // 2)
            cols = torch.arange(w, device=device) - (w - w // 2)
            grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
            grid_r, grid_c = grid_r.reshape(-1), grid_c.reshape(-1)
            p = self.params
            return _rope_freqs(torch.zeros_like(grid_r), grid_r, grid_c, p.axes_dims, p.rope_theta)

        return self._cached(("img", device, h, w), make)

    def _text_freqs(self, positions: Tensor) -> Tensor:
        p = self.params
        return _rope_freqs(positions, positions, positions, p.axes_dims, p.rope_theta)

    def _default_text_freqs(self, start: int, length: int, device: torch.device) -> Tensor:
        return self._cached(
            ("txt", device, start, length), lambda: self._text_freqs(torch.arange(start, start + length, device=device))
        )

    @contextlib.contextmanager
    def sampling(self, sigmas: Sequence[float]) -> Iterator[None]:
        """Run the forwards of one sampling loop, whose sigmas are known in advance, faster (see `sampling.py`).

        Inside, forwards at those sigmas read every block's modulation from tables filled at the first step
        (`modulation_tables`), and with `cuda_graph` on a CUDA device, replay a captured graph from the third forward
        with the same input layout. The caller promises that the model does not change (weights in place aside)
        until the block ends: a LoRA loaded or rescaled, or speed settings changed, inside it may not be seen.

        Args:
            sigmas: The noise level of each step, in order.
        """
        previous = self._sampling
        tables = ModulationTables(tuple(float(sigma) for sigma in sigmas))
        self._sampling = SamplingScope(tables, ForwardGraphs() if self.cuda_graph else None)
        try:
            yield
        finally:
            self._sampling = previous

    def forward(
        self,
        latents: Tensor,
        sigma: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        text_positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow-matching velocity.

        Args:
            latents: (B, C, H, W) spatial latents, any float dtype.
            sigma: (B,) noise levels in [0, 1] (a scalar or 1-element tensor is broadcast), on any device; on the
                CPU, a sampling loop's host-side work reads it without waiting for the GPU.
            text: (B, L, text_dim) text-encoder hidden states.
            text_mask: (B, L) bool, True = real token; None means all real. Padding is masked out as keys.
            text_positions: (L,) integer RoPE positions of the text tokens, overriding max(h//2, w//2) + j.
            attention_mask: (B or 1, 1 or heads, L+S, L+S) bool mask (True = attend) over [text, image] tokens,
                overriding the one built from `text_mask`.

        Returns:
            (B, out_channels, H, W) velocity in the compute dtype.
        """
        scope = self._sampling
        if scope is None or torch.is_grad_enabled():
            return self._forward(latents, sigma, text, text_mask, text_positions, attention_mask, None)
        sigma = torch.as_tensor(sigma)
        # Before it moves: a CPU sigma (as the pipeline passes it) is read without waiting for the GPU.
        index = scope.tables.row(sigma.reshape(-1)) if self.modulation_tables and not self._blocks_hooked() else None
        sigma = _sigma_on(sigma, latents.device)
        row = None if index is None else torch.full((1,), index, dtype=torch.long, device=latents.device)
        if scope.graphs is None or not self._graphable(latents, text, text_mask, text_positions, attention_mask):
            return self._forward(latents, sigma, text, text_mask, text_positions, attention_mask, row)

        def run(latents: Tensor, sigma: Tensor, text: Tensor, *row: Tensor) -> Tensor:
            return self._forward(latents, sigma, text, text_mask, None, None, row[0] if row else None)

        facts = None if text_mask is None else self._mask_facts(text_mask)
        inputs = (latents, sigma, text) if row is None else (latents, sigma, text, row)
        return scope.graphs((facts, self.attention_backend), run, inputs)

    def _forward(
        self,
        latents: Tensor,
        sigma: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        text_positions: Tensor | None,
        attention_mask: Tensor | None,
        modulation_row: Tensor | None,
    ) -> Tensor:
        p = self.params
        dtype = self._dtype()
        if latents.ndim != 4 or latents.shape[1] != p.latent_channels:
            raise InputError(f"latents must be (B, {p.latent_channels}, H, W), got shape {tuple(latents.shape)}.")
        b, _, height, width = latents.shape
        ps = self.patch_size
        if height % ps or width % ps:
            raise InputError(f"Latent size {height}x{width} must be divisible by the patch size {ps}.")
        h, w = height // ps, width // ps
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != p.text_dim:
            raise InputError(f"text must be ({b}, L, {p.text_dim}), got shape {tuple(text.shape)}.")
        n_txt, n_img = text.shape[1], h * w
        sigma = _sigma_on(torch.as_tensor(sigma), latents.device)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(b)
        elif sigma.shape != (b,):
            raise InputError(f"sigma must have shape ({b},) or be a scalar, got {tuple(sigma.shape)}.")

        img = self.img_in(pack_latents(latents.to(dtype), ps))
        txt = self.txt_in(self.txt_norm(text.to(dtype)))
        temb_act = self._temb_act(sigma)

        device = img.device
        img_freqs = self._image_freqs(h, w, device)
        if text_positions is None:
            txt_freqs = self._default_text_freqs(max(h // 2, w // 2), n_txt, device)
        else:
            if text_positions.shape != (n_txt,):
                raise InputError(f"text_positions must have shape ({n_txt},), got {tuple(text_positions.shape)}.")
            txt_freqs = self._text_freqs(text_positions.to(device))

        mask = self._joint_mask(text_mask, attention_mask, b, n_txt, n_img, device)
        if not torch.is_grad_enabled():
            # Linear outputs of 3-D inputs are views, and compiled blocks guard on view bases: without this the
            # first block would compile a variant of its own. detach() drops the base for free (no autograd here).
            img, txt = img.detach(), txt.detach()

        use_ckpt = self._checkpointing and torch.is_grad_enabled()
        offload = use_ckpt and self._offload_checkpoints
        ctx = (
            torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda") if offload else contextlib.nullcontext()
        )
        self._modulation_row = None if modulation_row is None else (modulation_row, sigma.dtype)
        try:
            with ctx:
                if self.step_cache is not None and not torch.is_grad_enabled():
                    img = self.step_cache(self, img, txt, temb_act, img_freqs, txt_freqs, mask, sigma)
                else:
                    n_blocks = len(self.transformer_blocks)
                    img, _ = self.run_blocks(0, n_blocks, img, txt, temb_act, img_freqs, txt_freqs, mask)
        finally:
            self._modulation_row = None

        out = self.proj_out(self.norm_out(img, temb_act))
        return unpack_latents(out, height, width, ps)

    def run_blocks(
        self,
        start: int,
        stop: int,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        mask: Tensor | tuple[int, ...] | None,
    ) -> tuple[Tensor, Tensor]:
        """Run blocks `start` .. `stop - 1` on both streams (block inputs as in `QwenImageBlock.forward`).

        `mask` may also be per-sample text lengths (from `_joint_mask`, right padding or none): each sample then
        attends on its own real text tokens, unmasked, and its padded text rows come back unchanged. By default the
        batch stays whole around the attention (`share_padded_linears`: every weight is read once for the batch, the
        projections run as one GEMM, the text stream on the real tokens only, packed). Under `split_batches`, or with
        an attention hook installed, each sample runs alone instead, block by block, every sample through a block
        before the next one, so a streamed block is loaded once for the batch. The model's last block skips its text
        output (it feeds nothing), so after it the text stream is stale.
        """
        if isinstance(mask, tuple):
            hooked = any(block.attn.attention_fn is not None for block in self.transformer_blocks[start:stop])
            if self.split_batches or hooked or not self.share_padded_linears:
                return self._run_blocks_per_sample(start, stop, img, txt, temb_act, img_freqs, txt_freqs, mask)
            return self._run_blocks_shared(start, stop, img, txt, temb_act, img_freqs, txt_freqs, mask)
        for i in range(start, stop):
            img, txt = self._run_block(i, img, txt, temb_act, img_freqs, txt_freqs, mask)
        self.block_evaluations += max(stop - start, 0)
        return img, txt

    def _run_block(
        self,
        i: int,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        block = self.transformer_blocks[i]
        args = (img, txt, temb_act, img_freqs, txt_freqs, mask, i != len(self.transformer_blocks) - 1)
        if self._checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        if self._modulation_row is not None and self._sampling is not None:
            row, sigma_dtype = self._modulation_row
            return block(*args, self._sampling.tables.block_rows(i, block, row, sigma_dtype, self._temb_act))
        return block(*args)

    def _temb_act(self, sigma: Tensor) -> Tensor:
        """SiLU of the timestep embedding: every modulation linear takes it, so it is computed once, not per block."""
        return F.silu(self.time_text_embed.timestep_embedder(_timestep_sinusoid(sigma).to(self._dtype())))

    def _blocks_hooked(self) -> bool:
        """Whether a memory strategy hooks the blocks (it may move their weights only when a block is called)."""
        return any(block._forward_pre_hooks or block._forward_hooks for block in self.transformer_blocks)

    def _graphable(
        self,
        latents: Tensor,
        text: Tensor,
        text_mask: Tensor | None,
        text_positions: Tensor | None,
        attention_mask: Tensor | None,
    ) -> bool:
        """Whether a forward with these inputs can be captured: nothing in it reads the GPU on the host or moves
        weights after its first run (no step cache, memory strategy or attention hook; a right-padded mask, whose
        lengths the graph key holds). Inputs of the wrong shape go the plain way, which names them."""
        if latents.device.type != "cuda" or self.step_cache is not None or text_positions is not None:
            return False
        if attention_mask is not None or self._forward_pre_hooks or self._forward_hooks or self._blocks_hooked():
            return False
        if any(block.attn.attention_fn is not None for block in self.transformer_blocks):
            return False
        if text_mask is None:
            return True
        return text_mask.shape == (latents.shape[0], text.shape[1]) and self._mask_facts(text_mask)[1]

    def _run_blocks_shared(
        self,
        start: int,
        stop: int,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        lengths: tuple[int, ...],
    ) -> tuple[Tensor, Tensor]:
        # Fresh tensors, not views of one cached tensor: compiled blocks would guard on how the inputs alias.
        sample_freqs = tuple(txt_freqs[:n].clone() for n in lengths)
        # The text stream runs packed, real tokens only: padding rows would cost every text GEMM their share (at long
        # prompts with a short negative prompt, nearly half its rows).
        out_img, out_txt = img, torch.cat([txt[i, :n] for i, n in enumerate(lengths)])[:, None]
        for block in range(start, stop):
            out_img, out_txt = self._run_block(block, out_img, out_txt, temb_act, img_freqs, sample_freqs, None)
        self.block_evaluations += max(stop - start, 0)
        pieces = out_txt[:, 0].split(lengths)  # back to (B, L, width), padding rows as they came
        return out_img, torch.stack(
            [torch.cat([piece, txt[i, n:]]) for i, (piece, n) in enumerate(zip(pieces, lengths, strict=True))]
        )

    def _run_blocks_per_sample(
        self,
        start: int,
        stop: int,
        img: Tensor,
        txt: Tensor,
        temb_act: Tensor,
        img_freqs: Tensor,
        txt_freqs: Tensor,
        lengths: tuple[int, ...],
    ) -> tuple[Tensor, Tensor]:
        # Each sample keeps its own (image, real text) state; a sample goes through the same ops as it would alone.
        states = [
            (
                img[i : i + 1],
                # Dense strides (a size-1 batch dim keeps its parent's stride through .contiguous()), so compiled
                # blocks see the same layout as for a lone prompt and need no variant of their own.
                txt[i : i + 1, :n].clone(memory_format=torch.contiguous_format),
            )
            for i, n in enumerate(lengths)
        ]
        for block in range(start, stop):
            for i, n in enumerate(lengths):
                sample_img, sample_txt = states[i]
                states[i] = self._run_block(
                    block, sample_img, sample_txt, temb_act[i : i + 1], img_freqs, txt_freqs[:n], None
                )
        img = torch.cat([sample_img for sample_img, _ in states])
        txt = torch.cat([torch.cat([states[i][1], txt[i : i + 1, n:]], 1) for i, n in enumerate(lengths)])
        self.block_evaluations += max(stop - start, 0)  # a batch's block counts once
        return img, txt

    def _mask_facts(self, text_mask: Tensor) -> tuple[tuple[int, ...], bool]:
        """Real tokens per sample, and whether each sample's real tokens are a prefix (right padding).

        Reading them costs a host sync, which drains the GPU queue; a pipeline passes the same mask tensor at every
        step, so the facts of the last mask seen are kept (tied to that tensor object and, outside inference mode,
        to its version counter, so an in-place change is seen).
        """
        cached = self._mask_cache
        version = _version(text_mask)
        if cached is not None and cached[0]() is text_mask and cached[1] == version:
            return cached[2], cached[3]
        mask = text_mask.to(torch.bool)
        lengths = mask.sum(dim=1)
        is_prefix = (mask == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all()
        # One host sync for both facts, repaid by dense attention kernels.
        *counts, prefix = torch.cat([lengths, is_prefix.reshape(1).long()]).tolist()
        self._mask_cache = (weakref.ref(text_mask), version, tuple(counts), bool(prefix))
        return tuple(counts), bool(prefix)

    def _joint_mask(
        self,
        text_mask: Tensor | None,
        attention_mask: Tensor | None,
        b: int,
        n_txt: int,
        n_img: int,
        device: torch.device,
    ) -> Tensor | tuple[int, ...] | None:
        """What the blocks attend with: None (nothing masked), per-sample text lengths, or a boolean key mask.

        Right-padded text in inference with `split_padded_batches` (default: on CUDA under "auto" attention) gives
        the per-sample lengths: in `run_blocks` each sample then attends on its real tokens with dense attention,
        which on GPUs beats every masked kernel (masked attention runs at a third of the dense speed on an H100,
        docs/speed.md). With `split_batches`, any batch of more than one sample in inference gives them (all L for
        unpadded text), whatever the device and attention backend. Otherwise a (B, 1, 1, L+S) key mask over
        [text, image], or the caller's full `attention_mask`.
        """
        n = n_txt + n_img
        if attention_mask is not None:
            ok = (
                attention_mask.ndim == 4
                and attention_mask.shape[0] in (1, b)
                and attention_mask.shape[1] in (1, self.params.num_heads)
                and attention_mask.shape[2:] == (n, n)
            )
            if not ok or attention_mask.dtype != torch.bool:
                raise InputError(
                    f"attention_mask must be a bool tensor of shape ({b}, 1 or {self.params.num_heads}, {n}, {n}) "
                    f"over [text, image] tokens, got {attention_mask.dtype} {tuple(attention_mask.shape)}."
                )
            return attention_mask.to(device)
        split_all = self.split_batches and b > 1 and n_txt > 0 and not torch.is_grad_enabled()
        if text_mask is None:
            return (n_txt,) * b if split_all else None
        if text_mask.shape != (b, n_txt):
            raise InputError(f"text_mask must have shape ({b}, {n_txt}), got {tuple(text_mask.shape)}.")
        counts, prefix = self._mask_facts(text_mask)
        text_mask = text_mask.to(device=device, dtype=torch.bool)
        if min(counts) == n_txt:
            return counts if split_all else None
        split = split_all or self.split_padded_batches
        if split is None:  # the default: where dense-per-sample was measured to beat masked kernels
            split = device.type == "cuda" and self.attention_backend == "auto"
        if split and prefix and min(counts) > 0 and not torch.is_grad_enabled():
            return counts
        keys = torch.cat([text_mask, text_mask.new_ones(b, n_img)], dim=1)
        return keys[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint detection and building

# Names only a diffusers-layout Qwen-Image DiT has together (Flux uses x_embedder/context_embedder or double_blocks).
DIT_KEY_MARKERS: frozenset[str] = frozenset(
    {
        "img_in.weight",
        "txt_in.weight",
        "txt_norm.weight",
        "transformer_blocks.0.img_mod.1.weight",
        "transformer_blocks.0.txt_mod.1.weight",
        "transformer_blocks.0.attn.add_q_proj.weight",
        "proj_out.weight",
    }
)


def is_dit_checkpoint(keys: Iterable[str]) -> bool:
    """Whether `keys` (all keys of a checkpoint, across shards) hold a Qwen-Image DiT."""
    return set(keys) >= DIT_KEY_MARKERS


def build_dit(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> QwenImageDiT:
    """Build a DiT on the meta device and assign the checkpoint's tensors to it (no random init, no copy).

    Args:
        state_dict: Tensors under diffusers key names.
        config: The transformer's config.json dict; sizes are inferred from tensor shapes when None.
        dtype: Cast floating-point tensors to this dtype (None keeps the checkpoint's).
        device: Where the weights end up.

    Raises:
        WeightsError: Keys are missing, unexpected or misshaped (each named).
        ConfigError: The config is invalid, or sizes can't be inferred without it.
    """
    if config is not None:
        params = DiTParams.from_config(config)
    else:
        params = DiTParams.from_shapes({k: tuple(v.shape) for k, v in state_dict.items()})
    with torch.device("meta"):
        module = QwenImageDiT(params)
    assign_state_dict(module, state_dict, what="Qwen-Image DiT", dtype=dtype, device=device)
    return module.eval()
