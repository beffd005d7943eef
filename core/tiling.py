"""Tiled processing of large spatial tensors with linearly blended overlaps.

Family-agnostic: any function mapping a `(B, C, h, w)` tile to a `(B, C', h·s, w·s)` result (a VAE decoder with
`s = 8`, an encoder with `s = 1/8`, ...) can be run tile by tile to bound the size of its activations. Overlapping
outputs are cross-faded with linear ramps whose weights are normalized to sum to exactly one at every pixel, so a
constant field stays constant and no seam appears where tiles meet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from imagezoo.errors import InputError

__all__ = ["Tile", "blend_weights_1d", "check_tiling", "iter_tiles", "tile_starts", "tiled_apply"]


@dataclass(frozen=True)
class Tile:
    """A rectangle `[top, top + height) x [left, left + width)` of a spatial tensor."""

    top: int
    left: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        """Return `(rows, cols)` slices selecting this tile from the last two dimensions."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def scaled(self, scale: Fraction) -> Tile:
        """Return the same rectangle in a space `scale` times as large; raises if it does not land on whole pixels."""
        values = [Fraction(v) * scale for v in (self.top, self.left, self.height, self.width)]
        if any(v.denominator != 1 for v in values):
            raise InputError(
                f"tile {self} scaled by {scale} does not land on whole pixels; "
                f"use a tile size, stride and image size that are multiples of {scale.denominator}"
            )
        return Tile(*(int(v) for v in values))


def check_tiling(tile_size: int, tile_stride: int) -> None:
    """Raise `InputError` unless `1 <= tile_stride <= tile_size`."""
    if tile_size < 1 or tile_stride < 1:
        raise InputError(f"tile_size ({tile_size}) and tile_stride ({tile_stride}) must both be at least 1")
    if tile_stride > tile_size:
        raise InputError(
            f"tile_stride ({tile_stride}) must not exceed tile_size ({tile_size}): tiles would leave gaps; "
            "pick a stride at most the tile size (about half of it gives smooth blending)"
        )


def tile_starts(length: int, tile_size: int, tile_stride: int) -> list[int]:
    """Start offsets of tiles covering `[0, length)` along one axis.

    The tile count is what steps of `tile_stride` need to reach the end; the tiles are then spread evenly, so every
    tile has the full size (a thin remainder tile would see too little context), the actual stride is at most
    `tile_stride`, and consecutive overlaps differ by at most one. An axis no longer than one tile gets a single tile.
    """
    check_tiling(tile_size, tile_stride)
    if length <= tile_size:
        return [0]
    span = length - tile_size
    gaps = -(-span // tile_stride)  # ceil
    return [(i * span + gaps // 2) // gaps for i in range(gaps + 1)]


def iter_tiles(height: int, width: int, tile_size: int, tile_stride: int) -> Iterator[Tile]:
    """Yield the tiles covering a `height x width` plane, row by row."""
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    for top in tile_starts(height, tile_size, tile_stride):
        for left in tile_starts(width, tile_size, tile_stride):
            yield Tile(top, left, tile_h, tile_w)


def blend_weights_1d(starts: Sequence[int], size: int, length: int) -> list[torch.Tensor]:
    """Per-tile blending weights along one axis, normalized to sum to one at every position.

    Each tile ramps linearly from near 0 to 1 across its overlap with a neighbour and stays 1 elsewhere; the image
    border gets no ramp. The ramp samples pixel centres (`(i + 0.5) / overlap`) so no weight is zero, which keeps the
    normalization defined even where three or more tiles overlap.

    Args:
        starts: Sorted tile start offsets (output pixels).
        size: Tile length (output pixels); every tile has this length.
        length: Axis length (output pixels); the tiles must cover `[0, length)`.

    Returns:
        One float32 weight vector of length `size` per tile.
    """
    raw = []
    for i, start in enumerate(starts):
        pos = torch.arange(size, dtype=torch.float64) + 0.5
        w = torch.ones(size, dtype=torch.float64)
        if i > 0:
            overlap = starts[i - 1] + size - start
            if overlap > 0:
                w = torch.minimum(w, pos / overlap)
        if i + 1 < len(starts):
            overlap = start + size - starts[i + 1]
            if overlap > 0:
                w = torch.minimum(w, (size - pos) / overlap)
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for start, w in zip(starts, raw, strict=True):
        total[start : start + size] += w
    if bool((total <= 0).any()):
        raise InputError(f"tiles of size {size} starting at {list(starts)} do not cover an axis of length {length}")
    return [(w / total[start : start + size]).float() for start, w in zip(starts, raw, strict=True)]


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_size: int,
    tile_stride: int,
    scale: float | Fraction = 1,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `x` and blend the results into one tensor.

    Args:
        fn: Maps a `(B, C, h, w)` tile to `(B, C', h * scale, w * scale)`; `C'` is taken from the first tile.
        x: Input `(B, C, H, W)`.
        tile_size: Tile side in input pixels (shorter along an axis that is smaller than a tile).
        tile_stride: Distance between tile starts in input pixels; `tile_size - tile_stride` is the overlap.
        scale: Output pixels per input pixel (e.g. `8` for a decoder, `Fraction(1, 8)` for an encoder). For a
            scale `p/q`, the input size, `tile_size` and `tile_stride` must be multiples of `q`.
        out_dtype: Dtype of the result; blending accumulates in it, so keep float32 unless memory is very tight.

    Returns:
        `(B, C', H * scale, W * scale)` on the device `fn` returns; with a single tile, just `fn(x)` in `out_dtype`.
    """
    if x.dim() != 4:
        raise InputError(f"tiled_apply expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    check_tiling(tile_size, tile_stride)
    scale = Fraction(scale)
    height, width = x.shape[-2:]
    # Lay tiles out in units that map to whole output pixels (8 input pixels for scale 1/8).
    unit = scale.denominator
    if height % unit or width % unit or tile_size % unit or tile_stride % unit:
        raise InputError(
            f"tiled_apply with scale {scale}: input size {height}x{width}, tile_size ({tile_size}) and tile_stride "
            f"({tile_stride}) must all be multiples of {unit}"
        )
    tiles = [
        Tile(t.top * unit, t.left * unit, t.height * unit, t.width * unit)
        for t in iter_tiles(height // unit, width // unit, tile_size // unit, tile_stride // unit)
    ]
    if len(tiles) == 1:
        return fn(x).to(out_dtype)

    out_size = Tile(0, 0, height, width).scaled(scale)
    size = tiles[0].scaled(scale)
    row_starts = sorted({t.scaled(scale).top for t in tiles})
    col_starts = sorted({t.scaled(scale).left for t in tiles})
    row_w = dict(zip(row_starts, blend_weights_1d(row_starts, size.height, out_size.height), strict=True))
    col_w = dict(zip(col_starts, blend_weights_1d(col_starts, size.width, out_size.width), strict=True))

    out: torch.Tensor | None = None
    for tile in tiles:
        target = tile.scaled(scale)
        rows, cols = tile.slices()
        piece = x[..., rows, cols]
        y = fn(piece)
        expected = (x.shape[0], target.height, target.width)
        if y.dim() != 4 or (y.shape[0], *y.shape[-2:]) != expected:
            raise InputError(
                f"tiled_apply: fn returned shape {tuple(y.shape)} for a tile of shape {tuple(piece.shape)}; "
                f"expected (B, C', H, W) = ({expected[0]}, C', {expected[1]}, {expected[2]}) for scale {scale}"
            )
        if out is None:
            out = torch.zeros(x.shape[0], y.shape[1], out_size.height, out_size.width, dtype=out_dtype, device=y.device)
        weight = torch.outer(row_w[target.top], col_w[target.left]).to(device=y.device, dtype=out_dtype)
        out[..., target.slices()[0], target.slices()[1]] += y.to(out_dtype) * weight
    assert out is not None  # at least one tile always exists
    return out
