"""Latency of one Qwen-Image generation on 1 GPU vs N GPUs (CFG-parallel, Ulysses sequence-parallel), same run.

Weights are full-size and random (built on the meta device, allocated on each GPU, filled in place with the same
seed on every rank), so no download is needed; speed does not depend on the values. The text encoder (Qwen2.5-VL-7B
language model) is built on rank 0 only, as the parallel pipeline runs it there; every rank builds the DiT and the
VAE (ranks > 0 drop the VAE).

Each case is one full pipeline call (text encoding, N sampler steps with CFG 4, VAE decode to PIL), timed after a
2-step warm-up at the same size. `s_per_step` is the median time between step callbacks (each step ends in a host
sync, the pipeline's finiteness check); `ms_50_steps` = measured wall + (50 - steps) x s_per_step. The 1-GPU
baseline runs on rank 0 of the same processes, with the same weights, before the parallel cases. Every parallel
case's final latents are compared with the 1-GPU ones (`rel_l2`); the `floor` row compares the 1-GPU run with
itself under another exact attention kernel, the size of bf16 rounding differences alone.

    torchrun --nproc_per_node 2 benchmarks/parallel.py                    # 1024² and 1328², 10 timed steps
    torchrun --nproc_per_node 2 benchmarks/parallel.py --device cpu --tiny   # smoke check (gloo, tiny model)

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc., see `imagezoo.parallel.NO_MULTICAST_ENV`).
Rank 0 writes `benchmarks/results/parallel.json` (`parallel_tiny.json` with `--tiny`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

for _key, _value in {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}.items():
    os.environ.setdefault(_key, _value)  # before torch starts NCCL

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from report import versions, write_json  # noqa: E402

from imagezoo.interfaces import Components  # noqa: E402
from imagezoo.parallel import ParallelPipeline, init_distributed  # noqa: E402
from imagezoo.pipeline import Pipeline  # noqa: E402
from imagezoo.plugin_manager import get_kernel  # noqa: E402
from imagezoo.plugins.qwen_image.dit import REAL_DIT, TINY_DIT, QwenImageDiT  # noqa: E402
from imagezoo.plugins.qwen_image.family import QwenDenoiser  # noqa: E402
from imagezoo.plugins.qwen_image.text_encoder import (  # noqa: E402
    REAL_TEXT_ENCODER,
    TINY_TEXT_ENCODER,
    QwenTextEncoder,
)
from imagezoo.plugins.qwen_image.tokenizer import load_tokenizer, write_offline_tokenizer  # noqa: E402
from imagezoo.plugins.qwen_image.vae import REAL_VAE, TINY_VAE, QwenImageVAE  # noqa: E402

logger = logging.getLogger("benchmarks.parallel")
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "A coffee shop entrance with a chalkboard sign reading 'Qwen Coffee $2 per cup', a neon light beside it"
FULL_STEPS = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: a fast smoke check")
    parser.add_argument("--sizes", type=int, nargs="+", help="square sides in pixels (default 1024 1328)")
    parser.add_argument("--steps", type=int, default=10, help="timed sampler steps per case (default 10)")
    parser.add_argument("--modes", nargs="+", default=["auto", "sp"], help="parallel modes to time")
    parser.add_argument("--cfg", type=float, default=4.0, help="CFG scale (default 4)")
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="skip the bf16 floor row")
    parser.add_argument("--out", type=Path, help="JSON output path")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([128, 144] if args.tiny else [1024, 1328])
    args.out = args.out or RESULTS / ("parallel_tiny.json" if args.tiny else "parallel.json")
    return args


@torch.no_grad()
def _fill(module: torch.nn.Module, seed: int, device: torch.device) -> None:
    """Same values on every rank: a fixed order and seed (CUDA's generator gives the same stream on any GPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1 and not name.endswith("bias"):  # norm scales
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _random(module_factory: Any, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        module = module_factory()
    module = module.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    _fill(module, seed, device)
    return module


def build_components(env: Any, tiny: bool, dtype: torch.dtype) -> Components:
    """Random full-size (or tiny) DiT and VAE on every rank; the text encoder on rank 0 only."""
    device = env.device
    dit = _random(lambda: QwenImageDiT(TINY_DIT if tiny else REAL_DIT), device, dtype, seed=1)
    vae = _random(lambda: QwenImageVAE(TINY_VAE if tiny else REAL_VAE), device, dtype, seed=2)
    text_encoder = None
    modules: dict[str, torch.nn.Module] = {"dit": dit, "vae": vae}
    if env.rank == 0:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

        params = TINY_TEXT_ENCODER if tiny else REAL_TEXT_ENCODER
        model = _random(lambda: Qwen2_5_VLTextModel(params.text_config()), device, dtype, seed=3)
        # Non-persistent RoPE buffers were left empty by to_empty: rebuild them, as build_text_encoder does.
        model.rotary_emb = type(model.rotary_emb)(config=model.config).to(device)
        tokenizer = load_tokenizer(write_offline_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer"))
        text_encoder = QwenTextEncoder(model, tokenizer)
        modules["text_encoder"] = model
    return Components(text_encoder=text_encoder, denoiser=QwenDenoiser(dit), vae=vae, modules=modules)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(pipe: Pipeline, size: int, steps: int, cfg: float) -> dict[str, Any]:
    """Warm up at `size`, then time one full call; returns wall ms, per-step seconds and the final latents."""
    marks: list[float] = []
    final: list[torch.Tensor] = []

    def on_step(index: int, sigma: float, latents: torch.Tensor) -> None:
        marks.append(time.perf_counter())
        final[:] = [latents]

    call = {
        "prompt": PROMPT,
        "negative_prompt": " ",
        "cfg_scale": cfg,
        "height": size,
        "width": size,
        "seed": 0,
        "progress_bar_cmd": lambda x: x,
    }
    pipe(**call, num_inference_steps=2)
    device = pipe.device
    _sync(device)
    start = time.perf_counter()
    pipe(**call, num_inference_steps=steps, step_callback=on_step)
    _sync(device)
    wall = time.perf_counter() - start
    gaps = [b - a for a, b in itertools.pairwise(marks)]
    per_step = statistics.median(gaps) if gaps else wall / steps
    return {"ms": wall * 1000, "s_per_step": per_step, "latents": final[0].float().cpu()}


def _nccl_version() -> str | None:
    if not torch.cuda.is_available():
        return None
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _row(gpus: int, mode: str, size: int, steps: int, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
    ms_full = result["ms"] + (FULL_STEPS - steps) * result["s_per_step"] * 1000
    return {
        "impl": "imagezoo",
        "case": {"gpus": gpus, "mode": mode, "size": size, "steps": steps},
        "s_per_step": round(result["s_per_step"], 4),
        "ms": round(result["ms"], 1),
        "ms_50_steps": round(ms_full, 1),
        **extra,
    }


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    env = init_distributed(args.device)
    dtype = torch.float32 if env.device.type == "cpu" else torch.bfloat16
    entry = get_kernel().models.get("tiny" if args.tiny else "Qwen/Qwen-Image")
    t0 = time.perf_counter()
    components = build_components(env, args.tiny, dtype)
    _sync(env.device)
    logger.info("rank %d: built components in %.1f s", env.rank, time.perf_counter() - t0)
    pipe_args = {"defaults": entry.defaults, "dtype": dtype, "entry": entry}

    rows: list[dict[str, Any]] = []
    baseline: dict[int, dict[str, Any]] = {}
    if env.rank == 0:  # 1-GPU baseline, same weights; the other ranks wait
        single = Pipeline(components, device=env.device, **pipe_args)
        for size in args.sizes:
            baseline[size] = run_case(single, size, args.steps, args.cfg)
            rows.append(_row(1, "single", size, args.steps, baseline[size]))
            logger.info("1 GPU %d²: %s", size, rows[-1])
    dist.barrier()

    pipe = ParallelPipeline.from_components(components, env=env, parallel=args.modes[0], **pipe_args)
    runtime = pipe.parallel
    assert runtime is not None
    for mode in args.modes:
        runtime.mode = mode
        for size in args.sizes:
            result = run_case(pipe, size, args.steps, args.cfg)
            layout = runtime.last_layout.describe(runtime.sequence_parallel) if runtime.last_layout else mode
            if env.rank == 0:
                rel = _rel_l2(result["latents"], baseline[size]["latents"])
                rows.append(_row(env.world_size, layout, size, args.steps, result, rel_l2_vs_1gpu=rel))
                logger.info("%d GPUs %s %d²: %s", env.world_size, layout, size, rows[-1])
    pipe.close()
    dist.barrier()

    if env.rank == 0 and args.floor:
        # bf16 floor: the same 1-GPU computation with another exact attention kernel.
        size = args.sizes[-1]
        dit = components.modules["dit"]
        backend = dit.attention_backend
        dit.set_attention_backend("efficient" if env.device.type == "cuda" else "math")
        floor = run_case(Pipeline(components, device=env.device, **pipe_args), size, args.steps, args.cfg)
        dit.set_attention_backend(backend)
        rel = _rel_l2(floor["latents"], baseline[size]["latents"])
        rows.append(_row(1, "floor", size, args.steps, floor, rel_l2_vs_1gpu=rel))
        logger.info("floor %d²: %s", size, rows[-1])
    dist.barrier()

    if env.rank == 0:
        report = {
            "name": "parallel",
            "gpu": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else platform.processor(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {**versions("imagezoo"), "nccl": _nccl_version()},
            "command": f"torchrun --nproc_per_node {env.world_size} " + shlex.join(sys.argv),
            "world_size": env.world_size,
            "dtype": str(dtype).removeprefix("torch."),
            "cfg_scale": args.cfg,
            "rows": rows,
        }
        write_json(args.out, report)
        for row in rows:
            print(json.dumps(row))
        print(f"wrote {args.out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
