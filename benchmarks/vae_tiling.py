"""Peak memory and time of untiled vs tiled Qwen-Image VAE decode, with random full-size weights.

Weights are random (built on the meta device, allocated with `to_empty`, filled in place), so no download is needed;
memory and time do not depend on the values. Peak memory is `torch.cuda.max_memory_allocated` over the timed runs,
weights (0.24 GiB in bf16) and inputs included.

    python benchmarks/vae_tiling.py                          # CUDA, bf16, 1328x1328 and 2048x2048
    python benchmarks/vae_tiling.py --encode --diffusers     # also encode rows, and diffusers' implementation
    python benchmarks/vae_tiling.py --device cpu --tiny      # smoke check (tiny model, small images)

Writes `benchmarks/results/vae_tiling.json` (`vae_tiling_tiny.json` with `--tiny`, so a smoke run never overwrites
real results).
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from report import versions, write_json

from imagezoo.plugins.qwen_image.vae import REAL_VAE, TINY_VAE, QwenImageVAE, VAEParams

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny model and small images: a fast smoke check")
    parser.add_argument("--sizes", type=int, nargs="+", help="square image sides in pixels (default 1328 2048)")
    parser.add_argument(
        "--tiles",
        nargs="+",
        help="tiled configurations as SIZE/STRIDE in latent pixels (default 128/64 64/32; tiny: 8/4)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--encode", action="store_true", help="also measure encode")
    parser.add_argument("--diffusers", action="store_true", help="also measure diffusers AutoencoderKLQwenImage")
    parser.add_argument("--out", type=Path, help="JSON output path")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([128, 256] if args.tiny else [1328, 2048])
    tiles = args.tiles or (["8/4"] if args.tiny else ["128/64", "64/32"])
    args.tiles = [tuple(int(v) for v in t.split("/")) for t in tiles]
    args.out = args.out or RESULTS / ("vae_tiling_tiny.json" if args.tiny else "vae_tiling.json")
    return args


@torch.no_grad()
def random_vae(params: VAEParams, device: torch.device, dtype: torch.dtype) -> QwenImageVAE:
    """Allocate the VAE directly on `device` in `dtype` and fill it with well-scaled random values."""
    with torch.device("meta"):
        vae = QwenImageVAE(params)
    vae = vae.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.normal_(1.0, 0.1, generator=gen)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.01, generator=gen)
        else:
            fan_in = p[0, :, -1].numel() if p.dim() == 5 else p[0].numel()
            p.normal_(0.0, fan_in**-0.5, generator=gen)
    return vae


def diffusers_twin(vae: QwenImageVAE) -> torch.nn.Module:
    """diffusers' implementation sharing `vae`'s tensors (no extra weight memory)."""
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        ref = AutoencoderKLQwenImage.from_config(vae.params.to_config())
    ref.load_state_dict(vae.state_dict(), assign=True)
    return ref.eval().requires_grad_(False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float | None, float]:
    """Return (peak GiB or None off CUDA, median ms) of `fn` after one warm-up call."""
    fn()
    synchronize(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return peak, statistics.median(times)


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    tilings: list[tuple[int, int] | None] = [None, *args.tiles]
    ops = ["decode", "encode"] if args.encode else ["decode"]
    impls = ["imagezoo", "diffusers"] if args.diffusers else ["imagezoo"]
    out = []
    for impl in impls:
        for op in ops:
            for size in args.sizes:
                # diffusers tiles with its own defaults (256/192 image pixels); our SIZE/STRIDE list is ours.
                for tiling in tilings if impl == "imagezoo" else [None, (32, 24)]:
                    out.append({"impl": impl, "op": op, "size": size, "tiling": tiling})
    return out


def workload(
    case: dict[str, Any], vae: QwenImageVAE, ref: torch.nn.Module | None, latents: torch.Tensor, images: torch.Tensor
) -> Callable[[], Any]:
    """The call to time for `case`."""
    tiling = case["tiling"]
    if case["impl"] == "imagezoo":
        kwargs = {"tiled": True, "tile_size": tiling[0], "tile_stride": tiling[1]} if tiling else {}
        if case["op"] == "decode":
            return lambda: vae.decode(latents, **kwargs)
        return lambda: vae.encode(images, **kwargs)
    assert ref is not None
    ref.use_tiling = tiling is not None  # diffusers' own switch; it tiles with its default sizes
    if case["op"] == "decode":
        z = latents.to(vae.dtype)[:, :, None]
        return lambda: ref.decode(z).sample
    x = images.to(vae.dtype)[:, :, None]
    return lambda: ref.encode(x).latent_dist.mean


def run_case(case: dict[str, Any], vae: QwenImageVAE, ref: torch.nn.Module | None, args: argparse.Namespace) -> dict:
    device, size, tiling = torch.device(args.device), case["size"], case["tiling"]
    f = vae.spatial_factor
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(1, vae.latent_channels, size // f, size // f, generator=gen, device=device)
    images = torch.rand(1, 3, size, size, generator=gen, device=device) * 2 - 1
    fn = workload(case, vae, ref, latents, images)
    tiled = tiling is not None
    tile_size, tile_stride = tiling if tiled else (None, None)

    row: dict[str, Any] = {
        "impl": case["impl"],
        "case": {
            "op": case["op"],
            "height": size,
            "width": size,
            "dtype": str(vae.dtype).removeprefix("torch."),
            "tiled": tiled,
            "tile_size": tile_size,
            "tile_stride": tile_stride,
            "model": "tiny" if args.tiny else "real",
        },
    }
    try:
        with torch.inference_mode():
            peak, ms = measure(fn, device, args.repeats)
    except torch.OutOfMemoryError:
        peak, ms = None, None
        row["error"] = "out of memory"
    row["peak_vram_gib"] = None if peak is None else round(peak, 3)
    row["ms"] = None if ms is None else round(ms, 1)
    del fn, latents, images
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'impl':<10} {'op':<7} {'size':>11} {'tiling':>10} {'peak GiB':>9} {'ms':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        c = row["case"]
        tiling = f"{c['tile_size']}/{c['tile_stride']}" if c["tiled"] else "untiled"
        peak = "-" if row["peak_vram_gib"] is None else f"{row['peak_vram_gib']:.3f}"
        ms = row.get("error") or f"{row['ms']:.1f}"
        print(f"{row['impl']:<10} {c['op']:<7} {c['height']:>5}x{c['width']:<5} {tiling:>10} {peak:>9} {ms:>10}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    vae = random_vae(TINY_VAE if args.tiny else REAL_VAE, device, DTYPES[args.dtype])
    ref = diffusers_twin(vae) if args.diffusers else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"
    print(f"Qwen-Image VAE ({'tiny' if args.tiny else 'real'}, {args.dtype}) on {gpu}")

    rows = [run_case(case, vae, ref, args) for case in cases(args)]
    print_table(rows)
    result = {
        "name": "vae_tiling",
        "gpu": gpu,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions("imagezoo", *(["diffusers"] if args.diffusers else [])),
        "command": shlex.join(["python", *sys.argv]),
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
