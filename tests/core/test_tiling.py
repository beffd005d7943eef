"""Tiled processing: tile layout, blend weights, exactness for pointwise functions, argument errors."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from imagezoo.errors import InputError
from imagezoo.tiling import Tile, blend_weights_1d, check_tiling, iter_tiles, tile_starts, tiled_apply


@pytest.mark.parametrize(
    ("length", "size", "stride", "expected"),
    [
        (10, 16, 8, [0]),  # smaller than one tile
        (16, 16, 8, [0]),
        (40, 16, 8, [0, 8, 16, 24]),
        (41, 16, 8, [0, 6, 13, 19, 25]),  # 4 steps of 8 needed, spread evenly: overlaps 10 or 9
        (40, 16, 16, [0, 12, 24]),
        (50, 20, 7, [0, 6, 12, 18, 24, 30]),
    ],
)
def test_tile_starts_cover_axis_with_full_size_tiles(length: int, size: int, stride: int, expected: list[int]) -> None:
    starts = tile_starts(length, size, stride)
    assert starts == expected
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + size] = True
        assert s + min(size, length) <= length
    assert bool(covered.all())


def test_iter_tiles_row_major_and_clipped_to_small_axes() -> None:
    tiles = list(iter_tiles(10, 40, 16, 8))
    assert [(t.top, t.left) for t in tiles] == [(0, 0), (0, 8), (0, 16), (0, 24)]
    assert all((t.height, t.width) == (10, 16) for t in tiles)
    assert Tile(2, 3, 4, 5).scaled(Fraction(2)) == Tile(4, 6, 8, 10)
    with pytest.raises(InputError, match="whole pixels"):
        Tile(4, 0, 8, 8).scaled(Fraction(1, 8))
    assert [t.slices() for t in iter_tiles(4, 4, 8, 4)] == [(slice(0, 4), slice(0, 4))]


@pytest.mark.parametrize(
    ("starts", "size", "length"),
    [
        ([0, 8, 16, 24], 16, 40),
        ([0, 6, 13, 19, 25], 16, 41),
        ([0, 3, 5, 20], 20, 40),
        ([0, 16, 24], 16, 40),
        ([0], 12, 12),
    ],
)
def test_blend_weights_sum_to_one_and_ramp_linearly(starts: list[int], size: int, length: int) -> None:
    weights = blend_weights_1d(starts, size, length)
    total = torch.zeros(length)
    for s, w in zip(starts, weights, strict=True):
        assert w.shape == (size,)
        assert bool((w > 0).all()) and bool((w <= 1).all())
        total[s : s + size] += w
    torch.testing.assert_close(total, torch.ones(length), atol=1e-6, rtol=0)
    if starts == [0, 8, 16, 24]:
        # Two tiles overlapping by 8: a linear cross-fade (k + 0.5) / 8 in, the mirror image out.
        ramp = (torch.arange(8) + 0.5) / 8
        torch.testing.assert_close(weights[1][:8], ramp)
        torch.testing.assert_close(weights[0][8:], ramp.flip(0))
        assert bool((weights[0][:8] == 1).all())  # no ramp at the image border


def test_constant_input_through_identity_is_unchanged() -> None:
    x = torch.full((2, 3, 37, 53), 0.375)
    out = tiled_apply(lambda t: t, x, tile_size=16, tile_stride=10)
    assert torch.equal(out, x) or (out - x).abs().max() <= 1e-7


def test_random_input_through_identity_is_reproduced() -> None:
    x = torch.randn(1, 4, 45, 30, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiled_apply(lambda t: t, x, 12, 5), x, atol=1e-6, rtol=0)


def test_pointwise_functions_are_exact_across_scales() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 48, 40, generator=g)
    up = lambda t: F.interpolate(t, scale_factor=4, mode="nearest").mul(2.0)  # noqa: E731
    torch.testing.assert_close(tiled_apply(up, x, 16, 8, scale=4), up(x), atol=1e-6, rtol=0)
    # Downscaling: tile offsets must map to whole output pixels (multiples of 8 here).
    down = lambda t: F.avg_pool2d(t, 8).repeat(1, 2, 1, 1)  # noqa: E731
    torch.testing.assert_close(tiled_apply(down, x, 16, 8, scale=Fraction(1, 8)), down(x), atol=1e-6, rtol=0)


def test_calls_fn_once_per_tile_and_once_when_it_fits() -> None:
    calls: list[tuple[int, ...]] = []

    def fn(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        return t

    x = torch.zeros(1, 1, 40, 24)
    tiled_apply(fn, x, 16, 8)
    assert len(calls) == 4 * 2 and set(calls) == {(1, 1, 16, 16)}
    calls.clear()
    out = tiled_apply(fn, x, 64, 32)
    assert calls == [(1, 1, 40, 24)] and out.dtype == torch.float32


@pytest.mark.parametrize(("length", "bound"), [(60, 1 / 12), (64, 1 / 7)])
def test_tile_dependent_offsets_become_ramps_not_steps(length: int, bound: float) -> None:
    # Each tile adds a different constant (what a seam looks like). Blending must turn the unit steps between
    # neighbours into ramps no steeper than 1 / overlap (60: overlaps of 12; 64: stride 10, overlaps 14, with
    # three tiles overlapping in places, so neighbours' offsets differ by up to 2 across 14 pixels).
    counter = iter(range(100))

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t + float(next(counter))

    out = tiled_apply(fn, torch.zeros(1, 1, 1, length), tile_size=24, tile_stride=12)
    steps = out[0, 0, 0].diff()
    assert bool((steps >= 0).all())
    assert steps.max() <= bound + 1e-6


def test_argument_errors_name_the_values() -> None:
    with pytest.raises(InputError, match=r"tile_stride \(9\).*tile_size \(8\)"):
        check_tiling(8, 9)
    with pytest.raises(InputError, match="at least 1"):
        tiled_apply(lambda t: t, torch.zeros(1, 1, 8, 8), 0, 0)
    with pytest.raises(InputError, match=r"\(B, C, H, W\)"):
        tiled_apply(lambda t: t, torch.zeros(8, 8), 4, 2)
    with pytest.raises(InputError, match="multiples of 8"):
        tiled_apply(lambda t: t, torch.zeros(1, 1, 20, 16), 16, 8, scale=Fraction(1, 8))
    with pytest.raises(InputError, match="fn returned shape"):
        tiled_apply(lambda t: t[..., :-1], torch.zeros(1, 1, 16, 16), 8, 4)
