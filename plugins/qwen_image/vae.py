"""Qwen-Image VAE: one frame of the Wan-2.1-style causal 3D VAE, computed with 2D convolutions.

Module and parameter names follow the published `vae/diffusion_pytorch_model.safetensors` exactly, and weights keep
their checkpoint shapes (3D kernels `(out, in, t, h, w)`), so the file loads without renaming.

Why 2D is exact: a causal Conv3d pads time only in front with zeros, so on a single frame every temporal tap but the
last sees zeros and the output is a 2D convolution with the kernel's last temporal slice. The temporal resampling
convolutions (`time_conv`) never run on the first frame of the reference's causal cache, so they are loaded but unused.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagezoo.errors import ConfigError, InputError, WeightsError
from imagezoo.state_dict import assign_state_dict
from imagezoo.tiling import check_tiling, tiled_apply

__all__ = [
    "REAL_VAE",
    "TINY_VAE",
    "VAE_KEY_MARKERS",
    "QwenImageVAE",
    "VAEParams",
    "build_vae",
    "is_vae_checkpoint",
]

_CLASS_NAME = "AutoencoderKLQwenImage"
_INPUT_CHANNELS = 3
_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Above this many query x key scores per attention call, queries are processed in chunks: head_dim 384 is too wide
# for flash attention, and a fallback to the math kernel would otherwise materialize the full score matrix.
_ATTN_MAX_SCORES = 1 << 26


@dataclass(frozen=True)
class VAEParams:
    """Architecture hyper-parameters, named as in the diffusers `AutoencoderKLQwenImage` config."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = _LATENTS_MEAN
    latents_std: tuple[float, ...] = _LATENTS_STD

    def __post_init__(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(
                f"VAE temperal_downsample has {len(self.temperal_downsample)} entries but dim_mult "
                f"{self.dim_mult} needs {len(self.dim_mult) - 1} (one per downsampling)"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ConfigError(
                f"VAE latents_mean/latents_std need z_dim={self.z_dim} values each, "
                f"got {len(self.latents_mean)} and {len(self.latents_std)}"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VAEParams:
        """Read a diffusers `vae/config.json` dict; keys starting with `_` are metadata and ignored."""
        class_name = config.get("_class_name", _CLASS_NAME)
        if class_name != _CLASS_NAME:
            raise ConfigError(f"VAE config has _class_name {class_name!r}; expected {_CLASS_NAME!r}")
        if config.get("input_channels", _INPUT_CHANNELS) != _INPUT_CHANNELS:
            raise ConfigError(f"VAE config has input_channels={config['input_channels']}; only 3 (RGB) is supported")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in names and k != "input_channels")
        if unknown:
            raise ConfigError(f"VAE config has unknown key(s) {unknown}; known keys: {sorted(names)}")
        kwargs: dict[str, Any] = {}
        casts = {
            "dim_mult": int,
            "attn_scales": float,
            "temperal_downsample": bool,
            "latents_mean": float,
            "latents_std": float,
        }
        for name in names & set(config):
            value = config[name]
            kwargs[name] = tuple(casts[name](v) for v in value) if name in casts else value
        return cls(**kwargs)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> VAEParams:
        """Infer the architecture from checkpoint tensor shapes (`key -> shape`).

        Recovers base_dim, z_dim, dim_mult, num_res_blocks, attn_scales and temperal_downsample from the encoder.
        latents_mean/std are not stored in checkpoints: they default to the published Qwen-Image values (for
        z_dim 16; other widths get mean 0 and std 1, i.e. no normalization).
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise WeightsError(f"Qwen-Image VAE: checkpoint lacks {key!r}; is this a Qwen-Image VAE checkpoint?")
            return tuple(shapes[key])

        base_dim = shape("encoder.conv_in.weight")[0]
        z_dim = shape("post_quant_conv.weight")[0]
        prefix = "encoder.down_blocks."
        indices = sorted({int(k[len(prefix) :].split(".", 1)[0]) for k in shapes if k.startswith(prefix)})
        if indices != list(range(len(indices))) or not indices:
            raise WeightsError(f"Qwen-Image VAE: encoder.down_blocks indices {indices} are not 0..n-1")

        # Walk the flat block list: residual blocks (and attention) per level, a resampler between levels.
        levels: list[dict[str, Any]] = [{"res": 0, "attn": False, "dim": None}]
        temporal: list[bool] = []
        for i in indices:
            block = f"{prefix}{i}."
            if block + "conv1.weight" in shapes:
                levels[-1]["res"] += 1
                levels[-1]["dim"] = shape(block + "conv1.weight")[0]
            elif block + "to_qkv.weight" in shapes:
                levels[-1]["attn"] = True
            elif block + "resample.1.weight" in shapes:
                temporal.append(block + "time_conv.weight" in shapes)
                levels.append({"res": 0, "attn": False, "dim": None})
            else:
                raise WeightsError(f"Qwen-Image VAE: cannot tell what {block.rstrip('.')} is from its keys")
        counts = {level["res"] for level in levels}
        if len(counts) != 1 or 0 in counts or any(level["dim"] % base_dim for level in levels):
            raise WeightsError(
                f"Qwen-Image VAE: encoder levels are irregular (residual blocks per level "
                f"{[level['res'] for level in levels]}, widths {[level['dim'] for level in levels]})"
            )
        stats = {} if z_dim == len(_LATENTS_MEAN) else {"latents_mean": (0.0,) * z_dim, "latents_std": (1.0,) * z_dim}
        return cls(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=tuple(level["dim"] // base_dim for level in levels),
            num_res_blocks=counts.pop(),
            attn_scales=tuple(1.0 / 2**i for i, level in enumerate(levels) if level["attn"]),
            temperal_downsample=tuple(temporal),
            **stats,
        )

    def to_config(self) -> dict[str, Any]:
        """Return diffusers `config.json` content (loadable by `AutoencoderKLQwenImage.from_config`)."""
        config: dict[str, Any] = {"_class_name": _CLASS_NAME}
        for name, value in asdict(self).items():
            config[name] = list(value) if isinstance(value, tuple) else value
        return config


REAL_VAE = VAEParams()
# Same structure as the real VAE (4 levels, 3 downsamplings, attention mid blocks, z_dim 16), a fraction of the width.
TINY_VAE = VAEParams(base_dim=8, num_res_blocks=1)


def _silu(x: torch.Tensor) -> torch.Tensor:
    # Callers only pass fresh temporaries, so overwriting them is safe whenever no graph needs the input.
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return x.add_(residual) if not torch.is_grad_enabled() else x + residual


class CausalConv3d(nn.Conv3d):
    """A causal 3D convolution with checkpoint-shaped weights, applied to one frame as a 2D convolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.spatial_padding = (pad[1], pad[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve a `(B, C, H, W)` frame."""
        return F.conv2d(x, self.weight[:, :, -1], self.bias, self.stride[1:], self.spatial_padding)


class RMSNorm(nn.Module):
    """L2-normalize over channels, times sqrt(C) and a per-channel gain (stored as `gamma`)."""

    def __init__(self, dim: int, gamma_dims: int = 3) -> None:
        super().__init__()
        # The checkpoint stores gamma broadcastable over (t, h, w), or (h, w) inside attention blocks.
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * gamma_dims)))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize a `(B, C, H, W)` tensor over channels."""
        inplace = not torch.is_grad_enabled()
        if x.dtype in (torch.float32, torch.float64):
            y = F.normalize(x, dim=1)
            gamma = self.gamma.reshape(1, -1, 1, 1)
            return y.mul_(self.scale).mul_(gamma) if inplace else y * self.scale * gamma
        # Low precision: only the per-pixel norm is computed in float32, never a float32 copy of the activation
        # (that copy would be the largest tensor of a 2048x2048 decode). Rounding matches the reference, which
        # also rounds the normalized values to the input dtype before scaling.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12)
        gamma = self.gamma.reshape(1, -1, 1, 1).to(x.dtype)
        y = x * (self.scale / norm).to(x.dtype)
        return y.mul_(gamma) if inplace else y * gamma


class ResidualBlock(nn.Module):
    """Two (norm, SiLU, 3x3 conv) stages plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to `(B, C, H, W)`."""
        shortcut = self.conv_shortcut(x)
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(self.dropout(_silu(self.norm2(h))))
        return _add(h, shortcut)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    n = q.shape[-2]
    chunk = max(1, _ATTN_MAX_SCORES // k.shape[-2])
    if chunk >= n:
        return F.scaled_dot_product_attention(q, k, v)
    out = q.new_empty(q.shape)
    for start in range(0, n, chunk):
        out[..., start : start + chunk, :] = F.scaled_dot_product_attention(q[..., start : start + chunk, :], k, v)
    return out


class AttentionBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, gamma_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to `(B, C, H, W)`."""
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)
        out = _attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return _add(self.proj(out), x)


class Upsample2x(nn.Module):
    """Nearest-exact x2 spatial upsampling (parameter-free; index 0 of the checkpoint's `resample` sequence)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample `(B, C, H, W)` to `(B, C, 2H, 2W)`."""
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Spatial x2 up- or downsampling; `time_conv` exists only so temporal variants' checkpoints load."""

    def __init__(self, dim: int, *, up: bool, temporal: bool) -> None:
        super().__init__()
        if up:
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            # Pad right/bottom only, so a 2H x 2W input maps to exactly H x W.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if temporal:
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resample `(B, C, H, W)` spatially."""
        return self.resample(x)


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to `(B, C, H, W)`."""
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x))
        return x


class Encoder(nn.Module):
    """Image `(B, 3, H, W)` -> posterior parameters `(B, 2 z_dim, H/8, W/8)` (before `quant_conv`)."""

    def __init__(self, params: VAEParams) -> None:
        super().__init__()
        dims = [params.base_dim * m for m in (1, *params.dim_mult)]
        self.conv_in = CausalConv3d(_INPUT_CHANNELS, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0
        for level, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            for _ in range(params.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, params.dropout))
                if scale in params.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if level < len(params.dim_mult) - 1:
                blocks.append(Resample(out_dim, up=False, temporal=params.temperal_downsample[level]))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], params.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], params.z_dim * 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode one frame."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(_silu(self.norm_out(x)))


class UpBlock(nn.Module):
    """`num_res_blocks + 1` residual blocks, then an optional x2 upsampler that halves the width."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample: bool, temporal: bool
    ) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(ResidualBlock(i, o, dropout) for i, o in itertools.pairwise(dims))
        self.upsamplers = nn.ModuleList([Resample(out_dim, up=True, temporal=temporal)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to `(B, C, H, W)`."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    """Latents `(B, z_dim, h, w)` (after `post_quant_conv`) -> unclamped image `(B, 3, 8h, 8w)`."""

    def __init__(self, params: VAEParams) -> None:
        super().__init__()
        mults = params.dim_mult
        dims = [params.base_dim * m for m in (mults[-1], *reversed(mults))]
        temporal_up = tuple(reversed(params.temperal_downsample))
        self.conv_in = CausalConv3d(params.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], params.dropout)
        blocks = []
        for level, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            upsample = level < len(mults) - 1
            blocks.append(
                UpBlock(
                    in_dim // 2 if level > 0 else in_dim,  # the previous upsampler halved the width
                    out_dim,
                    params.num_res_blocks,
                    params.dropout,
                    upsample=upsample,
                    temporal=upsample and temporal_up[level],
                )
            )
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], _INPUT_CHANNELS, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decode one frame."""
        x = self.conv_in(x)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(_silu(self.norm_out(x)))


class QwenImageVAE(nn.Module):
    """The Qwen-Image VAE for single images.

    `encode` maps images in [-1, 1] to normalized latents (posterior mean, then `(z - mean) / std`); `decode` inverts
    the normalization and decodes, clamping to [-1, 1]. Both run in the module's dtype and return float32.

    Tiling (`tiled=True`) bounds activation memory by processing overlapping tiles and cross-fading them with linear
    ramps. `tile_size` and `tile_stride` are in **latent** pixels for both directions (a latent pixel is 8x8 image
    pixels), so the same numbers describe the same image regions for encode and decode; the overlap is
    `tile_size - tile_stride`. Each tile sees only itself (including the global attention in the mid blocks), so the
    result is close to, not identical with, the untiled one.

    Attributes:
        compute_dtype: Dtype inputs are cast to. `None` means the dtype of the first parameter; a memory strategy that
            stores weights in another dtype (e.g. fp8) sets it to the dtype it computes in.
        memory_blocks: (declaration for memory strategies) None: the VAE (0.25 GB) moves whole, it has no blocks
            worth streaming.
    """

    latent_channels: int = 16
    spatial_factor: int = 8
    memory_blocks: tuple[str, ...] = ()

    def __init__(self, params: VAEParams = REAL_VAE) -> None:
        super().__init__()
        self.params = params
        self.latent_channels = params.z_dim
        self.spatial_factor = 2 ** (len(params.dim_mult) - 1)
        self.compute_dtype: torch.dtype | None = None
        self.encoder = Encoder(params)
        self.quant_conv = CausalConv3d(params.z_dim * 2, params.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(params.z_dim, params.z_dim, 1)
        self.decoder = Decoder(params)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in."""
        return self.compute_dtype or next(self.parameters()).dtype

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Built on the fly from the params so a meta-built module has no buffers left to initialize.
        mean = torch.tensor(self.params.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.params.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return mean, std

    def _encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(images.to(self.dtype)))
        return moments[:, : self.latent_channels]

    def _decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    def encode(
        self, images: torch.Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> torch.Tensor:
        """Encode images to normalized latents.

        Args:
            images: `(B, 3, H, W)` in [-1, 1], H and W multiples of 8.
            tiled: Encode in overlapping tiles to bound memory (a no-op when the image fits one tile).
            tile_size: Tile side in latent pixels (image tiles are 8x larger).
            tile_stride: Distance between tiles in latent pixels; must not exceed `tile_size`.

        Returns:
            Float32 latents `(B, 16, H/8, W/8)`: the posterior mean, normalized as `(z - mean) / std`.
        """
        f = self.spatial_factor
        if images.dim() != 4 or images.shape[1] != _INPUT_CHANNELS or images.shape[-1] % f or images.shape[-2] % f:
            raise InputError(
                f"VAE encode expects images of shape (B, 3, H, W) with H and W multiples of {f}, "
                f"got {tuple(images.shape)}; resize or crop the image"
            )
        if tiled:
            check_tiling(tile_size, tile_stride)
            z = tiled_apply(self._encode_mean, images, tile_size * f, tile_stride * f, Fraction(1, f))
        else:
            z = self._encode_mean(images)
        mean, std = self._latent_stats(z.device)
        return (z.float() - mean) / std

    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> torch.Tensor:
        """Decode normalized latents to images.

        Args:
            latents: `(B, 16, h, w)` normalized latents (any float dtype; cast to the module's dtype internally).
            tiled: Decode in overlapping tiles to bound memory (a no-op when the latents fit one tile).
            tile_size: Tile side in latent pixels.
            tile_stride: Distance between tiles in latent pixels; must not exceed `tile_size`.

        Returns:
            Float32 images `(B, 3, 8h, 8w)` clamped to [-1, 1].
        """
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise InputError(
                f"VAE decode expects latents of shape (B, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        if tiled:
            check_tiling(tile_size, tile_stride)
        mean, std = self._latent_stats(latents.device)
        z = (latents.float() * std + mean).to(self.dtype)
        if tiled:
            images = tiled_apply(self._decode_raw, z, tile_size, tile_stride, self.spatial_factor)
        else:
            images = self._decode_raw(z).float()
        return images.clamp(-1.0, 1.0)


VAE_KEY_MARKERS: frozenset[str] = frozenset(
    {"encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_in.weight"}
)


def is_vae_checkpoint(keys: Iterable[str]) -> bool:
    """Whether a checkpoint's keys look like a Qwen-Image (diffusers-named) VAE."""
    return set(keys) >= VAE_KEY_MARKERS


def build_vae(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> QwenImageVAE:
    """Build the VAE on the meta device and assign checkpoint tensors to it (no random init, no copy).

    Args:
        state_dict: Tensors under diffusers `AutoencoderKLQwenImage` names.
        config: diffusers `vae/config.json` content; when omitted the architecture is inferred from tensor shapes.
        dtype: Cast floating-point tensors to this dtype (default: keep the checkpoint's).
        device: Where the weights end up.

    Returns:
        The module in eval mode with `requires_grad` off (gradients still flow to inputs).

    Raises:
        WeightsError: Keys are missing, unexpected or misshaped (each named).
    """
    if config is not None:
        params = VAEParams.from_config(config)
    else:
        params = VAEParams.from_shapes({k: tuple(v.shape) for k, v in state_dict.items()})
    with torch.device("meta"):
        module = QwenImageVAE(params)
    assign_state_dict(module, state_dict, what="Qwen-Image VAE", dtype=dtype, device=device)
    return module.eval().requires_grad_(False)
